"""The bash recipes: recipes/lib.sh (options, override routing, done-markers) and
egs/librispeech/run.sh stages -1 and 0 end to end against a local HTTP server on 127.0.0.1.

The LibriSpeech tarball and the server come from tests/test_librispeech.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_librispeech import _make_archive, _Server, _write_alignments, _write_checksums

from speechvq.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "recipes" / "lib.sh"
RUN = REPO / "egs" / "librispeech" / "run.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def _bash(script: str, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` (its leading comment lines become the header --help prints) with lib.sh."""
    lines = script.lstrip("\n").splitlines(keepends=True)
    n = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header, body = "".join(lines[:n]), "".join(lines[n:])
    path = cwd / "script.sh"
    path.write_text(f"#!/usr/bin/env bash\n{header}set -euo pipefail\n. {LIB}\n{body}")
    return subprocess.run(
        ["bash", str(path), *args], cwd=cwd, env=_env(**env), capture_output=True, text=True
    )


# --- lib.sh -------------------------------------------------------------------------------------

_OPTIONS = """
# A test script.
#   script.sh [--foo-bar X]
foo_bar=default
n=1
parse_options "$@"
echo "foo_bar=$foo_bar n=$n"
for s in prepare train prior; do
  stage_args $s
  echo "$s:${args[*]}"
done
"""


@pytest.fixture
def conf(tmp_path):
    """Stand-in primary configs, so routing is tested apart from the real conf/."""
    d = tmp_path / "conf"
    d.mkdir()
    (d / "prepare.yaml").write_text(
        "defaults:\n  - data: folder\n  - features: logmel\nout_dir: ???\n"
    )
    (d / "train.yaml").write_text(
        "defaults:\n  - features: logmel\n  - trainer: default\ndevice: auto\n"
    )
    (d / "train_prior.yaml").write_text(
        "defaults:\n  - trainer: default\ndevice: auto\nunits: ???\n"
    )
    return d


def test_parse_options_sets_declared_variables_and_routes_overrides(tmp_path, conf):
    args = ["--foo-bar", "a b", "--n=3", "device=cpu", "train:seed=4", "trainer.max_steps=9",
            "features.n_mels=40", "--", "prior:+extra=1", "~data"]  # fmt: skip
    out = _bash(_OPTIONS, *args, cwd=tmp_path, SPEECHVQ_CONF=str(conf))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "foo_bar=a b n=3",
        "prepare:features.n_mels=40 ~data",  # only keys (or groups) its config has
        "train:device=cpu seed=4 trainer.max_steps=9 features.n_mels=40",
        "prior:device=cpu trainer.max_steps=9 +extra=1",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nope", "1"], "unknown option --nope"),
        (["--foo-bar"], "option --foo-bar needs a value"),
        (["stray"], "unexpected argument 'stray'"),
        (["--PATH", "x"], "unknown option --PATH"),
    ],
)
def test_parse_options_refuses_what_it_does_not_know(tmp_path, args, message):
    out = _bash(_OPTIONS, *args, cwd=tmp_path)
    assert out.returncode == 1 and message in out.stderr
    assert "script.sh:" not in out.stdout


def test_help_prints_the_script_header(tmp_path):
    out = _bash(_OPTIONS, "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith(
        "A test script.\n  script.sh [--foo-bar X]"
    )


def test_check_overrides_catches_typos_and_unknown_stages(tmp_path, conf):
    script = 'parse_options "$@"\ncheck_overrides prepare train prior\necho ok\n'
    ok = _bash(script, "trainer.lr=1", "prior:n=2", cwd=tmp_path, SPEECHVQ_CONF=str(conf))
    assert ok.stdout == "ok\n", ok.stderr
    typo = _bash(script, "trianer.lr=1", cwd=tmp_path, SPEECHVQ_CONF=str(conf))
    assert typo.returncode == 1 and "'trianer.lr=1' reaches none of the stages" in typo.stderr
    stage = _bash(script, "trian:lr=1", cwd=tmp_path, SPEECHVQ_CONF=str(conf))
    assert stage.returncode == 1 and "unknown stage 'trian'" in stage.stderr
    other = _bash(script, "sample:n=2", cwd=tmp_path, SPEECHVQ_CONF=str(conf))
    assert other.returncode == 1 and "is for stage sample, which" in other.stderr


