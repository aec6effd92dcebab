"""F0 (pitch) tracks: the melody the decoder is given beside the units and the speaker.

As in Polyak et al. (2021), "Speech Resynthesis from Discrete Disentangled Self-Supervised
Representations": units say what is said, the F0 track how it is sung, the speaker who says it.

- :func:`f0_track`: WORLD's DIO + StoneMask (``pyworld``) at the mel frame centres, 0 = unvoiced.
  Chosen by speed on real speech (``benchmarks/bench_f0.py``, 1 thread, 16 kHz, 20 realdev
  files): DIO + StoneMask 136x real time, Harvest 5.7x (and it calls 94% of frames voiced),
  ``librosa.pyin`` 7.1x; torchaudio's ``detect_pitch_frequency`` (409x) has no voicing decision.
- :func:`pitch_features`: the decoder's condition, ``(2, F)``: log-F0 standardised over the
  utterance's voiced frames (0 where unvoiced) and the voicing flag. It carries the contour, not
  the register: the speaker embedding sets the register, so the same track rendered with another
  speaker lands in that speaker's range (voice conversion needs no explicit shift).
- :class:`F0Moments`, :func:`convert_f0`: a speaker's log-F0 mean/std and the shift of a contour
  from one speaker's range to another's (for plots and measurements of converted speech).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

F0_MIN = 50.0   # Hz: covers low male voices
F0_MAX = 600.0  # Hz: covers children's voices
PITCH_CHANNELS = 2  # standardised log-F0, voicing


def _pyworld():
    try:
        with warnings.catch_warnings():  # pyworld 0.3.5 imports the deprecated pkg_resources
            warnings.simplefilter("ignore")
            import pyworld
    except ImportError as err:  # pragma: no cover - a dependency of speechvq
        raise ImportError(
            f"F0 extraction needs pyworld ({err}); pip install pyworld 'setuptools<81'"
        ) from None
    return pyworld


def f0_track(wav: Tensor | np.ndarray, sample_rate: int, hop_length: int,
             f0_min: float = F0_MIN, f0_max: float = F0_MAX) -> Tensor:
    """``wav (T,)`` -> F0 in Hz at the mel frame centres ``(T // hop_length,)``, float32; 0 where
    unvoiced. Frame ``k`` is centred at ``(k + 0.5) * hop_length`` samples (the log-mel framing of
    :mod:`speechvq.features`); DIO's frames (at multiples of the hop) are averaged in pairs, and a
    frame is voiced when both neighbours are.
    """
    x = wav.detach().double().cpu().numpy() if isinstance(wav, Tensor) else np.asarray(wav, "f8")
    n_frames = x.shape[-1] // hop_length
    if n_frames == 0:
        return torch.zeros(0)
    if not np.any(x):
        return torch.zeros(n_frames)
    pw = _pyworld()
    period = 1000.0 * hop_length / sample_rate
    x = np.ascontiguousarray(x)
    f0, times = pw.dio(x, sample_rate, f0_floor=f0_min, f0_ceil=f0_max, frame_period=period)
    f0 = pw.stonemask(x, f0, times, sample_rate)
    need = n_frames + 1
    if f0.shape[0] < need:
        f0 = np.pad(f0, (0, need - f0.shape[0]))
    left, right = f0[:n_frames], f0[1:need]
    voiced = (left > 0) & (right > 0)
    mid = np.where(voiced, np.sqrt(np.abs(left * right)), 0.0)  # geometric mean: log-F0 average
    return torch.from_numpy(mid.astype(np.float32))


def pitch_features(f0: Tensor) -> Tensor:
    """F0 ``(F,)`` Hz (0 = unvoiced) -> the decoder's pitch condition ``(2, F)``: log-F0
    standardised over this utterance's voiced frames (0 where unvoiced; std floored at 0.05,
    clamped to +-4), and the voicing flag (1.0 / 0.0)."""
    voiced = f0 > 0
    out = torch.zeros(PITCH_CHANNELS, f0.shape[-1])
    out[1] = voiced.float()
    if voiced.any():
        logf0 = f0[voiced].double().log()
        std = float(logf0.std(unbiased=False)) if logf0.numel() > 1 else 0.0
        z = (logf0 - logf0.mean()) / max(std, 0.05)
        out[0, voiced] = z.clamp(-4, 4).float()
    return out


@dataclass
class F0Moments:
    """A speaker's (or utterance's) log-F0 mean and std over voiced frames (natural log of Hz)."""

    mean: float
    std: float
    voiced_frames: int = 0

    @property
    def median_hz(self) -> float:
        return math.exp(self.mean)

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "voiced_frames": self.voiced_frames}

    @classmethod
    def from_tracks(cls, tracks: Iterable[Tensor]) -> F0Moments:
        """Moments over the voiced frames of F0 tracks (Hz); ValueError if none is voiced."""
        voiced = [t[t > 0].double().log() for t in tracks]
        logf0 = torch.cat(voiced) if voiced else torch.zeros(0, dtype=torch.float64)
        if logf0.numel() == 0:
            raise ValueError("no voiced frame to take F0 statistics from")
        return cls(float(logf0.mean()), float(logf0.std(unbiased=False)), int(logf0.numel()))


def convert_f0(f0: Tensor, source: F0Moments, target: F0Moments) -> Tensor:
    """Move an F0 contour ``(F,)`` Hz from ``source``'s range to ``target``'s: log-F0 is
    standardised with the source's moments and rescaled with the target's (unvoiced stays 0)."""
    out = torch.zeros_like(f0)
    voiced = f0 > 0
    z = (f0[voiced].double().log() - source.mean) / max(source.std, 1e-3)
    out[voiced] = torch.exp(z * target.std + target.mean).to(f0.dtype)
    return out


__all__ = ["F0_MAX", "F0_MIN", "F0Moments", "PITCH_CHANNELS", "convert_f0", "f0_track",
           "pitch_features"]
