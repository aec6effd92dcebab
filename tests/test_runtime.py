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

from speechvq import runtime, training
from speechvq.runtime import Throughput
from speechvq.training import fit

CONF = Path(__file__).resolve().parents[1] / "conf"

# ---------------------------------------------------------------- the policy


def test_policy_is_set_unless_the_user_chose() -> None:
    env: dict[str, str] = {}
    assert runtime.apply_thread_policy(env, torch_loaded=False) == (
        "OMP_WAIT_POLICY=PASSIVE (set by speechvq)")
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(user)
        assert "from the environment" in runtime.apply_thread_policy(env, torch_loaded=False)
        assert env == user
    assert "too late" in runtime.apply_thread_policy({}, torch_loaded=True)


def test_runtime_itself_imports_no_torch() -> None:
    """The module the package imports first must not load torch (the policy comes before it)."""
    path = Path(runtime.__file__)
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('rt', {str(path)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['rt'] = m\n"
            "spec.loader.exec_module(m); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _spincount(code: str, **env: str) -> str:
    """libgomp's spin count in a fresh interpreter running ``code`` (OMP_DISPLAY_ENV output)."""
    clean = {k: v for k, v in os.environ.items() if k not in runtime.USER_KEYS}
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
    assert "trainer.max_minutes" in msg and runtime.THREAD_POLICY in msg


def test_threads_follow_the_cores_other_processes_leave_free() -> None:
    from speechvq.runtime import busy_cores, choose_threads

    cores = len(os.sched_getaffinity(0))
    env: dict[str, str] = {}
    choose_threads(env, busy=0.1)
    assert env == {}  # an idle machine: torch's default (every core)
    if cores >= 2:
        line = choose_threads(env, busy=1.0)
        assert env == {"OMP_NUM_THREADS": str(cores - 1)} and "1.0 of" in line
        env = {"OMP_NUM_THREADS": "3"}
        choose_threads(env, busy=1.0)
        assert env == {"OMP_NUM_THREADS": "3"}  # the user's choice stays
        env = {"SPEECHVQ_CPU": "shared"}
        choose_threads(env, busy=1.0)
        assert "OMP_NUM_THREADS" not in env
    measured = busy_cores(0.05)
    assert measured is None or -0.5 <= measured <= (os.cpu_count() or 1) + 0.5
