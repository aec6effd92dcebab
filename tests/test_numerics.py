"""Numerics per device and a training step that never waits for the device.

No GPU here: the precision choice is tested with mocked device properties, and "no host-device
synchronisation in the hot loop" with a dispatch mode that records every op that would make the
host wait for a GPU (``.item()`` / ``bool(tensor)``, boolean-mask indexing, ``nonzero``,
``bincount``...) while the real training step runs on the CPU: the CPU runs the same code path
(fused optimizer, sync-free quantizer) that a GPU does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from speechvq import numerics
from speechvq.nn.augment import augment_mels
from speechvq.trainer import TrainerConfig
from speechvq.vqvae import build_vqvae

# ops whose output (or whose implementation) depends on tensor values the host must read
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "nonzero_static",
            "masked_select", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
            "equal", "allclose", "masked_scatter", "histc"}


class SyncRecorder(TorchDispatchMode):
    """Records the ops that would make the host wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        flagged = name in SYNC_OPS
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # x[mask]
            indices = args[1] if len(args) > 1 else []
            flagged = any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
        if name == "repeat_interleave" and func._overloadname.startswith("Tensor"):
            flagged = kwargs.get("output_size") is None
        if flagged:
            self.seen.append(f"{name}.{func._overloadname}")
        return func(*args, **kwargs)


def _props(major: int):
    return lambda device=None: SimpleNamespace(major=major, minor=0, name=f"sm{major}0")


@pytest.mark.parametrize("major, expected", [(7, torch.float16), (6, torch.float16),
                                             (8, torch.bfloat16), (9, torch.bfloat16)])
