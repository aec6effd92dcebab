"""Unit extraction speed and long-file exactness, for the mel and the wave VQ-VAE.

    python benchmarks/bench_extract.py [--threads 2] [--minutes 60] [--corpus-minutes 5]

Builds untrained models from the conf/ defaults (extraction speed does not depend on training;
the codebook is k-means-initialised on the model's own encoder outputs, as training starts, so
the units vary like a trained model's), saves them as checkpoints and, each phase in a fresh
process so its peak memory is its own:

1. real-time factor: ``speechvq.extract.extract_units`` over a corpus of 10-s utterances (the mini
   corpus' FLACs when present, else synthetic tones) on ``--threads`` CPU threads;
2. a long file (``--minutes`` of audio: the corpus concatenated) extracted in 30 s windows: time
   and peak resident memory (``resource.getrusage``);
3. the same file encoded in one pass (mel model; the wave model's one pass over an hour needs
   tens of GB, so it is compared on ``--wave-whole-minutes``): peak memory and the percentage of
   frames that differ from the chunked units.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from queue import Empty

import numpy as np
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speechvq.audio import load_audio, save_audio  # noqa: E402
from speechvq.checkpoint import VQVAEMeta, save_checkpoint  # noqa: E402
from speechvq.data.manifest import ManifestRow  # noqa: E402
from speechvq.extract import ChunkedEncoder, ModelInput, extract_units  # noqa: E402
from speechvq.features import FeatureStats, Moments, build_logmel  # noqa: E402
from speechvq.nn.quantizer import kmeans  # noqa: E402
from speechvq.vqvae import build_vqvae, load_vqvae  # noqa: E402

SR = 16000
CONF = ROOT / "conf"


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: VmHWM (ru_maxrss survives fork + exec, so
    a fresh child would report its parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def source_audio(seconds: float) -> np.ndarray:
    """The mini corpus' audio concatenated (repeated as needed), else harmonic tones + noise."""
    files = sorted((ROOT / "egs" / "mini" / "corpus").rglob("*.flac"))
    pieces, total = [], 0
    if files:
        while total < seconds * SR:
            for f in files:
                pieces.append(load_audio(f).numpy())
                total += len(pieces[-1])
                if total >= seconds * SR:
                    break
    else:
        rng = np.random.default_rng(0)
        while total < seconds * SR:
            t = np.arange(int(rng.integers(1600, 8000))) / SR
            f0 = rng.uniform(90, 250)
            pieces.append(sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 8)) * 0.2
                          + 0.01 * rng.standard_normal(t.size))
            total += t.size
    return np.concatenate(pieces)[: int(seconds * SR)].astype(np.float32)


def make_corpus(folder: Path, minutes: float, corpus_minutes: float
                ) -> tuple[FeatureStats, torch.Tensor, list[ManifestRow], Path]:
    """The inputs, written to ``folder``: ``(stats, calib, rows, long_path)``: global log-mel
    statistics and the audio they and the codebooks are fitted on (the first minute), manifest
    rows of ``corpus_minutes`` of 10-s utterances and a file of ``minutes`` of audio."""
    audio = source_audio(max(minutes, corpus_minutes) * 60)
    features = OmegaConf.to_container(OmegaConf.load(CONF / "features" / "logmel.yaml"))
    calib = torch.from_numpy(audio[: 60 * SR])
    feats = build_logmel(features)(calib)
    stats = FeatureStats(features, Moments(feats.mean(1), feats.std(1), feats.shape[1]), {})
    rows = []
    for i in range(int(corpus_minutes * 6)):
        path = folder / f"utt{i:03d}.flac"
        save_audio(path, audio[i * 10 * SR : (i + 1) * 10 * SR], SR)
        rows.append(ManifestRow(f"utt{i:03d}", str(path), 10 * SR, "bench"))
    long_path = folder / "long.flac"
    save_audio(long_path, audio[: int(minutes * 60 * SR)], SR)
    return stats, calib, rows, long_path


def build_checkpoint(kind: str, path: Path, stats: FeatureStats, calib: torch.Tensor) -> None:
    cfg = OmegaConf.create({
        "features": OmegaConf.load(CONF / "features" / "logmel.yaml"),
        "model": OmegaConf.load(CONF / "model" / f"{kind}.yaml"),
        "quantizer": OmegaConf.load(CONF / "quantizer" / "ema.yaml"),
    })
    cfg = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=1).eval()
    with torch.no_grad():
        x = stats.normalize(build_logmel(cfg["features"])(calib), None, "global")
        z = model.encoder((x if kind == "mel" else calib)[None])[0].T
        model.quantizer.codebook.copy_(kmeans(z, model.n_codes, 10)[0])
        model.quantizer.inited.fill_(True)
    features = dict(cfg["features"], normalize="global")
    save_checkpoint(path, {
        "kind": "vqvae",
        "model_config": {"model": cfg["model"], "quantizer": cfg["quantizer"], "n_speakers": 1},
        "meta": VQVAEMeta.from_dict({"speakers": ["bench"], "stats": stats.to_dict(),
                                     "features": features}, model).to_dict(),
        "model": model.state_dict(),
        "step": 0,
    })


def _setup(ckpt: str, threads: int, chunk_seconds: float = 30.0):
    torch.set_num_threads(threads)
    if sys.platform == "linux":  # a spawned phase would otherwise spawn its loader workers too
        mp.set_start_method("fork", force=True)
    model, meta = load_vqvae(ckpt)
    stats = FeatureStats.from_dict(meta.stats)
    make_input = ModelInput(model.kind, model.samples_per_unit, model.sample_rate,
                            meta.features, stats, chunk_seconds=chunk_seconds)
    encoder = ChunkedEncoder(model, chunk_seconds=chunk_seconds, context_seconds=None,
                             max_batch_seconds=60.0)
    return model, make_input, encoder


