"""Training throughput when another process uses a core: idle vs one busy single-threaded neighbour.

    python benchmarks/bench_contention.py [--seconds 60] [--policies unset,speechvq]
        [--threads auto] [--repeats 1] [--cores N] [--data DIR] [--verbose]

Prepares the shipped mini corpus once (``speechvq-prepare data=mini``), then for every
configuration (policy x threads) trains the default mel VQ-VAE for ``--seconds`` twice, each time
in a fresh process whose environment is set before Python starts: once on an idle machine, once
beside a pure-Python busy loop (one thread, started by this script and killed after). Prints
training steps/s (after 20 warm-up steps) idle and busy, their ratio, and idle throughput relative
to the pre-policy default (``unset``/``auto``, always measured). On 2 cores a fair share is ~0.5x.

Policies (the OpenMP wait behaviour; the effective ``GOMP_SPINCOUNT`` is read back from libgomp
with ``OMP_DISPLAY_ENV=VERBOSE`` and shown in the table):

    unset     nothing set and torch imported before speechvq: libgomp's own default (threads spin
              300,000 iterations at a barrier), i.e. speechvq before it set a policy
    speechvq  nothing set, speechvq imported first: what speechvq sets now (speechvq.runtime)
    passive   OMP_WAIT_POLICY=PASSIVE
    active    OMP_WAIT_POLICY=ACTIVE
    spin:N    GOMP_SPINCOUNT=N (OMP_WAIT_POLICY unset)

Threads: ``auto`` (OMP_NUM_THREADS unset: torch uses every core it may run on) or a number
(``OMP_NUM_THREADS=N``). ``--cores N`` pins the training and the neighbour to the first N CPUs
(to reproduce a 2-core laptop on a bigger machine). Run it on an otherwise idle machine.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
WARMUP_STEPS = 20  # as speechvq.runtime.Throughput: the first steps set up kernels and caches
BASELINE = ("unset", "auto")
OMP_KEYS = ("SPEECHVQ_CPU", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OMP_DISPLAY_ENV")
NEIGHBOUR = "while True:\n    pass\n"  # one busy thread, no OpenMP, no numpy


@dataclass
class Result:
    """One training run: steps/s after warm-up, steps, and what libgomp and torch used."""

    rate: float
    steps: int
    threads: int
    spincount: str
    end_line: str


# --------------------------------------------------------------------------- the training process


def worker(spec: dict) -> None:
    """Train for ``spec["seconds"]`` and print one JSON line (runs in a fresh process)."""
    # which comes first decides whether libgomp (loaded by torch) sees speechvq's policy
    importlib.import_module("torch" if spec["policy"] == "unset" else "speechvq")
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from speechvq.runtime import seed_everything
    from speechvq.tasks import VQVAETask
    from speechvq.training import fit

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
            starts.append(time.perf_counter())
        return step(model, batch)

    task.step = timed_step  # type: ignore[method-assign]
    t0 = time.perf_counter()
    fit(task, config["trainer"], spec["out"], seed=int(config["seed"]), device="cpu",
        config=config)
    first = WARMUP_STEPS if len(starts) > 2 * WARMUP_STEPS else 0
    if len(starts) > first + 1:
        rate = (len(starts) - 1 - first) / (starts[-1] - starts[first])
    else:  # a step or two: whole fit, final save included
        rate = len(starts) / (time.perf_counter() - t0)
    print(json.dumps({"rate": rate, "steps": len(starts), "threads": torch.get_num_threads()}))


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
    elif policy not in ("unset", "speechvq"):
        raise SystemExit(f"unknown policy {policy!r}: unset, speechvq, shared, passive, active, "
                         "spin:N")
    if threads != "auto":
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(int(threads))
    return env


def pin(cores: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` restricting a child to the first ``cores`` CPUs (None: no pinning)."""
    if not cores:
        return None
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    return lambda: os.sched_setaffinity(0, cpus)


