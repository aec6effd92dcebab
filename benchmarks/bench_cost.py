"""What each stage of the LibriSpeech recipe costs on one GPU and on eight: ESTIMATES made of
parts measured here.

    python benchmarks/bench_cost.py [--root ../shared/bigreal/src/librispeech_resemblyzer]
        [--files 120] [--crops 800] [--cores-per-gpu 8] [--mbps 50] [--models mel,mel_large]
        [--priors default,large]

Measured here, one process and one thread, on real LibriSpeech FLACs (bigreal's originals):
reading a file's header (``speechvq-prepare``'s scan), decoding and analysing a file for the
statistics, measuring its front-end state, a training crop (stored state + window read, the
features left to the GPU), the extraction input of a whole file (decode + features), and the
FLOPs and kernel launches of a training step of each model and prior (counted on the CPU).
Assumed: a GPU sustains ``ASSUMED_FLOPS`` on these models and a kernel costs ``ASSUMED_KERNEL_S``
(``bench_loader.py``), ``--cores-per-gpu`` loader / prepare threads per GPU, the download at
``--mbps`` MB/s, and the subsets' published sizes (reference.md). CPU work is assumed to scale
with the cores; a training step is the slower of the GPU and its loader workers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import soundfile as sf  # noqa: E402
import torch  # noqa: E402
from bench_loader import (  # noqa: E402
    ASSUMED_FLOPS,
    ASSUMED_KERNEL_S,
    DEFAULT_ROOT,
    GPU_BATCH,
    _features_cfg,
    _OpCounter,
    corpus,
    crop_rates,
    gpu_step_estimate,
)
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from speechvq.audio import inspect_audio  # noqa: E402
from speechvq.features import FrontEnd, compute_stats, measure_states  # noqa: E402

# (utterances, hours, archive GB) of what the recipe trains on (reference.md, OpenSLR 12)
CORPORA = {"100 h": (28539, 100.6, 6.39), "960 h": (281241, 961.1, 60.03)}
TRAIN_STEPS = 100_000  # conf/trainer/default.yaml max_steps (the recipe's train stage)
PRIOR_STEPS = 20_000  # conf/train_prior.yaml
PRIOR_TOKENS = 16 * 1024  # its batch: 16 windows of block_size tokens
STATS_PER_SPEAKER = 20  # data.stats_utterances_per_speaker
SPEAKERS = {"100 h": 251, "960 h": 2338}


def per_file_costs(rows: list) -> dict[str, float]:
    """CPU seconds per file of the prepare steps and of an extraction input."""
    cfg = _features_cfg()
    out = {}
    t0 = time.perf_counter()
    for row in rows:
        sf.info(row.path)
    out["scan"] = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    stats = compute_stats(rows, cfg, progress=False)  # every speaker of the files below
    out["stats"] = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    measure_states(rows, cfg, 320, progress=False)
    out["states"] = (time.perf_counter() - t0) / len(rows)
    t0 = time.perf_counter()
    for row in rows:
        inspect_audio(row.path, 16000)
    out["inspect"] = (time.perf_counter() - t0) / len(rows)
    front = FrontEnd(cfg, stats)
    t0 = time.perf_counter()
    for row in rows:
        from speechvq.audio import load_audio

        wav = load_audio(row.path, 16000)
        front(wav[: wav.numel() // 320 * 320], row.speaker)
    out["extract_input"] = (time.perf_counter() - t0) / len(rows)
    out["seconds_per_file"] = sum(r.num_samples for r in rows) / 16000 / len(rows)
    return out


def encoder_flops_per_second(model_name: str) -> tuple[float, int]:
    """FLOPs and kernels of the encoder + nearest code for one second of audio (batched)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from speechvq.vqvae import build_vqvae

    root = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train", overrides=[
            "data.manifest=unused", "out_dir=unused", f"model={model_name}"]), resolve=True)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=4).eval()
    x = torch.randn(8, 80, 1000)  # 8 x 10 s
    flops, ops = FlopCounterMode(display=False), _OpCounter()
    with flops, ops, torch.no_grad():
        model.encode(x)
    return flops.get_total_flops() / 80.0, ops.n


def prior_step(name: str) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from speechvq.prior import build_prior

    root = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(root), version_base="1.3"):
        cfg = OmegaConf.to_container(compose("train_prior", overrides=[
            "units=unused", "out_dir=unused", f"prior={name}"]), resolve=True)
    prior = build_prior(cfg["prior"], 512, 2338)
    tokens = 2 * 256
    idx = torch.randint(0, 512, (2, 256))
    flops, ops = FlopCounterMode(display=False), _OpCounter()
    with flops, ops:
        _, loss = prior(idx, idx)
        loss.backward()
    per_step = flops.get_total_flops() / tokens * PRIOR_TOKENS
    step = max(per_step / ASSUMED_FLOPS, ops.n * ASSUMED_KERNEL_S)
    return {"parameters": sum(p.numel() for p in prior.parameters()), "step_s": step}


