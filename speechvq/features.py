"""The log-mel front-end and its normalisation statistics: the one home of mel parameters.

Every stage (prepare, training, extraction, resynthesis) builds its front-end with
:func:`build_logmel` from the ``features`` config (``conf/features/logmel.yaml``), and the statistics
written by ``speechvq-prepare`` (``stats.json``) carry that same config so a mismatch is caught.

The statistics themselves (:class:`speechvq.stats.FeatureStats`, ``stats.json``) live in
:mod:`speechvq.stats`; where they come from (:func:`compute_stats`, :func:`stats_for_rows`) is
decided here.

Framing convention: the waveform is pre-emphasised, reflect-padded by ``(n_fft - hop) // 2``
samples on each side and framed with ``center=False``, so mel frame ``k`` is centred at
``(k + 0.5) * hop / sample_rate`` seconds and ``num_frames(T) == T // hop``.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.pitch import F0_MAX, F0_MIN, PITCH_CHANNELS, f0_track, pitch_features
from speechvq.stats import FRONTEND_VERSION as FRONTEND_VERSION  # stamped on the statistics
from speechvq.stats import (
    STD_FLOOR,
    Z_MAX,
    FeatureStats,
    Moments,
    _Accumulator,
    _check_mode,
)
from speechvq.stats import plain_dict as _plain

if TYPE_CHECKING:
    from speechvq.data.manifest import ManifestRow

log = logging.getLogger(__name__)

LEVEL_MODES = ("utterance", "absolute")
# The level an utterance is measured at: the median mean mel power of its frames within ACTIVE_DB of
# its loudest frame (its speech, whatever the amount of silence around it). Scaling the waveform by
# g scales every frame by g**2 exactly, so relative log-mels, and the units, do not change.
LEVEL_QUANTILE = 0.5
# Statistics (per speaker, per utterance) are taken over "active" frames: those whose mean mel power
# is within ACTIVE_DB of the utterance's level. Silence then does not move them, however much of it
# a recording holds (a corpus trimmed to the speech and one with long pauses normalise alike).
ACTIVE_DB = 40.0


class LogMel(nn.Module):
    """Waveform to log-mel spectrogram: ``(T,) -> (n_mels, F)`` or ``(B, T) -> (B, n_mels, F)``.

    Keyword arguments are the keys of ``conf/features/logmel.yaml`` (except ``normalize``); build it
    with :func:`build_logmel` rather than spelling the values out. ``F = T // hop_length``.
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        win_length: int,
        hop_length: int,
        n_mels: int,
        f_min: float,
        f_max: float,
        preemphasis: float,
        log_floor: float,
        power: float = 2.0,
    ) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} > n_fft {n_fft}")
        if hop_length > n_fft:
            raise ValueError(f"hop_length {hop_length} > n_fft {n_fft}")
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.win_length = int(win_length)
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.preemphasis = float(preemphasis)
        self.log_floor = float(log_floor)
        self.power = float(power)
        # Padding (n_fft - hop) in total makes the frame count exactly T // hop and puts frame k's
        # centre at (k + 0.5) * hop, so mel frames and 50 Hz units line up by construction.
        total_pad = self.n_fft - self.hop_length
        self.pad_left = total_pad // 2
        self.pad_right = total_pad - self.pad_left
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            power=self.power,
            center=False,
        )

    @property
    def frame_rate(self) -> float:
        """Mel frames per second (100.0 for a 160-sample hop at 16 kHz)."""
        return self.sample_rate / self.hop_length

    @property
    def filterbank(self) -> Tensor:
        """The mel filterbank, ``(n_fft // 2 + 1, n_mels)`` (for inverting to a linear spectrum)."""
        return self.mel.mel_scale.fb

    def num_frames(self, num_samples: int) -> int:
        """Number of mel frames for ``num_samples`` samples: ``num_samples // hop_length``."""
        return int(num_samples) // self.hop_length

    def mel_power(self, wav: Tensor) -> Tensor:
        """``wav: (T,)`` or ``(B, T)`` -> mel power ``(n_mels, F)`` or ``(B, n_mels, F)``, float32,
        before the log (what :class:`FrontEnd` measures levels on)."""
        if wav.dim() not in (1, 2):
            raise ValueError(f"LogMel expects (T,) or (B, T) audio, got shape {tuple(wav.shape)}")
        batch_shape = wav.shape[:-1]
        x = wav.reshape(-1, 1, wav.shape[-1]).float()
        n_frames = self.num_frames(x.shape[-1])
        if n_frames == 0:
            return x.new_zeros(*batch_shape, self.n_mels, 0)
        # Features are always fp32, whatever autocast the caller runs under.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.preemphasis:
                x = torch.cat([x[..., :1], x[..., 1:] - self.preemphasis * x[..., :-1]], dim=-1)
            x = F.pad(x, (self.pad_left, self.pad_right), mode="reflect")
            mel = self.mel(x[:, 0])
        return mel.reshape(*batch_shape, self.n_mels, mel.shape[-1])

    def forward(self, wav: Tensor) -> Tensor:
        """``wav: (T,)`` or ``(B, T)`` -> log-mels ``(n_mels, F)`` or ``(B, n_mels, F)``, float32:
        ``log(clamp(mel_power, log_floor))`` (absolute level; see :class:`FrontEnd` for the
        level-independent model input)."""
        return torch.log(torch.clamp(self.mel_power(wav), min=self.log_floor))


