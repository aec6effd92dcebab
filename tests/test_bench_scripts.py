"""Every benchmark script in ``benchmarks/`` runs end to end with tiny arguments and prints its
figures (the README cites them, so a script that no longer runs is a broken result).

Each test runs the script's real ``main`` path, in this process (``main(argv)``; the stages of
``bench_units.py`` are the speechvq-* programs it starts) except ``bench_extract.py``, run as a
program since every phase of it is a spawned process.
Models are tiny or untrained, corpora a few clips of the shipped mini corpus or generated tones:
the figures are meaningless, only their presence and form are checked. ``bench_resynth.py`` is
run as on a bare CI machine (no Codec2, pocketsphinx or pesq), and with those tools where they are
installed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.data.manifest import ManifestRow, read_manifest, write_manifest
from speechvq.stats import StateStore

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
MINI = ROOT / "egs" / "mini" / "corpus" / "train"
MINI_SPEAKERS = ("1001", "1002", "1003", "1004")
NUM = r"(-?\d+(?:\.\d+)?)"


def _script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (imported here, so an import error fails one test)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _run_main(capsys, name: str, *args: object) -> str:
    """``main(args)`` of ``benchmarks/<name>.py``; returns what it printed."""
    _script(name).main([str(a) for a in args])
    return capsys.readouterr().out


def _grab(out: str, pattern: str) -> list[float]:
    """The numbers captured by ``pattern`` on a line of ``out`` (the test fails naming it)."""
    match = re.search(pattern, out, re.M)
    assert match, f"no line matches {pattern!r} in:\n{out}"
    values = [float(g) for g in match.groups()]
    assert all(math.isfinite(v) for v in values), (pattern, values)
    return values


# ------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def mini_work(tmp_path_factory, tiny_vqvae) -> Path:
    """A ``bench_units.py``-style work folder from 3 clips of each mini speaker, made in-process:
    ``wav/<speaker>/`` (FLAC + ``.phn`` beside it, for ``--root``), ``data/`` (manifest, train
    (clips 0 and 2), valid = test (clip 1), alignments), ``tiny.pt``, an untrained tiny mel
    VQ-VAE (32 codes) of the four speakers, and ``tiny_pitch.pt``, the same with the F0
    condition."""
    work = tmp_path_factory.mktemp("mini_work")
    rows: dict[str, list[ManifestRow]] = {"train": [], "test": []}
    (work / "data" / "alignments").mkdir(parents=True)
    for speaker in MINI_SPEAKERS:
        clips = sorted((MINI / speaker).rglob("*.flac"))[:3]
        assert len(clips) == 3, f"the mini corpus lacks clips of {speaker} under {MINI}"
        for i, clip in enumerate(clips):
            folder = work / "wav" / speaker
            folder.mkdir(parents=True, exist_ok=True)
            audio, phn = folder / clip.name, folder / f"{clip.stem}.phn"
            shutil.copy(clip, audio)
            shutil.copy(clip.with_suffix(".phn"), phn)
            shutil.copy(phn, work / "data" / "alignments" / phn.name)
            row = ManifestRow(clip.stem, str(audio), sf.info(audio).frames, speaker)
            rows["test" if i == 1 else "train"].append(row)
    write_manifest(work / "data" / "manifest.tsv", rows["train"] + rows["test"])
    for split in ("train", "test"):
        write_manifest(work / "data" / f"{split}.tsv", rows[split])
    write_manifest(work / "data" / "valid.tsv", rows["test"])
    tiny_vqvae(work / "tiny.pt", speakers=MINI_SPEAKERS)
    tiny_vqvae(work / "tiny_pitch.pt", speakers=MINI_SPEAKERS, pitch=True)
    return work


@pytest.fixture
def bare_ci(monkeypatch):
    """As on a machine without the optional tools: no Codec2 on PATH (only the venv's scripts),
    ``pocketsphinx`` and ``pesq`` not importable."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    monkeypatch.setitem(sys.modules, "pocketsphinx", None)
    monkeypatch.setitem(sys.modules, "pesq", None)


@pytest.fixture
def passive_omp(monkeypatch):
    """bench_units / bench_resynth ``setdefault`` OMP_WAIT_POLICY: keep it out of later tests."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


# ---------------------------------------------------------------------------------------- tests

def test_bench_prior(capsys):
    out = _run_main(capsys, "bench_prior", "--tokens", 16, "--seconds", 0.5, "--threads", 1)
    params, = _grab(out, rf"^prior: {NUM} M parameters")
    assert params > 0
    cached, = _grab(out, rf"^generation, 16 tokens, KV cache:\s+{NUM} tokens/s$")
    uncached, = _grab(out, rf"^generation, 16 tokens, no cache:\s+{NUM} tokens/s$")
    speedup, = _grab(out, rf"^KV-cache speed-up: {NUM}x")
    assert cached > 0 and uncached > 0
    assert speedup == pytest.approx(cached / uncached, abs=0.06)
    seconds, total, rtf = _grab(out, rf"^{NUM} s of audio end to end: {NUM} s .*"
                                     rf"real-time factor {NUM} ")
    assert seconds == 0.5 and total > 0
    assert rtf == pytest.approx(total / seconds, abs=0.02)


def test_bench_codes(capsys):
    bench_codes = _script("bench_codes")
    out = _run_main(capsys, "bench_codes", "--threads", 1, "--frames", 2000, "--dim", 8,
                    "--codes", 16, 64, "--repeats", 2)
    assert out.startswith("N=2000 D=8 threads=1 ")
    for k in (16, 64):
        match = re.search(rf"^\s*{k} +{NUM} +{NUM} +{NUM} +(\S+) +(\S+) +(\S+) +{NUM}"
                          r"  (\d+) \((\d+)\), (.+)$", out, re.M)
        assert match, f"no row for K={k} in:\n{out}"
        old, gemm, new, faiss_ms, new_faiss, old_faiss, new_old, differ, ties, vs_faiss = \
            match.groups()
        assert float(old) > 0 and float(gemm) >= 0 and float(new) > 0 and float(new_old) > 0
        assert int(differ) == int(ties)  # nearest_codes only departs from the old path at ties
        if bench_codes.faiss is None:  # the optional extra is absent: its columns say so
            assert (faiss_ms, new_faiss, old_faiss, vs_faiss) == ("-", "-", "-", "-")
        else:
            assert float(faiss_ms) > 0 and float(new_faiss) > 0 and float(old_faiss) > 0
            differ, ties = map(int, re.fullmatch(r"(\d+) \((\d+)\)", vs_faiss).groups())
            assert differ == ties
    if bench_codes.faiss is None:
        assert "faiss not installed" in out
    assert out.rstrip().endswith("times in ms")


def test_bench_f0(capsys, tmp_path):
    t = np.arange(8000) / 16000  # 0.5 s of a 150 Hz harmonic tone: voiced throughout
    tone = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 6)) * 0.2
    sf.write(tmp_path / "tone.wav", tone.astype(np.float32), 16000)
    out = _run_main(capsys, "bench_f0", "--root", tmp_path, "--files", 1)
    assert _grab(out, rf"^1 files, {NUM} s of audio at 16000 Hz$") == [0.5]
    for name in ("DIO + StoneMask (pyworld)", "Harvest (pyworld)", "librosa.pyin"):
        speed, voiced = _grab(out, rf"^{re.escape(name)} +{NUM}x real time +voiced share {NUM}$")
        assert speed > 0 and 0 <= voiced <= 1
    speed, = _grab(out, rf"^torchaudio detect_pitch_frequency +{NUM}x real time +voiced share -$")
    assert speed > 0
    dio_voiced = _grab(out, rf"^DIO \+ StoneMask \(pyworld\) .* voiced share {NUM}$")[0]
    assert dio_voiced > 0.5  # speechvq's extractor finds the tone's pitch


@pytest.mark.slow
def test_bench_extract():
    """Each phase runs in a spawned process (a fresh torch import each), as the script always
    does: run it as a program, with the mel model (the wave model: the next test)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_extract.py"), "--threads", "1", "--workers", "0",
         "--minutes", "0.1", "--corpus-minutes", "0.34", "--models", "mel"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert out.startswith("speechvq extraction benchmark: 1 threads, ")
    rss, = _grab(out, rf"^\[mel\] peak RSS of a process that only loads the model: {NUM} MB$")
    assert rss > 0
    seconds, wall, rtf, context, rss = _grab(
        out, rf"^\[mel\] {NUM} s of 10-s utterances in {NUM} s: {NUM}x real time "
             rf"\(0 loader worker\(s\)\); context {NUM} units; peak RSS {NUM} MB$")
    assert seconds == 20 and rtf > 0 and context > 0
    wall, rtf, rss = _grab(out, rf"^\[mel\] 0.1-min file in 30 s windows: {NUM} s "
                                rf"\({NUM}x real time\), peak RSS {NUM} MB$")
    assert rtf > 0
    wall, rss, differ, frames = _grab(
        out, rf"^\[mel\] first 0.1 min in one pass: {NUM} s, peak RSS {NUM} MB; frames "
             rf"differing from the chunked units: {NUM}% of {NUM}$")
    assert 0 <= differ <= 100 and frames == 300  # 6 s at 50 Hz
    assert "[wave]" not in out


@pytest.fixture
def keep_start_method():
    """bench_extract's phases force the "fork" start method (meant for their own process)."""
    import multiprocessing as mp

    method = mp.get_start_method(allow_none=True)
    yield
    mp.set_start_method(method, force=True)


def test_bench_extract_wave_phases(tmp_path, keep_start_method):
    """The wave model's checkpoint and the phases main runs for it, here in this process."""
    bench_extract = _script("bench_extract")
    stats, calib, rows, long_path = bench_extract.make_corpus(tmp_path, 0.1, 0.2)
    assert len(rows) == 1 and calib.numel() == 12 * 16000  # the first minute of 12 s
    ckpt = str(tmp_path / "wave.pt")
    bench_extract.build_checkpoint("wave", Path(ckpt), stats, calib)
    r = bench_extract.phase_rtf(ckpt, rows, 1, 0)
    assert r["seconds"] == 10 and r["rtf"] > 0 and r["context"] > 0 and r["rss_mb"] > 0
    chunked = str(tmp_path / "chunked.npy")
    c = bench_extract.phase_long_chunked(ckpt, str(long_path), 1, chunked)
    assert c["seconds"] == pytest.approx(6.0, abs=0.1) and c["rtf"] > 0
    w = bench_extract.phase_long_whole(ckpt, str(long_path), 1, chunked, 3.0)
    assert 0 < w["frames"] <= 3.0 * 50 and 0 <= w["differ_percent"] <= 100


def test_bench_extract_reports_a_failed_phase(tmp_path):
    """A phase that raises in its process is an error naming it, not a wait for ever."""
    import threading

    bench_extract = _script("bench_extract")
    errors: list[str] = []

    def run() -> None:
        try:
            bench_extract.run_phase(bench_extract.phase_idle, str(tmp_path / "missing.pt"), 1)
        except RuntimeError as err:
            errors.append(str(err))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "run_phase still waits for a phase that failed"
    assert len(errors) == 1 and "phase_idle failed in its process" in errors[0]
    assert "missing.pt" in errors[0]


def test_bench_robustness(capsys, mini_work):
    bench_robustness = _script("bench_robustness")
    out = _run_main(capsys, "bench_robustness", "--checkpoint", mini_work / "tiny.pt",
                    "--manifest", mini_work / "data" / "test.tsv", "--threads", 1)
    utterances, frames, _ = _grab(out, rf"^{NUM} utterances, {NUM} frames \({NUM} min\)$")
    assert utterances == 4 and frames > 0
    for name in bench_robustness.ALTERATIONS:
        known, new = _grab(out, rf"^{re.escape(name)} +{NUM}% +{NUM}%$")
        assert 0 <= known <= 100 and 0 <= new <= 100
        if name.startswith("gain"):  # the same frames compared: a gain keeps the units
            assert known > 90, out


def _check_resynth_out(out: str, folder: Path, systems: list[str], model: str = "tiny.pt"
                       ) -> dict:
    """The table printed and written, and the JSON beside it; returns the summary."""
    text = (folder / "bench_resynth.txt").read_text()
    assert text.strip() in out
    summary = json.loads((folder / "bench_resynth.json").read_text())["summary"]
    assert list(summary) == systems
    for name in systems:
        assert re.search(rf"^\| {re.escape(name)} \|", out, re.M), (name, out)
    for name in ("speechvq", "Griffin-Lim of the true mels"):
        fig = summary[name]
        assert 0 <= fig["stoi"] <= 1 and fig["mcd"] > 0 and 0 <= fig["voicing_agreement"] <= 1
    for fig in summary.values():  # present where the voice has recordings to compare with
        assert fig.get("f0_target_z", 0) >= 0
    _grab(out, rf"^1 utterances of .*test\.tsv; model .*{re.escape(model)}; scored in {NUM} s$")
    return summary


REFERENCE_ROWS = ["speechvq", "speechvq, converted", "Griffin-Lim of the true mels",
                  "speechvq, no quantization", "k-means of the true mels (K = 32)"]


@pytest.mark.parametrize("model", ["tiny.pt", "tiny_pitch.pt"])
def test_bench_resynth_without_optional_tools(capsys, tmp_path, mini_work, bare_ci, passive_omp,
                                              model):
    out = _run_main(capsys, "bench_resynth", "--checkpoint", mini_work / model, "--manifest",
                    mini_work / "data" / "test.tsv", "--n", 1, "--out", tmp_path / "out")
    assert "c2enc/c2dec not found: no Codec2 rows" in out
    assert "pocketsphinx is not installed: no word figures" in out
    pitch = ["speechvq, F0 predicted"] if model == "tiny_pitch.pt" else []  # the units' own F0
    summary = _check_resynth_out(out, tmp_path / "out", REFERENCE_ROWS + pitch, model)
    assert not any("pesq_nb" in fig or "words_lost" in fig for fig in summary.values())
    assert "PESQ-NB" not in out and "words lost" not in out


def test_bench_resynth_with_optional_tools(capsys, tmp_path, mini_work, passive_omp):
    """Codec2 rows, PESQ and the recogniser's words, where those tools are installed."""
    missing = [name for name in ("c2enc", "c2dec") if shutil.which(name) is None]
    missing += [name for name in ("pocketsphinx", "pesq") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"optional tools not installed: {', '.join(missing)}")
    # one clip of about 1 s of speech: the recogniser (a fresh decoder per version) is the cost
    row = read_manifest(mini_work / "data" / "test.tsv")[0]
    wav, sr = sf.read(row.path, dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(short, wav[: sr * 6 // 5], sr)
    write_manifest(tmp_path / "test.tsv", [ManifestRow(row.id, str(short), sr * 6 // 5,
                                                       row.speaker)])
    out = _run_main(capsys, "bench_resynth", "--checkpoint", mini_work / "tiny.pt", "--manifest",
                    tmp_path / "test.tsv", "--n", 1, "--out", tmp_path / "out")
    assert "not found" not in out and "not installed" not in out
    summary = _check_resynth_out(out, tmp_path / "out",
                                 REFERENCE_ROWS + ["Codec2 700C", "Codec2 450"])
    for name in ("speechvq", "Griffin-Lim of the true mels", "Codec2 700C"):
        assert 1 <= summary[name]["pesq_nb"] <= 4.7
    for name, fig in summary.items():  # the recogniser heard words in the original clip
        assert fig["words_lost"] >= 0, (name, out)


def test_bench_unit_references(capsys, tmp_path, mini_work):
    out = _run_main(capsys, "bench_unit_references", "--work", mini_work, "--checkpoint",
                    mini_work / "tiny.pt", "--context", 1, "--penalties", 0, 1,
                    "--out", tmp_path / "refs.json")
    rows = json.loads((tmp_path / "refs.json").read_text())["rows"]
    expected = ["speechvq units", "speechvq units, duration-penalised (1 x median distance)",
                "k-means of speechvq's encoder", "MFCC + k-means (the baseline)",
                "MFCC + k-means (the baseline), duration-penalised (1 x median distance)",
                "MFCC, speaker-normalised, + k-means",
                "MFCC, speaker-normalised, +-1 units stacked, + k-means",
                "supervised MLP, its phone decisions as units",
                "supervised MLP, k-means of its posteriors"]
    assert list(rows) == expected
    for name, fig in rows.items():
        assert 0 <= fig["pnmi_test"] <= 1 and 0 <= fig["purity_test"] <= 1, name
        assert 0 < fig["segments_per_frame"] <= 1, name
        if not name.startswith("supervised"):
            assert 0 <= fig["pnmi_all"] <= 1, name
            for key in ("abx_within_codevec", "abx_across_codevec"):  # NaN: no triplet here
                assert math.isnan(fig[key]) or 0 <= fig[key] <= 1, (name, key)
        pnmi_test, = _grab(out, rf"^\| {re.escape(name)} \| {NUM} \|.* \| \S+ \| \S+ \|$")
        assert pnmi_test == pytest.approx(fig["pnmi_test"], abs=5e-4)
    assert 0 <= rows["supervised MLP, its phone decisions as units"]["frame_accuracy"] <= 1
    _grab(out, rf"^12 utterances \(4 test\), K = 32, 50 Hz, k-means fitted on 8 \(.*train\.tsv\); "
               rf"{NUM} s; written ")


UNITS_ARGS = ["--steps", "2", "--valid", "0.25", "--test", "0.25", "trainer.batch_size=4",
              "quantizer.n_codes=16", "model.encoder.channels=16", "model.decoder.channels=16",
              "model.encoder.out_channels=8", "model.decoder.speaker_dim=8"]


@pytest.fixture(scope="module")
def units_run(tmp_path_factory, mini_work) -> tuple[Path, str]:
    """``bench_units.py`` once on the mini clips: the whole protocol (prepare, train 2 steps of a
    tiny model, extract, evaluate; each stage a speechvq-* program the script starts).
    Returns (its --work folder, what it printed)."""
    work = tmp_path_factory.mktemp("units")
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as out:
        mp.setenv("OMP_WAIT_POLICY", "PASSIVE")
        _script("bench_units").main(["--root", str(mini_work / "wav"), "--work", str(work),
                                     *UNITS_ARGS])
    return work, out.getvalue()


@pytest.mark.slow
def test_bench_units(units_run):
    work, out = units_run
    for label in ("PNMI", "phone purity", "units used"):
        ours, base, ratio = _grab(out, rf"^{label} +{NUM} +{NUM} +{NUM}$")
        assert ours > 0 and base > 0
        assert ratio == pytest.approx(ours / base, abs=0.01)
    steps, minutes, rate = _grab(out, rf"^training: {NUM} steps in {NUM} min \({NUM} steps/s")
    assert steps == 2 and rate > 0
    exp = work / "exp"
    assert (exp / "checkpoints" / "best.pt").is_file()
    assert (exp / "bench_units_test.txt").read_text().strip() in out
    report = json.loads((exp / "eval" / "test.json").read_text())
    assert report["metrics"]["used"] <= 16 and report["baseline"]["metrics"]["pnmi"] > 0
    for split in ("train", "valid", "test"):  # every speaker in every split
        speakers = {r.speaker for r in read_manifest(work / "data" / f"{split}.tsv")}
        assert speakers == set(MINI_SPEAKERS), split


@pytest.mark.slow
def test_bench_resynth_trains_as_bench_units(capsys, units_run, mini_work, bare_ci, passive_omp):
    """--root/--work: bench_units' prepared data and trained model are reused, not redone."""
    work, _ = units_run
    out = _run_main(capsys, "bench_resynth", "--root", mini_work / "wav", "--work", work,
                    "--n", 1, *UNITS_ARGS)
    assert f"prepare: {work / 'data'} exists, reused" in out
    assert f"train: {work / 'exp' / 'checkpoints' / 'best.pt'} exists, reused" in out
    folder = work / "exp" / "bench_resynth"
    assert (folder / "bench_resynth.txt").read_text().strip() in out
    summary = json.loads((folder / "bench_resynth.json").read_text())["summary"]
    assert "k-means of the true mels (K = 16)" in summary
    assert 0 <= summary["speechvq"]["stoi"] <= 1
    _grab(out, rf"^1 utterances of .*test\.tsv; model .*best\.pt \(2 steps, {NUM} steps/s\); ")


def test_bench_vocoder(capsys, mini_work):
    out = _run_main(capsys, "bench_vocoder", "--data", mini_work / "data", "--minutes", 0.005,
                    "--channels", 16, "--batch", 2, "--n-test", 1)
    steps, minutes, rate, params = _grab(
        out, rf"^trained {NUM} steps in {NUM} min \({NUM} steps/s, {NUM} M parameters\)$")
    assert steps >= 1 and rate > 0 and params > 0
    for name in ("ISTFT vocoder", "Griffin-Lim"):
        stoi, mcd = _grab(out, rf"^{re.escape(name)} +STOI {NUM}, MCD {NUM} dB")
        assert 0 <= stoi <= 1 and mcd > 0


@pytest.mark.slow
def test_extra_training_audio_reaches_the_model_the_baseline_and_the_references(
        capsys, tmp_path, mini_work, passive_omp):
    """--extra-train DIR: the model and MFCC + k-means train on the train split plus DIR, the
    labelled corpus keeps its split; bench_unit_references fits its k-means on the same audio."""
    extra = tmp_path / "more"
    clips = sorted((mini_work / "wav").rglob("*.flac"))[:2]
    for i, clip in enumerate(clips):  # the same voices under other names: a new "speaker"
        (extra / "newcomer").mkdir(parents=True, exist_ok=True)
        shutil.copy(clip, extra / "newcomer" / f"more{i}.flac")
    work = tmp_path / "work"
    out = _run_main(capsys, "bench_units", "--root", mini_work / "wav", "--work", work,
                    "--extra-train", extra, *UNITS_ARGS)
    train = read_manifest(work / "data" / "train.tsv")
    merged = work / "train_more" / "train.tsv"
    ids = [r.id for r in read_manifest(merged)]
    assert ids == [r.id for r in train] + ["newcomer_more0", "newcomer_more1"]
    assert (work / "train_more" / "frontend_state.npz").is_file()  # both corpora's states
    n, minutes = _grab(out, rf"^training audio \(the model's and the baseline's\): {NUM} "
                            rf"utterances, {NUM} min \(train_more/train\.tsv\)$")
    assert n == len(train) + 2 and minutes > 0
    report = json.loads((work / "exp" / "eval" / "test.json").read_text())
    assert report["baseline"]["train_manifest"] == str(merged.resolve())
    assert {r.id for r in read_manifest(work / "data" / "test.tsv")}.isdisjoint(ids)
    out = _run_main(capsys, "bench_unit_references", "--work", work, "--extra-train", extra,
                    "--checkpoint", work / "exp" / "checkpoints" / "best.pt", "--context", 1,
                    "--penalties", 0, "--no-supervised", "--out", tmp_path / "refs.json")
    _grab(out, rf"^12 utterances \({NUM} test\), K = 16, 50 Hz, k-means fitted on "
               rf"{len(train) + 2} \(.*train_more/train\.tsv\); {NUM} s; written ")

    # a work folder prepared by an older speechvq (state format 1) is prepared again, not reused
    # (reused, every run would measure its states again, and merging them would fail)
    for folder in ("data", "extra_more", "train_more"):
        _age_state_store(work / folder / "frontend_state.npz")
    bench_units = _script("bench_units")
    parser = argparse.ArgumentParser()
    bench_units.add_protocol_arguments(parser, parser.add_mutually_exclusive_group(required=True))
    args = parser.parse_args(["--root", str(mini_work / "wav"), "--work", str(work),
                              "--extra-train", str(extra), "--valid", "0.25", "--test", "0.25"])
    bench_units.prepare(args, work / "data")
    assert bench_units.prepare_extra(args, work / "data", work) == merged
    out = capsys.readouterr().out
    for folder in ("data", "extra_more"):
        assert (f"prepare: {work / folder} exists, prepared again: "
                f"{work / folder / 'frontend_state.npz'}: state format 1 ") in out
    for folder in ("data", "extra_more", "train_more"):  # the merged store made again from them
        StateStore.load(work / folder / "frontend_state.npz")  # the current format again
    assert [r.id for r in read_manifest(merged)] == ids
    bench_units.prepare_extra(args, work / "data", work)
    assert f"prepare: {work / 'train_more'} exists, reused" in capsys.readouterr().out


def _age_state_store(path: Path) -> None:
    """Rewrite a front-end state store as state format 1 wrote it (no speech frames)."""
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("speech_")}
    meta = json.loads(str(arrays["meta"]))
    meta["state_version"] = 1
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="state format 1"):
        StateStore.load(path)


def test_vqcpc_negatives_are_the_same_speakers_steps_at_other_times():
    bench_vqcpc = _script("bench_vqcpc")
    s, u, length = 3, 4, 7
    speaker = torch.arange(s).view(s, 1, 1).expand(s, u, length)
    time = torch.arange(length).view(1, 1, length).expand(s, u, length)
    target = torch.stack([speaker, time], -1).float()  # (S, U, L, 2): who, when
    neg = bench_vqcpc.same_speaker_negatives(target, 17, torch.Generator().manual_seed(0))
    assert neg.shape == (s, u, 17, length, 2)
    assert torch.equal(neg[..., 0], speaker[:, :, None].expand(-1, -1, 17, -1).float())
    assert (neg[..., 1] != time[:, :, None].float()).all()  # never the step being predicted
    assert len(torch.unique(neg[..., 1])) == length  # every other step can be drawn


def test_vqcpc_codebook_follows_its_frames_and_loss_trains():
    bench_vqcpc = _script("bench_vqcpc")
    torch.manual_seed(0)
    book = bench_vqcpc.EmaCodebook(n_codes=4, dim=2, decay=0.0)
    x = torch.tensor([[10.0, 0.0], [12.0, 0.0], [0.0, -10.0]])
    book.codes.copy_(torch.tensor([[9.0, 0.0], [0.0, -9.0], [50.0, 50.0], [-50.0, 50.0]]))
    q, commit, idx = book(x)
    assert idx.tolist() == [0, 0, 1]
    assert torch.allclose(book.codes[:2], torch.tensor([[11.0, 0.0], [0.0, -10.0]]), atol=1e-3)
    assert commit > 0
    model = bench_vqcpc.VQCPC(n_mels=8, channels=16, z_dim=8, c_dim=16, n_codes=16, steps=2,
                              negatives=3)
    mels = torch.randn(4, 8, 32)
    valid = torch.ones(4, 16, dtype=torch.bool)
    valid[3, 10:] = False
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, fig = model.loss(mels, valid, n_speakers=2, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and 0 <= fig["accuracy"] <= 1
    assert model.units(mels).shape == (4, 16)


@pytest.mark.slow
def test_bench_vqcpc(capsys, units_run, mini_work, passive_omp):
    """The VQ-CPC reference on bench_units' prepared folder: trains, extracts, is scored."""
    work, _ = units_run
    out = _run_main(capsys, "bench_vqcpc", "--root", mini_work / "wav", "--work", work,
                    "--steps", 2, "--exp", "vqcpc")
    assert f"prepare: {work / 'data'} exists, reused" in out
    assert re.search(r"^metric +VQ-CPC +MFCC\+k-means +ratio$", out, re.M), out
    ours, base, ratio = _grab(out, rf"^PNMI +{NUM} +{NUM} +{NUM}$")
    assert 0 < ours <= 1 and 0 < base <= 1
    steps, _, rate = _grab(out, rf"^training: {NUM} steps in {NUM} min \({NUM} steps/s")
    assert steps == 2 and rate > 0
    exp = work / "vqcpc"
    assert np.load(exp / "units" / "codebook.npy").shape == (512, 64)
    report = json.loads((exp / "eval" / "test.json").read_text())
    assert report["metrics"]["used"] <= 512  # (too few clips here for ABX: its code vectors
    assert report["codebook"] == str((exp / "units" / "codebook.npy").resolve())  # are named)
    assert report["baseline"]["train_manifest"] == str((work / "data" / "train.tsv").resolve())
