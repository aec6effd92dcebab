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

A training crop costs what the crop costs: its utterance's state (and F0 track) comes from the
corpus' :class:`speechvq.stats.StateStore` (``frontend_state.npz``, measured once) and only the
crop's window of the file is decoded (:func:`speechvq.audio.read_window`). With
``features_on="device"`` a crop item carries no ``feats`` but what makes them, ``"dc"``,
``"ref"`` and ``"norm"`` ((2, n_mels): the mean and std it is normalised with), and the model's
input is computed for the whole batch on the training device (:meth:`FrontEnd.batch`).

A file that cannot be read at load time never stops a run: it is logged once and, for training
crops, replaced by another utterance chosen deterministically; whole-utterance items are dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from speechvq.audio import AudioError, load_audio, read_window
from speechvq.data.loader import train_batches as train_batches  # noqa: F401 (re-exported)
from speechvq.data.loader import valid_batches as valid_batches  # noqa: F401 (re-exported)
from speechvq.data.manifest import ManifestRow
from speechvq.features import FeatureStats, FrontEnd, UtteranceState
from speechvq.stats import StateStore, pitch_key

log = logging.getLogger(__name__)

# How many other utterances a crop tries before deciding the corpus itself is broken.
MAX_SUBSTITUTES = 20
FEATURES_ON = ("loader", "device")
# How a training crop picks its utterance: each utterance equally often (item i of an epoch is
# utterance i), or with a probability proportional to its length (every second of audio equally
# likely to be cropped, whatever the lengths of the files holding it).
CROP_SAMPLING = ("utterance", "duration")
# How many crop positions a crop tries before taking the most speech-like one (speech > 0).
SPEECH_TRIES = 8


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

    def _whole_units(self, num_samples: int) -> int:
        """The samples of an utterance that its units cover (at least the whole of a short one)."""
        hop = self.samples_per_unit
        return num_samples // hop * hop or num_samples

    def __len__(self) -> int:
        return len(self.rows)

    def unknown_speakers(self) -> list[str]:
        """The speakers of the rows that are not in ``speakers``, sorted."""
        return sorted({r.speaker for r in self.rows} - set(self._speaker_ids))


