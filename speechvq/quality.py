"""How close a resynthesised utterance is to its original: intelligibility, spectrum, pitch.

- :func:`stoi`: short-time objective intelligibility (Taal et al. 2011; ``pystoi``), 0-1.
- :func:`mel_cepstral_distortion`: MCD in dB over cepstra 1..24 of the 80-bin log-mel amplitude
  spectrum (the project's :class:`speechvq.features.LogMel`; not SPTK mel-cepstra, so compare
  figures within speechvq), on the original's speech frames.
- :func:`pesq_nb`: narrow-band PESQ (ITU-T P.862 at 8 kHz; the ``pesq`` package, optional).
- :func:`f0_error`: voicing agreement and F0 error (cents) on frames voiced in both.

All take a reference and a degraded waveform ``(T,)`` at ``sample_rate``; the shorter length is
used. :func:`score` bundles what ``speechvq-resynth`` reports.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.features import ACTIVE_DB, build_logmel, level_reference
from speechvq.files import write_json, write_text
from speechvq.pitch import f0_track

N_CEPSTRA = 24
_MCD_CONST = 10.0 / math.log(10.0) * math.sqrt(2.0)


def _pair(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(ref, dtype=np.float64).reshape(-1)
    b = np.asarray(deg, dtype=np.float64).reshape(-1)
    n = min(a.size, b.size)
    if n == 0:
        raise ValueError("cannot score an empty waveform")
    return a[:n], b[:n]


def stoi(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray, sample_rate: int) -> float:
    """STOI of ``deg`` against ``ref`` (0-1, higher is more intelligible); NaN for clips with too
    little speech to score (STOI needs 30 frames of 25.6 ms after its silence removal)."""
    from pystoi import stoi as _stoi

    a, b = _pair(ref, deg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = float(_stoi(a, b, sample_rate, extended=False))
        except (ValueError, IndexError):  # numpy errors on clips of a few frames
            return float("nan")
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        return float("nan")  # under ~0.4 s of speech pystoi returns 1e-5: no defined score
    return value


def pesq_available() -> bool:
    try:
        import pesq  # noqa: F401
    except ImportError:
        return False
    return True


def pesq_nb(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray, sample_rate: int) -> float:
    """Narrow-band PESQ (MOS-LQO, about 1-4.5) after resampling both to 8 kHz; needs ``pesq``.
    NaN where PESQ is undefined (under 0.25 s, or no speech found in the reference)."""
    import torchaudio
    from pesq import pesq as _pesq

    a, b = _pair(ref, deg)
    if sample_rate != 8000:
        x = torch.from_numpy(np.stack([a, b])).float()
        a, b = torchaudio.functional.resample(x, sample_rate, 8000).double().numpy()
    try:
        return float(_pesq(8000, a, b, "nb"))
    except Exception:  # pesq's BufferTooShortError / NoUtterancesError: no defined score
        return float("nan")


def mel_cepstral_distortion(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray,
                            features_cfg: Mapping) -> float:
    """MCD (dB) between the log-mel cepstra (1..24) of ``ref`` and ``deg``, frame by frame, over
    the frames where ``ref`` is within 40 dB of its speech level."""
    logmel = build_logmel(features_cfg)
    a, b = _pair(ref, deg)
    x = torch.from_numpy(np.stack([a, b])).float()
    with torch.no_grad():
        power = logmel.mel_power(x).double()  # (2, n_mels, F)
    # each signal floored 70 dB below its own speech level, so a gain changes nothing
    floors = torch.tensor([level_reference(p) * 1e-7 + 1e-30 for p in power], dtype=power.dtype)
    amp = 0.5 * torch.log(torch.maximum(power, floors[:, None, None]))  # log amplitude
    n = amp.shape[1]
    k = torch.arange(n, dtype=torch.float64)
    dct = torch.cos(math.pi / n * (k[None, :] + 0.5) * k[:, None]) * math.sqrt(2.0 / n)
    cep = torch.einsum("cm,bmf->bcf", dct[1 : N_CEPSTRA + 1], amp)
    ref_power = power[0].mean(0)
    active = 10 * torch.log10(ref_power / level_reference(power[0]) + 1e-30) > -ACTIVE_DB
    if not bool(active.any()):
        active = torch.ones_like(active)
    dist = _MCD_CONST * (cep[0] - cep[1]).pow(2).sum(0).sqrt()
    return float(dist[active].mean())


def f0_error(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray, sample_rate: int,
             hop_length: int) -> dict[str, float]:
    """``{"voicing_agreement": share of frames with the same voicing decision, "f0_cents":
    median |F0 difference| in cents on frames voiced in both (nan if none)}``."""
    a, b = _pair(ref, deg)
    fa, fb = f0_track(a, sample_rate, hop_length), f0_track(b, sample_rate, hop_length)
    va, vb = fa > 0, fb > 0
    both = va & vb
    cents = float("nan")
    if bool(both.any()):
        cents = float((1200 * (fa[both] / fb[both]).log2().abs()).median())
    return {"voicing_agreement": float((va == vb).float().mean()) if va.numel() else float("nan"),
            "f0_cents": cents}


def score(ref: Tensor | np.ndarray, deg: Tensor | np.ndarray, features_cfg: Mapping,
          pesq: bool = False) -> dict[str, float]:
    """What ``speechvq-resynth`` reports for one reconstruction: ``stoi``, ``mcd``, and with
    ``pesq=True`` (and the package installed) ``pesq_nb``. All NaN (undefined, left out of
    :func:`means`) when the reference is digital silence or shorter than one FFT window."""
    sr = int(features_cfg["sample_rate"])
    a, b = _pair(ref, deg)
    if not np.any(a) or a.size < int(features_cfg["n_fft"]):  # nothing to compare against
        return {"stoi": math.nan, "mcd": math.nan, **({"pesq_nb": math.nan} if pesq else {})}
    out = {"stoi": stoi(a, b, sr), "mcd": mel_cepstral_distortion(a, b, features_cfg)}
    if pesq and pesq_available():
        out["pesq_nb"] = pesq_nb(a, b, sr)
    return out


_LABELS = {"stoi": ("STOI", "{:.3f}"), "mcd": ("MCD", "{:.2f} dB"),
           "pesq_nb": ("PESQ-NB", "{:.2f}")}


def describe(figures: Mapping[str, float]) -> str:
    """``{"stoi": .., "mcd": ..}`` -> ``"STOI 0.812, MCD 7.10 dB"`` (known keys, in order)."""
    return ", ".join(f"{label} {fmt.format(figures[k])}" for k, (label, fmt) in _LABELS.items()
                     if k in figures)


def means(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every figure over ``scores``, NaN (undefined) values left out (``{}`` for none)."""
    out = {}
    for k in _LABELS:
        values = [s[k] for s in scores if k in s and not math.isnan(s[k])]
        if values:
            out[k] = float(np.mean(values))
    return out


def write_scores(out_dir: str | Path, scores: Sequence[Mapping[str, Any]],
                 summary: Mapping[str, float]) -> None:
    """``out_dir/quality.tsv`` (id and figures per utterance) and ``out_dir/quality.json``."""
    keys = [k for k in _LABELS if k in summary]
    lines = ["\t".join(["id", *keys])]
    lines += ["\t".join([str(s["id"]), *(f"{s.get(k, math.nan):.4f}" for k in keys)])
              for s in scores]
    write_text(Path(out_dir) / "quality.tsv", "\n".join(lines) + "\n")
    write_json(Path(out_dir) / "quality.json", {"n": len(scores), **summary})


__all__ = ["describe", "means", "write_scores", "f0_error", "mel_cepstral_distortion", "pesq_available", "pesq_nb", "score", "stoi"]