def _hm(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--files", type=int, default=120)
    ap.add_argument("--crops", type=int, default=800)
    ap.add_argument("--cores-per-gpu", type=int, default=8)
    ap.add_argument("--mbps", type=float, default=50.0, help="download speed, MB/s")
    ap.add_argument("--models", default="mel,mel_large")
    ap.add_argument("--priors", default="default,large")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = corpus(args.root, args.files)
    cost = per_file_costs(rows)
    crop = crop_rates(rows, args.crops, pitch=False)
    print(f"measured on {len(rows)} LibriSpeech files ({cost['seconds_per_file']:.1f} s each), "
          "one thread: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in cost.items()
                                     if k != "seconds_per_file")
          + f"; a training crop {crop['device']:.2f} ms (features on the GPU)")
    print(f"assumed: {ASSUMED_FLOPS / 1e12:.0f} TFLOP/s per GPU, {ASSUMED_KERNEL_S * 1e6:.0f} us "
          f"per kernel, {args.cores_per_gpu} CPU cores per GPU, download {args.mbps:.0f} MB/s")
    models = {m: gpu_step_estimate(m) for m in args.models.split(",")}
    encoders = {m: encoder_flops_per_second(m) for m in models}
    priors = {p: prior_step(p) for p in args.priors.split(",")}
    setups = [("100 h", 1), ("960 h", 1), ("960 h", 8)]
    print("\n| stage (ESTIMATES) | " + " | ".join(f"{c}, {g} GPU{'s' * (g > 1)}"
                                                 for c, g in setups) + " |")
    print("|---|" + "---|" * len(setups))

    def row(name: str, fn) -> None:  # noqa: ANN001
        print(f"| {name} | " + " | ".join(fn(c, g) for c, g in setups) + " |")

    row("-1 download (published archive sizes)",
        lambda c, g: _hm(CORPORA[c][2] * 1e3 / args.mbps))

    def prepare(c: str, g: int) -> str:
        n, hours, _ = CORPORA[c]
        seconds = n * (cost["scan"] + cost["states"]) + min(n, SPEAKERS[c] * STATS_PER_SPEAKER) * \
            cost["stats"]
        return _hm(seconds / (args.cores_per_gpu * g))
    row("0 prepare (scan, stats of 20 utterances per speaker, front-end states; "
        "`num_workers` = the cores)", prepare)
    for name, est in models.items():
        def train(c: str, g: int, est=est) -> str:  # noqa: ANN001
            loader = GPU_BATCH * crop["device"] / 1000 / args.cores_per_gpu
            step = max(est["step_ms_estimate"] / 1000, loader)
            return f"{_hm(TRAIN_STEPS * step)} ({1 / step:.0f} steps/s)"
        row(f"1 train `model={name}` ({est['parameters'] / 1e6:.2f} M), {TRAIN_STEPS // 1000}k "
            f"steps of {GPU_BATCH} crops per GPU", train)
    for name, (flops, kernels) in encoders.items():
        def extract(c: str, g: int, flops=flops, kernels=kernels) -> str:  # noqa: ANN001
            seconds = CORPORA[c][1] * 3600
            cpu = CORPORA[c][0] * cost["extract_input"] / (args.cores_per_gpu * g)
            # the encoder's kernels were counted for a batch of 80 s of audio
            gpu = max(seconds * flops / ASSUMED_FLOPS, seconds / 80 * kernels * ASSUMED_KERNEL_S) / g
            return _hm(max(cpu, gpu))
        row(f"2 extract every utterance once, `model={name}` (decode + features on the cores, "
            "encoder on the GPU)", extract)
    for name, est in priors.items():
        def prior(c: str, g: int, est=est) -> str:  # noqa: ANN001
            return f"{_hm(PRIOR_STEPS * est['step_s'])} ({1 / est['step_s']:.0f} steps/s)"
        row(f"4 prior `prior={name}` ({est['parameters'] / 1e6:.1f} M), {PRIOR_STEPS // 1000}k "
            f"steps of {PRIOR_TOKENS} units per GPU", prior)
    print("\n8 GPUs train the same number of steps in the same time on 8 times the crops "
          "(global batch 8 x 64, learning rate x sqrt(8): trainer.lr_scaling); the 8-GPU "
          "columns of train and prior show that time.")


if __name__ == "__main__":
    main()