def build_logmel(features_cfg: Mapping) -> LogMel:
    """Build :class:`LogMel` from the ``features`` config; keys LogMel does not take are ignored."""
    cfg = _plain(features_cfg)
    params = inspect.signature(LogMel.__init__).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params}
    missing = [
        name
        for name, p in params.items()
        if name != "self" and p.default is inspect.Parameter.empty and name not in kwargs
    ]
    if missing:
        raise ValueError(f"features config lacks key(s) {', '.join(missing)} needed by LogMel")
    return LogMel(**kwargs)


# ------------------------------------------------------------------------------------------------
# The one front-end: waveform (+ speaker) -> model input, for training, extraction and synthesis


@dataclass
class UtteranceState:
    """What the front-end measures on a whole utterance, so that a training crop of it is made
    exactly as the whole utterance is at extraction: its DC offset, its level (mel power of its
    loud frames) and, for ``normalize=utterance``, its own per-bin moments (relative log-mels)."""

    dc: float
    ref: float
    moments: Moments | None = None
    pitch: Tensor | None = None  # (2, F) the whole utterance's pitch condition, once measured


class FrontEnd:
    """The ONE waveform -> model-input path: used by training, extraction, resynthesis, prompts
    and the statistics of ``speechvq-prepare``.

    1. The DC offset of the utterance is removed.
    2. Log-mels (:class:`LogMel`) are taken relative to the utterance's level
       (``features.level: utterance``): ``log(max(P, ref * 10**(-range/10))) - log(ref)`` with
       ``ref`` the level of the utterance's speech (:func:`level_reference`) and ``range`` =
       ``features.dynamic_range_db``. A gain g multiplies P and ref by g**2, so the features do not
       change; a quiet recording keeps the same dynamic range as a loud one. ``level: absolute``
       keeps the old ``log(clamp(P, log_floor))``.
    3. Normalisation (``features.normalize``), one statistics policy: ``speaker``: the speaker's
       moments from ``stats`` (the training corpus' ``stats.json``, or those computed for a new
       corpus by :func:`stats_for_rows`); a speaker without statistics is normalised with the
       utterance's own moments (never with global ones). ``utterance``: the utterance's own
       moments. ``global``: the corpus moments. ``none``. Values are clamped to +-:data:`Z_MAX`
       and stds floored at :data:`STD_FLOOR`.

    ``__call__(wav (T,), speaker) -> (n_mels, T // hop)``; a crop is normalised with the state of
    its whole utterance (:meth:`measure`). ``analysis_only=True`` builds one without statistics
    (for computing them).
    """

    def __init__(self, features_cfg: Mapping, stats: FeatureStats | None = None,
                 chunk_seconds: float = 30.0, analysis_only: bool = False) -> None:
        cfg = _plain(features_cfg)
        self.features = cfg
        self.logmel = build_logmel(cfg)
        if "normalize" not in cfg and not analysis_only:
            raise ValueError("features config lacks 'normalize' (speaker|global|utterance|none)")
        self.mode = str(cfg.get("normalize", "none"))
        _check_mode(self.mode)
        self.level = str(cfg.get("level", "absolute"))
        if self.level not in LEVEL_MODES:
            raise ValueError(f"unknown features.level {self.level!r}; choose one of {LEVEL_MODES}")
        self.range_db = float(cfg.get("dynamic_range_db", 70.0))
        if self.mode in ("speaker", "global") and stats is None and not analysis_only:
            raise ValueError(f"features.normalize={self.mode} needs feature statistics (stats.json)")
        if stats is not None:
            stats.check_features(cfg)
        self.stats = stats
        self.chunk_frames = max(1, round(chunk_seconds * self.logmel.frame_rate))
        self._warned: set[str] = set()

    @property
    def sample_rate(self) -> int:
        return self.logmel.sample_rate

    @property
    def n_mels(self) -> int:
        return self.logmel.n_mels

    def num_frames(self, num_samples: int) -> int:
        return self.logmel.num_frames(num_samples)

    # --- measuring and log-mels --------------------------------------------------------------
    def mel_power(self, wav: Tensor, dc: float = 0.0) -> Tensor:
        """``wav (T,)`` -> mel power ``(n_mels, T // hop)``, in pieces for long files (exactly the
        frames of one call; memory stays bounded)."""
        return chunked_mel_power(self.logmel, wav.float() - dc, self.chunk_frames)

    def log_mels(self, power: Tensor, ref: float) -> Tensor:
        """Mel power ``(..., n_mels, F)`` -> natural-log mels at this front-end's level policy."""
        if self.level == "absolute":
            return torch.log(torch.clamp(power, min=self.logmel.log_floor))
        floor = ref * 10.0 ** (-self.range_db / 10.0)
        return torch.log(torch.clamp(power, min=floor)) - math.log(ref)

    def measure(self, wav: Tensor, num_samples: int | None = None) -> UtteranceState:
        """The state of a whole utterance ``wav (T,)`` (its first ``num_samples`` samples)."""
        wav = wav[:num_samples] if num_samples is not None else wav
        dc = float(wav.double().mean()) if wav.numel() else 0.0
        power = self.mel_power(wav, dc)
        ref = level_reference(power)
        moments = None
        if self.mode == "utterance" or (self.mode == "speaker" and self.stats is not None):
            moments = _frame_moments(self.log_mels(power, ref)[:, active_frames(power, ref)])
        return UtteranceState(dc, ref, moments)

    def pitch(self, wav: Tensor, num_samples: int | None = None, f0_min: float = F0_MIN,
              f0_max: float = F0_MAX) -> Tensor:
        """The decoder's pitch condition of a whole utterance ``wav (T,)``: ``(2, T // hop)``,
        standardised log-F0 and voicing (:func:`speechvq.pitch.pitch_features`) at the mel
        frames; DC removed first, frames past ``num_samples`` zero."""
        n = wav.numel() if num_samples is None else int(num_samples)
        x = wav[:n].double()
        x = x - x.mean() if n else x
        f0 = f0_track(x, self.sample_rate, self.logmel.hop_length, f0_min, f0_max)
        out = torch.zeros(PITCH_CHANNELS, self.num_frames(wav.numel()))
        out[:, : f0.shape[0]] = pitch_features(f0)
        return out

    def features_of(self, wav: Tensor, state: UtteranceState | None = None) -> Tensor:
        """Un-normalised log-mels ``(n_mels, T // hop)`` of ``wav`` (a whole utterance, or a crop
        of the utterance whose ``state`` is given)."""
        state = state or self.measure(wav)
        return self.log_mels(self.mel_power(wav, state.dc), state.ref)

    # --- normalising --------------------------------------------------------------------------
    def _moments_for(self, speaker: str | None, state: UtteranceState | None) -> Moments | None:
        if self.mode == "none":
            return None
        if self.mode == "global":
            return self.stats.global_
        if self.mode == "speaker" and speaker is not None and speaker in self.stats.speakers:
            return self.stats.speakers[speaker]
        if state is None or state.moments is None:
            raise ValueError("utterance statistics are needed: pass the utterance's state")
        if self.mode == "speaker" and str(speaker) not in self._warned:
            self._warned.add(str(speaker))
            log.warning("speaker %r has no statistics%s: normalising each of its utterances by "
                        "its own", speaker, f" in {self.stats.path}" if self.stats.path else "")
        return state.moments

    def normalize(self, feats: Tensor, speaker: str | None,
                  state: UtteranceState | None = None) -> Tensor:
        """Log-mels ``(n_mels, F)`` -> normalised, same shape (see the class docstring)."""
        m = self._moments_for(speaker, state)
        if m is None:
            return feats
        mean, std = m.mean[:, None].to(feats), m.std.clamp_min(STD_FLOOR)[:, None].to(feats)
        return ((feats - mean) / std).clamp(-Z_MAX, Z_MAX)

    def denormalize(self, feats: Tensor, speaker: str | Sequence[str] | None,
                    state: UtteranceState | None = None) -> Tensor:
        """Invert :meth:`normalize` for decoder outputs ``(n_mels, F)`` or ``(B, n_mels, F)``.

        With the source utterance's ``state`` (reconstruction) its own moments are used when it
        was normalised by them; otherwise the (target) speaker's statistics, else global ones."""
        if self.mode == "none":
            return feats
        names = [speaker] * (feats.shape[0] if feats.dim() == 3 else 1) \
            if speaker is None or isinstance(speaker, str) else list(speaker)
        ms = []
        for name in names:
            if self.mode == "utterance" and state is not None and state.moments is not None:
                ms.append(state.moments)
            elif self.stats is not None and self.mode != "global" and name in self.stats.speakers:
                ms.append(self.stats.speakers[name])
            elif self.stats is not None:
                ms.append(self.stats.global_)
            else:
                raise ValueError("no statistics to undo the normalisation with")
        mean = torch.stack([m.mean for m in ms])[:, :, None].to(feats)
        std = torch.stack([m.std.clamp_min(STD_FLOOR) for m in ms])[:, :, None].to(feats)
        out = feats.reshape(len(ms), *feats.shape[-2:]) * std + mean
        return out.reshape(feats.shape)

    def __call__(self, wav: Tensor, speaker: str | None, state: UtteranceState | None = None,
                 num_samples: int | None = None) -> Tensor:
        """``wav (T,)`` -> normalised model input ``(n_mels, T // hop)``. ``state``: the whole
        utterance's (for a crop); default: measured on ``wav[:num_samples]``. Frames past
        ``num_samples`` (zero padding) are set to 0."""
        state = state or self.measure(wav, num_samples)
        with torch.no_grad():
            feats = self.normalize(self.log_mels(self.mel_power(wav, state.dc), state.ref),
                                   speaker, state)
            if num_samples is not None:
                feats[:, self.num_frames(num_samples):] = 0.0
        return feats


