"""The CPU threads of a speechvq process: the OpenMP wait policy and the thread count, chosen
before torch loads and followed during a run.

torch runs its CPU kernels on an OpenMP thread pool (libgomp in the pip wheels). libgomp reads its
settings once, when ``import torch`` loads it. With ``OMP_WAIT_POLICY`` unset, a thread that
reaches the end of a parallel region first spins for 300,000 iterations (``GOMP_SPINCOUNT``,
milliseconds) before it sleeps. On an idle machine that saves a wake-up; when another process
holds one of the cores, the partner thread is descheduled and the spinning thread burns the time
it is waiting for, at every barrier: with one busy neighbour on 2 cores, training ran at 0.18x
of its idle speed instead of the fair ~0.5x.

Importing :mod:`speechvq` imports this module first (through :mod:`speechvq.runtime`); with
``SPEECHVQ_CPU=shared`` in the environment it calls :func:`apply_thread_policy`: ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at
once, spin count 0) unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` (then nothing is
changed). Without it libgomp's default stays: on an idle machine it is a third faster. Every
console entry point imports speechvq before torch, so the policy holds there, in DataLoader workers and in
``torchrun`` workers. A program that imports torch *before* speechvq keeps libgomp's spinning
default (:data:`THREAD_POLICY` says ``"too late"``): import speechvq first, or set
``OMP_WAIT_POLICY=PASSIVE`` in the shell.

Thread count: importing speechvq also calls :func:`choose_threads`: when other processes keep
cores busy at that moment (``/proc/stat`` over 0.1 s), ``OMP_NUM_THREADS`` is set to the cores
left free, unless the user set it or ``SPEECHVQ_CPU``. Measured on 2 cores beside one busy process:
0.64x of the idle speed instead of 0.29x, with the idle speed unchanged (README, "Sharing the CPU").
That is only where a run starts: during training, :class:`ThreadBalancer` (driven by the fit
loop's :class:`Throughput`) re-measures every 5 s and calls ``torch.set_num_threads`` when the
cores other processes leave free change, so a run started beside a briefly busy neighbour gets its
speed back when the neighbour leaves. A count the user chose (``OMP_NUM_THREADS``,
``SPEECHVQ_CPU``, ``torch.set_num_threads``) is never changed; a run whose count changed is not
bitwise reproducible.

Check what libgomp took: ``OMP_DISPLAY_ENV=VERBOSE python -c "import speechvq, torch"`` prints
``GOMP_SPINCOUNT = '0'`` under the passive policy, ``'300000'`` with libgomp's default.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: see the module docstring
    pass

log = logging.getLogger(__name__)

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


#: Set beside ``OMP_NUM_THREADS`` when :func:`choose_threads` chose the count: the value is then
#: speechvq's, not the user's (in this process and in child processes, which choose again).
AUTO_THREADS_KEY = "SPEECHVQ_AUTO_THREADS"

#: False: keep the thread count a run starts with (no :class:`ThreadBalancer` changes); the
#: benchmarks' "before rebalancing" reference.
REBALANCE = True

_threads_set: int | None = None  # the count speechvq last gave torch.set_num_threads


def user_thread_choice(environ: Mapping[str, str] | None = None) -> str | None:
    """Why the thread count is the user's (``SPEECHVQ_CPU`` set, or an ``OMP_NUM_THREADS`` that
    speechvq did not set), or None: speechvq then never changes it."""
    env = os.environ if environ is None else environ
    if "SPEECHVQ_CPU" in env:
        return f"SPEECHVQ_CPU={env['SPEECHVQ_CPU']} set"
    omp = env.get("OMP_NUM_THREADS")
    if omp is not None and env.get(AUTO_THREADS_KEY) != omp:
        return f"OMP_NUM_THREADS={omp} set by the user"
    return None


def _local_ranks(env: Mapping[str, str]) -> int:
    """Processes of this torchrun job on this machine (``LOCAL_WORLD_SIZE``; 1 without one)."""
    try:
        return int(env.get("LOCAL_WORLD_SIZE", "1"))
    except ValueError:
        return 1


def process_cpus() -> list[int]:
    """The CPUs this process may run on (``sched_getaffinity``; every CPU where it is missing)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def default_threads(cpus: Sequence[int]) -> int:
    """torch's own thread count on ``cpus``: one per physical core (hyperthreads share one)."""
    cores = set()
    for cpu in cpus:
        try:
            path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list"
            with open(path) as f:
                cores.add(f.read().strip())
        except OSError:
            return max(1, len(cpus))
    return max(1, min(len(cpus), len(cores)))