def phase_idle(ckpt: str, threads: int) -> dict:
    _setup(ckpt, threads)
    return {"rss_mb": peak_rss_mb()}


def phase_rtf(ckpt: str, rows: list, threads: int, workers: int) -> dict:
    _, make_input, encoder = _setup(ckpt, threads)
    extract_units(rows[:3], make_input, encoder, num_workers=0, progress=False)  # warm-up
    result = extract_units(rows, make_input, encoder, num_workers=workers, progress=False)
    return {"seconds": result.seconds, "wall": result.wall_seconds, "rtf": result.realtime_factor,
            "rss_mb": peak_rss_mb(), "context": encoder.context}


def phase_long_chunked(ckpt: str, path: str, threads: int, out: str) -> dict:
    _, make_input, encoder = _setup(ckpt, threads)
    row = ManifestRow("long", path, 0, "bench")
    result = extract_units([row], make_input, encoder, num_workers=0, progress=False)
    np.save(out, result.units["long"])
    return {"seconds": result.seconds, "wall": result.wall_seconds, "rtf": result.realtime_factor,
            "rss_mb": peak_rss_mb()}


def phase_long_whole(ckpt: str, path: str, threads: int, chunked: str, seconds: float) -> dict:
    model, make_input, encoder = _setup(ckpt, threads, chunk_seconds=1e9)  # one LogMel pass too
    start = time.perf_counter()
    x = make_input(path, "bench")
    n_units = min(int(seconds * model.unit_rate), x.shape[-1] // encoder.downsampling)
    with torch.no_grad():
        whole = model.encode(x[None, ..., : n_units * encoder.downsampling])[0].numpy()
    wall = time.perf_counter() - start
    reference = np.load(chunked)
    # a pass over the first minutes only ends early: its last `context` units see that end
    keep = len(whole) if len(whole) == len(reference) else len(whole) - encoder.context
    differ = float(np.mean(reference[:keep] != whole[:keep]))
    return {"frames": keep, "differ_percent": 100.0 * differ, "wall": wall,
            "rss_mb": peak_rss_mb()}


def _child(queue, fn, args) -> None:
    try:
        queue.put((True, fn(*args)))
    except BaseException:
        queue.put((False, traceback.format_exc()))
        raise


def run_phase(fn, *args) -> dict:
    """``fn(*args)`` in a fresh (non-daemonic: it may start loader workers) process. A phase that
    raises, or dies without a result (killed for memory), is a RuntimeError here, not a hang."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            ok, result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                try:  # its result may have arrived as it exited
                    ok, result = queue.get(timeout=1.0)
                    break
                except Empty:
                    raise RuntimeError(f"{fn.__name__} died (exit code {proc.exitcode}) "
                                       "without a result") from None
    proc.join()
    if not ok:
        raise RuntimeError(f"{fn.__name__} failed in its process:\n{result}")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1],
                        help="DataLoader worker counts to time (real-time factor phase)")
    parser.add_argument("--minutes", type=float, default=60.0, help="long-file length")
    parser.add_argument("--corpus-minutes", type=float, default=5.0, help="RTF corpus length")
    parser.add_argument("--wave-whole-minutes", type=float, default=5.0)
    parser.add_argument("--models", nargs="+", default=["mel", "wave"])
    args = parser.parse_args(argv)
    print(f"speechvq extraction benchmark: {args.threads} threads, {os.cpu_count()} CPUs visible, "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stats, calib, rows, long_path = make_corpus(tmp, args.minutes, args.corpus_minutes)
        for kind in args.models:
            ckpt = tmp / f"{kind}.pt"
            build_checkpoint(kind, ckpt, stats, calib)
            idle = run_phase(phase_idle, str(ckpt), args.threads)
            print(f"[{kind}] peak RSS of a process that only loads the model: "
                  f"{idle['rss_mb']:.0f} MB")
            for workers in args.workers:
                r = run_phase(phase_rtf, str(ckpt), rows, args.threads, workers)
                print(f"[{kind}] {r['seconds']:.0f} s of 10-s utterances in {r['wall']:.1f} s: "
                      f"{r['rtf']:.0f}x real time ({workers} loader worker(s)); "
                      f"context {r['context']} units; peak RSS {r['rss_mb']:.0f} MB")
            chunked = str(tmp / f"{kind}_chunked.npy")
            c = run_phase(phase_long_chunked, str(ckpt), str(long_path), args.threads, chunked)
            print(f"[{kind}] {args.minutes:g}-min file in 30 s windows: {c['wall']:.1f} s "
                  f"({c['rtf']:.0f}x real time), peak RSS {c['rss_mb']:.0f} MB")
            whole_minutes = args.minutes if kind == "mel" else min(args.minutes,
                                                                   args.wave_whole_minutes)
            w = run_phase(phase_long_whole, str(ckpt), str(long_path), args.threads, chunked,
                          whole_minutes * 60)
            print(f"[{kind}] first {whole_minutes:g} min in one pass: {w['wall']:.1f} s, peak RSS "
                  f"{w['rss_mb']:.0f} MB; frames differing from the chunked units: "
                  f"{w['differ_percent']:.4f}% of {w['frames']}")


if __name__ == "__main__":
    main()
