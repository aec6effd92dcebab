"""The console scripts' answer to a config mistake: one line naming the key, exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _fail(args: list[str], cwd: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # out_dir is what hydra's run dir is made of: hydra itself would print a traceback
        (["speechvq-train", "data.manifest=m.tsv"], "missing required value: out_dir="),
        (["speechvq-sample", "vqvae=v.pt", "out_dir=o"], "missing required value: prior_checkpoint="),
        (["speechvq-train", "data.manifest=m.tsv", "model=nope", "out_dir=o"],
         "Could not find 'model/nope'; choose from mel, mel_large, wave"),
        (["speechvq-train", "data.manifest=m.tsv", "trainer.max_stepz=3", "out_dir=o"],
         "trainer.max_stepz"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    assert expected in _fail(args, tmp_path)
    assert not (tmp_path / "o").exists()  # nothing written before the config is known good
