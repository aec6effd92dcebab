"""Log-mel normalisation statistics: per-bin moments, the ``stats.json`` container, accumulation.

:class:`FeatureStats` holds global and per-speaker :class:`Moments` with the features config they
were computed with (``speechvq-prepare`` writes it as ``stats.json``; checkpoints carry it in their
meta). Where statistics come from is one policy, in :mod:`speechvq.features`
(:func:`speechvq.features.compute_stats`, :func:`speechvq.features.stats_for_rows`); the front-end
that applies them is :class:`speechvq.features.FrontEnd`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from speechvq.files import write_text

log = logging.getLogger(__name__)

NORMALIZE_MODES = ("speaker", "global", "utterance", "none")
# Bumped whenever what FrontEnd computes changes for the same config: statistics (stats.json, a
# checkpoint's meta) made by another version would normalise the wrong features, silently.
FRONTEND_VERSION = 2
# A mel bin that hardly moves (stuck at the floor of a band-limited or very quiet recording) has a
# tiny std; dividing by it would blow its noise up (|z| ~ 675 with the old 1e-3). Natural-log
# units: 0.5 is about 2 dB, far below any speech bin's spread (typically 8-13 dB).
STD_FLOOR = 0.5
# Normalised values are clamped to [-Z_MAX, Z_MAX]: a bin's variance over the data its statistics
# came from is at most 1, and over any other utterance at most Z_MAX ** 2.
Z_MAX = 10.0


def plain_dict(cfg: Mapping) -> dict:
    """A plain dict copy of a (possibly omegaconf) mapping of scalars."""
    return {str(k): cfg[k] for k in cfg}


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
        self.features = plain_dict(features)
        self.global_ = global_
        self.speakers = dict(speakers)
        self.path = path  # where it was loaded from, for error messages
        self.version = FRONTEND_VERSION
        self._warned: set[str] = set()

    # --- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "frontend_version": self.version,
            "features": dict(self.features),
            "global": self.global_.to_dict(),
            "speakers": {spk: m.to_dict() for spk, m in sorted(self.speakers.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping, path: str | None = None) -> FeatureStats:
        where = path or "feature stats"
        try:
            stats = cls(
                d["features"],
                Moments.from_dict(d["global"]),
                {str(s): Moments.from_dict(m) for s, m in d["speakers"].items()},
                path=path,
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where}: not a speechvq stats file ({err!r})") from None
        stats.version = int(d.get("frontend_version", 1))
        return stats

    def save(self, path: str | os.PathLike) -> None:
        """Write as JSON, atomically."""
        write_text(path, _dumps(self.to_dict()) + "\n")

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
        where = self.path or "feature stats"
        if self.version != FRONTEND_VERSION:
            raise ValueError(
                f"{where}: made by front-end version {self.version}, this speechvq computes "
                f"version {FRONTEND_VERSION} features; re-run speechvq-prepare (and retrain a "
                "model trained on the old features)"
            )
        cfg = plain_dict(features_cfg)
        keys = (set(cfg) | set(self.features)) - {"normalize"}
        diff = [
            f"{k}: stats {self.features.get(k, '<absent>')!r} vs config {cfg.get(k, '<absent>')!r}"
            for k in sorted(keys)
            if cfg.get(k) != self.features.get(k)
        ]
        if diff:
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
        return ((feats - mean) / std).clamp(-Z_MAX, Z_MAX)

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
    return ((feats - mean) / std).clamp(-Z_MAX, Z_MAX)


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
