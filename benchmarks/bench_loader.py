"""What a training crop costs, and whether the input pipeline can feed a GPU.

    python benchmarks/bench_loader.py [--root ../shared/bigreal/src/librispeech_resemblyzer]
        [--work /tmp/bench_loader] [--crops 1500] [--train-seconds 90] [--files N]

On real LibriSpeech FLACs (the 351 originals in bigreal: 2-23 s, mean 11 s), one process and one
torch thread (= one loader worker):

1. crops/s of the training dataset, 1.28-s crops, in four ways, without and with the F0
   condition (``model.pitch.enabled``):
   - ``today``: what a loader worker did before front-end states were stored: decode the whole
     file, measure the whole utterance (DC, level; the whole F0 track with pitch), cut the crop,
     make its features (every crop, since re-forked workers kept nothing);
   - ``loader``: the stored state (``frontend_state.npz``) and a window read of the crop only,
     features made in the worker (``data.features_on=loader``, the CPU default);
   - ``device``: the same, the features left to the training device
     (``data.features_on=device``, the default on CUDA);
   - ``floor``: decoding the crop's window alone (``speechvq.audio.read_window``);
   and ``loader`` and ``device`` again with speech-biased crops (``data.crop_speech=0.5``: the
   position chosen by the stored speech frames, then one window read).
2. how many loader workers one GPU needs for batch 64 at a given step time: the step time is an
   ESTIMATE made of measured parts (no GPU here): the FLOPs of a training step of the model
   (counted by ``torch.utils.flop_counter``) at an assumed 100 TFLOP/s, and the number of kernels
   it launches (ops dispatched, counted) at an assumed 10 us each; the larger of the two.
3. CPU training with one loader worker and one torch thread for ``--train-seconds``: the whole
   files against the same audio cut into 1.6-s pieces (steps/s, and their ratio).
4. what validation costs: a pass over ``data.valid_seconds`` (600 s) of held-out files, the
   first one (decoding) and a later one (replayed), against 1000 training steps (valid_every) at
   the steps/s of 3.

Prints a Markdown table per part and writes ``WORK/bench_loader.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import speechvq  # noqa: E402, F401 (the thread policy before torch works)
from speechvq.audio import read_window  # noqa: E402
from speechvq.data.dataset import CropDataset, collate  # noqa: E402
from speechvq.data.manifest import ManifestRow, speakers_of, write_manifest  # noqa: E402
from speechvq.features import compute_stats, measure_states  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
DEFAULT_ROOT = ROOT.parent / "shared" / "bigreal" / "src" / "librispeech_resemblyzer"
PITCH = (50.0, 600.0)
SPU = 320
ASSUMED_FLOPS = 100e12  # sustained bf16 FLOP/s assumed for a data-centre GPU (an A100 peaks at 312)
ASSUMED_KERNEL_S = 10e-6  # assumed time per launched kernel of a small model
GPU_BATCH = 64


def _features_cfg(normalize: str = "speaker") -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "features" / "logmel.yaml"))
    return {**cfg, "normalize": normalize}


def corpus(root: Path, limit: int | None) -> list[ManifestRow]:
    """Every FLAC under ``root`` (speaker: its reader id), sorted; the first ``limit``."""
    files = sorted(root.rglob("*.flac"))[:limit]
    if not files:
        sys.exit(f"{root}: no .flac files (build the bigreal corpus, see its README)")
    return [ManifestRow(f.stem, str(f), sf.info(str(f)).frames, f.stem.split("-")[0])
            for f in files]


def pieces(rows: list[ManifestRow], folder: Path, seconds: float = 1.6) -> list[ManifestRow]:
    """The same audio cut into ``seconds`` pieces (FLAC), the remainder dropped."""
    out = []
    n = int(seconds * 16000)
    for row in rows:
        wav, sr = sf.read(row.path, dtype="int16")
        for k in range(len(wav) // n):
            path = folder / f"{row.id}_{k:03d}.flac"
            if not path.exists():
                folder.mkdir(parents=True, exist_ok=True)
                sf.write(path, wav[k * n : (k + 1) * n], sr)
            out.append(ManifestRow(f"{row.id}_{k:03d}", str(path), n, row.speaker))
    return out


# ------------------------------------------------------------------------------ crops per second


def crop_rates(rows: list[ManifestRow], n_crops: int, pitch: bool) -> dict[str, float]:
    """ms per crop of each way (see the module docstring)."""
    cfg = _features_cfg()
    stats = compute_stats(rows, cfg, progress=False)
    t0 = time.perf_counter()
    store = measure_states(rows, cfg, SPU, pitch=PITCH if pitch else None, progress=False)
    measure_ms = (time.perf_counter() - t0) / len(rows) * 1000
    index = store.lookup([r.id for r in rows], [r.num_samples for r in rows])
    args = (rows, speakers_of(rows), stats, cfg, 1.28, 16000, SPU)
    kw = {"pitch": PITCH if pitch else None, "seed": 1}
    ways = {
        "today": CropDataset(*args, **kw),
        "loader": CropDataset(*args, **kw, states=(store, index)),
        "device": CropDataset(*args, **kw, states=(store, index), features_on="device"),
        "loader_speech": CropDataset(*args, **kw, states=(store, index), speech=0.5),
        "device_speech": CropDataset(*args, **kw, states=(store, index), features_on="device",
                                     speech=0.5),
    }
    order = np.random.default_rng(0).integers(0, len(rows), n_crops)
    out = {"measure_ms_per_utterance": measure_ms}
    for name, ds in ways.items():
        ds[int(order[0])]  # imports, FFT plans
        t0 = time.perf_counter()
        for i in order:
            ds._states.clear()  # today's workers were re-forked every epoch: nothing was kept
            ds[int(i)]
        out[name] = (time.perf_counter() - t0) / n_crops * 1000
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for i in order:
        row = rows[int(i)]
        start = int(rng.integers(0, max(1, row.num_samples - 20480)))
        read_window(row.path, start, 20480, 16000, num_samples=row.num_samples)
    out["floor"] = (time.perf_counter() - t0) / n_crops * 1000
    return out


# ----------------------------------------------------------------------- a GPU step, estimated


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def gpu_step_estimate(model_name: str) -> dict:
    """FLOPs and kernels of one training step of batch 64 x 1.28 s (measured here), and the
    step time they imply at the assumed GPU rates (an estimate)."""
    from hydra import compose, initialize_config_dir
    from torch.utils.flop_counter import FlopCounterMode

    from speechvq.vqvae import build_vqvae

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["data.manifest=unused", "out_dir=unused",
                                          f"model={model_name}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=251).train()
    params = sum(p.numel() for p in model.parameters())
    batch = {"feats": torch.randn(GPU_BATCH, 80, 128), "speaker": torch.zeros(GPU_BATCH).long(),
             "mask": torch.ones(GPU_BATCH, 64, dtype=torch.bool)}
    model(batch)["loss"].backward()  # the codebook's k-means init: not a regular step
    flops, ops = FlopCounterMode(display=False), _OpCounter()
    with flops, ops:
        model.zero_grad()
        model(batch)["loss"].backward()
    total = flops.get_total_flops()
    step = max(total / ASSUMED_FLOPS, ops.n * ASSUMED_KERNEL_S)
    return {"model": model_name, "parameters": params, "flops": total, "kernels": ops.n,
            "step_ms_estimate": step * 1000}


# ------------------------------------------------------------------------ training on the CPU


def train_rate(manifest: Path, work: Path, seconds: float, batch_size: int = 32) -> dict:
    """Steps/s of the default mel model, one loader worker, one torch thread, ``seconds``."""
    from hydra import compose, initialize_config_dir

    from speechvq.tasks import VQVAETask
    from speechvq.training import fit

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.manifest={manifest}", f"out_dir={work}",
                                          "trainer.num_workers=1", "device=cpu",
                                          f"trainer.batch_size={batch_size}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    task = VQVAETask(cfg, out_dir=work, progress=False)
    trainer = {**cfg["trainer"], "max_minutes": seconds / 60, "valid_every": None,
               "media_every": None, "save_every": 10**9}
    t0 = time.monotonic()
    out = fit(task, trainer, work, config=cfg, device="cpu")
    return {"steps": out["step"], "seconds": time.monotonic() - t0,
            "steps_per_s": out["step"] / (time.monotonic() - t0)}


def valid_cost(train: Path, valid: Path, work: Path) -> dict:
    """Seconds of the first and of a later validation pass over ``valid`` (default subset)."""
    from hydra import compose, initialize_config_dir

    from speechvq.data.loader import ValidBatches
    from speechvq.tasks import VQVAETask

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"data.manifest={train}", f"data.valid_manifest={valid}",
                                          f"out_dir={work}", "device=cpu"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    task = VQVAETask(cfg, out_dir=work, progress=False)
    model = task.model.train()
    task.step(model, collate([task.train_set[i] for i in range(4)], SPU))  # the k-means init
    model.eval()
    batches = ValidBatches(task.valid_set, task.collate, cfg["trainer"]["batch_size"], 0, 1,
                           None, 1, pin_memory=False)
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            for _, batch in batches:
                task.step(model, batch)
        times.append(time.perf_counter() - t0)
    seconds = sum(row.num_samples for row in task.valid_set.rows) / 16000
    return {"first_s": times[0], "later_s": times[1], "audio_s": seconds,
            "utterances": len(task.valid_set)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_loader"))
    ap.add_argument("--files", type=int, default=None, help="only the first N files")
    ap.add_argument("--crops", type=int, default=1500)
    ap.add_argument("--train-seconds", type=float, default=90.0)
    ap.add_argument("--valid-files", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32, help="of the CPU training runs")
    ap.add_argument("--gpu-models", default="mel,mel_large",
                    help="conf/model/*.yaml whose GPU step is estimated")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    rows = corpus(args.root, args.files)
    args.work.mkdir(parents=True, exist_ok=True)
    hours = sum(r.num_samples for r in rows) / 16000 / 3600
    print(f"{len(rows)} files, {hours * 60:.1f} min, one process, torch threads: "
          f"{torch.get_num_threads()}")
    result: dict = {"files": len(rows), "minutes": hours * 60}

    print("\n| crop (1.28 s) | today | loader | device | floor (window decode) | loader / today "
          "| device / today | loader / floor | device / floor | measure once (per utterance) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pitch in (False, True):
        r = crop_rates(rows, args.crops, pitch)
        result["pitch" if pitch else "plain"] = r
        rate = {k: 1000 / r[k] for k in ("today", "loader", "device", "floor")}
        print(f"| {'with F0' if pitch else 'mel'} | " + " | ".join(
            f"{rate[k]:.0f}/s ({r[k]:.2f} ms)" for k in ("today", "loader", "device", "floor"))
            + f" | {rate['loader'] / rate['today']:.1f}x | {rate['device'] / rate['today']:.1f}x"
            f" | {r['loader'] / r['floor']:.2f}x | {r['device'] / r['floor']:.2f}x"
            f" | {r['measure_ms_per_utterance']:.1f} ms |")
    for label, key in (("mel", "plain"), ("with F0", "pitch")):
        r = result[key]
        print(f"{label}, with data.crop_speech=0.5: " + ", ".join(
            f"{way} {1000 / r[f'{way}_speech']:.0f}/s ({r[f'{way}_speech'] / r[way]:.2f}x the "
            f"time without)" for way in ("loader", "device")))

    print(f"\n| model | parameters | GFLOP per step (batch {GPU_BATCH}) | kernels | GPU step "
          "(estimate) | workers for it: today | loader | device |")
    print("|---|---|---|---|---|---|---|---|")
    result["gpu"] = []
    for name in args.gpu_models.split(","):
        est = gpu_step_estimate(name)
        r = result["plain"]
        need = {k: math.ceil(GPU_BATCH * r[k] / est["step_ms_estimate"])
                for k in ("today", "loader", "device")}
        est["workers"] = need
        result["gpu"].append(est)
        print(f"| {name} | {est['parameters'] / 1e6:.2f} M | {est['flops'] / 1e9:.0f} | "
              f"{est['kernels']} | {est['step_ms_estimate']:.1f} ms | {need['today']} | "
              f"{need['loader']} | {need['device']} |")

    whole = args.work / "whole.tsv"
    write_manifest(whole, rows)
    cut = args.work / "pieces.tsv"
    write_manifest(cut, pieces(rows, args.work / "pieces"))
    runs = {}
    for name, manifest in (("whole files", whole), ("1.6-s pieces", cut)):
        runs[name] = train_rate(manifest, args.work / f"run_{name[:5]}", args.train_seconds,
                                args.batch_size)
    result["training"] = runs
    a, b = runs["whole files"], runs["1.6-s pieces"]
    print("\n| CPU training, 1 loader worker, 1 torch thread | steps | steps/s |")
    print("|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['steps']} | {run['steps_per_s']:.2f} |")
    print(f"| whole / pieces | | {a['steps_per_s'] / b['steps_per_s']:.2f}x |")

    valid_rows = corpus(args.root, None)[-args.valid_files:]
    valid = args.work / "valid.tsv"
    write_manifest(valid, valid_rows)
    v = valid_cost(whole, valid, args.work / "valid_run")
    between = 1000 / max(a["steps_per_s"], 1e-9)
    v.update(between_s=between, share_first=v["first_s"] / (between + v["first_s"]),
             share_later=v["later_s"] / (between + v["later_s"]))
    result["validation"] = v
    print(f"\nvalidation: {v['utterances']} utterances, {v['audio_s'] / 60:.1f} min of audio: "
          f"first pass {v['first_s']:.1f} s, later passes {v['later_s']:.1f} s; 1000 steps take "
          f"{between:.0f} s: {100 * v['share_later']:.1f}% of training time "
          f"(first: {100 * v['share_first']:.1f}%)")
    (args.work / "bench_loader.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
