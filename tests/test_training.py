"""The fit loop on a toy task (exact resume, stops, TensorBoard, best.pt) and the VQ-VAE task."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from speechvq.checkpoint import load_checkpoint
from speechvq.data.dataset import train_batches, valid_batches
from speechvq.tasks import Task
from speechvq.training import (
    TrainerConfig,
    TrainingError,
    fit,
    lr_factor,
)

CONF = Path(__file__).resolve().parents[1] / "conf"


def _trainer(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    cfg.update(
        batch_size=4,
        warmup_steps=2,
        log_every=2,
        valid_every=4,
        save_every=4,
        media_every=4,
        lr=1e-2,
        precision="fp32",
    )
    cfg.update(overrides)
    return cfg


# ---------------------------------------------------------------- a toy task


class _ToySet(Dataset):
    """Items depend on (index, epoch) only, like CropDataset's random crops."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        x = torch.randn(4, generator=g)
        noise = torch.randn(4, generator=torch.Generator().manual_seed(i + 77 * self.epoch))
        return {"x": x + 0.1 * noise, "y": x.sum(0, keepdim=True)}


class _ToyModel(nn.Module):
    """Dropout and a randomly restarted EMA buffer: training consumes the RNG like a VQ-VAE."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(4, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1)
        )
        self.register_buffer("ema", torch.zeros(hidden))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net[1](self.net[0](x))
        if self.training:
            with torch.no_grad():
                self.ema.mul_(0.9).add_(0.1 * h.mean(0))
                dead = self.ema < 1e-3
                self.ema[dead] = torch.rand(int(dead.sum()))  # "dead-code restart"
        return self.net[3](self.net[2](h)), self.ema


class _ToyTask:
    kind = "vqvae"

    def __init__(self, n_train: int = 40, n_valid: int | None = 12, hidden: int = 16) -> None:
        torch.manual_seed(0)
        self.model = _ToyModel(hidden)
        self.model_config = {"hidden": hidden}
        self.meta = {"speakers": ["a"], "note": "toy"}
        self.train_set = _ToySet(n_train, seed=1)
        self.valid_set = _ToySet(n_valid, seed=2) if n_valid else None
        self.steps_seen = 0
        self.media_steps: list[int] = []
        self.on_step = None
        self.valid_penalty = 0.0

    def collate(self, items: list) -> dict:
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    def step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        pred, ema = model(batch["x"])
        loss = (pred - batch["y"]).pow(2).mean()
        if model.training:
            self.steps_seen += 1
            if self.on_step:
                self.on_step(self.steps_seen)
        else:
            loss = loss + self.valid_penalty
        return {"loss": loss, "mse": loss.detach(), "usage": (ema > 0.05).float().mean()}

    def log_media(self, model: nn.Module, writer, step: int) -> None:
        self.media_steps.append(step)
        torch.rand(10)  # media may use the RNG (Griffin-Lim does): must not change training
        writer.add_audio("toy/audio", torch.sin(torch.arange(1600) * 0.1), step, sample_rate=16000)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


# ---------------------------------------------------------------- pure helpers


def test_task_protocol_and_trainer_config() -> None:
    assert isinstance(_ToyTask(), Task)
    with pytest.raises(TrainingError, match="unknown key.*max_step"):
        TrainerConfig.from_mapping({**_trainer(), "max_step": 3})
    cfg = _trainer()
    del cfg["lr"]
    with pytest.raises(TrainingError, match=r"missing key.*'lr'"):
        TrainerConfig.from_mapping(cfg)


def test_lr_schedule() -> None:
    tc = TrainerConfig.from_mapping(_trainer(warmup_steps=10, max_steps=110, min_lr_ratio=0.1))
    assert lr_factor(0, tc) == pytest.approx(0.1)
    assert lr_factor(9, tc) == pytest.approx(1.0)
    assert lr_factor(10, tc) == pytest.approx(1.0)
    assert lr_factor(60, tc) == pytest.approx(0.55)
    assert lr_factor(110, tc) == pytest.approx(0.1) == lr_factor(500, tc)
    const = TrainerConfig.from_mapping(_trainer(warmup_steps=0, schedule="constant"))
    assert lr_factor(0, const) == lr_factor(10**6, const) == 1.0


def test_batches_are_deterministic_and_sharded() -> None:
    a = train_batches(23, 4, seed=3, epoch=1)
    assert a == train_batches(23, 4, seed=3, epoch=1)
    assert a != train_batches(23, 4, seed=3, epoch=2)
    assert len(a) == 5 and all(len(b) == 4 for b in a)
    r0 = train_batches(23, 4, seed=3, epoch=1, rank=0, world_size=2)
    r1 = train_batches(23, 4, seed=3, epoch=1, rank=1, world_size=2)
    assert len(r0) == len(r1) == 2
    flat = [i for b in r0 + r1 for i in b]
    assert len(set(flat)) == 16  # disjoint shards
    v0, v1 = valid_batches(5, 2, 0, 2), valid_batches(5, 2, 1, 2)
    assert len(v0) == len(v1) and {i for b in v0 + v1 for i in b} == set(range(5))


# ---------------------------------------------------------------- the loop


def test_exact_resume_after_max_steps(tmp_path: Path) -> None:
    """2N steps in one go == N steps, then resume to 2N (same config, cosine over 2N)."""
    full = fit(_ToyTask(), _trainer(max_steps=24, decay_steps=24), tmp_path / "full")
    assert full["step"] == 24 and full["stopped"] == "max_steps"
    # 10 batches per epoch: the stop at step 14 is mid-epoch
    half = fit(_ToyTask(), _trainer(max_steps=14, decay_steps=24), tmp_path / "split")
    assert half["step"] == 14
    assert load_checkpoint(tmp_path / "split/checkpoints/last.pt")["step"] == 14
    task = _ToyTask()
    resumed = fit(task, _trainer(max_steps=24, decay_steps=24), tmp_path / "split", resume=True)
    assert resumed["step"] == 24 and task.steps_seen == 10
    _assert_same_weights(
        tmp_path / "full/checkpoints/last.pt", tmp_path / "split/checkpoints/last.pt"
    )
    a = load_checkpoint(tmp_path / "full/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "split/checkpoints/last.pt")
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 24


@pytest.mark.parametrize("sig, reason", [(signal.SIGTERM, "sigterm"), (signal.SIGINT, "interrupt")])
def test_signal_saves_and_resume_is_exact(tmp_path: Path, sig: int, reason: str) -> None:
    full = fit(_ToyTask(), _trainer(max_steps=16), tmp_path / "full")
    assert full["stopped"] == "max_steps"
    task = _ToyTask()
    task.on_step = lambda n: os.kill(os.getpid(), sig) if n == 7 else None
    before = signal.getsignal(sig)
    stopped = fit(task, _trainer(max_steps=16), tmp_path / "killed")
    assert stopped["stopped"] == reason and stopped["step"] == 7
    assert signal.getsignal(sig) is before  # handlers put back
    ckpt = load_checkpoint(tmp_path / "killed/checkpoints/last.pt")
    assert ckpt["step"] == 7 and ckpt["kind"] == "vqvae" and ckpt["meta"]["note"] == "toy"
    assert ckpt["model_config"] == {"hidden": 16}
    fit(_ToyTask(), _trainer(max_steps=16), tmp_path / "killed", resume=True)
    _assert_same_weights(
        tmp_path / "full/checkpoints/last.pt", tmp_path / "killed/checkpoints/last.pt"
    )


def test_resume_refusals(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"last\.pt: no checkpoint to resume from"):
        fit(_ToyTask(), _trainer(max_steps=2), tmp_path, resume=True)
    fit(_ToyTask(), _trainer(max_steps=2), tmp_path, resume="auto")  # nothing there: fresh
    with pytest.raises(TrainingError, match=r"last\.pt already exists: pass resume=true"):
        fit(_ToyTask(), _trainer(max_steps=4), tmp_path)
    with pytest.raises(TrainingError, match=r"model_config\.hidden: 16 != 8"):
        fit(_ToyTask(hidden=8), _trainer(max_steps=4), tmp_path, resume=True)
    out = fit(_ToyTask(), _trainer(max_steps=2), tmp_path, resume=True)  # already done
    assert out["step"] == 2 and out["stopped"] == "max_steps"


def test_max_minutes_stops_and_saves(tmp_path: Path) -> None:
    out = fit(_ToyTask(), _trainer(max_steps=10**6, max_minutes=0.0), tmp_path)
    assert out["stopped"] == "max_minutes" and out["step"] == 1
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["step"] == 1
    # the end of the time budget is validated: best.pt is the model the run ended with, not one
    # valid_every (4) steps older, nor missing
    assert math.isfinite(out["best"]) and out["valid_loss"] is not None
    assert load_checkpoint(tmp_path / "checkpoints/best.pt")["step"] == 1


def test_tensorboard_scalars_audio_and_best(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task = _ToyTask()
    valid_seen: list[tuple[int, float]] = []
    out = fit(task, _trainer(max_steps=12, lr=0.05), tmp_path)
    assert task.media_steps == [4, 8, 12]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "audio": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/mse",
        "train/usage",
        "train/lr",
        "train/steps_per_sec",
        "train/grad_norm",
        "valid/loss",
        "valid/mse",
    ):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4, 6, 8, 10, 12]
    valid_seen = [(e.step, e.value) for e in acc.Scalars("valid/loss")]
    assert [s for s, _ in valid_seen] == [4, 8, 12]
    audio = acc.Audio("toy/audio")
    assert audio and all(a.sample_rate == 16000 for a in audio)
    # best.pt holds the step with the lowest validation loss, and only that one
    best_step, best_loss = min(valid_seen, key=lambda sv: sv[1])
    best = load_checkpoint(tmp_path / "checkpoints/best.pt")
    assert best["step"] == best_step and best["best"] == pytest.approx(best_loss, rel=1e-5)
    assert out["best"] == pytest.approx(best_loss, rel=1e-5)


def test_best_only_updates_when_validation_improves(tmp_path: Path) -> None:
    task = _ToyTask()
    fit(task, _trainer(max_steps=8, lr=0.02), tmp_path)
    first = load_checkpoint(tmp_path / "checkpoints/best.pt")
    assert first["step"] in (4, 8)
    worse = _ToyTask()
    worse.valid_penalty = 100.0  # validation gets worse from now on
    fit(worse, _trainer(max_steps=16, lr=0.02), tmp_path, resume=True)
    later = load_checkpoint(tmp_path / "checkpoints/best.pt")
    last = load_checkpoint(tmp_path / "checkpoints/last.pt")
    assert last["step"] == 16 and last["valid_loss"] > first["best"]
    assert later["step"] == first["step"]
    assert later["best"] == first["best"]


def test_without_validation_best_tracks_train_loss(tmp_path: Path) -> None:
    out = fit(_ToyTask(n_valid=None), _trainer(max_steps=8), tmp_path)
    best = load_checkpoint(tmp_path / "checkpoints/best.pt")
    assert math.isfinite(best["best"]) and best["best"] == out["best"]


def test_too_small_training_set(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"3 items, fewer than batch_size \(4\)"):
        fit(_ToyTask(n_train=3), _trainer(max_steps=2), tmp_path)


# ---------------------------------------------------------------- the VQ-VAE task (real model)

SR = 16000
TINY_MEL = [
    "model.encoder.channels=16",
    "model.encoder.out_channels=8",
    "model.decoder.channels=16",
    "model.decoder.speaker_dim=8",
    "quantizer.n_codes=16",
    "quantizer.kmeans_iters=2",
]
TINY_WAVE = [
    "model=wave",
    "model.encoder.channels=[8,8,8,8]",
    "model.encoder.out_channels=8",
    "model.decoder.channels=[8,8,8,8,8]",
    "model.decoder.speaker_dim=8",
    "quantizer.n_codes=16",
    "quantizer.kmeans_iters=2",
    "model.stft_resolutions=[[256,64,256]]",
]


def _write_corpus(root: Path, with_valid: bool = True) -> tuple[Path, Path | None]:
    """Two speakers of noisy tones (and a third only in validation), as FLAC + manifests."""
    import numpy as np
    import soundfile as sf

    from speechvq.data.manifest import ManifestRow, write_manifest

    rng = np.random.default_rng(0)
    rows: dict[str, list] = {"train": [], "valid": []}
    plan = [
        ("train", "ann", 220.0, 4),
        ("train", "bob", 330.0, 4),
        ("valid", "ann", 230.0, 1),
        ("valid", "cid", 180.0, 1),
    ]
    for split, spk, freq, n_utts in plan:
        (root / spk).mkdir(parents=True, exist_ok=True)
        for i in range(n_utts):
            n = int((0.5 + 0.1 * i) * SR)
            t = np.arange(n) / SR
            wav = 0.3 * np.sin(2 * np.pi * freq * (1 + 0.1 * i) * t) + 0.03 * rng.standard_normal(n)
            path = root / spk / f"{split}{i}.flac"
            sf.write(path, wav.astype(np.float32), SR)
            rows[split].append(ManifestRow(f"{spk}-{split}{i}", str(path), n, spk))
    write_manifest(root / "train.tsv", rows["train"])
    if not with_valid:
        return root / "train.tsv", None
    write_manifest(root / "valid.tsv", rows["valid"])
    return root / "train.tsv", root / "valid.tsv"


def _train_cfg(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["out_dir=unused", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    return _write_corpus(tmp_path_factory.mktemp("corpus"))


def _vq_trainer(**overrides) -> dict:
    return _trainer(
        batch_size=2, log_every=2, valid_every=3, save_every=3, media_every=3, lr=2e-3, **overrides
    )


def test_train_config_composes() -> None:
    cfg = _train_cfg(["data.manifest=m.tsv"])
    assert cfg["data"]["manifest"] == "m.tsv" and cfg["resume"] is False
    assert cfg["device"] == "auto" and cfg["model"]["kind"] == "mel"
    assert cfg["quantizer"]["ema"] is True
    TrainerConfig.from_mapping(cfg["trainer"])
    gpu = _train_cfg(["data.manifest=m.tsv", "trainer=gpu"])
    TrainerConfig.from_mapping(gpu["trainer"])
    assert gpu["trainer"]["batch_size"] == 64 and gpu["trainer"]["lr"] == cfg["trainer"]["lr"]


@pytest.mark.parametrize("extra", [[], ["model.loss_weights.adv=0.1", "model.loss_weights.fm=1.0",
                                          "data.augment.mask=0.3"]], ids=["defaults", "adversarial"])
def test_vqvae_task_exact_resume_and_meta(tmp_path: Path, corpus, extra: list[str]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from speechvq.tasks import VQVAETask
    from speechvq.vqvae import load_vqvae

    train, valid = corpus
    cfg = _train_cfg(
        [
            f"data.manifest={train}",
            f"data.valid_manifest={valid}",
            "data.crop_seconds=0.32",
            "data.media_seconds=0.5",
            *TINY_MEL,
            *extra,
        ]
    )

    def task() -> VQVAETask:
        torch.manual_seed(0)
        return VQVAETask(cfg, out_dir=tmp_path, progress=False)

    tc = _vq_trainer(max_steps=6, decay_steps=6)
    fit(task(), tc, tmp_path / "full", seed=0, config=cfg)
    no_media = {**tc, "media_every": None}  # media cannot change training (toy test above)
    fit(task(), {**no_media, "max_steps": 4}, tmp_path / "split", seed=0, config=cfg)
    fit(task(), no_media, tmp_path / "split", resume=True, seed=0, config=cfg)
    full, split = tmp_path / "full/checkpoints/last.pt", tmp_path / "split/checkpoints/last.pt"
    wa, wb = _weights(full), _weights(split)
    assert "quantizer.codebook" in wa and "quantizer.embed_sum" in wa
    assert any(k.startswith("discriminator.") for k in wa) == bool(extra)
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key  # bitwise
    # stats.json was absent: computed (and saved); meta rebuilds everything
    assert (tmp_path / "stats.json").exists()
    model, meta = load_vqvae(split)
    assert meta.speakers == ["ann", "bob", "cid"] and meta.kind == "mel"
    assert meta.n_codes == 16 and meta.unit_rate == 50.0
    assert meta.features["n_mels"] == 80 and meta.features["normalize"] == "speaker"
    assert set(meta.stats["speakers"]) == {"ann", "bob", "cid"}  # valid-only speaker added
    assert bool(model.quantizer.inited)
    ckpt = load_checkpoint(split, kind="vqvae")
    assert ckpt["config"]["data"]["manifest"] == str(train) and ckpt["step"] == 6
    acc = EventAccumulator(
        str(tmp_path / "full/tb"), size_guidance={"scalars": 0, "audio": 0, "images": 0}
    )
    acc.Reload()
    tags = acc.Tags()
    for tag in (
        "train/loss",
        "train/recon",
        "train/vq_commit",
        "train/perplexity",
        "train/usage",
        "train/dead_codes",
        "train/lr",
        "train/steps_per_sec",
        "valid/loss",
        "valid/recon",
        "valid/perplexity",
    ):
        assert tag in tags["scalars"], tag
    assert "media/mel" in tags["images"]
    for tag in ("media/reconstruction", "media/original", "media/original_griffin_lim"):
        assert tag in tags["audio"], tag
        assert all(a.sample_rate == 16000 for a in acc.Audio(tag))
    assert [a.step for a in acc.Audio("media/reconstruction")] == [3, 6]


def test_wave_task_trains_and_logs_media(tmp_path: Path) -> None:
    from speechvq.tasks import VQVAETask

    train, _ = _write_corpus(tmp_path / "corpus", with_valid=False)
    cfg = _train_cfg(
        [f"data.manifest={train}", "data.crop_seconds=0.32", "data.media_seconds=0.4", *TINY_WAVE]
    )
    torch.manual_seed(0)
    task = VQVAETask(cfg, out_dir=tmp_path / "exp", progress=False)
    assert task.valid_set is None and task.meta["kind"] == "wave"
    assert task.meta["stats"] is None  # the wave model needs no mel statistics
    out = fit(task, _vq_trainer(max_steps=3), tmp_path / "exp", config=cfg)
    assert out["step"] == 3 and math.isfinite(out["best"])
    assert (tmp_path / "exp/checkpoints/best.pt").exists()
    assert list((tmp_path / "exp/tb").glob("events.out.tfevents.*"))


def test_cli_user_errors_are_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).with_name("speechvq-train")
    missing = tmp_path / "nowhere.tsv"
    proc = subprocess.run([str(exe), f"data.manifest={missing}", f"out_dir={tmp_path / 'exp'}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    text = proc.stdout + proc.stderr
    assert "nowhere.tsv" in text and "Traceback" not in text


def test_resume_takes_the_new_learning_rate(tmp_path: Path) -> None:
    fit(_ToyTask(), _trainer(max_steps=4, schedule="constant", warmup_steps=0), tmp_path)
    fit(_ToyTask(), _trainer(max_steps=6, schedule="constant", warmup_steps=0, lr=0.5,
                             weight_decay=0.1), tmp_path, resume=True)
    ckpt = load_checkpoint(tmp_path / "checkpoints/last.pt")
    group = ckpt["optimizer"]["param_groups"][0]
    assert group["lr"] == 0.5 and group["weight_decay"] == 0.1
    assert ckpt["scheduler"]["base_lrs"] == [0.5]


# ---------------------------------------------------------------- faults: full disk, kills, resume


def _fail_saves_from(monkeypatch, step: int) -> None:
    """torch.save fails as on a full disk (inside its writer, as a real one does) from ``step``."""
    import errno

    real = torch.save

    class _Full:
        def __init__(self, f) -> None:
            self.f, self.written = f, 0

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    def save(obj, f, *args, **kwargs):
        target = _Full(f) if obj.get("step", 0) >= step else f
        return real(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_full_disk_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from speechvq.files import WriteError

    _fail_saves_from(monkeypatch, step=8)
    with pytest.raises(WriteError) as err:
        fit(_ToyTask(), _trainer(max_steps=12), tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    assert str(err.value) in (f"cannot write {last}: No space left on device",
                              f"cannot write {last.with_name('best.pt')}: No space left on device")
    assert load_checkpoint(last)["step"] == 4  # the previous good checkpoint survives
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.pt", "last.pt"]  # no temp


def test_cli_full_disk_is_one_line_naming_the_file(tmp_path: Path, corpus) -> None:
    import subprocess
    import sys

    train, valid = corpus
    exp = tmp_path / "exp"
    script = (
        "import errno, os, sys, torch\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if obj.get('step', 0) >= 2:\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "from speechvq.cli.train import main\n"
        "sys.argv = ['speechvq-train', *sys.argv[1:]]\n"
        "main()\n"
    )
    args = [f"data.manifest={train}", f"out_dir={exp}", "data.crop_seconds=0.32",
            "trainer.max_steps=3", "trainer.save_every=1", "trainer.valid_every=null",
            "trainer.media_every=null", "trainer.batch_size=2", "trainer.precision=fp32",
            *TINY_MEL]
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "ERROR" in ln or "Traceback" in ln]
    assert proc.returncode == 2, lines[-20:]
    assert len(errors) == 1, errors
    last = exp / "checkpoints" / "last.pt"
    assert errors[0].endswith(f"cannot write {last}: No space left on device")
    assert load_checkpoint(last)["step"] == 1


def test_stale_checkpoint_temps_are_removed_when_a_run_resumes(tmp_path: Path) -> None:
    fit(_ToyTask(), _trainer(max_steps=4), tmp_path)
    ckpts = tmp_path / "checkpoints"
    stale = [ckpts / ".last.pt.k2j_x9ab.tmp", ckpts / ".best.pt.0abcdefg.tmp"]
    others = [ckpts / ".notes.tmp", ckpts / "last.pt.bak", ckpts / ".last.pt.tmp"]
    for path in stale + others:
        path.write_bytes(b"debris of a killed write")
    fit(_ToyTask(), _trainer(max_steps=6), tmp_path, resume=True)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)  # only the checkpoint writes' temp pattern


def _scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    skip = ("train/steps_per_sec",)  # wall-clock
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"] if tag not in skip}


@pytest.mark.parametrize("kill_at", [6, 7, 8])  # a log step, neither, a save step
def test_tensorboard_of_a_resumed_run_equals_the_uninterrupted_one(tmp_path: Path,
                                                                    kill_at: int) -> None:
    """log_every=3 does not divide save_every=4: the interval running at the save goes on."""
    tc = _trainer(max_steps=14, log_every=3, save_every=4, valid_every=4, media_every=None)
    fit(_ToyTask(n_valid=None), tc, tmp_path / "full")
    task = _ToyTask(n_valid=None)
    task.on_step = lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == kill_at else None
    assert fit(task, tc, tmp_path / "split")["stopped"] == "sigterm"
    fit(_ToyTask(n_valid=None), tc, tmp_path / "split", resume=True)
    full, split = _scalars(tmp_path / "full/tb"), _scalars(tmp_path / "split/tb")
    assert [s for s, _ in full["train/loss"]] == [3, 6, 9, 12, 14]
    assert split == full
    _assert_same_weights(tmp_path / "full/checkpoints/best.pt",
                         tmp_path / "split/checkpoints/best.pt")