class CropDataset(_ManifestDataset):
    """Random fixed-length training crops; item ``i`` is a pure function of ``(seed, epoch, i)``.

    ``crop_seconds`` is rounded down to whole units (``samples_per_unit``). Shorter utterances are
    zero-padded at the end (``num_samples`` says how much is real). ``speakers`` gives the speaker
    ids (index in the list); every row's speaker must be in it. ``features_cfg=None``: waveforms
    only. (The training loader's workers live across epochs: it calls :meth:`set_epoch` with
    every item, :class:`speechvq.data.loader.EpochItems`.)

    ``states``: the corpus' :class:`speechvq.stats.StateStore` and the store index of each row
    (-1: none), as :func:`speechvq.features.states_for_rows` returns them; without a state a row's
    whole file is decoded and measured on its first use (once per dataset copy, i.e. per worker).
    ``cache_audio``: keep every decoded waveform in memory after its first read (float32, 4 bytes
    per sample: for corpora that fit in RAM; every DataLoader worker fills its own copy).
    ``features_on``: ``"loader"`` (items carry ``feats``) or ``"device"`` (see the module).
    ``sampling``: ``"utterance"`` (item ``i`` of an epoch crops utterance ``i``: each file equally
    often) or ``"duration"`` (item ``i`` crops an utterance drawn with probability proportional
    to its ``num_samples``: each second of audio equally often, so a corpus of many short files
    beside a few long ones is not trained mostly on the short ones). An epoch is ``len(rows)``
    crops either way. ``speech``: the least share of a crop's frames that must be speech
    (:func:`speechvq.features.speech_frames`, within :data:`speechvq.features.SPEECH_DB` of the
    utterance's level, measured once with its state); a crop short of it is redrawn at another
    position of the same utterance, up to :data:`SPEECH_TRIES` positions, keeping the one with
    the most speech (0: no check; needs ``features_cfg``).
    """

    def __init__(self, rows: Sequence[ManifestRow], speakers: Sequence[str],
                 stats: FeatureStats | None, features_cfg: Mapping | None, crop_seconds: float,
                 sample_rate: int, samples_per_unit: int, seed: int = 0,
                 cache_audio: bool = False, pitch: Sequence[float] | None = None,
                 states: tuple[StateStore, np.ndarray] | None = None,
                 features_on: str = "loader", sampling: str = "utterance",
                 speech: float = 0.0) -> None:
        if not rows:
            raise ValueError("CropDataset needs at least one utterance")
        super().__init__(rows, speakers, stats, features_cfg, sample_rate, samples_per_unit,
                         pitch)
        if features_on not in FEATURES_ON:
            raise ValueError(f"features_on must be one of {FEATURES_ON}, not {features_on!r}")
        self.features_on = features_on
        if sampling not in CROP_SAMPLING:
            raise ValueError(f"sampling (data.crop_sampling) must be one of {CROP_SAMPLING}, not {sampling!r}")
        self.sampling = sampling
        self.speech = float(speech)
        if not 0.0 <= self.speech <= 1.0:
            raise ValueError(f"speech (data.crop_speech) must be a share in [0, 1], not {speech}")
        if self.speech > 0 and features_cfg is None:
            raise ValueError("speech-biased crops (speech > 0) need the mel front-end (features_cfg)")
        lengths = np.array([max(int(r.num_samples), 1) for r in rows], dtype=np.float64)
        self._cumulative = np.cumsum(lengths) / lengths.sum()  # for sampling="duration"
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
        self._store, self._store_index = states if states is not None else (None, None)
        if self._store_index is not None and len(self._store_index) != len(self.rows):
            raise ValueError(f"{len(self._store_index)} state indices for {len(self.rows)} rows")
        self._states: dict[int, UtteranceState] = {}  # measured here: rows the store lacks
        self._bad: set[int] = set()

    def set_epoch(self, epoch: int) -> None:
        """Select the crops of ``epoch`` (call at the start of every epoch, as for samplers)."""
        self.epoch = int(epoch)

    def _rng(self, epoch: int, index: int, attempt: int = 0) -> np.random.Generator:
        key = [self.seed, epoch, index] + ([attempt] if attempt else [])
        return np.random.default_rng(key)

    def utterance_of(self, epoch: int, index: int) -> int:
        """The row that item ``index`` of ``epoch`` crops (before any substitution)."""
        if self.sampling == "utterance":
            return index
        # a stream of its own (substitutes use attempts 1..MAX_SUBSTITUTES, the crop's start 0)
        u = self._rng(epoch, index, MAX_SUBSTITUTES + 1).random()
        return min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.rows) - 1)

    def __getitem__(self, index: int) -> dict:
        epoch = self.epoch
        for attempt in range(MAX_SUBSTITUTES + 1):
            i = self.utterance_of(epoch, index) if attempt == 0 else int(
                self._rng(epoch, index, attempt).integers(len(self.rows)))
            if i in self._bad:
                continue
            try:
                return self._crop(i, self._rng(epoch, index))
            except AudioError as err:
                self._bad.add(i)
                _warn_bad(self._warned, err, "skipping it (another utterance is used in its place)")
        raise RuntimeError(
            f"{MAX_SUBSTITUTES + 1} utterances in a row could not be read (last tried: "
            f"{self.rows[i].path}); the corpus looks broken, re-run speechvq-prepare"
        )

    def _stored(self, i: int) -> int:
        """Row ``i``'s index in the state store, -1 when it has none (or there is no store)."""
        return -1 if self._store_index is None else int(self._store_index[i])

    def _crop(self, i: int, rng: np.random.Generator) -> dict:
        row = self.rows[i]
        whole = self._cache.get(i)
        if whole is None and (self.cache_audio or (
                self._front is not None and self._stored(i) < 0 and i not in self._states)):
            whole = load_audio(row.path, self.sample_rate)
            if self.cache_audio:
                self._cache[i] = whole
        state = self._state(i, whole)
        n = whole.numel() if whole is not None else row.num_samples
        take = min(n, self.crop_samples)
        start = self._start(n, state, rng)
        if whole is not None:
            wav = whole[start : start + take].clone()  # the cached waveform is never written to
        else:
            wav = read_window(row.path, start, take, self.sample_rate, num_samples=n)
        if take < self.crop_samples:
            wav = torch.cat([wav, wav.new_zeros(self.crop_samples - take)])
        item = _item(row, wav, None, self._speaker_ids[row.speaker], take)
        if self._front is None:
            return item
        if self.features_on == "loader":
            item["feats"] = self._front(wav, row.speaker, state, take)
        else:
            mean, std = self._front.norm_of(row.speaker, state) or (
                torch.zeros(self._front.n_mels), torch.ones(self._front.n_mels))
            item.update(dc=state.dc, ref=state.ref, norm=torch.stack([mean, std]))
        if self.pitch is not None:  # the whole utterance's track, at the nearest frames (<= 5 ms)
            frames = self._front.num_frames(self.crop_samples)
            first = round(start / self._front.logmel.hop_length)
            pitch = state.pitch[:, first : first + frames]
            pitch = torch.cat([pitch, pitch.new_zeros(2, frames - pitch.shape[1])], 1)
            pitch[:, self._front.num_frames(take):] = 0.0
            item["pitch"] = pitch
        return item

    def _start(self, n: int, state: UtteranceState | None, rng: np.random.Generator) -> int:
        """Where the crop of an utterance of ``n`` samples starts: a uniform position; with
        ``speech``, the first of up to :data:`SPEECH_TRIES` positions whose frames are at least
        that share speech by the utterance's stored speech frames (no audio is read to choose),
        else the most speech-like of them."""
        if n < self.crop_samples:
            return 0
        if self.speech <= 0 or n == self.crop_samples:
            return int(rng.integers(0, n - self.crop_samples + 1))
        if state is None or state.speech is None:
            raise RuntimeError("speech-biased crops need the utterances' speech frames (a state)")
        hop, frames = self._front.logmel.hop_length, self._front.num_frames(self.crop_samples)
        best, best_at = -1.0, 0
        for _ in range(SPEECH_TRIES):
            at = int(rng.integers(0, n - self.crop_samples + 1))
            first = round(at / hop)  # the whole utterance's frame nearest the crop's first
            share = float(state.speech[first : first + frames].sum()) / frames
            if share >= self.speech:
                return at
            if share > best:
                best, best_at = share, at
        return best_at

    def _state(self, i: int, whole: Tensor | None) -> UtteranceState | None:
        """The whole utterance's front-end state (crops are made exactly as the whole is): the
        store's, else measured on ``whole`` (and kept)."""
        if self._front is None:
            return None
        s = self._stored(i)
        if s >= 0:
            state = self._store.state(s)
            if self.pitch is not None:
                f0 = self._store.f0(s, pitch_key(self.pitch))
                state.pitch = self._front.pitch_condition(f0, self.rows[i].num_samples)
            return state
        if i not in self._states:
            n = self._whole_units(whole.numel())  # as UtteranceDataset cuts it
            self._states[i] = self._front.measure(whole, n)
            if self.pitch is not None:
                self._states[i].pitch = self._pitch_of(whole, n)
        return self._states[i]


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
    "pitch": (B, 2, F) (when items have a pitch condition), "dc", "ref": (B,) float64 and
    "norm": (B, 2, n_mels) (when items leave their features to the training device),
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
    if all("norm" in it for it in items):  # features made on the training device
        batch["dc"] = torch.tensor([it["dc"] for it in items], dtype=torch.float64)
        batch["ref"] = torch.tensor([it["ref"] for it in items], dtype=torch.float64)
        batch["norm"] = torch.stack([it["norm"] for it in items])
    for key in ("feats", "pitch"):
        if all(key in it for it in items):
            channels = items[0][key].shape[0]
            frames = max(it[key].shape[-1] for it in items)
            padded = torch.zeros(len(items), channels, frames)
            for b, it in enumerate(items):
                padded[b, :, : it[key].shape[-1]] = it[key]
            batch[key] = padded
    return batch
