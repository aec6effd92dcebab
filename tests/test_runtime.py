"""The OpenMP wait policy set before torch loads, and the fit loop's speed log and slowdown warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import Dataset

from speechvq import runtime, threads, training
from speechvq.runtime import Throughput
from speechvq.training import fit

CONF = Path(__file__).resolve().parents[1] / "conf"

# ---------------------------------------------------------------- the policy


def test_policy_is_set_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    assert threads.apply_thread_policy(env, torch_loaded=False) == (
        "OMP_WAIT_POLICY=PASSIVE (set by speechvq)")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(user)
        assert "from the environment" in threads.apply_thread_policy(env, torch_loaded=False)
        assert env == user
    assert "too late" in threads.apply_thread_policy({}, torch_loaded=True)


def test_runtime_itself_imports_no_torch() -> None:
    """The modules the package imports first (runtime, and threads through it) must not load
    torch (the policy comes before it)."""
    package = Path(runtime.__file__).parent
    code = ("import importlib.util, sys, types\n"
            "pkg = types.ModuleType('speechvq'); pkg.__path__ = []; sys.modules['speechvq'] = pkg\n"
            "for name in ('threads', 'runtime'):\n"
            f"    spec = importlib.util.spec_from_file_location('speechvq.' + name, {str(package)!r} + '/' + name + '.py')\n"
            "    m = importlib.util.module_from_spec(spec); sys.modules['speechvq.' + name] = m\n"
            "    spec.loader.exec_module(m)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _spincount(code: str, **env: str) -> str:
    """libgomp's spin count in a fresh interpreter running ``code`` (OMP_DISPLAY_ENV output)."""
    clean = {k: v for k, v in os.environ.items() if k not in threads.USER_KEYS}
    clean.update(OMP_DISPLAY_ENV="VERBOSE", **env)
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True,
                         text=True, timeout=120, check=True)
    lines = [ln for ln in out.stderr.splitlines() if "GOMP_SPINCOUNT" in ln]
    if not lines:
        pytest.skip("torch's OpenMP runtime is not libgomp (no OMP_DISPLAY_ENV output)")
    return lines[0].split("=")[1].strip(" '")


def test_libgomp_takes_the_policy_only_when_speechvq_comes_first() -> None:
    shared = {"SPEECHVQ_CPU": "shared"}
    assert _spincount("import speechvq, torch", **shared) == "0"  # passive: sleep at once
    assert _spincount("import torch, speechvq", **shared) != "0"  # libgomp loaded before: too late
    assert _spincount("import speechvq, torch", GOMP_SPINCOUNT="1234", **shared) == "1234"
    assert _spincount("import speechvq, torch") != "0"  # the default: libgomp's own


# ---------------------------------------------------------------- the speed monitor


def test_throughput_first_window_and_one_warning() -> None:
    speed = Throughput(step=0, now=0.0)
    now = 0.0
    warnings = []
    for step in range(1, 401):
        now += 0.125 if step <= 200 else 0.5  # 8 steps/s, then 2 steps/s
        if step == 150:  # 30 s of validation: not training time
            speed.paused += 30.0
            now += 30.0
        if (msg := speed.update(step, now)) is not None:
            warnings.append((step, msg))
    assert speed.first is not None and speed.first[:2] == (20, 120)
    assert speed.first_rate == pytest.approx(8.0)
    assert len(warnings) == 1, warnings  # once, although every later stretch is slow
    step, msg = warnings[0]
    assert step == 260  # 120-220 at 5 steps/s is not slow enough; 220-260 at 2 steps/s is
    assert "of the 8 steps/s of its first window (steps 20-120)" in msg
    assert "trainer.max_minutes" in msg and "another process" in msg.lower()
    line = speed.summary(now)
    assert line.startswith("trained 400 steps in ") and "(first window: 8 steps/s)" in line
    assert speed.rate == pytest.approx(400 / (200 * 0.125 + 200 * 0.5))  # without the 30 s
    assert "checkpoints took 0.5 min of it" in line