def _read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


def cpu_seconds(stat: str, cpus: Sequence[int]) -> tuple[float, float]:
    """(busy, busy + idle) CPU seconds since boot on ``cpus``, from the text of ``/proc/stat``.

    Busy is user + nice + system + irq + softirq + steal (a hypervisor's other guests hold the
    core too); idle is idle + iowait. Raises ValueError when no line of ``cpus`` is there.
    """
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    found = False
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if name in wanted:
            values = [int(v) for v in rest.split()[:8]]
            idle = values[3] + values[4]
            busy, total, found = busy + sum(values) - idle, total + sum(values), True
    if not found:
        raise ValueError(f"no line for CPUs {sorted(cpus)} in /proc/stat")
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return busy / tick, total / tick


def own_cpu_seconds() -> float:
    """CPU seconds this process has used, all its threads together (not its child processes)."""
    times = os.times()
    return times.user + times.system


def busy_cores(seconds: float = 0.1) -> float | None:
    """How many of this process's cores other processes keep busy now: CPU time used in
    ``/proc/stat`` over ``seconds`` (this process sleeps meanwhile). ``None`` where there is
    no ``/proc/stat``."""
    cpus = process_cpus()
    try:
        busy0, total0 = cpu_seconds(_read_proc_stat(), cpus)
        time.sleep(seconds)
        busy1, total1 = cpu_seconds(_read_proc_stat(), cpus)
    except (OSError, ValueError, IndexError):
        return None
    return len(cpus) * (busy1 - busy0) / max(total1 - total0, 1e-9)


def choose_threads(environ: MutableMapping[str, str] | None = None,
                   busy: float | None = None) -> str:
    """Set ``OMP_NUM_THREADS`` to the cores left free by other processes when some are busy
    (unless the user set it, or ``SPEECHVQ_CPU`` chose a policy): measured on 2 cores, two torch
    threads beside one busy process ran at 0.27x of their idle speed, one thread at 0.63x.
    This is where a run starts; :class:`ThreadBalancer` follows the load after that. A count
    set by a speechvq parent process (:data:`AUTO_THREADS_KEY`) is chosen again. Returns a line
    for logs."""
    env = os.environ if environ is None else environ
    if user_thread_choice(env) is not None:
        return "threads: as set in the environment"
    if "OMP_NUM_THREADS" in env and _local_ranks(env) > 1:  # the ranks share the cores
        return "threads: as set in the environment (torchrun ranks on this machine)"
    env.pop("OMP_NUM_THREADS", None)  # a speechvq parent's choice, made for another moment
    env.pop(AUTO_THREADS_KEY, None)
    cpus = process_cpus()
    cores = len(cpus)
    busy = busy_cores() if busy is None else busy
    if busy is None or cores < 2:
        return "threads: torch's default"
    free = cores - int(busy + 0.5)
    if free >= default_threads(cpus):  # torch takes one thread per physical core
        return f"threads: torch's default ({free} of {cores} cores free)"
    env["OMP_NUM_THREADS"] = env[AUTO_THREADS_KEY] = str(max(1, free))
    return (f"threads: OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (other processes kept "
            f"{busy:.1f} of {cores} cores busy when speechvq started)")


#: What :func:`choose_threads` did when speechvq was imported (before torch, in every entry point).
THREAD_CHOICE: str = choose_threads() if "torch" not in sys.modules else "threads: torch's default"


# ------------------------------------------------------------------- following the load