def test_auto_precision_never_picks_emulated_bf16(monkeypatch, major, expected):
    """V100 (7.0), P100 (6.0) emulate bf16, which torch.cuda.is_bf16_supported() counts: they get
    fp16 + GradScaler. A100 (8.0) and H100 (9.0) get bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_properties", _props(major))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cuda = torch.device("cuda", 0)
    assert numerics.autocast_dtype("auto", cuda) == expected
    assert numerics.autocast_dtype("bf16", cuda) == torch.bfloat16  # asked for: given
    assert numerics.autocast_dtype("fp32", cuda) is None
    assert numerics.autocast_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="precision"):
        numerics.autocast_dtype("fp8", cuda)


def test_exact_numerics_turns_tf32_off_and_puts_it_back():
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else None
    for tf32 in (True, False):
        numerics.set_tf32(tf32)
        torch.backends.cudnn.benchmark = True
        with numerics.exact_numerics():
            assert not numerics.tf32_enabled() and not numerics.conv_tf32()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert numerics.tf32_enabled() == tf32 and numerics.conv_tf32() == tf32
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    if saved is not None:  # torch's own "none" (set_float32_matmul_precision decides) comes back
        matmul.fp32_precision = "none"
        with numerics.exact_numerics():
            assert matmul.fp32_precision == "ieee"
        assert matmul.fp32_precision == "none"
        matmul.fp32_precision = saved
    numerics.set_tf32(False)
    torch.backends.cudnn.benchmark = False


def test_a_non_finite_step_is_skipped_on_the_device():
    model = torch.nn.Linear(3, 1)
    opt = numerics.build_optimizer(model, "adamw", 0.1, (0.9, 0.99), 0.0, torch.device("cpu"))
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with SyncRecorder() as rec:
        numerics.optimizer_step(opt, torch.isfinite(torch.tensor(float("nan"))))
    assert rec.seen == []
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    numerics.optimizer_step(opt, torch.tensor(True))
    assert not torch.equal(before[0], model.weight.detach())


def test_learning_rate_follows_the_ranks_by_the_stated_rule(trainer_cfg):
    tc = TrainerConfig.from_mapping(trainer_cfg(lr=4e-4, batch_size=64))
    assert tc.scaled_lr(1) == pytest.approx(4e-4)
    assert tc.scaled_lr(4) == pytest.approx(8e-4)  # sqrt(4 x 64 / 64)
    lin = TrainerConfig.from_mapping(trainer_cfg(lr=4e-4, batch_size=64, lr_scaling="linear",
                                                 lr_base_batch=32))
    assert lin.scaled_lr(2) == pytest.approx(4e-4 * 4)
    flat = TrainerConfig.from_mapping(trainer_cfg(lr_scaling="none"))
    assert flat.scaled_lr(8) == flat.lr


@pytest.mark.parametrize("extra", [{}, {"pitch": True, "augment": True}])
def test_a_vqvae_training_step_never_waits_for_the_device(tiny_vqvae_cfg, extra):
    cfg = tiny_vqvae_cfg("mel", n_codes=64)
    cfg["model"]["pitch"]["enabled"] = bool(extra.get("pitch"))
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=3).train()
    opt = numerics.build_optimizer(model, "adamw", 1e-3, (0.9, 0.99), 0.0, torch.device("cpu"))
    B, F = 4, 64
    batch = {"feats": torch.randn(B, 80, F), "speaker": torch.tensor([0, 1, 2, 0]),
             "mask": torch.arange(F // 2)[None] < torch.tensor([32, 20, 32, 9])[:, None],
             "pitch": torch.randn(B, 2, F)}

    def step() -> None:
        feats = batch["feats"]
        if extra.get("augment"):
            feats = augment_mels(feats, warp=0.1, eq=0.5, bandlimit=0.5, min_bins=40, mask=0.3)
        out = model({**batch, "encoder_input": feats})
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        numerics.optimizer_step(opt, torch.isfinite(norm))

    step()  # the first step initialises the codebook (k-means): it may wait, once per run
    model.quantizer.cluster_size[:5] = 0.0  # dead codes: restarted without waiting either
    with SyncRecorder() as rec:
        for _ in range(3):
            step()
    assert rec.seen == [], rec.seen
    assert bool((model.quantizer.cluster_size[:5] >= model.quantizer.dead_threshold * 0.9).all())


def test_the_fit_loop_waits_only_at_log_steps(tmp_path, monkeypatch, compose_cfg, tone_corpus):
    """The whole training step of the fit loop (batch to device, forward, backward, clip, optimizer,
    scheduler, meters) on the VQ-VAE task, recorded step by step."""
    import speechvq.training as training
    from speechvq.tasks import VQVAETask

    manifest = tone_corpus(tmp_path, n=4, seconds=1.0)
    cfg = compose_cfg("train", [f"data.manifest={manifest}", "out_dir=unused",
                                "data.crop_seconds=0.32", "data.features_on=device",
                                "model.encoder.channels=16", "model.decoder.channels=16",
                                "model.encoder.out_channels=8", "model.decoder.speaker_dim=8",
                                "quantizer.n_codes=16", "quantizer.kmeans_iters=2"], plain=True)
    seen: list[list[str]] = []
    real = training._Loop._train_step

    def recorded(self, batch):
        with SyncRecorder() as rec:
            real(self, batch)
        seen.append(rec.seen)

    monkeypatch.setattr(training._Loop, "_train_step", recorded)
    torch.manual_seed(0)
    task = VQVAETask(cfg, out_dir=tmp_path / "exp", progress=False)
    trainer = {**cfg["trainer"], "max_steps": 6, "batch_size": 2, "log_every": 3,
               "valid_every": None, "media_every": None, "save_every": 6, "warmup_steps": 2}
    training.fit(task, trainer, tmp_path / "exp", config=cfg)
    assert len(seen) == 6
    assert seen[1:] == [[]] * 5, seen  # after the codebook's k-means init: nothing waits


def test_bench_gpu_runs_its_paths_on_the_cpu(tmp_path):
    """benchmarks/bench_gpu.py (the check a person with a GPU runs) on the CPU: the fit loop, the
    bare model step, units at two batch sizes compared, with tiny arguments."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--steps", "4", "--model-steps", "1",
         "--utterances", "4", "--workers", "1", "--models", "mel", "--work", str(tmp_path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| fp32 |" in proc.stdout and "0 not float ties" in proc.stdout
    result = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert result["loop"][0]["syncs"] == [] and result["units"]["cpu batch 60 s vs 8 s"]["frames"]
