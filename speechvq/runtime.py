"""The process: thread policy (set before torch is imported), device, ranks, seeding, speed.

This module imports no torch at its top level: :mod:`speechvq` imports it first, and it must run
before torch loads. The helpers that need torch (:func:`resolve_device`, :func:`seed_everything`,
:func:`is_main_process` under an initialised process group) import it when called.

Ranks: under ``torchrun`` every process has ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE`` in its
environment; :func:`rank` reads the initialised process group when there is one, else ``RANK``,
so "am I rank 0" has one answer everywhere (:func:`is_main_process`).

Thread policy:

torch runs its CPU kernels on an OpenMP thread pool (libgomp in the pip wheels). libgomp reads its
settings once, when ``import torch`` loads it. With ``OMP_WAIT_POLICY`` unset, a thread that
reaches the end of a parallel region first spins for 300,000 iterations (``GOMP_SPINCOUNT``,
milliseconds) before it sleeps. On an idle machine that saves a wake-up; when another process
holds one of the cores, the partner thread is descheduled and the spinning thread burns the time
it is waiting for, at every barrier: with one busy neighbour on 2 cores, training ran at 0.18x
of its idle speed instead of the fair ~0.5x.

Importing :mod:`speechvq` imports this module first; with ``SPEECHVQ_CPU=shared`` in the
environment it calls :func:`apply_thread_policy`: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at
once, spin count 0) unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (then nothing is
changed). Without it libgomp's default stays: on an idle machine it is a third faster. Every console entry point
imports speechvq before torch, so the policy holds there, in DataLoader workers and in
``torchrun`` workers. A program that imports torch *before* speechvq keeps libgomp's spinning
default (:data:`THREAD_POLICY` says ``"too late"``): import speechvq first, or set
``OMP_WAIT_POLICY=PASSIVE`` in the shell.

Thread count: importing speechvq also calls :func:`choose_threads`: when other processes keep
cores busy at that moment (``/proc/stat`` over 0.1 s), ``OMP_NUM_THREADS`` is set to the cores
left free, unless the user set it or ``SPEECHVQ_CPU``. Measured on 2 cores beside one busy process:
0.64x of the idle speed instead of 0.29x, with the idle speed unchanged (README, "Sharing the CPU").

Check what libgomp took: ``OMP_DISPLAY_ENV=VERBOSE python -c "import speechvq, torch"`` prints
``GOMP_SPINCOUNT = '0'`` under the passive policy, ``'300000'`` with libgomp's default.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: see the module docstring
    import torch
    from torch import nn

#: What speechvq sets when the user set none of :data:`USER_KEYS`.
DEFAULT_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

#: Any of these in the environment means the user chose the wait behaviour: it is left alone.
USER_KEYS: tuple[str, ...] = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def apply_thread_policy(
    environ: MutableMapping[str, str] | None = None, torch_loaded: bool | None = None
) -> str:
    """Set :data:`DEFAULT_ENV` in ``environ`` (default ``os.environ``) unless the user chose.

    Args:
        environ: the environment to change (tests pass a dict).
        torch_loaded: whether torch (hence libgomp) is already loaded in this process; default:
            ``"torch" in sys.modules``.
    Returns:
        One line for logs: ``"OMP_WAIT_POLICY=PASSIVE (set by speechvq)"``,
        ``"OMP_WAIT_POLICY=... (from the environment)"`` (the user's, or a speechvq parent's), or ``"... too late: torch was imported
        before speechvq"`` (the variables are still set, for child processes).
    """
    env = os.environ if environ is None else environ
    if torch_loaded is None:
        torch_loaded = "torch" in sys.modules
    chosen = [f"{k}={env[k]}" for k in USER_KEYS if k in env]
    if chosen:
        return f"{' '.join(chosen)} (from the environment)"
    for key, value in DEFAULT_ENV.items():
        env[key] = value
    what = " ".join(f"{k}={v}" for k, v in DEFAULT_ENV.items())
    if torch_loaded:
        return (f"{what} too late: torch was imported before speechvq, its OpenMP threads "
                "spin-wait in this process")
    return f"{what} (set by speechvq)"


#: ``SPEECHVQ_CPU=shared`` applies :data:`DEFAULT_ENV` when speechvq is imported. It is not the
#: default: measured on 2 cores (README, ``benchmarks/bench_contention.py``), passive waiting
#: keeps 0.62x of the idle speed beside one busy process (0.27x with libgomp's spinning) but costs
#: a third of the idle speed itself. What was done is logged with slowdowns.
THREAD_POLICY: str = (
    apply_thread_policy() if os.environ.get("SPEECHVQ_CPU") == "shared"
    else "libgomp's default (SPEECHVQ_CPU=shared or OMP_WAIT_POLICY=PASSIVE for a busy machine)"
)


def busy_cores(seconds: float = 0.1) -> float | None:
    """How many cores other processes keep busy now: CPU time used in ``/proc/stat`` over
    ``seconds`` (this process sleeps meanwhile). ``None`` where there is no ``/proc/stat``."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    cores = os.cpu_count() or 1
    elapsed = max(total1 - total0, 1)
    return cores * (1.0 - (idle1 - idle0) / elapsed)