def train_once(data: Path, work: Path, policy: str, threads: str, seconds: float,
               cores: int | None, busy: bool, verbose: bool) -> Result:
    """One training process, idle or beside a busy neighbour (killed whatever happens)."""
    out = Path(tempfile.mkdtemp(prefix="run.", dir=work))
    spec = {"policy": policy, "data": str(data), "out": str(out), "seconds": seconds}
    neighbour = None
    try:
        if busy:
            neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR],
                                         preexec_fn=pin(cores), stdin=subprocess.DEVNULL)
            time.sleep(0.5)  # running before the training starts
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=child_env(policy, threads), preexec_fn=pin(cores), capture_output=True,
            text=True, timeout=seconds + 600,
        )
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()
        shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"training failed ({policy}, threads {threads}, busy={busy})")
    found = re.search(r"GOMP_SPINCOUNT = '(\d+)'", proc.stderr)
    ends = [ln for ln in proc.stderr.splitlines() if "trained " in ln and "steps/s" in ln]
    slow = [ln for ln in proc.stderr.splitlines() if "training slowed down" in ln]
    if verbose:
        for line in ends + slow:
            print(f"    {'busy' if busy else 'idle'}: {line}")
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return Result(got["rate"], got["steps"], got["threads"],
                  found.group(1) if found else "?", ends[-1] if ends else "")


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
    parser.add_argument("--policies", default="unset,speechvq",
                        help="comma-separated: unset, speechvq, passive, active, spin:N")
    parser.add_argument("--threads", default="auto", help="comma-separated: auto or a number")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (median)")
    parser.add_argument("--cores", type=int, default=None, help="pin to the first N CPUs")
    parser.add_argument("--data", type=Path, default=None,
                        help="a prepared mini corpus to reuse (default: prepared in a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show each run's speed log")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return

    configs = [(p.strip(), t.strip()) for p in args.policies.split(",")
               for t in args.threads.split(",")]
    if BASELINE not in configs:
        configs.insert(0, BASELINE)
    for policy, threads in configs:
        child_env(policy, threads)  # bad names fail now, not after minutes of training
    work = Path(tempfile.mkdtemp(prefix="bench_contention."))
    try:
        data = args.data or work / "data"
        prepare(data)
        cpus = args.cores or len(os.sched_getaffinity(0))
        print(f"{cpus} CPUs, {args.seconds:g} s per run, {args.repeats} repeat(s), "
              f"load average {os.getloadavg()[0]:.2f} before the runs", flush=True)
        rows = []
        for policy, threads in configs:
            idle, busy = [], []
            for _ in range(args.repeats):
                for is_busy, into in ((False, idle), (True, busy)):
                    into.append(train_once(data, work, policy, threads, args.seconds,
                                           args.cores, is_busy, args.verbose))
            rows.append((policy, threads, idle, busy))
            r_idle = statistics.median(r.rate for r in idle)
            r_busy = statistics.median(r.rate for r in busy)
            print(f"  {policy}/{threads}: idle {r_idle:.3g} steps/s, busy {r_busy:.3g} steps/s",
                  flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows)


def report(rows: list[tuple[str, str, list[Result], list[Result]]]) -> None:
    """The table, and the two acceptance figures for speechvq's default."""
    rates = {(p, t): (statistics.median(r.rate for r in i), statistics.median(r.rate for r in b))
             for p, t, i, b in rows}
    base_idle = rates[BASELINE][0]
    print()
    print("| policy | threads | torch threads | GOMP_SPINCOUNT | idle steps/s | busy steps/s "
          "| busy/idle | idle vs unset/auto |")
    print("|---|---|---|---|---|---|---|---|")
    few = False
    for policy, threads, idle, busy in rows:
        r_idle, r_busy = rates[(policy, threads)]
        mark = ""
        if min(r.steps for r in idle + busy) <= 2 * WARMUP_STEPS:
            few, mark = True, " *"
        print(f"| {policy} | {threads} | {idle[0].threads} | {idle[0].spincount} | "
              f"{r_idle:.3g} | {r_busy:.3g}{mark} | {r_busy / r_idle:.2f}x | "
              f"{r_idle / base_idle:.2f}x |")
    if few:
        print(f"\n* a run of {2 * WARMUP_STEPS} steps or fewer: warm-up included, raise --seconds")
    if ("speechvq", "auto") in rates:
        r_idle, r_busy = rates[("speechvq", "auto")]
        ratio, vs = r_busy / r_idle, r_idle / base_idle
        print(f"\nspeechvq default: busy/idle {ratio:.2f}x (target >= 0.45: "
              f"{'ok' if ratio >= 0.45 else 'NOT MET'}); idle {vs:.2f}x of unset/auto "
              f"(target: no worse within noise)")


if __name__ == "__main__":
    main()
