"""The log-mel front-end and its normalisation statistics: the one home of mel parameters.

Every stage (prepare, training, extraction, resynthesis) builds its front-end with
:func:`build_logmel` from the ``features`` config (``conf/features/logmel.yaml``), and the statistics
written by ``speechvq-prepare`` (``stats.json``) carry that same config so a mismatch is caught.

Framing convention: the waveform is pre-emphasised, reflect-padded by ``(n_fft - hop) // 2``
samples on each side and framed with ``center=False``, so mel frame ``k`` is centred at
``(k + 0.5) * hop / sample_rate`` seconds and ``num_frames(T) == T // hop``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio

if TYPE_CHECKING:
    from speechvq.data.manifest import ManifestRow

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("speaker", "global", "utterance", "none")
# A mel bin that never moves (e.g. stuck at the log floor) has std 0; dividing by it would blow up.
STD_FLOOR = 1e-3


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

    def forward(self, wav: Tensor) -> Tensor:
        """``wav: (T,)`` or ``(B, T)`` -> log-mels ``(n_mels, F)`` or ``(B, n_mels, F)``, float32."""
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
            logmel = torch.log(torch.clamp(mel, min=self.log_floor))
        return logmel.reshape(*batch_shape, self.n_mels, logmel.shape[-1])


def _plain(cfg: Mapping) -> dict:
    """A plain dict copy of a (possibly omegaconf) mapping of scalars."""
    return {str(k): cfg[k] for k in cfg}


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


@dataclass
class Moments:
    """Mean and standard deviation per mel bin, ``(n_mels,)`` each, over ``frames`` frames."""

    mean: Tensor
    std: Tensor
    frames: int

    def to_dict(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist(), "frames": int(self.frames)}

    @classmethod
    def from_dict(cls, d: Mapping) -> Moments:
        mean = torch.tensor(d["mean"], dtype=torch.float32)
        std = torch.tensor(d["std"], dtype=torch.float32)
        if mean.shape != std.shape or mean.dim() != 1:
            raise ValueError(f"mean/std shapes {tuple(mean.shape)} and {tuple(std.shape)} differ")
        return cls(mean, std, int(d["frames"]))


def _dumps(d: dict) -> str:
    """JSON with one line per list of numbers (readable, and small for hundreds of speakers)."""
    text = json.dumps(d, indent=1)
    return re.sub(
        r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text
    )


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalisation mode {mode!r}; choose one of {NORMALIZE_MODES}")


class FeatureStats:
    """Per-corpus log-mel statistics: global and per-speaker mean/std per mel bin.

    Serialised as ``{"features": {...}, "global": {"mean", "std", "frames"},
    "speakers": {spk: {...}}}`` (``stats.json``, written beside the manifest by prepare).
    """

    def __init__(
        self,
        features: Mapping,
        global_: Moments,
        speakers: Mapping[str, Moments],
        path: str | None = None,
    ) -> None:
        self.features = _plain(features)
        self.global_ = global_
        self.speakers = dict(speakers)
        self.path = path  # where it was loaded from, for error messages
        self._warned: set[str] = set()

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "features": dict(self.features),
            "global": self.global_.to_dict(),
            "speakers": {spk: m.to_dict() for spk, m in sorted(self.speakers.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping, path: str | None = None) -> FeatureStats:
        where = path or "feature stats"
        try:
            return cls(
                d["features"],
                Moments.from_dict(d["global"]),
                {str(s): Moments.from_dict(m) for s, m in d["speakers"].items()},
                path=path,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a speechvq stats file ({err!r})") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are shared
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_dumps(self.to_dict()) + "\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ValueError(f"{path}: stats file not found (run speechvq-prepare)") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(d, path=str(path))

    # --- checks --------------------------------------------------------------------------------
    def check_features(self, features_cfg: Mapping) -> None:
        """Raise ValueError if ``features_cfg`` differs from the config these stats were made with
        (``normalize`` is not compared: it is how the stats are used, not how features are made)."""
        cfg = _plain(features_cfg)
        keys = (set(cfg) | set(self.features)) - {"normalize"}
        diff = [
            f"{k}: stats {self.features.get(k, '<absent>')!r} vs config {cfg.get(k, '<absent>')!r}"
            for k in sorted(keys)
            if cfg.get(k) != self.features.get(k)
        ]
        if diff:
            where = self.path or "feature stats"
            raise ValueError(
                f"{where}: computed with different mel features than configured ("
                + "; ".join(diff)
                + "); re-run speechvq-prepare or use the matching features config"
            )

    # --- normalisation -------------------------------------------------------------------------
    def _moments(self, speaker: str | None, mode: str) -> Moments:
        if mode == "global" or speaker is None:
            return self.global_
        if speaker in self.speakers:
            return self.speakers[speaker]
        if speaker not in self._warned:
            self._warned.add(speaker)
            log.warning(
                "speaker %r has no statistics in %s; using the global statistics",
                speaker,
                self.path or "the feature stats",
            )
        return self.global_

    def _mean_std(
        self, feats: Tensor, speaker: str | Sequence[str] | None, mode: str
    ) -> tuple[Tensor, Tensor]:
        """Mean and std broadcastable against ``feats`` ((n_mels, F) or (B, n_mels, F))."""
        if feats.dim() == 3 and speaker is not None and not isinstance(speaker, str):
            if len(speaker) != feats.shape[0]:
                raise ValueError(f"{len(speaker)} speakers for a batch of {feats.shape[0]}")
            ms = [self._moments(s, mode) for s in speaker]
            mean = torch.stack([m.mean for m in ms])[:, :, None]
            std = torch.stack([m.std for m in ms])[:, :, None]
        else:
            if speaker is not None and not isinstance(speaker, str):
                raise ValueError("a list of speakers needs batched features (B, n_mels, F)")
            m = self._moments(speaker, mode)
            mean, std = m.mean[:, None], m.std[:, None]
        return mean.to(feats), std.clamp_min(STD_FLOOR).to(feats)

    def normalize(
        self,
        feats: Tensor,
        speaker: str | Sequence[str] | None,
        mode: str,
        valid_frames: int | None = None,
    ) -> Tensor:
        """Normalise log-mels ``(n_mels, F)`` or ``(B, n_mels, F)`` (same shape back).

        ``mode``: ``speaker`` (the speaker's statistics; global ones for an unknown speaker, with a
        warning), ``global``, ``utterance`` (the features' own statistics over their first
        ``valid_frames`` frames) or ``none``. ``speaker`` may be a list, one per batch item.
        """
        _check_mode(mode)
        if mode == "none":
            return feats
        if mode == "utterance":
            return utterance_normalize(feats, valid_frames)
        mean, std = self._mean_std(feats, speaker, mode)
        return (feats - mean) / std

    def denormalize(self, feats: Tensor, speaker: str | Sequence[str] | None, mode: str) -> Tensor:
        """Invert :meth:`normalize` (used before the vocoder); same shapes.

        ``utterance`` statistics are not kept, so that mode is undone with the speaker's statistics
        (the best available guess of what the utterance's were).
        """
        _check_mode(mode)
        if mode == "none":
            return feats
        mean, std = self._mean_std(feats, speaker, "global" if mode == "global" else "speaker")
        return feats * std + mean


def utterance_normalize(feats: Tensor, valid_frames: int | None = None) -> Tensor:
    """Normalise each mel bin by its own mean/std over the first ``valid_frames`` frames."""
    valid = feats[..., :valid_frames] if valid_frames is not None else feats
    if valid.shape[-1] == 0:
        return feats
    mean = valid.mean(dim=-1, keepdim=True)
    std = valid.std(dim=-1, unbiased=False, keepdim=True).clamp_min(STD_FLOOR)
    return (feats - mean) / std


class _Accumulator:
    """Running sum and sum of squares in float64 (float32 loses precision over millions of frames)."""

    def __init__(self, n_mels: int) -> None:
        self.sum = torch.zeros(n_mels, dtype=torch.float64)
        self.sumsq = torch.zeros(n_mels, dtype=torch.float64)
        self.frames = 0

    def add(self, feats: Tensor) -> None:
        x = feats.double()
        self.sum += x.sum(dim=-1)
        self.sumsq += (x * x).sum(dim=-1)
        self.frames += x.shape[-1]

    def merge(self, other: _Accumulator) -> None:
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.frames += other.frames

    def moments(self) -> Moments:
        n = max(self.frames, 1)
        mean = self.sum / n
        var = (self.sumsq / n - mean * mean).clamp_min(0.0)
        return Moments(mean.float(), var.sqrt().clamp_min(STD_FLOOR).float(), self.frames)


def compute_stats(
    rows: Sequence[ManifestRow], features_cfg: Mapping, progress: bool = True, workers: int = 1
) -> FeatureStats:
    """Log-mel mean/std per speaker and over everything, from the utterances in ``rows``.

    Files that cannot be read are logged and skipped; ValueError if none could be read.
    ``workers`` threads decode and analyse files in parallel (both release the GIL).
    """
    logmel = build_logmel(features_cfg)

    def analyse(row: ManifestRow) -> tuple[ManifestRow, _Accumulator | None]:
        try:
            wav = load_audio(row.path, logmel.sample_rate)
        except AudioError as err:
            log.warning("skipping %s", err)
            return row, None
        acc = _Accumulator(logmel.n_mels)
        with torch.no_grad():
            acc.add(logmel(wav))
        return row, acc

    per_speaker: dict[str, _Accumulator] = {}
    skipped = 0
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        results = pool.map(analyse, rows)
        for row, acc in tqdm(
            results, total=len(rows), desc="feature stats", unit="utt", disable=not progress
        ):
            if acc is None:
                skipped += 1
            else:
                per_speaker.setdefault(row.speaker, _Accumulator(logmel.n_mels)).merge(acc)
    if not per_speaker:
        raise ValueError(f"no readable audio among {len(rows)} utterances to compute stats from")
    if skipped:
        log.warning("feature stats: skipped %d unreadable file(s)", skipped)
    total = _Accumulator(logmel.n_mels)
    for acc in per_speaker.values():
        total.merge(acc)
    speakers = {spk: acc.moments() for spk, acc in per_speaker.items()}
    stats = FeatureStats(features_cfg, total.moments(), speakers)
    if not math.isfinite(float(stats.global_.mean.sum())):
        raise ValueError("feature stats are not finite")
    return stats
