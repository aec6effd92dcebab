"""The GPU check: is training fast and sync-free, and are units the same on CUDA as on the CPU?

    python benchmarks/bench_gpu.py [--work /tmp/bench_gpu] [--steps 150] [--utterances 100]
        [--device cuda]

Run it on a machine with a GPU (under 5 minutes on one). On the shipped mini corpus (prepared into
WORK/data on the first run), with the default mel model:

1. training steps/s of the fit loop for each precision the GPU has (fp32 with TF32, bf16 where the
   GPU computes it natively, fp16 + GradScaler), the real loader feeding it (``trainer=gpu``,
   features made on the GPU), and of the bare model step (batch 64 resident on the GPU) for
   ``model=mel`` and ``model=mel_large``;
2. host-device synchronisations inside training steps after the first (which initialises the
   codebook), caught by ``torch.cuda.set_sync_debug_mode("warn")``: there must be none;
3. the units of ``--utterances`` utterances extracted on CUDA and on the CPU, each at two batch
   sizes, from the checkpoint of the fp32 run: any difference that is not a float tie (the two
   codes' squared distances, recomputed in fp64 on the CPU, within 1e-4 of each other, relatively)
   is a mismatch;
4. the extraction real-time factor on CUDA;
5. with two GPUs or more: a 2-process DDP run (``torchrun --nproc_per_node=2``) whose replicas
   must agree.

Exits 1 on any sync in the steady loop, unit mismatch or DDP failure. ``--device cpu`` runs the
same paths on the CPU (no precisions but fp32, no sync mode, CPU against CPU): the suite's smoke
test does that.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import speechvq  # noqa: E402, F401
import speechvq.training as training  # noqa: E402
from speechvq.data.manifest import read_manifest  # noqa: E402
from speechvq.extract import ChunkedEncoder, ModelInput, extract_units, extraction_numerics  # noqa: E402
from speechvq.features import stats_for_rows  # noqa: E402
from speechvq.numerics import autocast_dtype, build_optimizer, native_bf16  # noqa: E402
from speechvq.tasks import VQVAETask  # noqa: E402
from speechvq.vqvae import build_vqvae, load_vqvae  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TIE = 1e-4


def _cfg(name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(name, overrides=overrides), resolve=True)


def prepare(work: Path) -> Path:
    data = work / "data"
    if not (data / "manifest.tsv").exists():
        subprocess.run([sys.executable, "-m", "speechvq.cli.prepare", "data=mini",
                        f"out_dir={data}", "progress=false"], check=True, capture_output=True)
    return data


def loop_rate(data: Path, work: Path, precision: str, steps: int, device: str,
              workers: int) -> dict:
    """Steps/s of the fit loop and the syncs it made after its first step."""
    name = f"run_{precision}"
    cfg = _cfg("train", [f"data.manifest={data / 'train.tsv'}", f"out_dir={work / name}",
                         "trainer=gpu", f"trainer.precision={precision}", f"device={device}",
                         f"trainer.num_workers={workers}"])
    times: list[float] = []
    syncs: list[str] = []
    real = training._Loop._train_step

    def step(self, batch):  # type: ignore[no-untyped-def]
        if self.device.type == "cuda" and times:
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            real(self, batch)
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode(0)
        syncs.extend(str(w.message).splitlines()[0] for w in caught
                     if "synchroniz" in str(w.message).lower())
        times.append(time.perf_counter())

    training._Loop._train_step = step
    try:
        torch.manual_seed(0)
        task = VQVAETask(cfg, out_dir=work / name, progress=False)
        trainer = {**cfg["trainer"], "max_steps": steps, "valid_every": None,
                   "media_every": None, "save_every": steps, "log_every": 50}
        training.fit(task, trainer, work / name, config=cfg, device=device)
    finally:
        training._Loop._train_step = real
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    skip = min(20, len(times) // 4)
    rate = (len(times) - 1 - skip) / max(times[-1] - times[skip], 1e-9)
    return {"precision": precision, "steps_per_s": rate, "syncs": syncs,
            "checkpoint": str(work / name / "checkpoints" / "last.pt")}


def model_rate(model_name: str, precision: str, device: torch.device, steps: int) -> float:
    """Steps/s of the bare model (forward, backward, fused AdamW) on a resident batch of 64."""
    cfg = _cfg("train", ["data.manifest=unused", "out_dir=unused", f"model={model_name}"])
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=8).to(device).train()
    opt = build_optimizer(model, "adamw", 4e-4, (0.9, 0.999), 0.0, device)
    dtype = autocast_dtype(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    batch = {"feats": torch.randn(64, 80, 128, device=device),
             "speaker": torch.randint(0, 8, (64,), device=device),
             "mask": torch.ones(64, 64, dtype=torch.bool, device=device)}

    def one() -> None:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(5):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - t0)


def units_on(ckpt: str, rows: list, device: torch.device, batch_seconds: float
             ) -> tuple[dict, float]:
    model, meta = load_vqvae(ckpt, map_location=device)
    stats, _ = stats_for_rows(meta.features, meta.stats, rows, progress=False)
    make = ModelInput(model.kind, model.samples_per_unit, model.sample_rate, meta.features, stats)
    with extraction_numerics(device):
        encoder = ChunkedEncoder(model, 30.0, None, batch_seconds, device)
        result = extract_units(rows, make, encoder, num_workers=0, progress=False)
    return result.units, result.realtime_factor


def compare(ckpt: str, rows: list, a: dict, b: dict) -> dict:
    """Frames whose units differ, and how many are not float ties (fp64 distances on the CPU)."""
    model, meta = load_vqvae(ckpt)
    model = model.double()
    stats, _ = stats_for_rows(meta.features, meta.stats, rows, progress=False)
    make = ModelInput(model.kind, model.samples_per_unit, model.sample_rate, meta.features, stats)
    codebook = model.quantizer.decode_codes().double()
    differ, real, worst = 0, 0, 0.0
    by_id = {r.id: r for r in rows}
    for utt, ua in a.items():
        frames = np.nonzero(ua != b[utt])[0]
        if not len(frames):
            continue
        differ += len(frames)
        x = make(by_id[utt].path, by_id[utt].speaker).double()[None]
        with torch.no_grad():
            z = model.encoder(x)[0].T  # (U, D)
        for f in frames:
            da = float((z[f] - codebook[int(ua[f])]).pow(2).sum())
            db = float((z[f] - codebook[int(b[utt][f])]).pow(2).sum())
            rel = abs(da - db) / max(da, db, 1e-12)
            worst = max(worst, rel)
            real += rel > TIE
    frames = sum(len(u) for u in a.values())
    return {"frames": frames, "differ": differ, "not_ties": real, "worst_relative_gap": worst}


def ddp_check(data: Path, work: Path) -> dict:
    out = work / "ddp"
    exe = Path(sys.executable).with_name("speechvq-train")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(exe), f"data.manifest={data / 'train.tsv'}",
                           f"out_dir={out}", "trainer=gpu", "trainer.max_steps=30",
                           "trainer.valid_every=null", "trainer.media_every=null",
                           "trainer.save_every=30"], capture_output=True, text=True, timeout=240)
    if proc.returncode:
        return {"ok": False, "error": proc.stderr[-2000:]}
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    return {"ok": len(set(ckpt["replicas"])) == 1, "replicas": ckpt["replicas"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_gpu"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--model-steps", type=int, default=50)
    ap.add_argument("--utterances", type=int, default=100)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--models", default="mel,mel_large")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu to check the paths on the CPU")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    precisions = ["fp32"] + (["bf16"] if native_bf16(device) else []) + (
        ["fp16"] if device.type == "cuda" else [])
    result: dict = {"device": name, "loop": [], "model": {}}
    failed = []
    print("\n| precision | fit loop steps/s (batch 64, mini corpus) | syncs after step 1 | "
          + " | ".join(f"{m} model step/s" for m in args.models.split(",")) + " |")
    print("|---|---|---|" + "---|" * len(args.models.split(",")))
    for precision in precisions:
        loop = loop_rate(data, args.work, precision, args.steps, args.device, args.workers)
        result["loop"].append(loop)
        rates = [model_rate(m, precision, device, args.model_steps)
                 for m in args.models.split(",")]
        result["model"][precision] = rates
        print(f"| {precision} | {loop['steps_per_s']:.1f} | {len(loop['syncs'])} | "
              + " | ".join(f"{r:.1f}" for r in rates) + " |")
        if loop["syncs"]:
            failed.append(f"{precision}: {len(loop['syncs'])} syncs, first: {loop['syncs'][0]}")
    ckpt = result["loop"][0]["checkpoint"]
    rows = read_manifest(data / "manifest.tsv")[: args.utterances]
    cpu_a, _ = units_on(ckpt, rows, torch.device("cpu"), 60.0)
    cpu_b, _ = units_on(ckpt, rows, torch.device("cpu"), 8.0)
    dev_a, rtf = units_on(ckpt, rows, device, 60.0)
    dev_b, _ = units_on(ckpt, rows, device, 8.0)
    checks = {"cpu batch 60 s vs 8 s": compare(ckpt, rows, cpu_a, cpu_b),
              f"{device.type} 60 s vs cpu": compare(ckpt, rows, cpu_a, dev_a),
              f"{device.type} 8 s vs cpu": compare(ckpt, rows, cpu_a, dev_b)}
    result["units"], result["extraction_rtf"] = checks, rtf
    print(f"\nunits of {len(rows)} utterances ({sum(len(u) for u in cpu_a.values())} frames), "
          f"extraction on {device.type}: {rtf:.0f}x real time")
    for what, c in checks.items():
        print(f"  {what}: {c['differ']} frames differ, {c['not_ties']} not float ties "
              f"(largest relative gap {c['worst_relative_gap']:.2e})")
        if c["not_ties"]:
            failed.append(f"units {what}: {c['not_ties']} frames differ beyond a float tie")
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        ddp = ddp_check(data, args.work)
        result["ddp"] = ddp
        print(f"\n2-GPU DDP: {'replicas agree' if ddp['ok'] else 'FAILED'}")
        if not ddp["ok"]:
            failed.append(f"DDP: {ddp.get('error') or ddp['replicas']}")
    (args.work / "bench_gpu.json").write_text(json.dumps(result, indent=1, default=str))
    for line in failed:
        print(f"MISMATCH: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
