"""The MFCC + k-means baseline and speechvq-evaluate end to end on a synthetic aligned corpus."""

from __future__ import annotations

import json
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
from speechvq.baseline import MfccKmeans, MfccUnitsFeatures
from speechvq.cli import evaluate
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.alignments import Interval, frame_labels, write_phn
from speechvq.data.manifest import ManifestRow, read_manifest, write_manifest
from speechvq.features import build_logmel

CONF = conf_dir()
EVALUATE = Path(sys.executable).parent / "speechvq-evaluate"
SR = 16000
PHONES = {"a": 500.0, "e": 1500.0, "i": 3000.0}  # one tone per "phone"
SPEAKERS = {"s1": 1.0, "s2": 1.12, "s3": 0.9}  # a speaker shifts every tone




@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 utterances: silence, 4-6 tone "phones" of 0.1-0.2 s, silence; .phn alignments."""
    root = tmp_path_factory.mktemp("aligned")
    rng = np.random.default_rng(0)
    rows = []
    (root / "ali").mkdir()
    for n in range(12):
        spk = list(SPEAKERS)[n % 3]
        t0, pieces, intervals = 0.0, [], []
        labels = ["sil", *rng.choice(list(PHONES), size=int(rng.integers(4, 7))), "sil"]
        for lab in labels:
            dur = round(float(rng.uniform(0.1, 0.2)), 2)
            t = np.arange(int(round(dur * SR))) / SR
            if lab == "sil":
                pieces.append(0.001 * rng.standard_normal(t.size))
            else:
                pieces.append(0.3 * np.sin(2 * np.pi * PHONES[lab] * SPEAKERS[spk] * t)
                              + 0.003 * rng.standard_normal(t.size))
            intervals.append(Interval(round(t0, 2), round(t0 + dur, 2), str(lab)))
            t0 += dur
        wav = np.concatenate(pieces).astype(np.float32)
        utt = f"{spk}-{n:02d}"
        save_audio(root / "audio" / f"{utt}.wav", wav, SR)
        write_phn(root / "ali" / f"{utt}.phn", intervals)
        rows.append(ManifestRow(utt, str(root / "audio" / f"{utt}.wav"), len(wav), spk))
    write_manifest(root / "manifest.tsv", rows)
    return root


def _perfect_units(root: Path) -> dict[str, np.ndarray]:
    """Units that name the phone of every frame (silence is unit 0)."""
    from speechvq.data.alignments import load_alignments

    ids = {"sil": 0, "a": 1, "e": 2, "i": 3}
    out = {}
    for row in read_manifest(root / "manifest.tsv"):
        labels = frame_labels(load_alignments(root / "ali")[row.id], 50.0, row.num_samples // 320)
        out[row.id] = np.array([ids[lab] for lab in labels])
    return out


# ---------------------------------------------------------------- MFCC features


def test_mfcc_frames_match_the_units_and_the_logmel_framing(features_cfg):
    feats_cfg = dict(features_cfg)
    mfcc = MfccUnitsFeatures(feats_cfg, unit_rate=50.0, n_mfcc=13, pool="mean")
    logmel = build_logmel(feats_cfg)
    for n in (320, 959, 16000, 16321):
        wav = torch.randn(n)
        out = mfcc(wav)
        assert out.shape == (n // 320, 39)  # one row per unit frame, 13 + deltas + delta-deltas
        assert logmel(wav).shape[-1] // 2 == out.shape[0]
    assert mfcc.mfcc.MelSpectrogram.spectrogram.hop_length == feats_cfg["hop_length"]
    assert mfcc.mfcc.MelSpectrogram.spectrogram.win_length == feats_cfg["win_length"]
    stacked = MfccUnitsFeatures(feats_cfg, unit_rate=50.0, n_mfcc=13, pool="stack")
    assert stacked(torch.randn(3200)).shape == (10, 78)
    with pytest.raises(ValueError, match="whole number"):
        MfccUnitsFeatures(feats_cfg, unit_rate=30.0, n_mfcc=13, pool="mean")


def test_kmeans_baseline_finds_the_tones(corpus, features_cfg):
    from speechvq.data.alignments import load_alignments
    from speechvq.metrics import unit_metrics

    rows = read_manifest(corpus / "manifest.tsv")
    model = MfccKmeans(dict(features_cfg), 50.0, n_clusters=4, seed=0).fit(rows, progress=False)
    units = model.transform(rows, progress=False)
    assert all(len(units[r.id]) == r.num_samples // 320 for r in rows)
    m = unit_metrics(units, load_alignments(corpus / "ali"), 50.0, n_codes=4)
    assert m["pnmi"] > 0.7 and m["phone_purity"] > 0.85
    again = MfccKmeans(dict(features_cfg), 50.0, n_clusters=4, seed=0).fit(rows, progress=False)
    assert all(np.array_equal(units[k], v) for k, v in again.transform(rows, False).items())


# ---------------------------------------------------------------- speechvq-evaluate


def test_evaluate_cli_units_and_baseline(corpus, tmp_path):
    units = _perfect_units(corpus)
    unit_file = tmp_path / "units.txt"
    U.write_units(unit_file, units, "gslm", dedup=True)  # evaluated after expansion to frames
    U.write_sidecar(unit_file, {"unit_rate": 50.0, "n_codes": 8, "dedup": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(EVALUATE), f"units={unit_file}", f"alignments={corpus / 'ali'}",
         f"data.manifest={corpus / 'manifest.tsv'}",
         f"baseline.train_manifest={corpus / 'manifest.tsv'}", "progress=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PNMI" in proc.stdout and "mfcc+kmeans" in proc.stdout
    report = json.loads((tmp_path / "units.txt.metrics.json").read_text())
    m = report["metrics"]
    assert m["pnmi"] == pytest.approx(1.0) and m["phone_purity"] == pytest.approx(1.0)
    assert m["abx_within"] == 0.0 and m["abx_across"] == 0.0
    assert m["used"] == 4 and m["usage"] == pytest.approx(0.5)
    assert m["utterances"] == 12 and m["abx_items"] > 20
    base = report["baseline"]
    assert base["n_clusters"] == 4  # as many clusters as units used
    assert 0.0 < base["metrics"]["pnmi"] <= 1.0
    assert base["features"]["hop_length"] == 160
    assert report["unit_rate"] == 50.0


def _run(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("evaluate", overrides=["progress=false", *overrides])
    return evaluate.run(cfg)


def test_evaluate_without_manifest_and_errors(corpus, tmp_path, capsys):
    unit_file = tmp_path / "u.kaldi"
    U.write_units(unit_file, _perfect_units(corpus), "kaldi")
    out = tmp_path / "m.json"
    assert _run([f"units={unit_file}", f"alignments={corpus / 'ali'}", "baseline.enabled=false",
                 f"out={out}"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["pnmi"] == pytest.approx(1.0) and "abx_within" not in metrics
    assert "mfcc+kmeans" not in capsys.readouterr().out
    with pytest.raises(StageError, match="baseline.train_manifest"):
        _run([f"units={unit_file}", f"alignments={corpus / 'ali'}",
              f"data.manifest={corpus / 'manifest.tsv'}"])
    with pytest.raises(StageError, match="no utterance"):
        U.write_units(tmp_path / "other.txt", {"nobody": np.array([1, 2])}, "gslm")
        _run([f"units={tmp_path / 'other.txt'}", f"alignments={corpus / 'ali'}",
              "baseline.enabled=false"])
    with pytest.raises(StageError, match="missing.txt"):
        _run([f"units={tmp_path / 'missing.txt'}", f"alignments={corpus / 'ali'}"])
