"""The fit loop's data: one loader for the whole run (workers started once, the same batches as
without workers, from any resume point), validation read once, a bounded validation subset."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from speechvq.data.loader import TrainLoader, ValidBatches, train_batches
from speechvq.data.manifest import ManifestRow
from speechvq.tasks import _valid_subset


class _Items(Dataset):
    """Item i of epoch e is (e, i) and the pid that made it; counts the items it made here."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch, self.made = n, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        self.made += 1
        return {"key": torch.tensor([self.epoch, i]), "pid": torch.tensor(os.getpid())}


def _collate(items: list) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _take(loader: TrainLoader, n: int) -> list:
    out = []
    for epoch, position, batch in loader:
        out.append((epoch, position, batch))
        if len(out) == n:
            return out
    raise AssertionError("the loader ended")


def test_one_loader_walks_the_epochs_with_workers_that_stay(monkeypatch):
    args = dict(batch_size=3, seed=5, rank=0, world_size=1, prefetch_factor=2,
                pin_memory=False)
    plain = _take(TrainLoader(_Items(10), _collate, epoch=0, start=0, num_workers=0, **args), 10)
    # 3 batches per epoch (10 items, batch 3): the epochs follow one another
    assert [(e, p) for e, p, _ in plain][:7] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),
                                                 (2, 0)]
    for epoch, position, batch in plain:
        expected = train_batches(10, 3, 5, epoch)[position]
        assert batch["key"][:, 0].tolist() == [epoch] * 3  # each item made for its own epoch
        assert batch["key"][:, 1].tolist() == expected
    workers = _take(TrainLoader(_Items(10), _collate, epoch=0, start=0, num_workers=2, **args), 10)
    for (e1, p1, b1), (e2, p2, b2) in zip(plain, workers, strict=True):
        assert (e1, p1) == (e2, p2) and torch.equal(b1["key"], b2["key"])
    pids = {int(p) for _, _, b in workers for p in b["pid"]}
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, the same ones in every epoch
    # a resumed run starts where the checkpoint says, mid-epoch, and continues identically
    resumed = _take(TrainLoader(_Items(10), _collate, epoch=1, start=2, num_workers=1, **args), 5)
    for (e1, p1, b1), (e2, p2, b2) in zip(plain[5:], resumed, strict=True):
        assert (e1, p1) == (e2, p2) and torch.equal(b1["key"], b2["key"])


def test_validation_batches_are_read_once():
    data = _Items(7)
    valid = ValidBatches(data, _collate, batch_size=3, rank=0, world_size=1, max_batches=None,
                         num_workers=0, pin_memory=False)
    first = [(n, b["key"].clone()) for n, b in valid]
    assert [n for n, _ in first] == [3, 3, 1] and data.made == 7
    again = [(n, b["key"]) for n, b in valid]
    assert data.made == 7  # nothing read again
    assert all(torch.equal(a[1], b[1]) for a, b in zip(first, again, strict=True))
    small = ValidBatches(_Items(7), _collate, 3, 0, 1, None, 0, False, max_bytes=10)
    list(small), list(small)
    assert small.dataset.made == 14  # too big to keep: read at every validation


def test_the_validation_subset_is_bounded_and_longest_first():
    rows = [ManifestRow(f"u{i}", f"/x/u{i}.flac", 16000 * (1 + i % 7), "s") for i in range(50)]
    total = sum(r.num_samples for r in rows) / 16000
    assert _valid_subset(rows, None, 16000) == sorted(rows, key=lambda r: (-r.num_samples, r.id))
    picked = _valid_subset(rows, 60, 16000)
    seconds = sum(r.num_samples for r in picked) / 16000
    assert 50 <= seconds <= 60 < total
    assert [r.num_samples for r in picked] == sorted((r.num_samples for r in picked), reverse=True)
    assert picked == _valid_subset(rows, 60, 16000)  # a fixed draw
    assert len({r.num_samples for r in picked}) > 3  # spread, not the first or longest rows


def test_bench_loader_runs(tmp_path):
    """benchmarks/bench_loader.py, whose tables the README cites, with tiny arguments."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    root = tmp_path / "flac"
    rng = np.random.default_rng(0)
    for i in range(5):  # LibriSpeech-like names: <reader>-<chapter>-<utt>.flac
        t = np.arange(int(16000 * (2.0 + i * 0.3))) / 16000
        wav = 0.2 * np.sin(2 * np.pi * (120 + 20 * i) * t) + 0.01 * rng.standard_normal(t.size)
        root.mkdir(exist_ok=True)
        sf.write(root / f"{100 + i}-1-000{i}.flac", wav.astype(np.float32), 16000)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_loader.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--work", str(tmp_path / "w"),
         "--crops", "6", "--train-seconds", "2", "--valid-files", "2", "--batch-size", "2",
         "--gpu-models", "mel"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "| mel | " in out and "| with F0 | " in out and "whole / pieces" in out
    assert "validation: 2 utterances" in out and "with data.crop_speech=0.5: loader" in out
    result = __import__("json").loads((tmp_path / "w" / "bench_loader.json").read_text())
    assert result["plain"]["device"] > 0 and result["gpu"][0]["kernels"] > 100


def test_bench_cost_runs(tmp_path):
    """benchmarks/bench_cost.py, whose estimate table the README cites, with tiny arguments."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import soundfile as sf

    root = tmp_path / "flac"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        t = np.arange(int(16000 * (1.5 + i * 0.5))) / 16000
        wav = 0.2 * np.sin(2 * np.pi * (110 + 30 * i) * t) + 0.01 * rng.standard_normal(t.size)
        sf.write(root / f"{200 + i}-1-000{i}.flac", wav.astype(np.float32), 16000)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cost.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--root", str(root), "--files", "3", "--crops", "4",
         "--models", "mel", "--priors", "default"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "measured on 3 LibriSpeech files" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ESTIMATES" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| -1 download (published archive sizes)",
        "| 0 prepare (scan, stats of 20 utterances per speaker, front-end states; `num_workers` = "
        "the cores)",
        "| 1 train `model=mel` (0.78 M), 100k steps of 64 crops per GPU",
        "| 2 extract every utterance once, `model=mel` (decode + features on the cores, encoder on "
        "the GPU)",
        "| 4 prior `prior=default` (4.1 M), 20k steps of 16384 units per GPU"]
    assert all(r.count(" | ") == 3 and "steps/s" in r for r in rows[2:3] + rows[4:])
