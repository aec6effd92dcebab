"""The log-mel front-end and its normalisation statistics: the one home of mel parameters.

Every stage (prepare, training, extraction, resynthesis) builds its front-end with
:func:`build_logmel` from the ``features`` config (``conf/features/logmel.yaml``), and the statistics
written by ``speechvq-prepare`` (``stats.json``) carry that same config so a mismatch is caught.

The statistics themselves (:class:`speechvq.stats.FeatureStats`, ``stats.json``; the
per-utterance :class:`speechvq.stats.StateStore`, ``frontend_state.npz``) live in
:mod:`speechvq.stats`; where they come from (:func:`compute_stats`, :func:`stats_for_rows`,
:func:`measure_states`, :func:`states_for_rows`) is decided here. The spectrogram itself
(:class:`LogMel`, its framing convention: frame ``k`` centred at ``(k + 0.5) * hop`` samples,
``T // hop`` frames) is :mod:`speechvq.nn.logmel`.
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

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.nn.logmel import LogMel as LogMel  # re-exported: the public home of mel features
from speechvq.nn.logmel import chunked_mel_power
from speechvq.nn.logmel import mel_centres as mel_centres
from speechvq.pitch import F0_MAX, F0_MIN, PITCH_CHANNELS, f0_track, pitch_features
from speechvq.stats import FRONTEND_VERSION as FRONTEND_VERSION  # stamped on the statistics
from speechvq.stats import (
    STATE_FILE,
    STD_FLOOR,
    Z_MAX,
    FeatureStats,
    Moments,
    StateStore,
    UtteranceState,
    _Accumulator,
    _check_mode,
    pitch_key,
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
# A crop's frames count as speech (data.crop_speech) when their mean mel power is within SPEECH_DB
# of the utterance's level: stricter than ACTIVE_DB (a quiet room's silence sits 40-50 dB below).
SPEECH_DB = 30.0


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

    def measure(self, wav: Tensor, num_samples: int | None = None,
                moments: bool | None = None) -> UtteranceState:
        """The state of a whole utterance ``wav (T,)`` (its first ``num_samples`` samples).
        ``moments``: measure its own per-bin moments (default: when this front-end's
        normalisation may use them)."""
        wav = wav[:num_samples] if num_samples is not None else wav
        dc = float(wav.double().mean()) if wav.numel() else 0.0
        power = self.mel_power(wav, dc)
        ref = level_reference(power)
        if moments is None:
            moments = self.mode == "utterance" or (self.mode == "speaker" and self.stats is not None)
        own = None
        if moments:
            own = _frame_moments(self.log_mels(power, ref)[:, active_frames(power, ref)])
        return UtteranceState(dc, ref, own, speech=speech_frames(power, ref))

    def f0(self, wav: Tensor, num_samples: int | None = None, f0_min: float = F0_MIN,
           f0_max: float = F0_MAX) -> Tensor:
        """F0 (Hz, 0 unvoiced) of a whole utterance ``wav (T,)`` at its mel frames,
        ``(num_samples // hop,)`` float32: DC removed first (:func:`speechvq.pitch.f0_track`)."""
        n = wav.numel() if num_samples is None else int(num_samples)
        x = wav[:n].double()
        x = x - x.mean() if n else x
        return f0_track(x, self.sample_rate, self.logmel.hop_length, f0_min, f0_max)

    def pitch_condition(self, f0: Tensor, num_samples: int) -> Tensor:
        """An utterance's F0 track ``(F0,)`` -> the decoder's pitch condition
        ``(2, num_samples // hop)``: standardised log-F0 and voicing
        (:func:`speechvq.pitch.pitch_features`), frames past the track zero."""
        out = torch.zeros(PITCH_CHANNELS, self.num_frames(num_samples))
        out[:, : f0.shape[0]] = pitch_features(f0)
        return out

    def pitch(self, wav: Tensor, num_samples: int | None = None, f0_min: float = F0_MIN,
              f0_max: float = F0_MAX) -> Tensor:
        """The decoder's pitch condition of a whole utterance ``wav (T,)``: ``(2, T // hop)``
        (:meth:`f0` of its first ``num_samples`` samples through :meth:`pitch_condition`)."""
        return self.pitch_condition(self.f0(wav, num_samples, f0_min, f0_max), wav.numel())

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

    def norm_of(self, speaker: str | None, state: UtteranceState | None = None
                ) -> tuple[Tensor, Tensor] | None:
        """The mean and (floored) std ``(n_mels,)`` each that :meth:`normalize` applies to
        ``speaker``'s utterance of ``state``, or None when nothing is applied (``none``)."""
        m = self._moments_for(speaker, state)
        return None if m is None else (m.mean, m.std.clamp_min(STD_FLOOR))

    def batch(self, wav: Tensor, dc: Tensor, ref: Tensor, num_samples: Tensor,
              mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
        """Crops ``wav (B, T)`` -> normalised model input ``(B, n_mels, T // hop)`` in one batched
        pass on ``wav``'s device: what ``self(wav[b], speaker, state, num_samples[b])`` gives for
        each crop (to float rounding), from its utterance's ``dc``, ``ref`` ``(B,)`` and the
        moments of :meth:`norm_of` stacked, ``mean``, ``std`` ``(B, n_mels)`` (None: ``none``).
        For training on an accelerator, where the loader then only decodes the crops."""
        with torch.no_grad():
            power = self.logmel.mel_power(wav.float() - dc.float()[:, None])
            if self.level == "absolute":
                feats = torch.log(torch.clamp(power, min=self.logmel.log_floor))
            else:
                ref = ref.double()[:, None, None]
                floor = (ref * 10.0 ** (-self.range_db / 10.0)).float()
                feats = torch.log(torch.maximum(power, floor)) - torch.log(ref).float()
            if mean is not None:
                feats = ((feats - mean.float()[:, :, None]) / std.float()[:, :, None])
                feats = feats.clamp(-Z_MAX, Z_MAX)
            frames = torch.arange(feats.shape[-1], device=feats.device)
            padded = frames[None, :] >= (num_samples.to(feats.device) // self.logmel.hop_length)[:, None]
            return feats.masked_fill(padded[:, None, :], 0.0)

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


def speech_frames(power: Tensor, ref: float, within_db: float = SPEECH_DB) -> Tensor:
    """``(F,)`` bool: the frames of mel power ``(n_mels, F)`` whose mean power is within
    ``within_db`` of the utterance's level ``ref``: its speech rather than the pauses and silence
    around it (stored with every state; training crops with ``data.crop_speech`` read it)."""
    return power.double().mean(dim=0) >= ref * 10.0 ** (-within_db / 10.0)


def _frame_moments(feats: Tensor) -> Moments:
    """Per-bin moments of ``feats (n_mels, F)`` over frames (std floored)."""
    if feats.shape[-1] == 0:
        n = feats.shape[0]
        return Moments(torch.zeros(n), torch.ones(n), 0)
    x = feats.double()
    return Moments(x.mean(-1).float(), x.std(-1, unbiased=False).clamp_min(STD_FLOOR).float(),
                   int(x.shape[-1]))


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


def measure_states(
    rows: Sequence[ManifestRow], features_cfg: Mapping, samples_per_unit: int,
    pitch: Sequence[float] | None = None, workers: int = 1, progress: bool = True,
) -> StateStore:
    """The :class:`speechvq.stats.StateStore` of ``rows``: each utterance decoded once and measured
    by :meth:`FrontEnd.measure` (its own moments with ``normalize=utterance``) on its first
    ``T // samples_per_unit`` whole units, as a training crop and extraction measure it; with
    ``pitch=(f0_min, f0_max)`` also its F0 track (:meth:`FrontEnd.f0`). Unreadable files are
    logged and left out (a crop of them is replaced, as for any bad file). ``workers`` threads."""
    front = FrontEnd(features_cfg, analysis_only=True)
    own_moments = front.mode == "utterance"
    spu = int(samples_per_unit)

    def measure(row: ManifestRow) -> tuple[UtteranceState, Tensor | None] | None:
        try:
            wav = load_audio(row.path, front.sample_rate)
        except AudioError as err:
            log.warning("front-end states: skipping %s", err)
            return None
        n = wav.numel() // spu * spu or wav.numel()
        with torch.no_grad():
            state = front.measure(wav, n, moments=own_moments)
            f0 = front.f0(wav, n, *pitch) if pitch is not None else None
        return state, f0

    kept: list[tuple[ManifestRow, UtteranceState, Tensor | None]] = []
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for row, found in tqdm(zip(rows, pool.map(measure, rows), strict=True), total=len(rows),
                               desc="front-end states", unit="utt", disable=not progress):
            if found is not None:
                kept.append((row, *found))
    f0 = {pitch_key(pitch): [k[2] for k in kept]} if pitch is not None else None
    return StateStore.from_states(features_cfg, spu, [k[0].id for k in kept],
                                  [k[0].num_samples for k in kept], [k[1] for k in kept], f0)


def states_for_rows(
    rows: Sequence[ManifestRow], features_cfg: Mapping, samples_per_unit: int,
    pitch: Sequence[float] | None = None, found: Sequence[str | os.PathLike] = (),
    cache: str | os.PathLike | None = None, workers: int = 1, progress: bool = True,
) -> tuple[StateStore, np.ndarray]:
    """The front-end states of ``rows``: the one policy for where they come from.

    The first store among ``found`` (``stats.json``'s neighbour ``frontend_state.npz`` from
    ``speechvq-prepare``, a run folder's own) made with this features config and unit serves the
    rows it holds (and the F0 range ``pitch``, when asked); the rest are measured now
    (:func:`measure_states`) and, with ``cache``, the store of ``rows`` is written there so that a
    resumed run measures nothing. Returns ``(store, store index of each row, -1 when unreadable)``.
    """
    key = pitch_key(pitch) if pitch is not None else None
    store, missing = None, list(range(len(rows)))
    for path in found:
        if not Path(path).is_file():
            continue
        try:
            candidate = StateStore.load(path)
        except ValueError as err:
            log.warning("%s", err)
            continue
        problem = candidate.problem(features_cfg, samples_per_unit)
        if problem is None and key is not None and key not in candidate.f0_keys:
            problem = f"holds no F0 tracks for the range {key} Hz (model.pitch)"
        if problem is not None:
            log.info("%s: not used (%s)", path, problem)
            continue
        index = candidate.lookup([r.id for r in rows], [r.num_samples for r in rows])
        if (index >= 0).any():
            store, missing = candidate, [i for i in range(len(rows)) if index[i] < 0]
            break
    if store is not None and not missing:
        return store, index
    todo = [rows[i] for i in missing]
    log.info("measuring the front-end state%s of %d of %d utterances once (speechvq-prepare "
             "stores them with the corpus as %s: re-run it to add them)",
             " and F0 track" if key else "", len(todo), len(rows), STATE_FILE)
    measured = measure_states(todo, features_cfg, samples_per_unit, pitch, workers, progress)
    if store is not None:
        have = index[index >= 0]
        measured = StateStore.concat([store.subset(have), measured])
    if cache is not None:
        measured.save(cache)
    return measured, measured.lookup([r.id for r in rows], [r.num_samples for r in rows])


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
