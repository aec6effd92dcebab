"""Training throughput when another process uses a core: idle, beside a busy single-threaded
neighbour for the whole run, and beside one that leaves after the run's first seconds.

    python benchmarks/bench_contention.py [--seconds 60] [--policies unset,static,speechvq]
        [--threads auto] [--scenarios idle,busy,leaves] [--neighbour-seconds 20] [--repeats 1]
        [--cores N] [--data DIR] [--no-baseline] [--verbose]

Prepares the shipped mini corpus once (``speechvq-prepare data=mini``), then for every
configuration (policy x threads) and scenario trains the default mel VQ-VAE for ``--seconds``,
each time in a fresh process whose environment is set before Python starts. Scenarios:

    idle      nothing else runs
    busy      a pure-Python busy loop (one thread, started by this script half a second before the
              training and killed after it) runs throughout
    leaves    the same neighbour, killed ``--neighbour-seconds`` after the training process started
              (imports included): the run starts beside it, as one started during a package
              install, and should get its speed back once it is gone

Prints training steps/s (after 20 warm-up steps) for idle and busy and their ratio; for ``leaves``,
the steps/s over the steps that started after the neighbour was killed, next to the idle run's
steps/s over the same part of its run (same offset from its start), and their ratio; the thread
changes of each run (speechvq's :class:`~speechvq.threads.ThreadBalancer`); idle throughput
relative to the pre-policy default (``unset``/``auto``, measured unless ``--no-baseline``). On
2 cores a fair share beside one busy process is ~0.5x.

Policies (the OpenMP wait behaviour and speechvq's thread count; the effective
``GOMP_SPINCOUNT`` is read back from libgomp with ``OMP_DISPLAY_ENV=VERBOSE`` and shown):

    unset     nothing set and torch imported before speechvq: libgomp's own default (threads spin
              300,000 iterations at a barrier) and torch's thread count, never changed, i.e.
              speechvq before it set a policy
    static    speechvq imported first, threads chosen once at import and never changed
              (speechvq.threads.REBALANCE off): speechvq before it followed the load
    speechvq  speechvq imported first, nothing else set: what speechvq does now (the count chosen
              at import, then followed during training)
    shared    SPEECHVQ_CPU=shared (OMP_WAIT_POLICY=PASSIVE, threads never changed)
    passive   OMP_WAIT_POLICY=PASSIVE
    active    OMP_WAIT_POLICY=ACTIVE
    spin:N    GOMP_SPINCOUNT=N (OMP_WAIT_POLICY unset)

Threads: ``auto`` (OMP_NUM_THREADS unset: speechvq or torch choose) or a number
(``OMP_NUM_THREADS=N``: the user's choice, never changed). ``--cores N`` pins the training and the
neighbour to the first N CPUs (to reproduce a 2-core laptop on a bigger machine). Run it on an
otherwise idle machine: anything else running is a neighbour too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WARMUP_STEPS = 20  # as speechvq.runtime.Throughput: the first steps set up kernels and caches
BASELINE = ("unset", "auto")
OMP_KEYS = ("SPEECHVQ_CPU", "SPEECHVQ_AUTO_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
            "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_DISPLAY_ENV")
NEIGHBOUR = "while True:\n    pass\n"  # one busy thread, no OpenMP, no numpy
SCENARIOS = ("idle", "busy", "leaves")
FIXED_POLICIES = ("unset", "static")  # the thread count is never changed during the run


@dataclass
class Result:
    """One training run: steps/s after warm-up (and after the neighbour left), steps, and what
    libgomp and torch used."""

    rate: float
    rate_after: float | None  # over the steps that started after --neighbour-seconds
    steps: int
    threads: int  # torch's count when training started
    threads_end: int
    spincount: str
    end_line: str
    changes: list[tuple[float, str]] = field(default_factory=list)  # (s after start, log line)


# --------------------------------------------------------------------------- the training process


def rate_over(starts: Sequence[float], after: float | None = None, skip: int = 0) -> float | None:
    """Steps/s over the steps in ``starts`` (start times, ascending) from index ``skip`` that
    started at or after ``after``: intervals between consecutive starts; None below 2 steps."""
    chosen = [t for t in starts[skip:] if after is None or t >= after]
    if len(chosen) < 2:
        return None
    return (len(chosen) - 1) / max(chosen[-1] - chosen[0], 1e-9)


class _ThreadLog(logging.Handler):
    """Keeps speechvq.threads' thread-change lines with the time they were logged."""

    def __init__(self, t0: float) -> None:
        super().__init__(logging.INFO)
        self.t0, self.lines = t0, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((time.monotonic() - self.t0, record.getMessage()))


