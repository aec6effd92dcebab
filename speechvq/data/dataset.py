"""Datasets over a manifest: random training crops and whole utterances, plus their collate.

Crops and utterances are kept to whole units of the model's ``samples_per_unit`` (given by the
model: :attr:`speechvq.vqvae.VQVAE.samples_per_unit`), so mel frames, units and masks line up.

Items are dicts ``{"id", "wav": (T,), "feats": (n_mels, F) normalised (when a features config is
given), "pitch": (2, F) (with ``pitch=(f0_min, f0_max)``: the decoder's F0 condition of
:meth:`speechvq.features.FrontEnd.pitch`), "speaker": int, "num_samples": int}`` where
``num_samples`` counts the valid samples before zero padding. Features always come from
:class:`speechvq.features.FrontEnd`, the one front-end of every stage: a whole utterance's
item is exactly ``FrontEnd(cfg, stats)(wav, speaker)``, and a training crop is made with its
whole utterance's state (level, DC, utterance moments).

A file that cannot be read at load time never stops a run: it is logged once and, for training
crops, replaced by another utterance chosen deterministically; whole-utterance items are dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from speechvq.audio import AudioError, load_audio
from speechvq.data.manifest import ManifestRow
from speechvq.features import FeatureStats, FrontEnd, UtteranceState

log = logging.getLogger(__name__)

# How many other utterances a crop tries before deciding the corpus itself is broken.
MAX_SUBSTITUTES = 20


def _warn_bad(warned: set[str], err: AudioError, what: str) -> None:
    if err.path not in warned:  # once per file (and dataset copy), not once per epoch
        warned.add(err.path)
        log.warning("%s; %s", err, what)


def _front_end(stats: FeatureStats | None, features_cfg: Mapping | None,
               sample_rate: int) -> FrontEnd | None:
    """The one front-end (:class:`speechvq.features.FrontEnd`), or None for waveform models."""
    if features_cfg is None:
        return None
    front = FrontEnd(features_cfg, stats)
    if front.sample_rate != sample_rate:
        raise ValueError(
            f"features.sample_rate {front.sample_rate} != dataset sample_rate {sample_rate}"
        )
    return front


def _item(row: ManifestRow, wav: Tensor, feats: Tensor | None, speaker: int, n: int,
          pitch: Tensor | None = None) -> dict:
    item = {"id": row.id, "wav": wav, "speaker": speaker, "num_samples": n}
    if feats is not None:
        item["feats"] = feats
    if pitch is not None:
        item["pitch"] = pitch
    return item


class _ManifestDataset(torch.utils.data.Dataset):
    """What both datasets hold: the rows, the speakers' ids, the unit size and the front-end."""

    def __init__(self, rows: Sequence[ManifestRow], speakers: Sequence[str],
                 stats: FeatureStats | None, features_cfg: Mapping | None, sample_rate: int,
                 samples_per_unit: int, pitch: Sequence[float] | None = None) -> None:
        self.rows = list(rows)
        self.pitch = tuple(float(v) for v in pitch) if pitch is not None else None
        self.speakers = list(speakers)
        self._speaker_ids = {s: i for i, s in enumerate(self.speakers)}
        self.sample_rate = int(sample_rate)
        self.samples_per_unit = int(samples_per_unit)
        self._front = _front_end(stats, features_cfg, self.sample_rate)
        self._warned: set[str] = set()
        if self.pitch is not None and self._front is None:
            raise ValueError("the pitch condition needs a features config (mel model)")

    def _pitch_of(self, wav: Tensor, n: int) -> Tensor:
        """The pitch condition (2, T // hop) of a whole utterance (its first n samples)."""
        return self._front.pitch(wav, n, *self.pitch)

    def __len__(self) -> int:
        return len(self.rows)

    def unknown_speakers(self) -> list[str]:
        """The speakers of the rows that are not in ``speakers``, sorted."""
        return sorted({r.speaker for r in self.rows} - set(self._speaker_ids))


