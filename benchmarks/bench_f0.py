"""Which F0 extractor: speed (times real time, one thread) and voiced share of the candidates on a
folder of audio (the first ``--files`` WAV/FLAC files, sorted).

    OMP_NUM_THREADS=1 python benchmarks/bench_f0.py --root ../shared/realdev/wav --files 20

Candidates: WORLD DIO + StoneMask and Harvest (``pyworld``), ``librosa.pyin`` and torchaudio's
``detect_pitch_frequency`` (no voicing decision: its voiced share is not given). speechvq uses
DIO + StoneMask (:func:`speechvq.pitch.f0_track`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import librosa
import numpy as np
import torch
import torchaudio

from speechvq.audio import load_audio
from speechvq.pitch import F0_MAX, F0_MIN, _pyworld


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--sample-rate", type=int, default=16000)
    args = parser.parse_args(argv)
    sr, hop = args.sample_rate, args.sample_rate // 100
    paths = sorted(p for p in Path(args.root).rglob("*") if p.suffix.lower() in (".wav", ".flac"))
    wavs = [load_audio(p, sr).double().numpy() for p in paths[: args.files]]
    seconds = sum(w.size for w in wavs) / sr
    pw = _pyworld()
    period = 1000.0 * hop / sr

    def dio(w: np.ndarray) -> np.ndarray:
        f0, t = pw.dio(w, sr, f0_floor=F0_MIN, f0_ceil=F0_MAX, frame_period=period)
        return pw.stonemask(w, f0, t, sr)

    candidates = {
        "DIO + StoneMask (pyworld)": dio,
        "Harvest (pyworld)": lambda w: pw.harvest(w, sr, f0_floor=F0_MIN, f0_ceil=F0_MAX,
                                                  frame_period=period)[0],
        "librosa.pyin": lambda w: np.nan_to_num(librosa.pyin(
            w, fmin=F0_MIN, fmax=F0_MAX, sr=sr, frame_length=1024, hop_length=hop)[0]),
        "torchaudio detect_pitch_frequency": lambda w: torchaudio.functional.
        detect_pitch_frequency(torch.from_numpy(w).float(), sr).numpy(),
    }
    print(f"{len(wavs)} files, {seconds:.1f} s of audio at {sr} Hz")
    for name, fn in candidates.items():
        start = time.perf_counter()
        tracks = [fn(w) for w in wavs]
        speed = seconds / (time.perf_counter() - start)
        voiced = ("-" if name.startswith("torchaudio") else
                  f"{np.mean([float((t > 0).mean()) for t in tracks]):.2f}")
        print(f"{name:36s} {speed:9.3f}x real time   voiced share {voiced}")


if __name__ == "__main__":
    main()
