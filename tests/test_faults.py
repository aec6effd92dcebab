"""Hostile conditions across stages: two runs into one output, refused runs that must leave the
output untouched, unwritable output folders, ids unit files cannot hold, units out of range."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speechvq.checkpoint import OutputInUseError, OutputLock
from speechvq.cli import evaluate, extract
from speechvq.cli import train as train_cli
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.manifest import read_manifest
from speechvq.training import LOCK_FILE, fit
from speechvq.units import write_sidecar, write_units

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def _held_elsewhere(lock_file: Path, program: str) -> Iterator[int]:
    """``lock_file`` locked by another live process (as ``program``); yields its pid."""
    code = ("import sys, time\nfrom speechvq.checkpoint import OutputLock\n"
            "OutputLock(sys.argv[1], program=sys.argv[2]).__enter__()\n"
            "print('locked', flush=True)\ntime.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file), program],
                            stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _cli(args: list[str], cwd: Path) -> tuple[int, list[str]]:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, env=ENV, timeout=300)
    return proc.returncode, [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]


def _trainer() -> dict:
    return OmegaConf.to_container(OmegaConf.load(conf_dir() / "trainer" / "default.yaml"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- the lock itself


def test_output_lock_is_exclusive_across_processes_and_nests_within_one(tmp_path: Path) -> None:
    lock_file = tmp_path / "exp" / ".lock"
    with _held_elsewhere(lock_file, "speechvq-train") as pid:
        with pytest.raises(OutputInUseError) as err:
            OutputLock(lock_file, tmp_path / "exp").__enter__()
        assert str(err.value) == f"{tmp_path / 'exp'} is in use by another speechvq-train (pid {pid})"
    with OutputLock(lock_file), OutputLock(lock_file):  # the holder is gone: free; and re-entrant
        pass
    with OutputLock(lock_file):
        pass


# ---------------------------------------------------------------- two trainings, one out_dir


def test_fit_into_an_out_dir_in_use_is_refused(tmp_path: Path) -> None:
    with _held_elsewhere(tmp_path / LOCK_FILE, "speechvq-train") as pid:
        with pytest.raises(OutputInUseError, match=rf"in use by another speechvq-train \(pid {pid}\)"):
            fit(None, _trainer(), tmp_path)  # type: ignore[arg-type]  refused before the task is used


def test_cli_train_into_an_out_dir_in_use_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    with _held_elsewhere(exp / LOCK_FILE, "speechvq-train") as pid:
        code, lines = _cli(["speechvq-train", f"data.manifest={tmp_path / 'm.tsv'}",
                            f"out_dir={exp}"], tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0] == f"speechvq-train: {exp} is in use by another speechvq-train (pid {pid})"
    assert sorted(p.name for p in exp.iterdir()) == [LOCK_FILE]  # no .hydra/, no train.log


def test_refused_training_leaves_the_run_untouched(tmp_path: Path) -> None:
    """An existing run and no resume=true: refused before hydra rewrites .hydra/config.yaml."""
    exp = tmp_path / "exp"
    (exp / "checkpoints").mkdir(parents=True)
    (exp / "checkpoints" / "last.pt").write_bytes(b"the run's checkpoint")
    (exp / ".hydra").mkdir()
    (exp / ".hydra" / "config.yaml").write_text("the run's config\n")
    (exp / "train.log").write_text("the run's log\n")
    before = _snapshot(exp)
    code, lines = _cli(["speechvq-train", f"data.manifest={tmp_path / 'other.tsv'}",
                        f"out_dir={exp}"], tmp_path)
    assert code == 2 and len(lines) == 1, lines
    assert "last.pt already exists: pass resume=true" in lines[0]
    assert _snapshot(exp) == before


def test_unwritable_out_dir_is_one_line_before_hydra(tmp_path: Path, monkeypatch, capsys) -> None:
    """Permissions cannot be taken from root: the write that fails is simulated."""
    import speechvq.files

    exp = tmp_path / "exp"

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(exp))

    monkeypatch.setattr(speechvq.files.tempfile, "mkstemp", denied)
    monkeypatch.setattr(sys, "argv", ["speechvq-train", f"data.manifest={tmp_path / 'm.tsv'}",
                                      f"out_dir={exp}"])
    with pytest.raises(SystemExit) as err:
        train_cli.main()
    assert err.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"speechvq-train: cannot write {exp}: Permission denied"]
    assert not (exp / ".hydra").exists() and not (exp / "train.log").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_out_dir_is_one_line(tmp_path: Path) -> None:
    exp = tmp_path / "exp"
    exp.mkdir()
    exp.chmod(0o500)
    try:
        code, lines = _cli(["speechvq-train", f"data.manifest={tmp_path / 'm.tsv'}",
                            f"out_dir={exp}"], tmp_path)
    finally:
        exp.chmod(0o700)
    assert code == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    assert f"cannot write {exp}" in lines[0] and "Permission denied" in lines[0]


# ---------------------------------------------------------------- two extractions, one OUT


def _extract_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("extract", overrides=["progress=false", "num_workers=0", *overrides])


def test_a_second_extract_into_one_out_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "units.txt"
    args = [f"out={out}", f"checkpoint={tmp_path / 'a.pt'}", f"data.manifest={tmp_path / 'm.tsv'}"]
    with _held_elsewhere(tmp_path / ".units.txt.lock", "speechvq-extract") as pid:
        with pytest.raises(OutputInUseError,
                           match=rf"units\.txt is in use by another speechvq-extract \(pid {pid}\)"):
            extract.run(_extract_cfg(*args))
        # a merge into OUT is refused too, and so is one while a shard is being extracted
        with pytest.raises(OutputInUseError):
            extract.run(_extract_cfg(f"out={out}", "nshards=2", "merge=true"))
    with _held_elsewhere(tmp_path / ".units.txt.shard-1-of-2.lock", "speechvq-extract"):
        with pytest.raises(OutputInUseError, match=r"shard-1-of-2 is in use"):
            extract.run(_extract_cfg(f"out={out}", "nshards=2", "merge=true"))
    assert not out.exists()


# ---------------------------------------------------------------- ids and unit ranges


@pytest.mark.parametrize("bad_id", ["spk one", "spk|one", "spk\u00a0one"])
def test_manifest_ids_unit_files_cannot_hold_are_refused_when_read(tmp_path: Path,
                                                                   bad_id: str) -> None:
    manifest = tmp_path / "m.tsv"
    manifest.write_text("id\tpath\tnum_samples\tspeaker\n"
                        f"ok\t/a.wav\t16000\tspk\n{bad_id}\t/b.wav\t16000\tspk\n")
    with pytest.raises(ValueError) as err:
        read_manifest(manifest)
    message = str(err.value)
    assert message.startswith(f"{manifest}:3: id {bad_id!r} contains") and "\n" not in message


def _evaluate_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("evaluate", overrides=["progress=false", "baseline.enabled=false",
                                              "abx.enabled=false", *overrides])


def test_evaluate_refuses_units_beyond_the_codebook(tmp_path: Path) -> None:
    units = tmp_path / "units.txt"
    write_units(units, {"u1": np.array([1, 600, 2]), "u2": np.array([3, 4])}, "gslm")
    write_sidecar(units, {"format": "gslm", "dedup": False, "n_codes": 512, "unit_rate": 50.0})
    (tmp_path / "ali").mkdir()
    for utt in ("u1", "u2"):
        (tmp_path / "ali" / f"{utt}.phn").write_text("0 960 a\n")
    cfg = _evaluate_cfg(f"units={units}", f"alignments={tmp_path / 'ali'}")
    with pytest.raises(StageError, match=r"units\.txt: utterance 'u1' holds unit 600, outside the "
                                         r"codes 0\.\.511"):
        evaluate.run(cfg)
    with pytest.raises(StageError, match="holds unit 600"):
        evaluate.run(_evaluate_cfg(f"units={units}", f"alignments={tmp_path / 'ali'}",
                                   "n_codes=100"))