_STEP = """
stage=0 stop_stage=9 tag=a fail=false
parse_options "$@"
want_stage 3 && echo "stage 3 wanted"
run_step out work --after input.txt -- bash -c 'echo "$1" >> runs.txt; [ "$2" = false ]' _ "$tag" "$fail"
"""


def test_run_step_skips_what_is_done_and_reruns_what_changed(tmp_path):
    (tmp_path / "input.txt").write_text("x")
    runs = tmp_path / "runs.txt"

    def step(*args: str) -> subprocess.CompletedProcess:
        return _bash(_STEP, *args, cwd=tmp_path)

    first = step()
    assert first.returncode == 0, first.stderr
    assert "stage 3 wanted" in first.stdout and runs.read_text() == "a\n"
    marker = tmp_path / "out" / ".done.work"
    assert marker.read_text().splitlines()[1].startswith("bash -c")  # the command, for a reader
    assert "done, skipping" in step().stderr and runs.read_text() == "a\n"
    assert "command changed" in step("--tag", "b").stderr and runs.read_text() == "a\nb\n"
    assert "done, skipping" in step("--tag", "b").stderr
    os.utime(tmp_path / "input.txt", (marker.stat().st_mtime + 5,) * 2)  # the input changed
    assert "is newer than" in step("--tag", "b").stderr and runs.read_text() == "a\nb\nb\n"
    assert "stage 3 wanted" not in step("--stop-stage", "2").stdout
    failed = step("--tag", "c", "--fail", "true")
    assert failed.returncode != 0 and not marker.exists()  # a failed step is never marked done
    assert runs.read_text().endswith("c\n")
    assert step("--tag", "c").returncode == 0 and runs.read_text().endswith("c\nc\n")
    _bash(_STEP + 'echo "force=$force"\n', "--tag", "c", cwd=tmp_path, force="true")
    assert runs.read_text().endswith("c\nc\nc\n")


# --- egs/librispeech/run.sh, stages -1 and 0 ----------------------------------------------------


@pytest.fixture
def server(tmp_path):
    srv = _Server(tmp_path / "srv")
    yield srv
    srv.close()