def choose_threads(environ: MutableMapping[str, str] | None = None,
                   busy: float | None = None) -> str:
    """Set ``OMP_NUM_THREADS`` to the cores left free by other processes when some are busy
    (unless the user set it, or ``SPEECHVQ_CPU`` chose a policy): measured on 2 cores, two torch
    threads beside one busy process ran at 0.27x of their idle speed, one thread at 0.63x.
    Returns a line for logs."""
    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env or "SPEECHVQ_CPU" in env:
        return "threads: as set in the environment"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    busy = busy_cores() if busy is None else busy
    if busy is None or cores < 2:
        return "threads: torch's default"
    free = cores - int(busy + 0.5)
    if free >= cores:
        return f"threads: torch's default ({cores} cores free)"
    env["OMP_NUM_THREADS"] = str(max(1, free))
    return (f"threads: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (other processes kept "
            f"{busy:.1f} of {cores} cores busy when speechvq started)")


#: What :func:`choose_threads` did when speechvq was imported (before torch, in every entry point).
THREAD_CHOICE: str = choose_threads() if "torch" not in sys.modules else "threads: torch's default"


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


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


class Throughput:
    """Training speed of one run, for the logs only (wall-clock data never reaches the training,
    so exact resume is untouched).

    Training time is wall time less the time spent in :meth:`pause` blocks (validation, media,
    checkpoints). The *first window* starts after :attr:`WARMUP_STEPS` and lasts at least
    :attr:`WINDOW_STEPS` steps and :attr:`WINDOW_SECONDS`; after it, every stretch of at least
    :attr:`CHECK_SECONDS` (and :attr:`CHECK_STEPS`) is compared with it, and the first one below
    :attr:`SLOW_RATIO` of the first window's rate gives one warning (:meth:`update`).
    """

    WARMUP_STEPS = 20  # kernel selection, allocator and cache warm-up: not representative
    WINDOW_STEPS = 100
    WINDOW_SECONDS = 10.0
    CHECK_STEPS = 5
    CHECK_SECONDS = 20.0  # long enough that a GC pause or a new epoch's data workers do not count
    SLOW_RATIO = 0.5

    def __init__(self, step: int, now: float) -> None:
        self.start_step, self.start = step, now
        self.paused = 0.0
        self.step = step
        self.train_seconds = 0.0
        self.first: tuple[int, int, float] | None = None  # (from step, to step, steps/s)
        self.warned = False
        self._mark: tuple[int, float] | None = None  # (step, training time) where a stretch began

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
        """Note that ``step`` ended at ``now``; the slowdown warning (once per run), or None."""
        self.step, self.train_seconds = step, now - self.start - self.paused
        t = self.train_seconds
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
            return None
        if self.warned or recent >= self.SLOW_RATIO * self.first[2]:
            return None
        self.warned = True
        a, b, first = self.first
        return (
            f"training slowed down: {recent:.3g} steps/s over steps {since}-{step}, "
            f"{recent / first:.0%} of the {first:.3g} steps/s of its first window (steps {a}-{b}). "
            "Another process is probably using the CPU (or GPU); a time-limited run "
            "(trainer.max_minutes) will reach fewer steps. "
            f"[torch threads: {_torch_threads()}; {THREAD_CHOICE}; {THREAD_POLICY}]"
        )

    def summary(self, now: float) -> str:
        """The end-of-run line: steps, minutes, steps/s (and the first window's)."""
        steps = self.step - self.start_step
        line = (f"trained {steps} step{'s' * (steps != 1)} in {(now - self.start) / 60:.1f} min: "
                f"{self.rate:.3g} steps/s")
        if self.first is not None:
            line += f" (first window: {self.first[2]:.3g} steps/s)"
        if self.paused > 0.05 * max(now - self.start, 1e-9):
            line += (f"; validation, media and checkpoints took {self.paused / 60:.1f} min of it "
                     "(not counted in steps/s)")
        return line
