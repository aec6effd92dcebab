"""benchmarks/bench_contention.py: its measuring helper, and the script end to end on a few
seconds of training (the real code path: corpus preparation, worker processes, the neighbour that
leaves, the table)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_contention import rate_over  # noqa: E402


def test_rate_over_counts_the_steps_after_a_moment() -> None:
    starts = [0.0, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0]  # 1 step/s, then 2 steps/s from 2.0
    assert rate_over(starts) == pytest.approx(6 / 4.0)
    assert rate_over(starts, after=2.0) == pytest.approx(2.0)
    assert rate_over(starts, after=1.5, skip=0) == pytest.approx(2.0)
    assert rate_over(starts, skip=5) == pytest.approx(2.0)  # warm-up steps left out
    assert rate_over(starts, after=3.9) is None  # one step: no interval


def test_bench_contention_runs_end_to_end(tmp_path: Path) -> None:
    args = ["--seconds", "3", "--policies", "speechvq", "--scenarios", "leaves",
            "--neighbour-seconds", "2", "--no-baseline", "--verbose"]
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_contention.py"), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| speechvq | auto |")]
    assert len(rows) == 1, proc.stdout
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    assert float(cells[3].rstrip(" *")) > 0  # the idle run trained and was timed
    for after in (cells[6], cells[7]):  # "-" only where a loaded machine ran under 2 steps
        assert after == "-" or float(after) > 0
    assert cells[4] == "-"  # busy was not asked for
    assert int(cells[9].split()[0]) >= 1  # torch's thread count in the leaves run
    assert "speechvq default: leaves/idle after 2 s" in proc.stdout
    assert "leaves: INFO speechvq.training: trained " in proc.stdout  # --verbose: its end line