def level_reference(power: Tensor) -> float:
    """The level of an utterance from its mel power ``(n_mels, F)``: the :data:`LEVEL_QUANTILE`
    quantile of the mean power of its frames within :data:`ACTIVE_DB` of the loudest one
    (positive; a tiny value for digital silence). Silence around the speech does not move it."""
    if power.shape[-1] == 0:
        return 1e-12
    frame_power = power.double().mean(dim=0)
    loud = frame_power[frame_power >= frame_power.max() * 10.0 ** (-ACTIVE_DB / 10.0)]
    return max(float(torch.quantile(loud, LEVEL_QUANTILE)), 1e-12)


def active_frames(power: Tensor, ref: float) -> Tensor:
    """``(F,)`` bool: frames of mel power ``(n_mels, F)`` within :data:`ACTIVE_DB` of the level
    ``ref`` (every frame when fewer than a tenth would be: statistics need frames)."""
    frame_power = power.double().mean(dim=0)
    active = frame_power >= ref * 10.0 ** (-ACTIVE_DB / 10.0)
    if int(active.sum()) < max(1, power.shape[-1] // 10):
        return torch.ones_like(active)
    return active


def _frame_moments(feats: Tensor) -> Moments:
    """Per-bin moments of ``feats (n_mels, F)`` over frames (std floored)."""
    if feats.shape[-1] == 0:
        n = feats.shape[0]
        return Moments(torch.zeros(n), torch.ones(n), 0)
    x = feats.double()
    return Moments(x.mean(-1).float(), x.std(-1, unbiased=False).clamp_min(STD_FLOOR).float(),
                   int(x.shape[-1]))


def chunked_mel_power(logmel: LogMel, wav: Tensor, chunk_frames: int) -> Tensor:
    """``logmel.mel_power(wav)`` for a long ``wav: (T,)`` computed in pieces of ``chunk_frames``
    frames: ``(n_mels, T // hop)``, the same frames as one call (STFT memory stays bounded).

    Each piece is computed over extra samples on both sides, so a kept frame's window never
    touches a piece border (reflect padding, pre-emphasis); frames at the real ends of ``wav``
    are computed from the real ends, as in one call.
    """
    hop = logmel.hop_length
    n_frames = wav.shape[-1] // hop
    if n_frames <= chunk_frames:
        return logmel.mel_power(wav)
    margin = math.ceil(logmel.n_fft / hop) + 1
    out = torch.empty(logmel.n_mels, n_frames)
    for f0 in range(0, n_frames, chunk_frames):
        f1 = min(n_frames, f0 + chunk_frames)
        a, b = max(0, f0 - margin), min(n_frames, f1 + margin)
        piece = wav[a * hop : (wav.shape[-1] if b == n_frames else b * hop)]
        out[:, f0:f1] = logmel.mel_power(piece)[:, f0 - a : f1 - a]
    return out


def mel_centres(logmel: LogMel) -> Tensor:
    """Centre frequency (Hz) of each mel bin of ``logmel``, ``(n_mels,)``."""
    fb = logmel.filterbank  # (n_fft // 2 + 1, n_mels)
    return fb.argmax(0).double() * logmel.sample_rate / logmel.n_fft


def augment_mels(feats: Tensor, warp: float = 0.0, eq: float = 0.0, bandlimit: float = 0.0,
                 min_bins: int = 0, mask: float = 0.0, mask_span: int = 5,
                 generator: torch.Generator | None = None) -> Tensor:
    """Speaker- and channel-like perturbations of normalised log-mels ``(B, n_mels, F)`` (same
    shape back), for the encoder's input while the decoder reconstructs the clean features.

    ``warp``: each utterance's mel axis is stretched by a factor drawn from ``[1 - warp, 1 + warp]``
    (a vocal-tract-length change, as VTLP); ``eq``: a smooth random curve over the bins (three
    cosines with N(0, eq) amplitudes, in normalised units) is added (a channel's colouring);
    ``bandlimit``: with this probability an utterance loses every bin above a cutoff drawn from
    ``[min_bins, n_mels)`` (set to 0, the value a band-limited recording's empty bins get from
    its own statistics: 8 kHz sources, telephone channels); ``mask``: about this share of each
    utterance's frames is set to 0 (the normalised mean) in spans of ``mask_span`` frames at
    random places (spans may overlap), so the encoder has to infer them from their context while
    the decoder still reconstructs them (masked reconstruction, as TERA / MAE).
    """
    if feats.dim() != 3:
        raise ValueError(f"augment_mels expects (B, n_mels, F), got {tuple(feats.shape)}")
    B, n, _ = feats.shape
    out = feats
    if warp > 0:
        alpha = 1.0 + (torch.rand(B, 1, generator=generator) * 2 - 1) * warp
        pos = (torch.arange(n, dtype=torch.float32)[None, :] * alpha).clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo.float())[:, :, None].to(feats)
        lo, hi = lo.to(feats.device), hi.to(feats.device)
        index = torch.cat([lo, hi], 1)[:, :, None].expand(-1, -1, out.shape[-1])
        low, high = torch.gather(out, 1, index).split(n, dim=1)
        out = low * (1 - frac) + high * frac
    if eq > 0:
        k = torch.arange(1, 4, dtype=torch.float32)
        amp = torch.randn(B, 3, generator=generator) * eq
        phase = torch.rand(B, 3, generator=generator) * 2 * math.pi
        bins = torch.linspace(0, math.pi, n)
        curve = (amp[:, :, None] * torch.cos(k[None, :, None] * bins + phase[:, :, None])).sum(1)
        out = out + curve[:, :, None].to(feats)
    if bandlimit > 0:
        cut = torch.randint(min(min_bins, n - 1), n, (B,), generator=generator)
        cut = torch.where(torch.rand(B, generator=generator) < bandlimit, cut, torch.full_like(cut, n))
        keep = torch.arange(n)[None, :] < cut[:, None]
        out = out * keep[:, :, None].to(feats)
    if mask > 0:
        F = out.shape[-1]
        span = max(1, min(int(mask_span), F))
        n_spans = max(1, round(mask * F / span))
        starts = torch.randint(0, F - span + 1, (B, n_spans), generator=generator)
        covered = torch.zeros(B, F + 1)
        covered.scatter_add_(1, starts, torch.ones(B, n_spans))
        covered.scatter_add_(1, starts + span, -torch.ones(B, n_spans))
        hidden = covered.cumsum(1)[:, :F] > 0
        out = out.masked_fill(hidden[:, None, :].to(feats.device), 0.0)
    return out


