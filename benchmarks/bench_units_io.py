"""Reading unit files at LibriSpeech 960 h scale, and the prior's training set in memory.

    python benchmarks/bench_units_io.py [--million 20] [--formats gslm kaldi] [--modes ...]
                                        [--dir DIR] [--in-process]

Writes a synthetic frame-level unit file of ``--million`` million units (utterances of 615 units
on average, LibriSpeech's 12.3 s at 50 Hz; 512 codes in runs of 1-4 frames), then, each in a
fresh process so that peak memory is its own:

- ``parse``: seconds and peak RSS of reading it with the former pure-Python parser (an ``int()``
  per unit into an int32 array per utterance; a copy of it is kept below as the reference) and
  with :func:`speechvq.units.read_units` (numpy parses each line in C into one flat array;
  int32, and int16 as the prior reads it);
- ``prior``: the prior's training set as it was (the reader's int32 dict + an int64 copy per
  utterance in the dataset) and as it is (int16 views into one array, used in place by
  :class:`speechvq.prior.UnitSequences`): peak and resident memory, dataset bytes.

Every figure is then extrapolated linearly to 173 M units (LibriSpeech 960 h at 50 Hz), and said
to be so. Memory is the process's RSS above its footprint after imports (the peak: ``VmHWM``
after resetting it through ``/proc/self/clear_refs``; what stays resident: ``/proc/self/statm``). ``--in-process`` measures in this process
instead (quick, for the tests: the memory figures then overlap and mean little).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LIBRISPEECH_UNITS = 173e6
MEAN_UNITS = 615
MODES = ("parse-old", "parse-int32", "parse-int16", "prior-old", "prior-new")


# ------------------------------------------------------------------------- the former code


def old_read_units(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """The reader before vectorisation: a Python ``int()`` per unit (gslm and kaldi)."""
    out = {}
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                continue
            if fmt == "gslm":
                utt, _, body = line.partition("|")
            else:
                parts = line.split(maxsplit=1)
                utt, body = parts[0], (parts[1] if len(parts) > 1 else "")
            try:
                out[utt.strip()] = np.asarray([int(tok) for tok in body.split()], dtype=np.int32)
            except ValueError:
                raise ValueError(f"{path}:{lineno}: expected integer units") from None
    return out


class OldUnitSequences:
    """The prior's dataset before: an int64 copy of every utterance, in a list of tuples."""

    def __init__(self, sequences, leads) -> None:
        self.items = [(np.asarray(s, dtype=np.int64), int(lead))
                      for s, lead in zip(sequences, leads, strict=True) if len(s)]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s, _ in self.items)


# ------------------------------------------------------------------------- measuring


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the peak is this measurement's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak() -> int:
    """Peak RSS in bytes: VmHWM (since the last reset), else ru_maxrss (since the start)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def write_corpus(path: Path, million: float, fmt: str, seed: int = 0) -> int:
    """A frame-level unit file of about ``million`` million units; returns how many."""
    from speechvq.units import write_units

    rng = np.random.default_rng(seed)
    units, total, i = {}, 0, 0
    while total < million * 1e6:
        n = int(rng.integers(MEAN_UNITS // 2, MEAN_UNITS * 3 // 2 + 1))
        runs = rng.integers(0, 512, size=n // 2 + 1)
        seq = np.repeat(runs, rng.integers(1, 5, size=runs.size))[:n].astype(np.int16)
        units[f"{100 + i % 2000}-{i // 2000}-{i:06d}"] = seq
        total += seq.size
        i += 1
    write_units(path, units, fmt)
    return total


def child(mode: str, path: Path, fmt: str) -> dict:
    """One measurement in this (fresh) process."""
    from speechvq.prior import UnitSequences
    from speechvq.units import read_units

    base_rss = _rss_now()
    base_peak = base_rss if _reset_peak() else _peak()
    start = time.perf_counter()
    if mode == "parse-old":
        units = old_read_units(path, fmt)
    elif mode in ("parse-int32", "parse-int16"):
        units = read_units(path, fmt, dtype=np.int16 if mode.endswith("16") else np.int32)
    elif mode == "prior-old":
        units = old_read_units(path, fmt)
        ids = sorted(units)
        data = OldUnitSequences([units[i] for i in ids], [0] * len(ids))
    elif mode == "prior-new":
        units = read_units(path, fmt, dtype=np.int16)
        ids = sorted(units)
        data = UnitSequences([units[i] for i in ids], [0] * len(ids), 1023, crop=True)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - start
    out = {"mode": mode, "seconds": seconds, "units": int(sum(len(u) for u in units.values())),
           "peak_mb": max(0, _peak() - max(base_peak, base_rss)) / 1e6,
           "resident_mb": (_rss_now() - base_rss) / 1e6}
    if mode.startswith("prior"):
        out["dataset_mb"] = data.nbytes / 1e6
    return out


def measure(mode: str, path: Path, fmt: str, in_process: bool = False) -> dict:
    if in_process:
        return child(mode, path, fmt)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(path), fmt],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--million", type=float, default=20.0, help="units in the file, millions")
    parser.add_argument("--formats", nargs="+", default=["gslm", "kaldi"],
                        choices=["gslm", "kaldi"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--dir", type=Path, default=None, help="where the files go (a temp dir)")
    parser.add_argument("--in-process", action="store_true",
                        help="measure here, not in fresh processes (quick; memory not comparable)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "FILE", "FORMAT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, path, fmt = args.child
        print(json.dumps(child(mode, Path(path), fmt)))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for fmt in args.formats:
            path = Path(tmp) / f"units.{fmt}"
            n = write_corpus(path, args.million, fmt)
            scale = LIBRISPEECH_UNITS / n
            print(f"{fmt}: {n / 1e6:.1f} M units, {path.stat().st_size / 1e6:.0f} MB file "
                  f"(x{scale:.1f} = 173 M units, LibriSpeech 960 h; extrapolated linearly)")
            print(f"  {'what':<12} {'seconds':>8} {'peak MB':>8} {'kept MB':>8} {'data MB':>8}"
                  f"   | at 173 M: {'seconds':>7} {'peak MB':>8} {'kept MB':>8}")
            for mode in args.modes:
                r = measure(mode, path, fmt, args.in_process)
                data = f"{r['dataset_mb']:8.0f}" if "dataset_mb" in r else f"{'':>8}"
                print(f"  {mode:<12} {r['seconds']:8.2f} {r['peak_mb']:8.0f} "
                      f"{r['resident_mb']:8.0f} {data}   |          {r['seconds'] * scale:7.1f} "
                      f"{r['peak_mb'] * scale:8.0f} {r['resident_mb'] * scale:8.0f}")


if __name__ == "__main__":
    main()
