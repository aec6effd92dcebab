"""The fit loop's data: which batches each rank trains on, and the loaders that feed them.

- :func:`train_batches` / :func:`valid_batches`: the batches of an epoch and of validation, pure
  functions of (seed, epoch, rank), so a resumed run trains on exactly what an uninterrupted one
  would.
- :class:`TrainLoader`: ONE DataLoader for the whole run. Its batch sampler walks the epochs
  itself (:class:`EpochBatches`) and asks the dataset for ``(epoch, index)`` keys
  (:class:`EpochItems`), so worker processes are started once, stay up across epochs and keep
  ``prefetch_factor`` batches each in flight; the per-utterance work a dataset keeps (decoded
  audio, measured states) survives too.
- :class:`ValidBatches`: the validation batches of a rank, collated once and kept in memory
  (up to :data:`VALID_CACHE_BYTES`), so later validations decode nothing.
"""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

#: Validation batches are kept in memory up to this size (tensor bytes); beyond, re-read each time.
VALID_CACHE_BYTES = 2 * 1024**3


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


def ignore_sigint(worker_id: int) -> None:
    """DataLoader workers: Ctrl-C reaches the whole process group, and the main process stops
    cleanly after the current step, so workers must not die under it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class EpochItems(Dataset):
    """``dataset[(epoch, i)]``: item ``i`` of ``epoch`` (``set_epoch`` first when the dataset has
    it), whichever process asks, so items stay a pure function of (epoch, index) in workers that
    live across epochs."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


class EpochBatches(Sampler):
    """The batches of :func:`train_batches` as ``(epoch, index)`` keys, from batch ``start`` of
    ``epoch`` on, epoch after epoch, without end (the loop decides when to stop)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, rank: int, world_size: int,
                 epoch: int, start: int) -> None:
        self.args = (n_items, batch_size, seed)
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        n_items, batch_size, seed = self.args
        epoch, start = self.epoch, self.start
        while True:
            batches = train_batches(n_items, batch_size, seed, epoch, self.rank, self.world_size)
            for batch in batches[start:]:
                yield [(epoch, i) for i in batch]
            epoch, start = epoch + 1, 0


class TrainLoader:
    """``(epoch, batch_in_epoch, batch)`` for the rest of a run, from ``epoch`` and batch
    ``start`` on: one DataLoader (``num_workers`` processes started once, ``prefetch_factor``
    batches each in flight, pinned memory for CUDA) over :class:`EpochBatches`."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], batch_size: int,
                 seed: int, rank: int, world_size: int, epoch: int, start: int,
                 num_workers: int, prefetch_factor: int, pin_memory: bool) -> None:
        n_items = len(dataset)  # type: ignore[arg-type]
        self.per_epoch = len(train_batches(n_items, batch_size, seed, 0, 0, world_size))
        self.epoch, self.start = epoch, start
        sampler = EpochBatches(n_items, batch_size, seed, rank, world_size, epoch, start)
        self.loader = DataLoader(
            EpochItems(dataset), batch_sampler=sampler, collate_fn=collate,
            num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=prefetch_factor if num_workers else None,
            # its own generator: creating the iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(seed + epoch), worker_init_fn=ignore_sigint,
        )

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        epoch, position = self.epoch, self.start
        for batch in self.loader:
            yield epoch, position, batch
            position += 1
            if position == self.per_epoch:
                epoch, position = epoch + 1, 0


def _nbytes(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(_nbytes(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return sum(_nbytes(v) for v in batch)
    return 0


def _pinned(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pinned(v) for k, v in batch.items()}
    return batch


class ValidBatches:
    """A rank's validation batches, ``(n_items, batch)`` each (``batch`` None when every item of
    it was unreadable): read by ``num_workers`` processes the first time, kept in memory
    (pinned for CUDA) and replayed afterwards, when they fit in ``max_bytes``."""

    def __init__(self, dataset: Dataset, collate: Callable[[list], Any], batch_size: int,
                 rank: int, world_size: int, max_batches: int | None, num_workers: int,
                 pin_memory: bool, max_bytes: int = VALID_CACHE_BYTES) -> None:
        self.dataset, self.collate = dataset, collate
        self.batches = valid_batches(len(dataset), batch_size, rank, world_size)  # type: ignore
        if max_batches:
            self.batches = self.batches[:max_batches]
        self.num_workers, self.pin_memory, self.max_bytes = num_workers, pin_memory, max_bytes
        self._kept: list[tuple[int, Any]] | None = None

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        if self._kept is not None:
            yield from self._kept
            return
        loader = DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=self.collate,
                            num_workers=self.num_workers, worker_init_fn=ignore_sigint,
                            generator=torch.Generator().manual_seed(0))
        kept: list[tuple[int, Any]] | None = []
        size = 0
        for indices, batch in zip(self.batches, loader, strict=True):
            if kept is not None:
                size += _nbytes(batch)
                if size > self.max_bytes:
                    log.info("validation batches exceed %.1f GiB: read again at every validation",
                             self.max_bytes / 1024**3)
                    kept = None
                else:
                    kept.append((len(indices), _pinned(batch) if self.pin_memory else batch))
            yield len(indices), batch
        self._kept = kept
