"""Speaking from units (speechvq.synthesis): the Synthesizer, prior samples, resynthesis and
voice conversion, speechvq-sample and speechvq-resynth, on tiny models."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.cli import resynth, sample
from speechvq.cli._hydra import StageError
from speechvq.features import build_logmel
from speechvq.prior import load_prior
from speechvq.synthesis import Synthesizer, resolve_speakers, write_samples
from speechvq.vocoder import griffin_lim

BIN = Path(sys.executable).parent
SPEAKERS = ["alice", "bob"]


# ---------------------------------------------------------------- synthesis


def test_synthesizer_round_trip_lengths_and_seeds(tmp_path, tiny_vqvae):
    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "vq.pt"), {"n_iter": 4})
    wav = torch.randn(16000) * 0.1
    units = synth.encode(wav, "alice")
    assert units.shape == (50,) and units.dtype == torch.long
    assert 0 <= units.min() and units.max() < synth.n_codes
    audio = synth.decode(units, "alice", seed=0)
    assert audio.shape == (16000,) and torch.isfinite(audio).all()
    assert torch.equal(audio, synth.decode(units, "alice", seed=0))
    other = synth.decode(units, "bob", seed=0)
    assert not torch.allclose(audio, other)
    batch = synth.decode(torch.stack([units, units]), ["alice", "bob"], seed=0)
    assert batch.shape == (2, 16000)
    with pytest.raises(ValueError, match="carol"):
        synth.decode(units, "carol")


# ---------------------------------------------------------------- CLIs


def _wav_ok(path: Path, seconds: float) -> None:
    data, rate = sf.read(path)
    assert rate == 16000 and data.ndim == 1
    assert len(data) == round(seconds * 16000)
    assert np.sqrt(np.mean(data**2)) > 1e-3


def test_write_samples_same_seed_same_audio(tmp_path, tiny_vqvae, tiny_prior):
    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "vq.pt"), {"n_iter": 4})
    prior, meta = load_prior(tiny_prior(tmp_path / "prior.pt"))

    def run(out: str, n: int, seed: int) -> list[bytes]:
        write_samples(synth, prior, meta["speakers"], tmp_path / out, n=n, seconds=0.5,
                      speakers=SPEAKERS, seed=seed)
        return [p.read_bytes() for p in sorted((tmp_path / out).glob("sample_*.wav"))]

    first = run("a", 3, seed=0)
    assert run("b", 3, seed=0) == first
    assert run("c", 1, seed=0) == first[:1]  # clip i does not depend on n
    assert run("d", 3, seed=1) != first


def test_sample_cli_writes_clips_units_and_page(tmp_path, tiny_vqvae, tiny_prior, run_cli):
    vq = tiny_vqvae(tmp_path / "vq.pt")
    prior = tiny_prior(tmp_path / "prior.pt")
    common = [str(BIN / "speechvq-sample"), f"vqvae={vq}", f"prior_checkpoint={prior}", "seed=0",
              "vocoder.n_iter=4", "device=cpu"]
    out = tmp_path / "s1"
    run_cli(common + ["n=8", "seconds=4", "speaker=all", f"out_dir={out}"], tmp_path)
    wavs = sorted(out.glob("sample_*.wav"))
    assert len(wavs) == 8
    for path in wavs:
        _wav_ok(path, 4.0)
    assert (out / "index.html").exists() and len(list((out / "img").glob("*.png"))) == 8
    lines = (out / "units.txt").read_text().splitlines()
    assert len(lines) == 8 and len(lines[0].split("|")[1].split()) == 200
    assert list((out / "tb").glob("events.*"))


def test_prompted_sampling_continues_the_prompt(tmp_path, tiny_vqvae, tiny_prior, tone_corpus, compose_cfg):
    vq = tiny_vqvae(tmp_path / "vq.pt")
    prior = tiny_prior(tmp_path / "prior.pt")
    manifest = tone_corpus(tmp_path)
    out = tmp_path / "s"
    cfg = compose_cfg("sample", [f"vqvae={vq}", f"prior_checkpoint={prior}", "n=2", "seconds=2",
                              "prompt=utt1", f"data.manifest={manifest}", "prompt_seconds=0.5",
                              "vocoder.n_iter=4", "device=cpu", "tensorboard=false",
                              f"out_dir={out}"])
    sample.run(cfg)
    _wav_ok(out / "sample_000.wav", 2.0)
    lines = (out / "units.txt").read_text().splitlines()
    prompt_units = Synthesizer.from_checkpoint(vq).encode(
        torch.from_numpy(sf.read(tmp_path / "audio" / "utt1.wav", dtype="float32")[0]), "bob")
    for line in lines:  # both clips continue the utterance's first 25 units
        assert line.split("|")[1].split()[:25] == [str(u) for u in prompt_units[:25].tolist()]
    assert (out / "prompt" / "utt1.wav").exists()
    assert "prompt utt1" in (out / "index.html").read_text()


def test_resynth_cli_reconstruction_and_conversion(tmp_path, tiny_vqvae, tone_corpus, run_cli):
    vq = tiny_vqvae(tmp_path / "vq.pt")
    manifest = tone_corpus(tmp_path, n=3)
    out = tmp_path / "r"
    run_cli(
        [
            str(BIN / "speechvq-resynth"),
            f"checkpoint={vq}",
            f"data.manifest={manifest}",
            "speaker=all",
            "n=2",
            "vocoder.n_iter=4",
            "device=cpu",
            "tensorboard=false",
            f"out_dir={out}",
        ],
        tmp_path,
    )
    originals = sorted(p.name for p in (out / "original").glob("*.wav"))
    assert len(originals) == 2
    assert sorted(p.name for p in (out / "reconstruction").glob("*.wav")) == originals
    for name in originals:
        _wav_ok(out / "reconstruction" / name, 1.0)
    # each utterance converted to the one other speaker
    converted = sorted((out / "converted").rglob("*.wav"))
    assert len(converted) == 2
    page = (out / "index.html").read_text()
    assert page.count("<audio") == 6
    # every reconstruction scored against its original: per utterance, means, page and stdout
    lines = (out / "quality.tsv").read_text().splitlines()
    assert lines[0].split("\t")[:3] == ["id", "stoi", "mcd"] and len(lines) == 3
    means = json.loads((out / "quality.json").read_text())
    assert means["n"] == 2 and 0 <= means["stoi"] <= 1 and means["mcd"] > 0
    assert "STOI" in page and "MCD" in page


def test_resynth_skips_bad_files_and_scores_nothing_from_silence(tmp_path, tiny_vqvae, tone_corpus,
                                                                 compose_cfg, caplog):
    from speechvq.audio import save_audio
    from speechvq.data.manifest import ManifestRow, read_manifest, write_manifest

    vq = tiny_vqvae(tmp_path / "vq.pt")
    rows = read_manifest(tone_corpus(tmp_path, n=2))
    save_audio(tmp_path / "short.wav", np.full(100, 0.1, dtype=np.float32), 16000)
    save_audio(tmp_path / "silent.wav", np.zeros(16000, dtype=np.float32), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"not audio")
    rows += [ManifestRow(n, str(tmp_path / f"{n}.wav"), 16000, "alice")
             for n in ("short", "silent", "corrupt")]
    manifest = tmp_path / "bad.tsv"
    write_manifest(manifest, rows)
    out = tmp_path / "r"
    cfg = compose_cfg("resynth", [f"checkpoint={vq}", f"data.manifest={manifest}", "n=null",
                                  "vocoder.n_iter=4", "device=cpu", "tensorboard=false",
                                  f"out_dir={out}"])
    resynth.run(cfg)
    made = sorted(p.stem for p in (out / "reconstruction").glob("*.wav"))
    assert made == ["silent", "utt0", "utt1"]
    assert "short.wav" in caplog.text and "corrupt.wav" in caplog.text
    lines = {ln.split("\t")[0]: ln.split("\t")[1:] for ln in
             (out / "quality.tsv").read_text().splitlines()[1:]}
    assert lines["silent"][:2] == ["nan", "nan"]  # no score against digital silence
    means = json.loads((out / "quality.json").read_text())  # NaN left out of the means
    assert means["stoi"] == pytest.approx((float(lines["utt0"][0]) + float(lines["utt1"][0])) / 2,
                                          abs=1e-3)
    assert "2 skipped" in (out / "index.html").read_text()


def test_stage_errors_name_the_problem(tmp_path, tiny_vqvae, tiny_prior, tone_corpus, compose_cfg):
    vq = tiny_vqvae(tmp_path / "vq.pt")
    manifest = tone_corpus(tmp_path, n=2)
    cfg = compose_cfg("resynth", [f"checkpoint={vq}", f"data.manifest={manifest}", "speaker=carol",
                               f"out_dir={tmp_path / 'r'}", "device=cpu"])
    with pytest.raises(StageError, match="carol"):
        resynth.run(cfg)
    cfg = compose_cfg("sample", [f"vqvae={vq}", f"prior_checkpoint={tmp_path / 'missing.pt'}",
                              f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="missing.pt"):
        sample.run(cfg)
    cfg = compose_cfg("sample", [f"vqvae={vq}", f"prior_checkpoint={tiny_prior(tmp_path / 'p.pt')}",
                              "prompt=utt0", f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="data.manifest"):
        sample.run(cfg)
    # a prior trained on another codebook size cannot drive this decoder
    other = tiny_prior(tmp_path / "p16.pt", n_codes=16)
    cfg = compose_cfg("sample", [f"vqvae={vq}", f"prior_checkpoint={other}",
                              f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="16 units"):
        sample.run(cfg)


def test_griffin_lim_inverts_the_front_end(features_cfg):
    features = dict(features_cfg)
    logmel = build_logmel(features)
    t = torch.arange(16000) / 16000
    # a harmonic tone switched on halfway: tests level, spectrum and time alignment at once
    wav = sum(torch.sin(2 * math.pi * 150 * k * t) / k for k in range(1, 8)) * 0.1
    wav = wav * (t >= 0.5)
    mel = logmel(wav)
    out = griffin_lim(mel, features, n_iter=32, seed=0)
    assert out.shape == (mel.shape[-1] * features["hop_length"],)
    assert torch.equal(out, griffin_lim(mel, features, n_iter=32, seed=0))
    again = logmel(out)
    loud = mel > math.log(1e-3)  # compare where there is signal, not the log floor
    error = (again - mel)[loud].abs().mean()
    assert error < 0.25
    for shift in (-80, 80):  # half a hop early or late is clearly worse: the frames line up
        shifted = logmel(torch.roll(out, shift))
        assert (shifted - mel)[loud].abs().mean() > 1.5 * error
    batch = griffin_lim(torch.stack([mel, mel]), features, n_iter=4)
    assert batch.shape == (2, out.numel())


def test_resolve_speakers():
    known = ["1001", "1002", "bob"]
    assert resolve_speakers(None, known, "ckpt") == []
    assert resolve_speakers("all", known, "ckpt") == known
    assert resolve_speakers(1001, known, "ckpt") == ["1001"]  # hydra parses `speaker=1001` as int
    assert resolve_speakers(["bob", 1002], known, "ckpt") == ["bob", "1002"]
    with pytest.raises(ValueError, match="ckpt: unknown speaker.*carol"):
        resolve_speakers(["bob", "carol"], known, "ckpt")