@dataclass(frozen=True)
class Load:
    """CPU use on the process's cores over one interval, in cores (CPU seconds per second)."""

    cores: int  # the CPUs the process may run on
    busy: float  # used by every process, this one included
    own: float  # used by this process (all its threads)

    #: Less idle than this (in cores) and the cores were all taken: see :meth:`others`.
    SATURATED_IDLE = 0.25

    @classmethod
    def between(cls, before: tuple[float, float, float], after: tuple[float, float, float],
                cores: int) -> Load | None:
        """From two readings ``(busy, busy + idle, own)`` in CPU seconds (None: no time passed)."""
        elapsed = (after[1] - before[1]) / cores  # wall seconds, by the kernel's own count
        if elapsed <= 0:
            return None
        return cls(cores, (after[0] - before[0]) / elapsed, (after[2] - before[2]) / elapsed)

    def others(self, threads: int) -> float:
        """Cores other processes want, given that this one ran ``threads`` torch threads.

        What they used (busy less our own CPU time: our threads, spinning ones included, are not
        a neighbour). When no core was left idle they may have wanted more than they got: the
        scheduler shares a core fairly between threads, so a neighbour's thread got no more than
        the share each of ours got (``own / threads``), and its use is scaled up by that share.
        Beside one busy process, two threads on 2 cores leave it ~0.6 of a core: it wants 1.
        """
        used = max(0.0, self.busy - self.own)
        if self.cores - self.busy > self.SATURATED_IDLE or self.own <= 0:
            return used
        share = min(1.0, self.own / max(threads, 1))
        return min(float(self.cores), used / max(share, 0.1))


def target_threads(cores: int, ceiling: int, current: int, others: float,
                   margin: float = 0.15) -> int:
    """The thread count for the cores other processes leave free (``cores - others``, rounded),
    in ``[1, ceiling]``. The free cores must pass the rounding point by ``margin`` to move away
    from ``current``: a load near the boundary keeps the count."""
    free = cores - others
    if free > current:
        free -= margin
    elif free < current:
        free += margin
    return max(1, min(ceiling, math.floor(free + 0.5)))


@dataclass(frozen=True)
class ThreadChange:
    """One change of torch's thread count and why (for the log and the speed monitor)."""

    old: int
    new: int
    others: float  # cores other processes want (:meth:`Load.others`), at the last check
    cores: int
    checks: int  # in a row that chose ``new``
    interval: float  # seconds between checks

    def __str__(self) -> str:
        return (f"torch threads {self.old} -> {self.new}: other processes want {self.others:.1f} "
                f"of {self.cores} cores ({self.checks} checks in a row, {self.interval:g} s apart)")


