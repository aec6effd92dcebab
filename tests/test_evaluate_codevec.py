"""speechvq-evaluate's code-vector ABX: codebook from the units' checkpoint (or ``codebook=``),
k-means centroids for the baseline; alignments matched to manifest rows by audio stem."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from speechvq import units as U
from speechvq.audio import save_audio
from speechvq.checkpoint import checkpoint_hash
from speechvq.cli import evaluate
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.alignments import Interval, frame_labels, write_phn
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.vqvae import build_vqvae

CONF = conf_dir()
EVALUATE = Path(sys.executable).parent / "speechvq-evaluate"
SR = 16000
PHONES = {"sil": 0, "a": 1, "e": 2, "i": 3}  # the unit that names each phone
TONES = {"a": 500.0, "e": 1500.0, "i": 3000.0}
SPEAKERS = {"s1": 1.0, "s2": 1.12, "s3": 0.9}
N_CODES, DIM = 8, 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """9 utterances of tone "phones"; alignment files are named after the audio (``uttNN.phn``),
    manifest ids are ``<speaker>-uttNN``; units name the phone of every frame."""
    root = tmp_path_factory.mktemp("codevec")
    rng = np.random.default_rng(1)
    rows, units = [], {}
    (root / "ali").mkdir()
    for n in range(9):
        spk = list(SPEAKERS)[n % 3]
        labels = ["sil", *rng.choice(list(TONES), size=5), "sil"]
        t0, pieces, intervals = 0.0, [], []
        for lab in labels:
            dur = round(float(rng.uniform(0.1, 0.2)), 2)
            t = np.arange(int(round(dur * SR))) / SR
            tone = 0.0 if lab == "sil" else 0.3 * np.sin(2 * np.pi * TONES[lab] * SPEAKERS[spk] * t)
            pieces.append(tone + 0.002 * rng.standard_normal(t.size))
            intervals.append(Interval(round(t0, 2), round(t0 + dur, 2), str(lab)))
            t0 += dur
        wav = np.concatenate(pieces).astype(np.float32)
        audio = root / "audio" / spk / f"utt{n:02d}.wav"
        save_audio(audio, wav, SR)
        write_phn(root / "ali" / f"utt{n:02d}.phn", intervals)
        rows.append(ManifestRow(f"{spk}-utt{n:02d}", str(audio), len(wav), spk))
        frames = frame_labels(intervals, 50.0, len(wav) // 320)
        units[rows[-1].id] = np.array([PHONES[lab] for lab in frames])
    write_manifest(root / "manifest.tsv", rows)
    return root, units


@pytest.fixture(scope="session")
def codebook_ckpt(tiny_vqvae_cfg, save_vqvae):
    """``codebook_ckpt(path, codes)``: a tiny untrained VQ-VAE whose codebook is ``codes``
    ``(N_CODES, DIM)``, saved as a checkpoint."""

    def make(path: Path, codes: np.ndarray) -> Path:
        cfg = tiny_vqvae_cfg("mel", n_codes=N_CODES, channels=8, dim=DIM)
        model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=len(SPEAKERS))
        model.quantizer.codebook.copy_(torch.as_tensor(codes, dtype=torch.float32))
        model.quantizer.inited.fill_(True)
        return save_vqvae(path, model, cfg, SPEAKERS)

    return make


def _distinct_codes() -> np.ndarray:
    """Phone units 0-3 along the axes, so every two phones are orthogonal."""
    return np.concatenate([np.eye(DIM), np.random.default_rng(0).normal(size=(N_CODES - DIM, DIM))])


def _parallel_codes() -> np.ndarray:
    """The phone units a, e, i point the same way (different lengths): code-vector ABX can't
    tell them apart, so every triplet ties."""
    codes = _distinct_codes()
    codes[1:4] = np.array([[1.0, 2.0, 0.0, 0.0]]) * np.array([[1.0], [2.0], [0.5]])
    return codes


def _unit_file(tmp_path: Path, units: dict, sidecar: dict) -> Path:
    path = tmp_path / "units.txt"
    U.write_units(path, units, "gslm")
    U.write_sidecar(path, {"unit_rate": 50.0, "n_codes": N_CODES, **sidecar})
    return path


def _run(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["progress=false", *overrides])
    return evaluate.run(cfg)


def test_cli_reports_codevec_abx_for_both_systems(corpus, tmp_path, codebook_ckpt):
    root, units = corpus
    ckpt = codebook_ckpt(tmp_path / "best.pt", _distinct_codes())
    unit_file = _unit_file(tmp_path, units, {"checkpoint": str(ckpt),
                                             "checkpoint_hash": checkpoint_hash(ckpt)})
    proc = subprocess.run(
        [str(EVALUATE), f"units={unit_file}", f"alignments={root / 'ali'}",
         f"data.manifest={root / 'manifest.tsv'}",
         f"baseline.train_manifest={root / 'manifest.tsv'}", "progress=false"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ABX within, code vectors (%)" in proc.stdout
    assert "ABX across, code vectors (%)" in proc.stdout
    report = json.loads((tmp_path / "units.txt.metrics.json").read_text())
    assert report["codebook"] == str(ckpt.resolve())
    m = report["metrics"]
    assert m["utterances"] == 9  # every alignment file matched its row by the audio's stem
    assert m["abx_within"] == m["abx_across"] == 0.0
    assert m["abx_within_codevec"] == m["abx_across_codevec"] == 0.0
    base = report["baseline"]["metrics"]
    for key in ("abx_within", "abx_across", "abx_within_codevec", "abx_across_codevec"):
        assert 0.0 <= base[key] <= 1.0


def test_codebook_override_is_used(corpus, tmp_path, codebook_ckpt):
    root, units = corpus
    ckpt = codebook_ckpt(tmp_path / "parallel.pt", _parallel_codes())
    unit_file = _unit_file(tmp_path, units, {})  # no checkpoint in the sidecar
    out = tmp_path / "m.json"
    assert _run([f"units={unit_file}", f"alignments={root / 'ali'}",
                 f"data.manifest={root / 'manifest.tsv'}", "baseline.enabled=false",
                 f"codebook={ckpt}", f"out={out}"]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["abx_within"] == m["abx_across"] == 0.0  # one-hot: the phones' units differ
    assert m["abx_within_codevec"] == m["abx_across_codevec"] == 0.5  # parallel codes: ties


def test_codevec_abx_is_skipped_without_a_usable_checkpoint(corpus, tmp_path, caplog, codebook_ckpt):
    root, units = corpus
    args = [f"alignments={root / 'ali'}", f"data.manifest={root / 'manifest.tsv'}",
            "baseline.enabled=false", f"out={tmp_path / 'm.json'}"]
    with caplog.at_level(logging.INFO, logger="speechvq.baseline"):
        assert _run([f"units={_unit_file(tmp_path, units, {})}", *args]) == 0
    assert "code-vector ABX is left out" in caplog.text
    metrics = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert "abx_within_codevec" not in metrics and metrics["abx_within"] == 0.0
    # a checkpoint overwritten since extraction: its codebook no longer names these units
    ckpt = codebook_ckpt(tmp_path / "best.pt", _distinct_codes())
    unit_file = _unit_file(tmp_path, units, {"checkpoint": str(ckpt), "checkpoint_hash": "0" * 16})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="speechvq.baseline"):
        assert _run([f"units={unit_file}", *args]) == 0
    assert "hash changed" in caplog.text
    assert "abx_across_codevec" not in json.loads((tmp_path / "m.json").read_text())["metrics"]


def test_errors_name_counts_examples_and_codebook_size(corpus, tmp_path, codebook_ckpt):
    root, units = corpus
    unit_file = _unit_file(tmp_path, {"nobody": np.array([1, 2]), "nobody2": np.array([1])}, {})
    with pytest.raises(StageError) as err:
        _run([f"units={unit_file}", f"alignments={root / 'ali'}",
              f"data.manifest={root / 'manifest.tsv'}", "baseline.enabled=false"])
    text = str(err.value)
    assert "2 unit ids (e.g. 'nobody')" in text
    assert "9 alignment files" in text and "e.g. 'utt00'" in text
    ckpt = codebook_ckpt(tmp_path / "best.pt", _distinct_codes())
    big = {u: np.where(s == 3, N_CODES, s) for u, s in units.items()}  # a unit past the codebook
    with pytest.raises(StageError, match="codebook has 8 codes"):  # (no n_codes in the sidecar)
        _run([f"units={_unit_file(tmp_path, big, {'n_codes': None})}", f"alignments={root / 'ali'}",
              f"data.manifest={root / 'manifest.tsv'}", "baseline.enabled=false",
              f"codebook={ckpt}"])
    with pytest.raises(StageError, match="codebook: .*missing.pt"):
        _run([f"units={_unit_file(tmp_path, units, {})}", f"alignments={root / 'ali'}",
              f"data.manifest={root / 'manifest.tsv'}", "baseline.enabled=false",
              f"codebook={tmp_path / 'missing.pt'}"])


def test_codebook_from_a_npy_array(corpus, tmp_path):
    """codebook=FILE.npy: another system's (K, D) code vectors, checked like a checkpoint's."""
    root, units = corpus
    args = [f"units={_unit_file(tmp_path, units, {})}", f"alignments={root / 'ali'}",
            f"data.manifest={root / 'manifest.tsv'}", "baseline.enabled=false",
            f"out={tmp_path / 'm.json'}"]
    np.save(tmp_path / "parallel.npy", _parallel_codes())
    assert _run([*args, f"codebook={tmp_path / 'parallel.npy'}"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["abx_within_codevec"] == m["abx_across_codevec"] == 0.5  # parallel codes: ties
    np.save(tmp_path / "distinct.npy", _distinct_codes())
    assert _run([*args, f"codebook={tmp_path / 'distinct.npy'}"]) == 0
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["abx_within_codevec"] == m["abx_across_codevec"] == 0.0
    np.save(tmp_path / "flat.npy", np.zeros(N_CODES))
    with pytest.raises(StageError, match=r"codebook: .*flat\.npy: a codebook is a \(K, D\) array"):
        _run([*args, f"codebook={tmp_path / 'flat.npy'}"])
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(StageError, match=r"junk\.npy: not a readable \.npy array"):
        _run([*args, f"codebook={tmp_path / 'junk.npy'}"])