def worker(spec: dict) -> None:
    """Train for ``spec["seconds"]`` and print one JSON line (runs in a fresh process)."""
    # which comes first decides whether libgomp (loaded by torch) sees speechvq's policy
    importlib.import_module("torch" if spec["policy"] == "unset" else "speechvq")
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from speechvq import threads
    from speechvq.runtime import seed_everything
    from speechvq.tasks import VQVAETask
    from speechvq.training import fit

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    changes = _ThreadLog(spec["t0"])
    logging.getLogger("speechvq.threads").addHandler(changes)
    threads.REBALANCE = spec["policy"] not in FIXED_POLICIES
    overrides = [
        f"data.manifest={spec['data']}/train.tsv", f"out_dir={spec['out']}", "device=cpu",
        f"trainer.max_minutes={spec['seconds'] / 60}", "trainer.max_steps=1000000000",
        "trainer.valid_every=null", "trainer.media_every=null", "trainer.save_every=1000000000",
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    config = OmegaConf.to_container(cfg, resolve=True)
    seed_everything(int(config["seed"]))
    task = VQVAETask(config, out_dir=spec["out"], progress=False)
    starts: list[float] = []
    step = task.step

    def timed_step(model: Any, batch: dict) -> dict:
        if model.training:
            starts.append(time.monotonic())  # system-wide: comparable with spec["after"]
        return step(model, batch)

    task.step = timed_step  # type: ignore[method-assign]
    threads = torch.get_num_threads()
    t0 = time.monotonic()
    fit(task, config["trainer"], spec["out"], seed=int(config["seed"]), device="cpu",
        config=config)
    skip = WARMUP_STEPS if len(starts) > 2 * WARMUP_STEPS else 0
    rate = rate_over(starts, skip=skip)
    if rate is None:  # a step or two: whole fit, final save included
        rate = len(starts) / (time.monotonic() - t0)
    print(json.dumps({"rate": rate, "rate_after": rate_over(starts, spec["after"], skip),
                      "steps": len(starts), "threads": threads,
                      "threads_end": torch.get_num_threads(), "changes": changes.lines}))


# --------------------------------------------------------------------------- the orchestration


def child_env(policy: str, threads: str) -> dict[str, str]:
    """The environment a training process starts with (the caller's, less every OpenMP knob)."""
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_DISPLAY_ENV"] = "VERBOSE"  # libgomp prints what it took: checked per run
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy == "active":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    elif policy == "shared":
        env["SPEECHVQ_CPU"] = "shared"
    elif policy.startswith("spin:"):
        env["GOMP_SPINCOUNT"] = str(int(policy.split(":", 1)[1]))
    elif policy not in ("unset", "static", "speechvq"):
        raise SystemExit(f"unknown policy {policy!r}: unset, static, speechvq, shared, passive, "
                         "active, spin:N")
    if threads != "auto":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    return env


def pin(cores: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` restricting a child to the first ``cores`` CPUs (None: no pinning)."""
    if not cores:
        return None
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait()


def train_once(data: Path, work: Path, policy: str, threads: str, seconds: float,
               cores: int | None, scenario: str, neighbour_seconds: float,
               verbose: bool) -> Result:
    """One training process in ``scenario`` (its neighbour killed whatever happens)."""
    run_dir = Path(tempfile.mkdtemp(prefix="run.", dir=work))
    neighbour = proc = None
    # the child's output goes to files: a pipe left unread while this script waits to kill the
    # neighbour fills up (the progress bar) and stalls the training it measures
    with open(run_dir / "stdout", "w+") as out, open(run_dir / "stderr", "w+") as err:
        try:
            if scenario != "idle":
                neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR],
                                             preexec_fn=pin(cores), stdin=subprocess.DEVNULL)
                time.sleep(0.5)  # running before the training starts
            t0 = time.monotonic()
            spec = {"policy": policy, "data": str(data), "out": str(run_dir / "train"),
                    "seconds": seconds, "t0": t0, "after": t0 + neighbour_seconds}
            proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)],
                                    env=child_env(policy, threads), preexec_fn=pin(cores),
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=err)
            if scenario == "leaves":
                try:
                    proc.wait(timeout=neighbour_seconds)
                except subprocess.TimeoutExpired:
                    pass
                _stop(neighbour)
            proc.wait(timeout=seconds + 600)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(neighbour)
            _stop(proc)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    shutil.rmtree(run_dir, ignore_errors=True)
    if proc is None or proc.returncode != 0 or not stdout.strip():
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"training failed ({policy}, threads {threads}, {scenario})")
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", stderr)
    ends = [ln for ln in stderr.splitlines() if "trained " in ln and "steps/s" in ln]
    slow = [ln for ln in stderr.splitlines() if "training slowed down" in ln]
    got = json.loads(stdout.strip().splitlines()[-1])
    changes = [(float(t), line) for t, line in got["changes"]]
    if verbose:
        for line in ends + slow + [f"{t:.1f} s: {line}" for t, line in changes]:
            print(f"    {scenario}: {line}")
    return Result(got["rate"], got["rate_after"], got["steps"], got["threads"],
                  got["threads_end"], found.group(1) if found else "?",
                  ends[-1] if ends else "", changes)


def prepare(data: Path) -> None:
    """``speechvq-prepare data=mini out_dir=DATA`` unless DATA/train.tsv is there."""
    if (data / "train.tsv").exists():
        return
    print(f"preparing the mini corpus into {data} ...", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    subprocess.run([sys.executable, "-m", "speechvq.cli.prepare", "data=mini",
                    f"out_dir={data}", "progress=false"], check=True, env=env, cwd=ROOT,
                   stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per run")
    parser.add_argument("--policies", default="unset,static,speechvq",
                        help="comma-separated: unset, static, speechvq, shared, passive, active, "
                             "spin:N")
    parser.add_argument("--threads", default="auto", help="comma-separated: auto or a number")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated: idle, busy, leaves")
    parser.add_argument("--neighbour-seconds", type=float, default=20.0,
                        help="leaves: seconds after the training process starts that the "
                             "neighbour is killed; the after-rates count from there")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median)")
    parser.add_argument("--cores", type=int, default=None, help="pin to the first N CPUs")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared mini corpus to reuse (default: prepared in a temp dir)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not add the unset/auto reference configuration")
    parser.add_argument("--verbose", action="store_true", help="show each run's speed log")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    scenarios = [s.strip() for s in args.scenarios.split(",")]
    if unknown := sorted(set(scenarios) - set(SCENARIOS)):
        raise SystemExit(f"unknown scenario {unknown[0]!r}: {', '.join(SCENARIOS)}")
    if "leaves" in scenarios and "idle" not in scenarios:
        scenarios.insert(0, "idle")  # leaves is compared with the idle run
    configs = [(p.strip(), t.strip()) for p in args.policies.split(",")
               for t in args.threads.split(",")]
    if BASELINE not in configs and not args.no_baseline:
        configs.insert(0, BASELINE)
    for policy, threads in configs:
        child_env(policy, threads)  # bad names fail now, not after minutes of training
    work = Path(tempfile.mkdtemp(prefix="bench_contention."))
    try:
        data = args.data or work / "data"
        prepare(data)
        cpus = args.cores or len(os.sched_getaffinity(0))
        print(f"{cpus} CPUs, {args.seconds:g} s per run, {args.repeats} repeat(s), neighbour "
              f"leaving after {args.neighbour_seconds:g} s, load average "
              f"{os.getloadavg()[0]:.2f} before the runs", flush=True)
        rows = []
        for policy, threads in configs:
            runs: dict[str, list[Result]] = {s: [] for s in scenarios}
            for _ in range(args.repeats):
                for scenario in scenarios:
                    runs[scenario].append(train_once(
                        data, work, policy, threads, args.seconds, args.cores, scenario,
                        args.neighbour_seconds, args.verbose))
            rows.append((policy, threads, runs))
            print(f"  {policy}/{threads}: " + ", ".join(
                f"{s} {_median(r, 'rate'):.3g}" for s, r in runs.items()) + " steps/s",
                flush=True)
        print(f"load average {os.getloadavg()[0]:.2f} after the runs")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args.neighbour_seconds)


def _median(results: list[Result], key: str) -> float:
    values = [getattr(r, key) for r in results if getattr(r, key) is not None]
    return statistics.median(values) if values else float("nan")


def _cell(value: float, fmt: str = ".3g", unit: str = "") -> str:
    return "-" if value != value else format(value, fmt) + unit  # NaN: not measured


def _thread_story(result: Result) -> str:
    """``2``, or ``1 -> 2 (29.8 s)``: torch's count at the start and each change."""
    story = str(result.threads)
    for t, line in result.changes:
        found = re.match(r"torch threads \d+ -> (\d+)", line)
        if found:
            story += f" -> {found.group(1)} ({t:.1f} s)"
    return story


def report(rows: list[tuple[str, str, dict[str, list[Result]]]], neighbour_seconds: float) -> None:
    """The table, and the acceptance figures for speechvq's default."""
    figures = {}
    for policy, threads, runs in rows:
        get = {s: _median(r, "rate") for s, r in runs.items()}
        after = {s: _median(r, "rate_after") for s, r in runs.items()}
        figures[(policy, threads)] = (get.get("idle", float("nan")),
                                      get.get("busy", float("nan")),
                                      after.get("idle", float("nan")),
                                      after.get("leaves", float("nan")))
    base = figures.get(BASELINE, (float("nan"),))[0]
    after_label = f"after {neighbour_seconds:g} s"
    print()
    print(f"| policy | threads | GOMP_SPINCOUNT | idle | busy | busy/idle | idle {after_label} "
          f"| leaves {after_label} | leaves/idle | torch threads (leaves) | idle vs unset/auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    few = False
    for policy, threads, runs in rows:
        idle, busy, idle_after, leaves_after = figures[(policy, threads)]
        first = next(iter(runs.values()))[0]
        mark = ""
        if min(r.steps for rs in runs.values() for r in rs) <= 2 * WARMUP_STEPS:
            few, mark = True, " *"
        story = _thread_story(runs["leaves"][0]) if "leaves" in runs else "-"
        print(f"| {policy} | {threads} | {first.spincount} | {_cell(idle)}{mark} | {_cell(busy)} "
              f"| {_cell(busy / idle, '.2f', 'x')} | {_cell(idle_after)} | {_cell(leaves_after)} "
              f"| {_cell(leaves_after / idle_after, '.2f', 'x')} | {story} "
              f"| {_cell(idle / base, '.2f', 'x')} |")
    if few:
        print(f"\n* a run of {2 * WARMUP_STEPS} steps or fewer: warm-up included, raise --seconds")
    if ("speechvq", "auto") in figures:
        idle, busy, idle_after, leaves_after = figures[("speechvq", "auto")]
        print()
        for name, ratio, target in (("busy/idle", busy / idle, 0.6),
                                    (f"leaves/idle {after_label}", leaves_after / idle_after, 0.9)):
            verdict = "not measured" if ratio != ratio else "ok" if ratio >= target else "NOT MET"
            print(f"speechvq default: {name} {_cell(ratio, '.2f', 'x')} (target >= {target}: "
                  f"{verdict})")


if __name__ == "__main__":
    main()