# ------------------------------------------------------------------------------------------------
# corpus statistics and checks


@dataclass
class AudioCheck:
    """What :func:`check_audio` finds in one file (numbers for the corpus summary)."""

    peak: float            # max |x|
    clipped: float         # share of samples at the file's extreme value when it is near full scale
    floor_share: float     # share of log-mel values on the front-end's floor
    high_band_db: float    # mean mel power above 4 kHz relative to all bins, dB
    dc: float              # mean sample value


def check_audio(wav: Tensor, front: FrontEnd, power: Tensor, state: UtteranceState) -> AudioCheck:
    """Level, clipping, floor and bandwidth figures of one file (``power``: its mel power)."""
    peak = float(wav.abs().max()) if wav.numel() else 0.0
    clipped = 0.0
    if peak >= 0.9:
        clipped = float((wav.abs() >= peak * 0.999).double().mean())
    feats = front.log_mels(power, state.ref)
    floor_share = float((feats <= feats.min() + 1e-6).double().mean()) if feats.numel() else 0.0
    high = power[mel_centres(front.logmel) > 4500.0]  # bins wholly above 4 kHz
    total = float(power.double().mean()) + 1e-30
    high_db = 10 * math.log10(float(high.double().mean()) / total + 1e-30) if high.numel() else 0.0
    return AudioCheck(peak, clipped, floor_share, high_db, state.dc)


