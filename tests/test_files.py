"""One writer for every file: atomic, readable by group and others (umask permitting), no temp
file left by a failed write."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from speechvq import files
from speechvq.audio import save_audio
from speechvq.checkpoint import save_checkpoint
from speechvq.data.alignments import Interval, write_frame_tsv, write_phn
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.data.prepare import write_rejected
from speechvq.features import FeatureStats, Moments
from speechvq.report import Clip, Row, write_report
from speechvq.units import write_sidecar, write_units

FEATURES = {"sample_rate": 16000, "n_fft": 400, "win_length": 400, "hop_length": 160,
            "n_mels": 8, "f_min": 50.0, "f_max": 8000.0, "preemphasis": 0.97, "power": 2.0,
            "log_floor": 1e-5, "level": "utterance", "dynamic_range_db": 70.0,
            "normalize": "speaker"}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _every_writer(tmp: Path) -> list[tuple[str, Callable[[], object]]]:
    """(name, call) for every function of speechvq that writes a file, each into ``tmp``."""
    wav = tmp / "page" / "a.wav"
    stats = FeatureStats(FEATURES, Moments(torch.zeros(8), torch.ones(8), 1), {})
    return [
        ("files.write_json", lambda: files.write_json(tmp / "x.json", {"a": 1})),
        ("units.write_units", lambda: write_units(tmp / "u.txt", {"a": np.array([1, 1, 2])},
                                                  "gslm", dedup=True)),
        ("units.write_units npy", lambda: write_units(tmp / "u.npz", {"a": np.array([1])}, "npy")),
        ("units.write_units km", lambda: write_units(tmp / "km" / "u.km", {"a": np.array([1])},
                                                     "km", n_codes=4)),
        ("units.write_sidecar", lambda: write_sidecar(tmp / "u.txt", {"format": "gslm"})),
        ("checkpoint.save_checkpoint", lambda: save_checkpoint(
            tmp / "c.pt", {"kind": "vqvae", "model_config": {}, "meta": {}, "model": {},
                           "step": 0})),
        ("audio.save_audio", lambda: save_audio(wav, np.zeros(1600, np.float32), 16000)),
        ("report.write_report", lambda: write_report(
            tmp / "page", [Row("r", [Clip(wav, "a", [1, 2])])], "t", FEATURES)),
        ("alignments.write_phn", lambda: write_phn(tmp / "a.phn", [Interval(0.0, 0.1, "a")])),
        ("alignments.write_frame_tsv", lambda: write_frame_tsv(tmp / "f.tsv", {"a": ["x"]}, 50)),
        ("manifest.write_manifest", lambda: write_manifest(
            tmp / "m.tsv", [ManifestRow("a", str(wav), 1600, "s")])),
        ("prepare.write_rejected", lambda: write_rejected(tmp / "rejected.tsv", [("p", "bad")])),
        ("features.FeatureStats.save", lambda: stats.save(tmp / "stats.json")),
    ]


def test_every_file_is_readable_by_group_and_others(tmp_path: Path, umask_022) -> None:
    for _, write in _every_writer(tmp_path):
        write()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 15
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: "0o644" for p in written}


def test_the_umask_is_honoured(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        save_checkpoint(tmp_path / "c.pt", {"kind": "prior", "model_config": {}, "meta": {},
                                            "model": {}, "step": 0})
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640 and _mode(tmp_path / "c.pt") == 0o640
    assert files.umask() == old


def test_a_failed_write_leaves_no_temp_file_and_names_the_file(tmp_path: Path, monkeypatch,
                                                              umask_022) -> None:
    writers = _every_writer(tmp_path)
    save_audio(tmp_path / "page" / "a.wav", np.zeros(1600, np.float32), 16000)  # the page's clip
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full)
    for name, write in writers:
        with pytest.raises(files.WriteError, match="No space left on device") as err:
            write()
        assert str(err.value).startswith(f"cannot write {tmp_path}"), name
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # no temp file, nothing half written, the old files kept


def test_an_error_inside_the_writer_removes_the_temp_file(tmp_path: Path) -> None:
    files.write_text(tmp_path / "a.txt", "old")

    def broken(f) -> None:
        f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "a.txt", broken)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
    assert (tmp_path / "a.txt").read_text() == "old"


def test_clean_temps_and_safe_names(tmp_path: Path) -> None:
    stale = [tmp_path / ".u.txt.abcd1234.tmp", tmp_path / ".last.pt.x_y_z_00.tmp"]
    kept = [tmp_path / "u.txt", tmp_path / ".u.txt.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert files.clean_temps(tmp_path, ".pt") == [stale[1]]
    assert files.clean_temps(tmp_path) == [stale[0]]
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert files.safe_name("a/b c..") == "a_b_c" and files.safe_name("..") == "_"
    assert files.read_json(files.write_json(tmp_path / "x.json", {"k": [1]})) == {"k": [1]}