def test_throughput_steady_run_does_not_warn() -> None:
    speed = Throughput(step=1000, now=5.0)  # a resumed run: counted from its own start
    now, msgs = 5.0, []
    for i in range(1, 3001):
        now += 0.1 * (1.2 if i % 2 else 0.8)  # jitter
        msgs.append(speed.update(1000 + i, now))
    assert not any(msgs) and speed.first is not None and speed.first[0] == 1020
    assert speed.summary(305.0).startswith("trained 3000 steps in 5.0 min: 10 steps/s")


# ---------------------------------------------------------------- through fit, on a fake clock


class _FakeTime:
    """Stands in for the ``time`` module of speechvq.training: the toy task moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = time = monotonic


class _Set(Dataset):
    def __len__(self) -> int:
        return 16

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.full((2,), float(i))


class _ClockTask:
    """A tiny regression whose every training step takes ``seconds(step)`` of fake time."""

    kind = "vqvae"

    def __init__(self, clock: _FakeTime, slow_from: int) -> None:
        torch.manual_seed(0)
        self.model = nn.Linear(2, 1)
        self.model_config: dict = {}
        self.meta: dict = {}
        self.train_set, self.valid_set = _Set(), None
        self.clock, self.slow_from, self.steps = clock, slow_from, 0

    def collate(self, items: list) -> dict:
        return {"x": torch.stack(items)}

    def step(self, model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        if model.training:
            self.steps += 1
            self.clock.now += 0.125 if self.steps < self.slow_from else 1.0
        return {"loss": model(batch["x"]).pow(2).mean()}

    def log_media(self, model: nn.Module, writer, step: int) -> None:
        pass


def _trainer(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    cfg.update(batch_size=4, warmup_steps=2, log_every=10, valid_every=None, media_every=None,
               save_every=10**6, precision="fp32", max_steps=300)
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("slow_from", [200, 10**6])
def test_fit_logs_speed_and_warns_once_when_it_drops(tmp_path: Path, monkeypatch, caplog,
                                                     slow_from: int) -> None:
    clock = _FakeTime()
    monkeypatch.setattr(training, "time", clock)
    monkeypatch.setattr(runtime, "time", clock)  # Throughput.pause
    with caplog.at_level(logging.INFO, logger="speechvq.training"):
        out = fit(_ClockTask(clock, slow_from), _trainer(), tmp_path / "run", device="cpu")
    assert out["step"] == 300
    slow = [r for r in caplog.records if "training slowed down" in r.getMessage()]
    ends = [r.getMessage() for r in caplog.records if r.getMessage().startswith("trained ")]
    assert len(ends) == 1 and ends[0].startswith("trained 300 steps in ")
    assert "(first window: 8 steps/s)" in ends[0]
    if slow_from > 300:
        assert not slow and ": 8 steps/s (first" in ends[0]
        return
    assert len(slow) == 1 and slow[0].levelno == logging.WARNING
    msg = slow[0].getMessage()
    assert "of the 8 steps/s of its first window (steps 20-120)" in msg
    assert "trainer.max_minutes" in msg and threads.THREAD_POLICY in msg


def test_threads_follow_the_cores_other_processes_leave_free() -> None:
    from speechvq.threads import AUTO_THREADS_KEY, busy_cores, choose_threads, default_threads

    cpus = sorted(os.sched_getaffinity(0))
    cores = len(cpus)
    env: dict[str, str] = {}
    choose_threads(env, busy=0.1)
    assert env == {}  # an idle machine: torch's default (every core)
    if cores >= 2:
        line = choose_threads(env, busy=1.0)
        if cores - 1 < default_threads(cpus):
            free = str(cores - 1)
            assert env == {"OMP_NUM_THREADS": free, AUTO_THREADS_KEY: free} and "1.0 of" in line
        else:  # hyperthreads: torch's default (a thread per physical core) fits in what is free
            assert env == {}
        env = {"OMP_NUM_THREADS": "3"}
        choose_threads(env, busy=1.0)
        assert env == {"OMP_NUM_THREADS": "3"}  # the user's choice stays
        env = {"SPEECHVQ_CPU": "shared"}
        choose_threads(env, busy=1.0)
        assert "OMP_NUM_THREADS" not in env
        env = {"OMP_NUM_THREADS": "1", AUTO_THREADS_KEY: "1"}  # a speechvq parent's choice
        choose_threads(env, busy=0.1)
        assert env == {}  # chosen again, for this moment
        env = {"OMP_NUM_THREADS": "1", AUTO_THREADS_KEY: "1", "LOCAL_WORLD_SIZE": "2"}
        choose_threads(env, busy=0.1)
        assert env["OMP_NUM_THREADS"] == "1"  # torchrun's ranks share the cores: kept
    measured = busy_cores(0.05)
    assert measured is None or -0.5 <= measured <= (os.cpu_count() or 1) + 0.5


# ---------------------------------------------------------------- following the load


class _Machine:
    """A 2-core machine's ``/proc/stat`` and this process's CPU time, for a fake clock: the test
    says how many cores this process and the others used over each stretch of time."""

    def __init__(self, cores: int = 2) -> None:
        self.busy, self.idle, self.own, self.reads = [0.0] * cores, [0.0] * cores, 0.0, 0

    def run(self, seconds: float, own: float, others: float) -> None:
        share = min(1.0, (own + others) / len(self.busy))
        for cpu in range(len(self.busy)):
            self.busy[cpu] += share * seconds
            self.idle[cpu] += (1 - share) * seconds
        self.own += own * seconds

    def stat(self) -> str:
        self.reads += 1
        tick = os.sysconf("SC_CLK_TCK")
        total = [round(sum(v) * tick) for v in (self.busy, self.idle)]
        lines = [f"cpu  {total[0]} 0 0 {total[1]} 0 0 0 0 0 0"]
        lines += [f"cpu{i} {round(b * tick)} 0 0 {round(d * tick)} 0 0 0 0 0 0"
                  for i, (b, d) in enumerate(zip(self.busy, self.idle, strict=True))]
        return "\n".join([*lines, "intr 12345 0 0", "procs_running 3"]) + "\n"


class _Torch:
    """torch.set_num_threads / get_num_threads, recorded."""

    def __init__(self, threads: int) -> None:
        self.threads, self.calls = threads, []

    def set(self, n: int) -> None:
        self.threads = n
        self.calls.append(n)

    def get(self) -> int:
        return self.threads


def _balancer(machine: _Machine, torch_: _Torch, **kw) -> threads.ThreadBalancer:
    return threads.ThreadBalancer(torch_.threads, [0, 1], read_stat=machine.stat,
                                  own_cpu=lambda: machine.own, set_threads=torch_.set,
                                  get_threads=torch_.get, **kw)


class _Run:
    """Steps of 0.1 s on the fake machine, the balancer checked after each (as the fit loop)."""

    def __init__(self, machine: _Machine, balancer: threads.ThreadBalancer) -> None:
        self.machine, self.balancer, self.now = machine, balancer, 0.0
        self.changed_at: list[float] = []

    def go(self, seconds: float, others: float, own: float | None = None) -> None:
        for _ in range(round(seconds / 0.1)):
            threads = self.balancer.threads
            used = own if own is not None else min(threads, 2 - min(others, 1.0))
            self.machine.run(0.1, used, others)
            self.now += 0.1
            if self.balancer.update(self.now) is not None:
                self.changed_at.append(self.now)


def test_threads_go_back_up_when_the_neighbour_leaves(caplog) -> None:
    """A run that started beside a busy process (1 thread) gets its second core back within two
    checks of the neighbour leaving, and not after one."""
    machine, torch_ = _Machine(), _Torch(1)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(30.0, others=1.0)  # the neighbour holds one core, our one thread the other
    assert torch_.calls == [] and run.balancer.load is not None
    assert run.balancer.load.others(1) == pytest.approx(1.0, abs=0.05)
    with caplog.at_level(logging.INFO, logger="speechvq.threads"):
        run.go(5.5, others=0.02)  # it left: one check saw it gone
        assert torch_.calls == []
        run.go(5.5, others=0.02)  # the second in a row
    assert torch_.calls == [2] and run.balancer.threads == 2
    assert 30.0 + 5.5 < run.changed_at[0] <= 30.0 + 11.0  # two checks, 5 s apart
    lines = [r.getMessage() for r in caplog.records if r.name == "speechvq.threads"]
    assert len(lines) == 1 and lines[0].startswith("torch threads 1 -> 2: other processes want")
    assert "not bitwise reproducible" in lines[0]
    run.go(60.0, others=0.02)
    assert torch_.calls == [2]  # and it stays


def test_threads_go_down_when_a_neighbour_arrives() -> None:
    """Two spinning threads leave a busy neighbour ~0.6 of a core (fair shares of 2 cores among
    3 threads): it wants a whole one, and the run goes to 1 thread."""
    machine, torch_ = _Machine(), _Torch(2)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(30.0, others=0.05, own=1.95)
    assert torch_.calls == []
    run.go(20.0, others=0.62, own=1.38)
    assert torch_.calls == [1]
    assert 30.0 + 5.5 < run.changed_at[0] <= 30.0 + 11.0
    assert run.balancer.changes[0].others == pytest.approx(0.9, abs=0.05)


def test_own_threads_are_not_a_neighbour() -> None:
    """Both cores busy with this process's own threads: nothing to give back. One thread on an
    idle machine: the busy core is ours, the other is free."""
    machine, torch_ = _Machine(), _Torch(2)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(60.0, others=0.0, own=2.0)
    assert torch_.calls == [] and run.balancer.load.busy == pytest.approx(2.0, abs=0.02)
    machine, torch_ = _Machine(), _Torch(1)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(20.0, others=0.0, own=1.0)
    assert torch_.calls == [2]


def test_the_users_thread_count_is_never_changed(monkeypatch) -> None:
    machine = _Machine()
    monkeypatch.setattr(threads, "_threads_set", None)
    n = str(torch.get_num_threads())  # the user's count equals torch's: only the env tells
    for env, why in (({"OMP_NUM_THREADS": n}, f"OMP_NUM_THREADS={n} set by the user"),
                     ({"SPEECHVQ_CPU": "shared"}, "SPEECHVQ_CPU=shared set"),
                     ({"OMP_NUM_THREADS": n, threads.AUTO_THREADS_KEY: "9"},  # changed after
                      f"OMP_NUM_THREADS={n} set by the user")):
        fixed = threads.ThreadBalancer.for_process(env).fixed
        assert fixed == why, env
        torch_ = _Torch(1)
        run = _Run(machine, _balancer(machine, torch_, fixed=fixed))
        run.go(30.0, others=0.0, own=1.0)  # a free core, for 30 s
        assert torch_.calls == [] and machine.reads == 0
    # speechvq's own choice (choose_threads at import) follows the load, where there are 2 cores
    ours = {"OMP_NUM_THREADS": str(torch.get_num_threads()),
            threads.AUTO_THREADS_KEY: str(torch.get_num_threads())}
    balancer = threads.ThreadBalancer.for_process(ours)
    assert balancer.fixed is None or balancer.fixed == "one core"
    # torch.set_num_threads by the program before the run: torch's count is not speechvq's
    ours = {"OMP_NUM_THREADS": "7", threads.AUTO_THREADS_KEY: "7"}
    assert "torch.set_num_threads" in threads.ThreadBalancer.for_process(ours).fixed
    # ... or during it: the balancer stops
    torch_ = _Torch(1)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(6.0, others=0.0, own=1.0)  # one check so far: a free core, no change yet
    torch_.threads = 3  # the program's own torch.set_num_threads(3)
    run.go(30.0, others=0.0, own=1.0)
    assert torch_.calls == [] and "set to 3 by the program" in run.balancer.fixed
    several = {"OMP_NUM_THREADS": "1", threads.AUTO_THREADS_KEY: "1", "LOCAL_WORLD_SIZE": "2"}
    assert "torchrun ranks" in threads.ThreadBalancer.for_process(several).fixed
    monkeypatch.setattr(threads, "REBALANCE", False)
    assert "REBALANCE" in threads.ThreadBalancer.for_process(
        {"OMP_NUM_THREADS": "1", threads.AUTO_THREADS_KEY: "1"}).fixed


def test_thread_count_has_hysteresis() -> None:
    # near the rounding point the count stays; past it by the margin it moves
    assert threads.target_threads(2, 2, current=2, others=0.6) == 2
    assert threads.target_threads(2, 2, current=2, others=0.7) == 1
    assert threads.target_threads(2, 2, current=1, others=0.4) == 1
    assert threads.target_threads(2, 2, current=1, others=0.3) == 2
    # one busy check, or checks that disagree, change nothing
    machine, torch_ = _Machine(), _Torch(2)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(10.0, others=0.0, own=2.0)
    run.go(5.0, others=0.62, own=1.38)  # one interval with a neighbour
    run.go(30.0, others=0.0, own=2.0)
    for _ in range(6):  # a neighbour that comes and goes with every check
        run.go(5.0, others=0.62, own=1.38)
        run.go(5.0, others=0.0, own=2.0)
    assert torch_.calls == []


def test_thread_count_stays_within_the_cores() -> None:
    assert threads.target_threads(2, 2, current=2, others=0.0) == 2
    assert threads.target_threads(8, 4, current=2, others=0.0) == 4  # ceiling: physical cores
    assert threads.target_threads(2, 2, current=1, others=5.0) == 1  # never below one
    machine, torch_ = _Machine(), _Torch(1)
    assert _balancer(machine, torch_, ceiling=16).ceiling == 2  # never above the process's CPUs
    run = _Run(machine, _balancer(machine, torch_))
    run.go(30.0, others=0.0, own=0.2)
    assert torch_.calls == [2]


def test_load_is_read_every_interval_only() -> None:
    machine, torch_ = _Machine(), _Torch(2)
    run = _Run(machine, _balancer(machine, torch_))
    run.go(12.0, others=0.0, own=2.0)  # 120 steps
    assert machine.reads == 3  # at 0.1 s, 5.1 s and 10.1 s


def test_cpu_seconds_reads_the_process_cpus_only() -> None:
    tick = os.sysconf("SC_CLK_TCK")
    stat = ("cpu  900 0 100 1000 0 0 0 0 0 0\n"
            "cpu0 800 0 100 100 0 0 0 0 0 0\n"  # busy, not ours
            "cpu1 100 0 0 850 50 0 0 0 0 0\n"  # iowait is idle
            "cpu2 0 0 0 0 0 0 0 30 0 0\n"  # steal is busy
            "intr 1 2 3\n")
    assert threads.cpu_seconds(stat, [1]) == pytest.approx((100 / tick, 1000 / tick))
    assert threads.cpu_seconds(stat, [1, 2]) == pytest.approx((130 / tick, 1030 / tick))
    with pytest.raises(ValueError):
        threads.cpu_seconds(stat, [5])


def test_throughput_remeasures_its_reference_when_threads_go_up(caplog) -> None:
    """1 thread beside a neighbour (4 steps/s), the neighbour leaves (2 threads: 8 steps/s), then
    comes back (1 thread, 3.5 steps/s). The last stretch is slow against the 2-thread speed, not
    against the first window's 1-thread speed; the thread changes themselves never warn."""
    machine, torch_ = _Machine(), _Torch(1)
    balancer = _balancer(machine, torch_)
    speed = Throughput(step=0, now=0.0, balancer=balancer)
    now, step, warnings = 0.0, 0, []
    for others, seconds in ((1.0, 60.0), (0.0, 60.0), (1.0, 60.0)):
        end = now + seconds
        while now < end:
            rate = {1: 4.0 if step < 300 else 3.5, 2: 8.0}[balancer.threads]
            machine.run(1 / rate, min(balancer.threads, 2 - others), others)
            now, step = now + 1 / rate, step + 1
            if (msg := speed.update(step, now)) is not None:
                warnings.append((step, msg))
    assert torch_.calls == [2, 1]
    assert len(warnings) == 1, warnings
    msg = warnings[0][1]
    assert "of the 8 steps/s of its window at 2 threads" in msg and "torch threads: 1" in msg
    assert "torch threads 1 -> 2 -> 1" in speed.summary(now)
    assert "(window at 2 threads: 8 steps/s)" in speed.summary(now)


def test_throughput_in_tests_does_not_rebalance() -> None:
    """conftest sets OMP_NUM_THREADS=1: the fit loop's balancer is fixed in every test."""
    assert Throughput(0, 0.0).balancer.fixed is not None