def summarise_checks(checks: Sequence[AudioCheck], what: str = "corpus") -> list[str]:
    """Warnings (one line each, with numbers) for a corpus that looks unusual; logs a summary."""
    if not checks:
        return []
    n = len(checks)
    peaks = sorted(c.peak for c in checks)
    median_peak_db = 20 * math.log10(max(peaks[n // 2], 1e-10))
    clipping = sum(c.clipped > 1e-3 for c in checks)
    floor = sum(c.floor_share for c in checks) / n
    narrow = sum(c.high_band_db < -20.0 for c in checks)
    dc = sum(abs(c.dc) > 0.01 for c in checks)
    log.info("%s: %d files, median peak %.1f dBFS, %.1f%% of log-mel values on the floor",
             what, n, median_peak_db, 100 * floor)
    warnings = []
    if median_peak_db < -20:
        warnings.append(f"{what}: quiet recordings (median peak {median_peak_db:.1f} dBFS); "
                        "features are taken relative to each utterance's level, so this is "
                        "handled, but check the gain chain")
    if clipping > max(1, 0.02 * n):
        warnings.append(f"{what}: {clipping} of {n} files clip (>0.1% of samples at full scale)")
    if floor > 0.2:
        warnings.append(f"{what}: {100 * floor:.0f}% of log-mel values sit on the floor "
                        "(digital silence, heavy gating or very narrow-band audio)")
    if narrow > 0.25 * n:
        warnings.append(f"{what}: {narrow} of {n} files have almost nothing above 4 kHz "
                        "(narrow-band sources upsampled?)")
    if dc > 0.1 * n:
        warnings.append(f"{what}: {dc} of {n} files have a DC offset above 0.01 (removed)")
    for line in warnings:
        log.warning(line)
    return warnings


def compute_stats(
    rows: Sequence[ManifestRow], features_cfg: Mapping, progress: bool = True, workers: int = 1
) -> FeatureStats:
    """Model-input log-mel mean/std per speaker and over everything, from the utterances in
    ``rows``, made by :class:`FrontEnd` (so at the configured level policy); also checks every file
    and warns, with numbers, when the corpus looks unusual (:func:`summarise_checks`).

    Files that cannot be read are logged and skipped; ValueError if none could be read.
    ``workers`` threads decode and analyse files in parallel (both release the GIL).
    """
    front = FrontEnd(features_cfg, analysis_only=True)

    def analyse(row: ManifestRow) -> tuple[ManifestRow, _Accumulator | None, AudioCheck | None]:
        try:
            wav = load_audio(row.path, front.sample_rate)
        except AudioError as err:
            log.warning("skipping %s", err)
            return row, None, None
        acc = _Accumulator(front.n_mels)
        with torch.no_grad():
            dc = float(wav.double().mean()) if wav.numel() else 0.0
            power = front.mel_power(wav, dc)
            state = UtteranceState(dc, level_reference(power))
            acc.add(front.log_mels(power, state.ref)[:, active_frames(power, state.ref)])
            check = check_audio(wav, front, power, state)
        return row, acc, check

    per_speaker: dict[str, _Accumulator] = {}
    checks: list[AudioCheck] = []
    skipped = 0
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = pool.map(analyse, rows)
        for row, acc, check in tqdm(
            results, total=len(rows), desc="feature stats", unit="utt", disable=not progress
        ):
            if acc is None:
                skipped += 1
            else:
                per_speaker.setdefault(row.speaker, _Accumulator(front.n_mels)).merge(acc)
                checks.append(check)
    if not per_speaker:
        raise ValueError(f"no readable audio among {len(rows)} utterances to compute stats from")
    if skipped:
        log.warning("feature stats: skipped %d unreadable file(s)", skipped)
    summarise_checks(checks)
    total = _Accumulator(front.n_mels)
    for acc in per_speaker.values():
        total.merge(acc)
    speakers = {spk: acc.moments() for spk, acc in per_speaker.items()}
    stats = FeatureStats(features_cfg, total.moments(), speakers)
    if not math.isfinite(float(stats.global_.mean.sum())):
        raise ValueError("feature stats are not finite")
    return stats


def stats_for_rows(
    features_cfg: Mapping[str, Any],
    known: FeatureStats | Mapping[str, Any] | None,
    rows: Sequence[ManifestRow],
    all_rows: Sequence[ManifestRow] | None = None,
    stats_json: str | os.PathLike | None = None,
    progress: bool = True,
    workers: int = 1,
) -> tuple[FeatureStats | None, dict[str, Any]]:
    """The statistics that normalise ``rows`` as training normalised its data: the one policy
    every stage after training uses (extraction, resynthesis, prompts).

    ``normalize``: ``none`` / ``utterance`` need none (returns ``None``). ``global``: the training
    statistics ``known`` (the checkpoint's). ``speaker``: each speaker's moments from ``known``, else
    from ``stats_json`` (the ``stats.json`` beside a new corpus' manifest, when made with the same
    features config), else computed over all of that speaker's utterances in ``all_rows``
    (default ``rows``; the whole manifest, so every shard of an array job gets the same numbers).
    Returns ``(FeatureStats or None, a description for sidecars and logs)``.
    """
    if "normalize" not in features_cfg:  # no silent default: FrontEnd refuses it too
        raise ValueError("features config lacks 'normalize' (speaker|global|utterance|none)")
    mode = str(features_cfg["normalize"])
    info: dict[str, Any] = {"mode": mode, "level": str(features_cfg.get("level", "absolute"))}
    if mode in ("none", "utterance"):
        return None, info
    if isinstance(known, Mapping):
        known = FeatureStats.from_dict(known, path="checkpoint meta")
    if mode == "global":
        if known is None:
            raise ValueError("features.normalize=global but there are no training statistics")
        return known, {**info, "source": "checkpoint"}
    needed = sorted({r.speaker for r in rows})
    moments = {s: known.speakers[s] for s in needed if known is not None and s in known.speakers}
    info["speakers_from_checkpoint"] = len(moments)
    fallback = known.global_ if known is not None else None
    if stats_json is not None and Path(stats_json).exists() and len(moments) < len(needed):
        try:
            side = FeatureStats.load(stats_json)
            side.check_features(features_cfg)
        except ValueError as err:
            log.warning("%s; computing per-speaker statistics instead", err)
        else:
            found = {s: side.speakers[s] for s in needed if s not in moments and s in side.speakers}
            moments.update(found)
            fallback = fallback or side.global_
            info["stats_json"] = str(Path(stats_json).resolve())
            info["speakers_from_stats_json"] = len(found)
    missing = set(needed) - set(moments)
    info["speakers_computed"] = len(missing)
    if missing:
        log.info("computing log-mel statistics of %d speaker(s) unknown to the model",
                 len(missing))
        try:
            computed = compute_stats([r for r in (all_rows or rows) if r.speaker in missing],
                                     features_cfg, progress, workers)
        except ValueError as err:  # none of their files is readable: they will be rejected
            log.warning("%s", err)
        else:
            moments.update({s: computed.speakers[s] for s in missing if s in computed.speakers})
            fallback = fallback or computed.global_
    if fallback is None:
        raise ValueError("no statistics available to normalise the log-mels")
    return FeatureStats(features_cfg, fallback, moments, path=getattr(known, "path", None)), info
