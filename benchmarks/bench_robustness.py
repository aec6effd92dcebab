"""How much do a recording's level and channel change its units? Share of frames whose unit stays.

    python benchmarks/bench_robustness.py --checkpoint EXP/checkpoints/best.pt --manifest M.tsv

Each utterance of the manifest is altered as real recordings differ (gain, band-limiting to a
telephone-like 4 kHz, clipping, a DC offset, silence around it) and encoded as ``speechvq-extract``
would, and the share of frames whose unit equals the original's is printed per alteration, twice:
"known speakers" normalises with the speakers' statistics from the checkpoint (the same people
recorded again through another channel); "as a new corpus" renames the speakers, so their
statistics come from the altered audio itself (a corpus recorded that way).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from speechvq.audio import load_audio
from speechvq.checkpoint import VQVAEMeta
from speechvq.data.manifest import ManifestRow, read_manifest
from speechvq.extract import ChunkedEncoder, ModelInput, extract_units
from speechvq.features import stats_for_rows
from speechvq.vqvae import load_vqvae

SR = 16000
PAD = SR  # one second of silence each side (a whole number of units)


def _band_limit(wav: torch.Tensor) -> torch.Tensor:
    down = torchaudio.functional.resample(wav, SR, 8000)
    return torchaudio.functional.resample(down, 8000, SR)[: wav.numel()]


ALTERATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gain x0.01 (-40 dB)": lambda w: w * 0.01,
    "gain x0.1 (-20 dB)": lambda w: w * 0.1,
    "gain x3 (+10 dB, float)": lambda w: w * 3,
    "band-limited to 4 kHz": _band_limit,
    "clipped at 30% of peak": lambda w: w.clamp(-0.3 * w.abs().max(), 0.3 * w.abs().max()),
    "DC offset 0.05": lambda w: w + 0.05,
    "1 s of silence each side": lambda w: torch.cat([torch.zeros(PAD), w, torch.zeros(PAD)]),
}


def _encode(rows: list[ManifestRow], model, meta: VQVAEMeta) -> dict[str, np.ndarray]:
    stats, _ = stats_for_rows(meta.features, meta.stats, rows, progress=False)
    make_input = ModelInput(model.kind, model.samples_per_unit, model.sample_rate,
                            meta.features, stats)
    return extract_units(rows, make_input, ChunkedEncoder(model, 30.0, None, 60.0), progress=False).units


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, meta = load_vqvae(args.checkpoint)
    rows = read_manifest(args.manifest)
    reference = _encode(rows, model, meta)
    frames = sum(len(u) for u in reference.values())
    print(f"{len(rows)} utterances, {frames} frames ({frames / model.unit_rate / 60:.1f} min)")
    print(f"{'alteration':30s}{'known speakers':>16s}{'as a new corpus':>17s}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, alter in ALTERATIONS.items():
            altered = []
            for i, row in enumerate(rows):
                path = Path(tmp) / f"{i}.wav"
                wav = alter(load_audio(row.path))
                sf.write(path, wav.numpy(), SR, subtype="FLOAT")  # no requantisation
                altered.append(ManifestRow(row.id, str(path), wav.numel(), row.speaker))
            renamed = [ManifestRow(r.id, r.path, r.num_samples, f"{r.speaker}~new")
                       for r in altered]
            shift = PAD // model.samples_per_unit if "silence" in name else 0
            shares = []
            for subset in (altered, renamed):
                units = _encode(subset, model, meta)
                kept = sum(int((units[r.id][shift : shift + len(reference[r.id])]
                                == reference[r.id]).sum()) for r in rows if r.id in units)
                shares.append(100 * kept / frames)
            print(f"{name:30s}{shares[0]:15.1f}%{shares[1]:16.1f}%", flush=True)


if __name__ == "__main__":
    main()
