"""The process: thread policy (set before torch is imported), device, ranks and seeding.

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

Importing :mod:`speechvq` imports this module first, which calls :func:`apply_thread_policy`:
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once, spin count 0) unless the user set
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (then nothing is changed). Every console entry point
imports speechvq before torch, so the policy holds there, in DataLoader workers and in
``torchrun`` workers. A program that imports torch *before* speechvq keeps libgomp's spinning
default (:data:`THREAD_POLICY` says ``"too late"``): import speechvq first, or set
``OMP_WAIT_POLICY=PASSIVE`` in the shell.

Check what libgomp took: ``OMP_DISPLAY_ENV=VERBOSE python -c "import speechvq, torch"`` prints
``GOMP_SPINCOUNT = '0'`` under the passive policy, ``'300000'`` with libgomp's default.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: see the module docstring
    import torch

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


#: What :func:`apply_thread_policy` did when speechvq was imported (logged with slowdowns).
THREAD_POLICY: str = apply_thread_policy()


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