class CropDataset(_ManifestDataset):
    """Random fixed-length training crops; item ``i`` is a pure function of ``(seed, epoch, i)``.

    ``crop_seconds`` is rounded down to whole units (``samples_per_unit``). Shorter utterances are
    zero-padded at the end (``num_samples`` says how much is real). ``speakers`` gives the speaker
    ids (index in the list); every row's speaker must be in it. ``features_cfg=None``: waveforms only.
    ``cache_audio``: keep every decoded waveform in memory after its first read (float32, 4 bytes
    per sample: for corpora that fit in RAM; decoding is a large part of a CPU step). With
    DataLoader workers each worker fills its own copy.
    """

    def __init__(self, rows: Sequence[ManifestRow], speakers: Sequence[str],
                 stats: FeatureStats | None, features_cfg: Mapping | None, crop_seconds: float,
                 sample_rate: int, samples_per_unit: int, seed: int = 0,
                 cache_audio: bool = False, pitch: Sequence[float] | None = None) -> None:
        if not rows:
            raise ValueError("CropDataset needs at least one utterance")
        super().__init__(rows, speakers, stats, features_cfg, sample_rate, samples_per_unit,
                         pitch)
        self.cache_audio = bool(cache_audio)
        self._cache: dict[int, Tensor] = {}
        if unknown := self.unknown_speakers():
            raise ValueError(f"speaker(s) {unknown[:5]} of the manifest are not in `speakers`")
        hop = self.samples_per_unit
        self.crop_samples = int(round(crop_seconds * sample_rate)) // hop * hop
        if self.crop_samples <= 0:
            raise ValueError(f"crop_seconds {crop_seconds} is shorter than one unit "
                             f"({hop} samples)")
        self.seed = int(seed)
        self.epoch = 0
        self._states: dict[int, UtteranceState] = {}  # whole-utterance level/moments, per row
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call at the start of every epoch, as for samplers)."""
        self.epoch = int(epoch)

    def _rng(self, index: int, attempt: int = 0) -> np.random.Generator:
        key = [self.seed, self.epoch, index] + ([attempt] if attempt else [])
        return np.random.default_rng(key)

    def _load(self, index: int) -> tuple[int, Tensor]:
        """Audio of ``index``, or of a deterministic substitute when that file is unreadable."""
        for attempt in range(MAX_SUBSTITUTES + 1):
            i = index if attempt == 0 else int(self._rng(index, attempt).integers(len(self.rows)))
            if i in self._bad:
                continue
            if i in self._cache:
                return i, self._cache[i]
            try:
                wav = load_audio(self.rows[i].path, self.sample_rate)
            except AudioError as err:
                self._bad.add(i)
                _warn_bad(self._warned, err, "skipping it (another utterance is used in its place)")
                continue
            if self.cache_audio:
                self._cache[i] = wav
            return i, wav
        raise RuntimeError(
            f"{MAX_SUBSTITUTES + 1} utterances in a row could not be read (last tried: "
            f"{self.rows[i].path}); the corpus looks broken, re-run speechvq-prepare"
        )

    def _state(self, i: int, wav: Tensor) -> UtteranceState | None:
        """The whole utterance's front-end state (crops are made exactly as the whole is)."""
        if self._front is None:
            return None
        if i not in self._states:
            hop = self.samples_per_unit
            n = wav.numel() // hop * hop or wav.numel()  # as UtteranceDataset cuts it
            self._states[i] = self._front.measure(wav, n)
            if self.pitch is not None:
                self._states[i].pitch = self._pitch_of(wav, n)
        return self._states[i]

    def __getitem__(self, index: int) -> dict:
        i, wav = self._load(index)
        row = self.rows[i]
        state = self._state(i, wav)
        n = wav.numel()
        start = 0
        if n >= self.crop_samples:
            start = int(self._rng(index).integers(0, n - self.crop_samples + 1))
            wav = wav[start : start + self.crop_samples].clone()
            n = self.crop_samples
        else:
            wav = torch.cat([wav, wav.new_zeros(self.crop_samples - n)])  # a new tensor: the
            # cached waveform is never written to
        feats = self._front(wav, row.speaker, state, n) if self._front else None
        pitch = None
        if self.pitch is not None:  # the whole utterance's track, at the nearest frames (<= 5 ms)
            frames = self._front.num_frames(self.crop_samples)
            first = round(start / self._front.logmel.hop_length)
            pitch = state.pitch[:, first : first + frames]
            pitch = torch.cat([pitch, pitch.new_zeros(2, frames - pitch.shape[1])], 1)
            pitch[:, self._front.num_frames(n):] = 0.0
        return _item(row, wav, feats, self._speaker_ids[row.speaker], n, pitch)