def test_librispeech_recipe_download_and_prepare_stages(tmp_path, server):
    archive, expected = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    work = tmp_path / "work"
    work.mkdir()
    base = ["--stage", "-1", "--stop-stage", "0", "--subsets", "dev-clean", "--data-dir", "data",
            "--base-url", server.url, "--checksums", str(checksums)]  # fmt: skip

    def run(*extra: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            [str(RUN), *base, *extra], cwd=work, env=_env(), capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return out

    run()
    manifests = work / "data" / "manifests"
    rows = read_manifest(manifests / "dev-clean.tsv")
    assert {r.id: (r.speaker, r.num_samples) for r in rows} == expected
    assert all(r.text and r.text.startswith("HELLO") for r in rows)
    assert (manifests / "train.tsv").is_file() and (manifests / "stats.json").is_file()
    assert (work / "data" / "LibriSpeech" / "dev-clean" / ".complete").is_file()
    assert len(server.requests) == 1

    mtime = (manifests / "dev-clean.tsv").stat().st_mtime_ns
    again = run()
    assert again.stderr.count("done, skipping") == 2
    assert len(server.requests) == 1  # the server saw nothing
    assert (manifests / "dev-clean.tsv").stat().st_mtime_ns == mtime

    base[1] = "0"  # --stage 0: the changed option reaches stage 0
    changed = run("prepare:data.stats_utterances_per_speaker=1")
    assert "command changed" in changed.stderr
    assert len(server.requests) == 1  # the corpus is still there: no download
    assert (manifests / "dev-clean.tsv").stat().st_mtime_ns != mtime  # stage 0 ran again


# --- the whole recipe -------------------------------------------------------------------------

_STAGES = ["prepare", "train", "extract", "evaluate", "train-prior", "sample", "resynth"]


@pytest.mark.slow
def test_librispeech_recipe_runs_to_the_listening_pages(tmp_path, server):
    missing = [s for s in _STAGES if not shutil.which(f"speechvq-{s}", path=_env()["PATH"])]
    if missing:
        pytest.skip(f"console scripts missing: {missing}")
    archive, expected = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    alignments = _write_alignments(tmp_path / "mfa", expected)
    tiny = [f"prepare:data.alignments={alignments}", "evaluate:abx.max_per_cell=2","--trainer", "default", "device=cpu", "trainer.max_steps=4", "trainer.batch_size=2",
            "trainer.valid_every=2", "trainer.save_every=2", "trainer.log_every=1",
            "trainer.media_every=null", "train:model.encoder.channels=16",
            "train:model.decoder.channels=16", "train:quantizer.n_codes=16", "prior:prior=tiny",
            "prior:valid_fraction=0.3", "sample:n=2", "sample:seconds=0.5", "resynth:n=2",
            "train:data.crop_seconds=0.32"]  # fmt: skip
    out = subprocess.run(
        [str(RUN), "--subsets", "dev-clean", "--base-url", server.url, "--checksums",
         str(checksums), "--exp-dir", "exp", *tiny],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-5000:]
    assert (tmp_path / "exp" / "checkpoints" / "best.pt").is_file()
    assert (tmp_path / "exp" / "units" / "dev-clean.txt").is_file()
    metrics = json.loads((tmp_path / "exp" / "eval" / "valid.json").read_text())
    assert metrics  # stage 3 ran: the alignments were imported by stage 0
    assert (tmp_path / "exp" / "samples" / "index.html").is_file()
    assert (tmp_path / "exp" / "resynth" / "index.html").is_file()
    assert "listening pages:" in out.stderr


@pytest.mark.slow
def test_mini_recipe_runs_to_the_listening_pages(tmp_path):
    missing = [s for s in _STAGES if not shutil.which(f"speechvq-{s}", path=_env()["PATH"])]
    if missing:
        pytest.skip(f"console scripts missing: {missing}")
    tiny = ["device=cpu", "trainer.max_steps=4", "trainer.batch_size=4", "trainer.valid_every=2",
            "trainer.save_every=2", "trainer.media_every=null", "trainer.valid_batches=1",
            "train:model.encoder.channels=16", "train:model.decoder.channels=16",
            "train:quantizer.n_codes=16", "evaluate:abx.max_per_cell=2", "sample:n=2",
            "sample:seconds=0.5", "resynth:n=1"]  # fmt: skip
    out = subprocess.run(
        [str(REPO / "egs" / "mini" / "run.sh"), "--exp-dir", "exp", *tiny],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-5000:]
    for split in ("train", "valid", "test"):
        assert (tmp_path / "exp" / "units" / f"{split}.txt").is_file()
    assert json.loads((tmp_path / "exp" / "eval" / "test.json").read_text())
    assert (tmp_path / "exp" / "samples" / "index.html").is_file()
    assert (tmp_path / "exp" / "resynth" / "index.html").is_file()
    assert "listening pages: exp/samples/index.html and exp/resynth/index.html" in out.stderr


# --- egs/librispeech/run.sh with logging stand-ins for the speechvq-* commands -----------------


def _manifests(work: Path, **splits: list[str]) -> None:
    from speechvq.data.manifest import ManifestRow, write_manifest

    for name, ids in splits.items():
        write_manifest(work / "data" / "manifests" / f"{name}.tsv",
                       [ManifestRow(i, f"/audio/{i}.flac", 16000, i.split("-")[0]) for i in ids])


def test_librispeech_stage2_encodes_each_subset_once_and_merges_splits(tmp_path, command_stubs):
    """Subsets a and b, train = a + b, valid = b: a and b are extracted once each, train is
    merged from their unit files (not extracted again), valid is b's file itself."""
    work = tmp_path / "work"
    a, b = ["1-1-0", "1-1-1"], ["2-1-0", "3-1-0"]
    _manifests(work, a=a, b=b, train=a + b, valid=b)
    env, log = command_stubs(tmp_path / "bin", "speechvq-extract", env=_env())
    cmd = [str(RUN), "--stage", "2", "--stop-stage", "2", "--subsets", "a b", "--exp-dir", "exp"]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    calls = log.read_text().splitlines()
    encoded = [c for c in calls if "from_units=" not in c]
    merged = [c for c in calls if "from_units=" in c]
    assert [c.split("data.manifest=")[1].split()[0] for c in encoded] == [
        "data/manifests/a.tsv", "data/manifests/b.tsv"]  # each subset once
    assert all("checkpoint=exp/checkpoints/best.pt" in c for c in calls)
    assert len(merged) == 1 and "data.manifest=data/manifests/train.tsv out=exp/units/train.txt" in \
        merged[0] and "from_units=['exp/units/a.txt','exp/units/b.txt']" in merged[0]
    assert not any("valid" in c for c in calls)  # valid is subset b: its units are b's file
    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and again.stderr.count("done, skipping") == 3
    assert log.read_text().splitlines() == calls  # nothing ran again


def test_librispeech_stage4_gets_the_trainer_and_the_launch(tmp_path, command_stubs):
    """--trainer gpu, --nproc and --nnodes reach the prior's training as they reach the VQ-VAE's."""
    work = tmp_path / "work"
    a = ["1-1-0", "1-1-1"]
    _manifests(work, a=a, train=a, manifest=a)
    env, log = command_stubs(tmp_path / "bin", "speechvq-train-prior", "torchrun",
                             env=_env())
    prior = tmp_path / "bin" / "speechvq-train-prior"
    base = [str(RUN), "--stage", "4", "--stop-stage", "4", "--subsets", "a", "--exp-dir", "exp"]

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *extra], cwd=work, env=env, capture_output=True, text=True)

    out = run("--nproc", "2", "prior:trainer.max_steps=9")
    assert out.returncode == 0, out.stderr[-3000:]
    (call,) = log.read_text().splitlines()
    assert call.startswith(f"torchrun --standalone --nproc_per_node=2 {prior} units=exp/units/a.txt")
    assert call.endswith("resume=auto trainer=gpu trainer.max_steps=9")  # the default --trainer
    (work / "exp" / "prior" / ".done.prior").unlink()
    log.unlink()
    out = run("--nproc", "8", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "n1:29500",
              "--rdzv-id", "job7", "--trainer", "default")
    assert out.returncode == 0, out.stderr[-3000:]
    (call,) = log.read_text().splitlines()
    assert call.startswith("torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d "
                           f"--rdzv-endpoint=n1:29500 --rdzv-id=job7 --node-rank=1 {prior} ")
    assert call.endswith("trainer=default")
    refused = run("--nnodes", "2", "--rdzv-endpoint", "n1:29500", "--stage", "1")
    assert refused.returncode == 1 and "run stage 2 on one node" in refused.stderr


def test_prior_trainer_groups_follow_the_trainer(compose_cfg):
    """trainer=gpu gives the prior GPU-sized batches; the default keeps the prior's recipe."""
    default = compose_cfg("train_prior", ["units=u", "out_dir=o"]).trainer
    gpu = compose_cfg("train_prior", ["units=u", "out_dir=o", "trainer=gpu"]).trainer
    mine = compose_cfg("train_prior", ["units=u", "out_dir=o", "trainer=gpu",
                                       "trainer.batch_size=8"]).trainer
    assert (default.batch_size, default.lr, default.betas) == (16, 3e-4, [0.9, 0.95])
    assert (gpu.batch_size, gpu.lr, gpu.betas, gpu.max_steps) == (64, 6e-4, [0.9, 0.95], 20000)
    assert gpu.num_workers == 0 and mine.batch_size == 8