class ThreadBalancer:
    """Follows the cores other processes leave free: torch's thread count during a run.

    The count chosen when speechvq was imported (:func:`choose_threads`) holds only for that
    moment: a run started while a package install was busy kept 1 thread (3.1 steps/s) long
    after the install ended (2 threads: ~11). :meth:`update` is called after every training step
    with the time (a comparison, nothing else); every :attr:`INTERVAL` seconds it reads
    ``/proc/stat`` for the process's CPUs and its own CPU time (``os.times``), takes the
    difference with the previous reading (no sleeping), estimates the cores other processes want
    (:meth:`Load.others`) and the count for the rest (:func:`target_threads`: rounded, with a
    :attr:`MARGIN`). The count changes (``torch.set_num_threads``, one INFO line) only when the
    same new count comes out of :attr:`CONFIRM` checks in a row; it is never above ``ceiling``
    (torch's default: one per physical core the process may use) nor below 1.

    It never changes a count the user chose: ``OMP_NUM_THREADS`` set by the user (not by
    :func:`choose_threads`), ``SPEECHVQ_CPU`` set, ``torch.set_num_threads`` called by the program
    before the run (torch's count is not the one speechvq expects) or during it (it stops), or
    :data:`REBALANCE` False; nor where several torchrun ranks share the machine (each would see
    the others as neighbours); :attr:`fixed` says why. Other processes of one's own, such as
    DataLoader workers, are neighbours: the cores they keep busy are not free for torch's threads.

    Reproducibility: the thread count changes the order of floating-point reductions on the CPU,
    so a run whose threads changed is not bitwise identical to one whose threads did not (nor is
    its resumed continuation). Set ``OMP_NUM_THREADS`` for bitwise-reproducible CPU runs.
    """

    INTERVAL = 5.0  # seconds between readings: steps take milliseconds to seconds
    CONFIRM = 2  # the same new count this many checks in a row
    MARGIN = 0.15  # cores past the rounding point before the count moves

    def __init__(self, threads: int, cpus: Sequence[int], ceiling: int | None = None, *,
                 fixed: str | None = None, read_stat: Callable[[], str] = _read_proc_stat,
                 own_cpu: Callable[[], float] = own_cpu_seconds,
                 set_threads: Callable[[int], None] | None = None,
                 get_threads: Callable[[], int] | None = None) -> None:
        self.threads, self.cpus = threads, list(cpus)
        self.ceiling = max(1, min(len(self.cpus), ceiling or len(self.cpus)))
        self.fixed = fixed  # why the count is left alone; None: it follows the load
        self.load: Load | None = None  # the last interval's
        self.changes: list[ThreadChange] = []
        self._read_stat, self._own_cpu = read_stat, own_cpu
        self._set = set_threads or _set_torch_threads
        self._get = get_threads or _torch_threads
        self._reading: tuple[float, float, float] | None = None
        self._read_at = -math.inf
        self._votes = (threads, 0)  # (count, checks in a row that chose it)

    @classmethod
    def for_process(cls, environ: Mapping[str, str] | None = None) -> ThreadBalancer:
        """The balancer for this process's torch threads (fixed where the user chose them)."""
        env = os.environ if environ is None else environ
        cpus, threads = process_cpus(), _torch_threads()
        ceiling = default_threads(cpus)
        ours = env.get(AUTO_THREADS_KEY)  # the count choose_threads set, if it set one
        if ours != env.get("OMP_NUM_THREADS") or not (ours or "").isdigit():
            ours = None
        expected = _threads_set or (int(ours) if ours else ceiling)
        fixed = user_thread_choice(env)
        if fixed is None and not REBALANCE:
            fixed = "rebalancing off (speechvq.runtime.REBALANCE)"
        elif fixed is None and len(cpus) < 2:
            fixed = "one core"
        elif fixed is None and _local_ranks(env) > 1:
            fixed = f"{_local_ranks(env)} torchrun ranks share this machine's cores"
        elif fixed is None and threads != expected:
            fixed = (f"torch runs {threads} threads, not the {expected} speechvq chose: set by "
                     "the program (torch.set_num_threads, MKL_NUM_THREADS)")
        return cls(threads, cpus, ceiling, fixed=fixed)

    def describe(self) -> str:
        """One line for logs: the count and whether it follows the load."""
        if self.fixed is not None:
            return f"torch threads: {self.threads}, fixed ({self.fixed})"
        moves = f", changed {len(self.changes)}x" if self.changes else ""
        return (f"torch threads: {self.threads} of at most {self.ceiling}, following the load "
                f"every {self.INTERVAL:g} s{moves}")

    def update(self, now: float) -> ThreadChange | None:
        """After a step ending at ``now`` (seconds): every :attr:`INTERVAL`, measure and maybe
        change the count. Returns the change, or None."""
        if self.fixed is not None or now - self._read_at < self.INTERVAL:
            return None
        try:
            busy, total = cpu_seconds(self._read_stat(), self.cpus)
        except (OSError, ValueError, IndexError) as err:
            self._stop(f"cannot read the CPU load: {err}")
            return None
        before, self._reading = self._reading, (busy, total, self._own_cpu())
        self._read_at = now
        if before is None:
            return None
        actual = self._get()
        if actual != self.threads:
            self._stop(f"set to {actual} by the program")
            return None
        load = Load.between(before, self._reading, len(self.cpus))
        if load is None:
            return None
        self.load = load
        return self.decide(load)

    def decide(self, load: Load) -> ThreadChange | None:
        """The policy on one interval's ``load``: change the count when :func:`target_threads`
        gives the same new count :attr:`CONFIRM` times in a row."""
        others = load.others(self.threads)
        target = target_threads(load.cores, self.ceiling, self.threads, others, self.MARGIN)
        count, votes = self._votes
        self._votes = (target, votes + 1 if target == count else 1)
        if target == self.threads or self._votes[1] < self.CONFIRM:
            return None
        return self._change(target, others, load.cores)

    def _change(self, new: int, others: float, cores: int) -> ThreadChange:
        change = ThreadChange(self.threads, new, others, cores, self.CONFIRM, self.INTERVAL)
        self._set(new)
        self.threads = new
        self._votes = (new, 0)
        self.changes.append(change)
        note = ("" if len(self.changes) > 1 else "; a run whose threads change is not bitwise "
                "reproducible: set OMP_NUM_THREADS to fix them")
        log.info("%s%s", change, note)
        return change

    def _stop(self, why: str) -> None:
        self.fixed = why
        log.info("torch threads: no longer following the load (%s)", why)


def _set_torch_threads(n: int) -> None:
    global _threads_set
    import torch

    torch.set_num_threads(n)
    _threads_set = n


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