class UtteranceDataset(_ManifestDataset):
    """Whole utterances in manifest order (validation, test, unit extraction, resynthesis).

    Each utterance is cut to a whole number of units (``T // samples_per_unit`` of them: the tail
    shorter than one unit gets no unit anyway). An unreadable file gives ``None`` (logged once), which
    :func:`collate` drops. A speaker not in ``speakers`` gets id -1.
    """

    def __init__(self, rows: Sequence[ManifestRow], speakers: Sequence[str],
                 stats: FeatureStats | None, features_cfg: Mapping | None, sample_rate: int,
                 samples_per_unit: int, pitch: Sequence[float] | None = None) -> None:
        super().__init__(rows, speakers, stats, features_cfg, sample_rate, samples_per_unit,
                         pitch)
        if unknown := self.unknown_speakers():
            log.warning("speaker(s) %s are not among the model's speakers: id -1", unknown[:5])

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        try:
            wav = load_audio(row.path, self.sample_rate)
        except AudioError as err:
            _warn_bad(self._warned, err, "skipping it")
            return None
        n = wav.numel() // self.samples_per_unit * self.samples_per_unit
        wav = wav[:n].clone()
        feats = self._front(wav, row.speaker, num_samples=n) if self._front else None
        pitch = self._pitch_of(wav, n) if self.pitch is not None else None
        return _item(row, wav, feats, self._speaker_ids.get(row.speaker, -1), n, pitch)

    def sorted_batches(self, max_seconds: float) -> list[list[int]]:
        """Index batches of similar lengths (longest first) whose padded size stays within
        ``max_seconds`` of audio (a longer utterance gets a batch of its own). Deterministic;
        use as ``DataLoader(ds, batch_sampler=ds.sorted_batches(s), collate_fn=fn)`` with
        ``fn = functools.partial(collate, samples_per_unit=ds.samples_per_unit)``."""
        limit = max_seconds * self.sample_rate
        order = sorted(range(len(self.rows)), key=lambda i: (-self.rows[i].num_samples, i))
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = self.rows[current[0]].num_samples if current else self.rows[i].num_samples
            if current and longest * (len(current) + 1) > limit:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches


def collate(items: Sequence[dict | None], samples_per_unit: int) -> dict | None:
    """Stack items into a batch, zero-padding to whole units of the longest; ``None`` items (bad
    files) are dropped.

    Returns ``{"ids": [B], "wav": (B, T), "feats": (B, n_mels, F) (when items have feats),
    "pitch": (B, 2, F) (when items have a pitch condition),
    "speaker": (B,) long, "num_samples": (B,) long, "mask": (B, T // samples_per_unit) bool}``
    where ``mask`` marks the valid units; ``None`` when every item was dropped (skip that batch).
    """
    items = [it for it in items if it is not None]
    if not items:
        return None
    hop = int(samples_per_unit)
    longest = max(max(it["wav"].numel() for it in items), hop)
    t_pad = -(-longest // hop) * hop
    wav = torch.zeros(len(items), t_pad)
    for b, it in enumerate(items):
        wav[b, : it["wav"].numel()] = it["wav"]
    num_samples = torch.tensor([it["num_samples"] for it in items], dtype=torch.long)
    n_units = t_pad // hop
    mask = torch.arange(n_units)[None, :] < (num_samples // hop)[:, None]
    batch = {
        "ids": [it["id"] for it in items],
        "wav": wav,
        "speaker": torch.tensor([it["speaker"] for it in items], dtype=torch.long),
        "num_samples": num_samples,
        "mask": mask,
    }
    for key in ("feats", "pitch"):
        if all(key in it for it in items):
            channels = items[0][key].shape[0]
            frames = max(it[key].shape[-1] for it in items)
            padded = torch.zeros(len(items), channels, frames)
            for b, it in enumerate(items):
                padded[b, :, : it[key].shape[-1]] = it[key]
            batch[key] = padded
    return batch


# --- the fit loop's batches: a pure function of (seed, epoch, rank), for exact resume -----------


def train_batches(
    n_items: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """One epoch of training batches for one rank: a permutation from (seed, epoch), cut into
    ``world_size * batch_size`` blocks (the last partial block dropped) and sharded by rank, so
    every rank gets the same number of batches and the order is reproducible for resume."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_items, generator=gen).tolist()
    block = world_size * batch_size
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size]
        for start in range(0, n_items - block + 1, block)
    ]


def valid_batches(
    n_items: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """Validation batches in dataset order, sharded by rank; the index list is padded by
    wrapping around so every rank runs the same number of batches."""
    if n_items == 0:
        return []
    per_rank = math.ceil(n_items / world_size)
    padded = [i % n_items for i in range(per_rank * world_size)]
    mine = padded[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
