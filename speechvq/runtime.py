"""The process: device, ranks, seeding, replicas, training speed.

This module imports no torch at its top level: :mod:`speechvq` imports it first, and it must run
before torch loads. The helpers that need torch (:func:`resolve_device`, :func:`seed_everything`,
:func:`is_main_process` under an initialised process group) import it when called.

Ranks: under ``torchrun`` every process has ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` in its
environment; :func:`rank` reads the initialised process group when there is one, else ``RANK``,
so "am I rank 0" has one answer everywhere (:func:`is_main_process`).

The CPU thread policy (the OpenMP wait policy and the thread count, at import and during a
run) is :mod:`speechvq.threads`, which this module imports first.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from speechvq.threads import THREAD_CHOICE, THREAD_POLICY, ThreadBalancer, ThreadChange

if TYPE_CHECKING:  # torch is imported lazily: see the module docstring
    import torch
    from torch import nn

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------ ranks


def world_size() -> int:
    """Processes in this job: the process group's size, else ``WORLD_SIZE`` (1 without torchrun)."""
    dist = _dist()
    if dist is not None:
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank: the process group's, else ``RANK`` (0 without torchrun)."""
    dist = _dist()
    if dist is not None:
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``; 0 without torchrun): its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the one process that writes shared outputs and speaks in the logs."""
    return rank() == 0


def _dist():  # noqa: ANN202 (torch.distributed when a process group is up, else None)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist
    return None


# ----------------------------------------------------------------------- device and seeding


def resolve_device(device: str | torch.device = "auto", gpu: int | None = None) -> torch.device:
    """``auto`` -> CUDA when present (this rank's GPU under torchrun) else CPU; else ``device``
    (``cpu``, ``cuda``, ``cuda:1``); a bare ``cuda`` means GPU ``gpu`` (default
    :func:`local_rank`)."""
    import torch

    device = str(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank() if gpu is None else gpu)
    return dev


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's ``random``."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------ the torchrun group




class ReplicaDriftError(RuntimeError):
    """DDP replicas whose parameters or buffers differ: statistics were not all-reduced."""


@dataclass
class DistInfo:
    """This process in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owned: bool = False  # this module started the process group and ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group from its env vars (gloo on CPU, nccl on CUDA).

    Without ``WORLD_SIZE > 1`` in the environment this is a single process and does nothing.
    """
    import torch
    import torch.distributed as dist

    if world_size() <= 1:
        return DistInfo()
    gpu = local_rank()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), gpu, owned=False)
    use_cuda = resolve_device(device, gpu).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(gpu)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), gpu, owned=True)


def state_checksums(module: nn.Module) -> dict[str, str]:
    """sha256 (16 hex) of every parameter and buffer: equal on all DDP replicas or a bug."""
    import torch

    out = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        out[name] = hashlib.sha256(data.tobytes()).hexdigest()[:16]
    return out


def replica_checksum(module: nn.Module) -> str:
    """One checksum over every parameter and buffer (the ``"replicas"`` entries of a checkpoint)."""
    return _combine(state_checksums(module))


def _combine(checksums: dict[str, str]) -> str:
    joined = "".join(f"{k}={checksums[k]};" for k in sorted(checksums))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def verify_replicas(module: nn.Module, info: DistInfo) -> list[str]:
    """Compare parameters and buffers (EMA codebooks included) across ranks; raise if they drift.

    Returns every rank's :func:`replica_checksum` (saved in the checkpoint as ``"replicas"``).
    """
    mine = state_checksums(module)
    total = _combine(mine)
    if not info.enabled:
        return [total]
    import torch.distributed as dist

    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, (total, mine))
    totals = [g[0] for g in gathered]
    if len(set(totals)) > 1:
        diff = sorted(k for k in mine if len({g[1].get(k) for g in gathered}) > 1)
        raise ReplicaDriftError(
            f"DDP replicas drifted apart: {len(diff)} tensors differ across ranks "
            f"(first: {diff[:5]}); codebook statistics must be all-reduced/broadcast"
        )
    return totals


# --------------------------------------------------------------------------- training speed


class Throughput:
    """Training speed of one run, for the logs only (wall-clock data never reaches the training,
    so exact resume is untouched), and the :class:`ThreadBalancer` that follows the CPU load.

    Training time is wall time less the time spent in :meth:`pause` blocks (validation, media,
    checkpoints). The *first window* starts after :attr:`WARMUP_STEPS` and lasts at least
    :attr:`WINDOW_STEPS` steps and :attr:`WINDOW_SECONDS`; after it, every stretch of at least
    :attr:`CHECK_SECONDS` (and :attr:`CHECK_STEPS`) is compared with it, and the first one below
    :attr:`SLOW_RATIO` of the first window's rate gives one warning (:meth:`update`).

    A change of torch's thread count ends the stretch being measured (no stretch mixes two
    counts). When the count goes up (other processes left), the reference window was measured
    with fewer free cores: it is measured again at the new count, or a later neighbour could
    bring the run back to the old, slower speed without a warning. When it goes down (other
    processes came), the reference stays: the run is slower because of them, which the warning
    is for, and it names the thread count.
    """

    WARMUP_STEPS = 20  # kernel selection, allocator and cache warm-up: not representative
    WINDOW_STEPS = 100
    WINDOW_SECONDS = 10.0
    CHECK_STEPS = 5
    CHECK_SECONDS = 20.0  # long enough that a GC pause or a new epoch's data workers do not count
    SLOW_RATIO = 0.5

    def __init__(self, step: int, now: float, balancer: ThreadBalancer | None = None) -> None:
        self.start_step, self.start = step, now
        self.paused = 0.0
        self.step = step
        self.train_seconds = 0.0
        self.first: tuple[int, int, float] | None = None  # (from step, to step, steps/s)
        self.warned = False
        self._mark: tuple[int, float] | None = None  # (step, training time) where a stretch began
        self.balancer = ThreadBalancer.for_process() if balancer is None else balancer
        self._first_threads = self.balancer.threads  # the count the reference is measured at
        self._remeasured = False  # the reference was measured again after more threads

    @property
    def rate(self) -> float:
        """Steps per second of training time over the whole run so far."""
        return (self.step - self.start_step) / max(self.train_seconds, 1e-9)

    @property
    def first_rate(self) -> float | None:
        return self.first[2] if self.first else None

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """Time spent in the block is not training time (validation, media, checkpoints)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.paused += time.monotonic() - t0

    def update(self, step: int, now: float) -> str | None:
        """Note that ``step`` ended at ``now``; the slowdown warning (once per run), or None.
        Also drives :attr:`balancer` (a thread change is logged by it, at INFO)."""
        self.step, self.train_seconds = step, now - self.start - self.paused
        t = self.train_seconds
        change = self.balancer.update(now)
        if change is not None:
            self._threads_changed(change, step, t)
            return None
        if self._mark is None:
            if step - self.start_step >= self.WARMUP_STEPS:
                self._mark = (step, t)
            return None
        done, seconds = step - self._mark[0], t - self._mark[1]
        if seconds < (self.WINDOW_SECONDS if self.first is None else self.CHECK_SECONDS):
            return None
        if done < (self.WINDOW_STEPS if self.first is None else self.CHECK_STEPS):
            return None
        recent = done / max(seconds, 1e-9)
        since = self._mark[0]
        self._mark = (step, t)
        if self.first is None:
            self.first = (since, step, recent)
            self._first_threads = self.balancer.threads
            return None
        if self.warned or recent >= self.SLOW_RATIO * self.first[2]:
            return None
        self.warned = True
        a, b, first = self.first
        return (
            f"training slowed down: {recent:.3g} steps/s over steps {since}-{step}, "
            f"{recent / first:.0%} of the {first:.3g} steps/s of its {self._reference()} "
            f"(steps {a}-{b}). Another process is probably using the CPU (or GPU); a time-limited "
            "run (trainer.max_minutes) will reach fewer steps. "
            f"[{self.balancer.describe()}; {THREAD_CHOICE}; {THREAD_POLICY}]"
        )

    def _threads_changed(self, change: ThreadChange, step: int, t: float) -> None:
        if self._mark is not None:
            self._mark = (step, t)  # the stretch so far ran at the old count
        if self.first is not None and change.new > self._first_threads:
            self.first, self._remeasured = None, True  # the next full window is the reference

    def _reference(self) -> str:
        return (f"window at {self._first_threads} threads" if self._remeasured
                else "first window")

    def summary(self, now: float) -> str:
        """The end-of-run line: steps, minutes, steps/s (and the reference window's)."""
        steps = self.step - self.start_step
        line = (f"trained {steps} step{'s' * (steps != 1)} in {(now - self.start) / 60:.1f} min: "
                f"{self.rate:.3g} steps/s")
        if self.first is not None:
            line += f" ({self._reference()}: {self.first[2]:.3g} steps/s)"
        if changes := self.balancer.changes:
            counts = " -> ".join(str(n) for n in [changes[0].old, *(c.new for c in changes)])
            line += f"; torch threads {counts} as other processes came and went"
        if self.paused > 0.05 * max(now - self.start, 1e-9):
            line += (f"; validation, media and checkpoints took {self.paused / 60:.1f} min of it "
                     "(not counted in steps/s)")
        return line
