"""Front-end statistics and their files: per-bin moments, ``stats.json``, per-utterance states.

:class:`FeatureStats` holds global and per-speaker :class:`Moments` with the features config they
were computed with (``speechvq-prepare`` writes it as ``stats.json``; checkpoints carry it in their
meta). :class:`StateStore` holds every utterance's :class:`UtteranceState` (what the front-end
measures on a whole utterance: DC, level, its own moments, its F0 track), computed once per corpus
(``frontend_state.npz``) so that a training crop costs what the crop costs. Where statistics come
from is one policy, in :mod:`speechvq.features` (:func:`speechvq.features.compute_stats`,
:func:`speechvq.features.stats_for_rows`, :func:`speechvq.features.measure_states`); the
front-end that applies them is :class:`speechvq.features.FrontEnd`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.files import atomic_write, write_text

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
        problem = features_problem(self.features, self.version, features_cfg, "stats")
        if problem:
            raise ValueError(f"{self.path or 'feature stats'}: {problem}")

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


def features_problem(made_with: Mapping, version: int, features_cfg: Mapping,
                     what: str) -> str | None:
    """Why data made with the features config ``made_with`` by front-end ``version`` does not
    serve ``features_cfg`` (``normalize`` is not compared: it is how the data are used), or None."""
    if version != FRONTEND_VERSION:
        return (f"made by front-end version {version}, this speechvq computes version "
                f"{FRONTEND_VERSION} features; re-run speechvq-prepare (and retrain a model "
                "trained on the old features)")
    cfg = plain_dict(features_cfg)
    keys = (set(cfg) | set(made_with)) - {"normalize"}
    diff = [f"{k}: {what} {made_with.get(k, '<absent>')!r} vs config {cfg.get(k, '<absent>')!r}"
            for k in sorted(keys) if cfg.get(k) != made_with.get(k)]
    if diff:
        return ("computed with different mel features than configured (" + "; ".join(diff)
                + "); re-run speechvq-prepare or use the matching features config")
    return None


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


# ------------------------------------------------------------------------------------------------
# per-utterance front-end states, stored with the corpus


@dataclass
class UtteranceState:
    """What the front-end measures on a whole utterance, so that a training crop of it is made
    exactly as the whole utterance is at extraction: its DC offset, its level (mel power of its
    loud frames) and, for ``normalize=utterance``, its own per-bin moments (relative log-mels)."""

    dc: float
    ref: float
    moments: Moments | None = None
    pitch: Tensor | None = None  # (2, F) the whole utterance's pitch condition, once measured
    speech: Tensor | None = None  # (F,) bool: its speech frames (features.speech_frames)


STATE_FILE = "frontend_state.npz"  # beside the manifest (speechvq-prepare) or in a run folder
STATE_VERSION = 2  # bumped when what a StateStore holds, or how, changes


def pitch_key(f0_range: Sequence[float]) -> str:
    """The name of an F0 range in a :class:`StateStore` (``"50-600"``)."""
    lo, hi = (float(v) for v in f0_range)
    return f"{lo:g}-{hi:g}"


class StateStore:
    """Every utterance's :class:`UtteranceState` for one features config, and (optionally) its F0
    tracks, indexed by utterance id: ``frontend_state.npz`` (+ ``frontend_state.f0-LO-HI.npy``).

    What a state is measured on: the utterance cut to whole units of ``samples_per_unit`` samples
    (as :class:`speechvq.data.dataset.UtteranceDataset` and extraction cut it). The ``.npz`` holds
    ``ids`` (N,), ``num_samples`` (N,) int64 (the manifest's: a row whose length differs has no
    state here), ``dc``, ``ref`` (N,) float64, with ``moments``: ``mean``, ``std`` (N, n_mels)
    float32 and ``frames`` (N,), the speech frames of each utterance (``speech_offsets`` (N + 1,)
    int64 into ``speech_bits``: the masks end to end, one bit per mel frame, packed; see
    :func:`speechvq.features.speech_frames`), and per F0 range ``f0_offsets_LO-HI`` (N + 1,)
    int64 into the float32 track file (F0 in Hz at the mel frames, 0 unvoiced; memory-mapped,
    opened lazily in each process). ``meta`` (JSON): versions, the features config and its hash.
    """

    def __init__(self, features: Mapping, samples_per_unit: int, arrays: Mapping[str, np.ndarray],
                 f0_files: Mapping[str, str | Path] | None = None,
                 version: int = FRONTEND_VERSION, path: str | Path | None = None) -> None:
        self.features = plain_dict(features)
        self.samples_per_unit = int(samples_per_unit)
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        self.version = int(version)
        self.path = Path(path) if path is not None else None
        self.f0_files = {k: Path(v) for k, v in (f0_files or {}).items()}
        self._f0: dict[str, np.ndarray] = {}  # memory maps, opened on first use in a process
        self._index: dict[str, int] | None = None

    # --- building ------------------------------------------------------------------------------
    @classmethod
    def from_states(cls, features: Mapping, samples_per_unit: int, ids: Sequence[str],
                    num_samples: Sequence[int], states: Sequence[UtteranceState],
                    f0: Mapping[str, Sequence[Tensor]] | None = None) -> StateStore:
        """A store from measured states (``f0``: per range key, one track per utterance)."""
        arrays: dict[str, np.ndarray] = {
            "ids": np.asarray([str(i) for i in ids], dtype=np.str_),
            "num_samples": np.asarray(num_samples, dtype=np.int64),
            "dc": np.asarray([s.dc for s in states], dtype=np.float64),
            "ref": np.asarray([s.ref for s in states], dtype=np.float64),
        }
        if states and all(s.moments is not None for s in states):
            arrays["mean"] = np.stack([s.moments.mean.numpy() for s in states]).astype(np.float32)
            arrays["std"] = np.stack([s.moments.std.numpy() for s in states]).astype(np.float32)
            arrays["frames"] = np.asarray([s.moments.frames for s in states], dtype=np.int64)
        if states and all(s.speech is not None for s in states):
            arrays.update(_pack_speech([s.speech for s in states]))
        store = cls(features, samples_per_unit, arrays)
        for key, tracks in (f0 or {}).items():
            store.add_f0(key, tracks)
        return store

    def add_f0(self, key: str, tracks: Sequence[Tensor]) -> None:
        """Attach F0 tracks (one per utterance, in store order) for range ``key``, in memory."""
        lengths = [int(t.numel()) for t in tracks]
        if len(lengths) != len(self):
            raise ValueError(f"{len(lengths)} F0 tracks for {len(self)} utterances")
        self.arrays[f"f0_offsets_{key}"] = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        data = [t.numpy().astype(np.float32) for t in tracks]
        self._f0[key] = np.concatenate(data) if data else np.zeros(0, np.float32)
        self.f0_files.pop(key, None)

    # --- files ---------------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        return {"state_version": STATE_VERSION, "frontend_version": self.version,
                "features": self.features, "features_hash": _features_hash(self.features),
                "samples_per_unit": self.samples_per_unit, "f0": sorted(self.f0_keys)}

    @property
    def f0_keys(self) -> set[str]:
        return {k.removeprefix("f0_offsets_") for k in self.arrays if k.startswith("f0_offsets_")}

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (``.npz``) and an F0 track file per range beside it, each atomically
        (the tracks first: a store never names a track file that is not there)."""
        path = Path(path)
        for key in sorted(self.f0_keys):
            track = self._f0_array(key)
            atomic_write(_f0_path(path, key), lambda f, a=track: np.save(f, a), mode="wb")
        arrays = {**self.arrays, "meta": np.asarray(json.dumps(self.meta))}
        atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")
        self.path = path
        self.f0_files = {k: _f0_path(path, k) for k in self.f0_keys}
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> StateStore:
        """Read a store (ValueError naming the file for anything that is not one)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
            meta = json.loads(str(arrays.pop("meta")))
        except FileNotFoundError:
            raise ValueError(f"{path}: no such front-end state file") from None
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: not a speechvq front-end state file ({err})") from None
        if meta.get("state_version") != STATE_VERSION:
            raise ValueError(f"{path}: state format {meta.get('state_version')} is not "
                             f"{STATE_VERSION}; re-run speechvq-prepare")
        keys = {k.removeprefix("f0_offsets_") for k in arrays if k.startswith("f0_offsets_")}
        return cls(meta["features"], meta["samples_per_unit"], arrays,
                   {k: _f0_path(path, k) for k in keys}, meta["frontend_version"], path)

    def __getstate__(self) -> dict:  # DataLoader workers (spawn): memory maps are reopened
        return {**self.__dict__, "_f0": {k: v for k, v in self._f0.items()
                                          if k not in self.f0_files}, "_index": None}

    # --- looking up ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.arrays["ids"])

    @property
    def has_moments(self) -> bool:
        return "mean" in self.arrays

    def problem(self, features_cfg: Mapping, samples_per_unit: int) -> str | None:
        """Why this store does not serve ``features_cfg`` at ``samples_per_unit``, or None."""
        problem = features_problem(self.features, self.version, features_cfg, "states")
        if problem:
            return problem
        if self.samples_per_unit != int(samples_per_unit):
            return (f"measured on utterances cut to units of {self.samples_per_unit} samples, the "
                    f"model's units are {samples_per_unit}")
        if str(features_cfg.get("normalize")) == "utterance" and not self.has_moments:
            return "holds no per-utterance moments (features.normalize=utterance needs them)"
        return None

    def lookup(self, ids: Sequence[str], num_samples: Sequence[int]) -> np.ndarray:
        """Store index of each utterance, -1 where the store has none of that id and length."""
        if self._index is None:
            self._index = {str(u): i for i, u in enumerate(self.arrays["ids"].tolist())}
        index = np.asarray([self._index.get(str(u), -1) for u in ids], dtype=np.int64)
        lengths = self.arrays["num_samples"][np.maximum(index, 0)] if len(index) else index
        return np.where((index >= 0) & (lengths == np.asarray(num_samples, np.int64)), index, -1)

    def state(self, i: int) -> UtteranceState:
        """The state of utterance ``i`` (a store index)."""
        a = self.arrays
        moments = None
        if self.has_moments:
            moments = Moments(torch.from_numpy(a["mean"][i].copy()),
                              torch.from_numpy(a["std"][i].copy()), int(a["frames"][i]))
        return UtteranceState(float(a["dc"][i]), float(a["ref"][i]), moments,
                              speech=self.speech(i))

    def speech(self, i: int) -> Tensor | None:
        """The speech frames ``(F,)`` bool of utterance ``i`` (None: the store holds none)."""
        if "speech_bits" not in self.arrays:
            return None
        lo, hi = (int(v) for v in self.arrays["speech_offsets"][i : i + 2])
        bits = np.unpackbits(self.arrays["speech_bits"][lo // 8 : (hi + 7) // 8])
        return torch.from_numpy(bits[lo % 8 : lo % 8 + hi - lo].astype(bool))

    def f0(self, i: int, key: str) -> Tensor:
        """The F0 track (Hz, 0 unvoiced) of utterance ``i`` for range ``key``: ``(F,)`` float32."""
        offsets = self.arrays[f"f0_offsets_{key}"]
        return torch.from_numpy(np.array(self._f0_array(key)[offsets[i]: offsets[i + 1]]))

    def _f0_array(self, key: str) -> np.ndarray:
        if key not in self._f0:
            try:
                self._f0[key] = np.load(self.f0_files[key], mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as err:
                raise ValueError(f"{self.f0_files[key]}: cannot read F0 tracks ({err})") from None
        return self._f0[key]

    def subset(self, index: np.ndarray) -> StateStore:
        """The utterances at store indices ``index`` (in that order), F0 tracks included."""
        tracks = _track_arrays(self.arrays)
        per_row = {k: v[index] for k, v in self.arrays.items() if k not in tracks}
        if "speech_bits" in self.arrays:
            per_row.update(_pack_speech([self.speech(int(i)) for i in index]))
        store = StateStore(self.features, self.samples_per_unit, per_row, version=self.version)
        for key in self.f0_keys:
            store.add_f0(key, [self.f0(int(i), key) for i in index])
        return store

    @classmethod
    def concat(cls, stores: Sequence[StateStore]) -> StateStore:
        """One store of several with the same features and unit (F0 ranges all of them have)."""
        first = stores[0]
        keys = set.intersection(*(s.f0_keys for s in stores))
        names = set.intersection(*(set(s.arrays) - _track_arrays(s.arrays) for s in stores))
        arrays = {k: np.concatenate([s.arrays[k] for s in stores]) for k in names}
        if all("speech_bits" in s.arrays for s in stores):
            arrays.update(_pack_speech([s.speech(i) for s in stores for i in range(len(s))]))
        store = cls(first.features, first.samples_per_unit, arrays, version=first.version)
        for key in keys:
            store.add_f0(key, [s.f0(i, key) for s in stores for i in range(len(s))])
        return store


def _track_arrays(arrays: Mapping[str, np.ndarray]) -> set[str]:
    """The arrays of variable-length tracks (not one entry per utterance)."""
    return {k for k in arrays if k.startswith(("f0_offsets_", "speech_"))}


def _pack_speech(masks: Sequence[Tensor]) -> dict[str, np.ndarray]:
    """Speech masks (one ``(F,)`` bool per utterance) -> ``speech_offsets``, ``speech_bits``."""
    lengths = [int(m.numel()) for m in masks]
    flat = np.concatenate([m.numpy().astype(bool) for m in masks]) if masks else np.zeros(0, bool)
    return {"speech_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            "speech_bits": np.packbits(flat)}


def _f0_path(path: Path, key: str) -> Path:
    return path.with_name(f"{path.name.removesuffix('.npz')}.f0-{key}.npy")


def _features_hash(features: Mapping) -> str:
    text = json.dumps({k: v for k, v in plain_dict(features).items() if k != "normalize"},
                      sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
