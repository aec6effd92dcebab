"""Prior training through fit(), sampling, resynthesis and their CLIs, on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from omegaconf import OmegaConf

from speechvq.audio import save_audio
from speechvq.checkpoint import load_checkpoint, save_checkpoint
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.features import FeatureStats, Moments
from speechvq.prior import (
    build_prior,
    load_prior,
    ngram_perplexities,
    prior_model_config,
    sample_units,
    split_ids,
    unit_perplexity,
)
from speechvq.synthesis import Synthesizer, write_samples
from speechvq.tasks import PriorTask
from speechvq.training import fit
from speechvq.units import write_units
from speechvq.vqvae import build_vqvae

CONF = Path(__file__).resolve().parents[1] / "conf"
BIN = Path(sys.executable).parent
SPEAKERS = ["alice", "bob"]
TINY_PRIOR = dict(block_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)


# ---------------------------------------------------------------- fixtures (tiny models, data)




def _features() -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "features" / "logmel.yaml"))
    return cfg


def _tiny_vqvae(path: Path, speakers=SPEAKERS, n_codes: int = 32) -> Path:
    """A randomly initialised mel VQ-VAE saved in the contract's checkpoint format."""
    features = _features()
    cfg = OmegaConf.create(
        {
            "features": features,
            "model": OmegaConf.load(CONF / "model" / "mel.yaml"),
            "quantizer": OmegaConf.load(CONF / "quantizer" / "ema.yaml"),
        }
    )
    cfg.model.encoder.channels = 16
    cfg.model.encoder.out_channels = 8
    cfg.model.decoder.channels = 16
    cfg.model.decoder.speaker_dim = 8
    cfg.quantizer.n_codes = n_codes
    plain = OmegaConf.to_container(cfg, resolve=True)
    torch.manual_seed(0)
    model = build_vqvae(plain["model"], plain["quantizer"], n_speakers=len(speakers))
    with torch.no_grad():  # spread the codebook so encoding uses several codes
        model.quantizer.codebook.normal_()
    n_mels = features["n_mels"]
    level = torch.linspace(-3.0, -9.0, n_mels)  # a speech-like spectral tilt, in log power
    stats = FeatureStats(
        features,
        Moments(level, torch.full((n_mels,), 1.5), 1000),
        {
            s: Moments(level + i, torch.full((n_mels,), 1.0 + i), 500)
            for i, s in enumerate(speakers)
        },
    )
    meta = {
        "speakers": list(speakers),
        "stats": stats.to_dict(),
        "features": features,
        "unit_rate": model.unit_rate,
        "n_codes": model.n_codes,
    }
    save_checkpoint(
        path,
        {
            "kind": "vqvae",
            "model_config": {
                "model": plain["model"],
                "quantizer": plain["quantizer"],
                "n_speakers": len(speakers),
            },
            "meta": meta,
            "model": model.state_dict(),
            "step": 0,
        },
    )
    return path


def _tiny_prior(path: Path, n_codes: int = 32, speakers=SPEAKERS) -> Path:
    torch.manual_seed(1)
    prior = build_prior(TINY_PRIOR, n_codes, len(speakers))
    save_checkpoint(
        path,
        {
            "kind": "prior",
            "model_config": prior_model_config(prior),
            "meta": {"speakers": list(speakers), "n_codes": n_codes},
            "model": prior.state_dict(),
            "step": 0,
        },
    )
    return path


def _corpus(tmp: Path, n: int = 4, seconds: float = 1.0) -> Path:
    """Short synthetic utterances (harmonic tones + noise), alternating speakers -> manifest."""
    rows = []
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    for i in range(n):
        f0 = 100 + 40 * i
        wav = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.1
        wav = (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
        path = tmp / "audio" / f"utt{i}.wav"
        save_audio(path, wav, 16000)
        rows.append(ManifestRow(f"utt{i}", str(path), t.size, SPEAKERS[i % 2]))
    write_manifest(tmp / "manifest.tsv", rows)
    return tmp / "manifest.tsv"


def _cyclic_units(n_utts: int = 24, length: int = 60, n_codes: int = 8) -> dict:
    """Runs of a cycle of units: easy for a prior, hard for a unigram model."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n_utts):
        start = rng.integers(n_codes)
        seq = [(start + j // 3) % n_codes for j in range(length)]
        out[f"u{i:02d}"] = np.asarray(seq)
    return out


def _trainer(**overrides) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    cfg.update(
        max_steps=40,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        log_every=5,
        valid_every=20,
        media_every=20,
        save_every=20,
        precision="fp32",
    )
    cfg.update(overrides)
    return cfg


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


# ---------------------------------------------------------------- baselines and splits


def test_ngram_perplexities_on_a_hand_case():
    # train: [0 0 1]; add-one over 2 codes. unigram counts 1+2, 1+1 -> p = 3/5, 2/5
    train = [np.array([0, 0, 1])]
    valid = [np.array([1, 0])]
    ppl = ngram_perplexities(train, valid, n_codes=2)
    uni = math.exp(-(math.log(2 / 5) + math.log(3 / 5)) / 2)
    assert ppl["unigram"] == pytest.approx(uni)
    # bigram rows (add-one): start -> {0: 2, 1: 1}; 0 -> {0: 2, 1: 2}; 1 -> {0: 1, 1: 1}
    big = math.exp(-(math.log(1 / 3) + math.log(1 / 2)) / 2)
    assert ppl["bigram"] == pytest.approx(big)
    assert ppl["units"] == 2


def test_split_ids_is_seeded_and_disjoint():
    ids = [f"u{i}" for i in range(40)]
    train, valid = split_ids(ids, 0.1, seed=3)
    assert len(valid) == 4 and not set(train) & set(valid) and len(train) + len(valid) == 40
    assert split_ids(ids, 0.1, seed=3) == (train, valid)
    assert split_ids(ids, 0.1, seed=4)[1] != valid


# ---------------------------------------------------------------- training through fit()


def test_prior_trains_through_fit_and_beats_the_baselines(tmp_path):
    units = _cyclic_units()
    ids = sorted(units)
    train = {i: units[i] for i in ids[:20]}
    valid = {i: units[i] for i in ids[20:]}
    speaker_of = {i: SPEAKERS[k % 2] for k, i in enumerate(ids)}
    task = PriorTask(
        train,
        valid,
        speaker_of,
        SPEAKERS,
        TINY_PRIOR,
        n_codes=8,
        max_units=40,
        meta={"units": "synthetic"},
        seed=0,
    )
    assert task.meta["speakers"] == SPEAKERS
    before = unit_perplexity(task.model, task.valid_set)
    result = fit(task, _trainer(), tmp_path / "run", seed=0, device="cpu")
    assert result["step"] == 40
    prior, meta = load_prior(result["best_path"])
    after = unit_perplexity(prior, task.valid_set)
    assert after < before / 2
    assert after < task.baselines["unigram"]
    assert meta["speakers"] == SPEAKERS and meta["n_codes"] == 8
    assert meta["baselines"]["unigram"] == pytest.approx(task.baselines["unigram"])
    ckpt = load_checkpoint(result["last"], kind="prior")
    assert ckpt["model_config"] == prior_model_config(prior)
    tb = list((tmp_path / "run" / "tb").glob("events.*"))
    assert tb and b"valid/perplexity" in b"".join(p.read_bytes() for p in tb)


def test_train_prior_cli(tmp_path):
    units = _cyclic_units(n_utts=20, length=40)
    write_units(tmp_path / "units.txt", units, format="gslm")
    rows = [
        ManifestRow(i, "/nonexistent.wav", 16000, SPEAKERS[k % 2])
        for k, i in enumerate(sorted(units))
    ]
    write_manifest(tmp_path / "m.tsv", rows)
    out = tmp_path / "prior"
    proc = _run(
        [
            str(BIN / "speechvq-train-prior"),
            f"units={tmp_path / 'units.txt'}",
            f"data.manifest={tmp_path / 'm.tsv'}",
            f"out_dir={out}",
            "prior=tiny",
            "n_codes=8",
            "valid_fraction=0.2",
            "trainer.max_steps=30",
            "trainer.batch_size=4",
            "trainer.lr=3e-3",
            "trainer.warmup_steps=2",
            "trainer.valid_every=15",
            "trainer.save_every=15",
            "trainer.media_every=null",
            "device=cpu",
        ],
        tmp_path,
    )
    report = json.loads((out / "perplexity.json").read_text())
    assert {"prior", "bigram", "unigram"} <= set(report) and report["valid_utterances"] == 4
    assert "unigram" in proc.stdout and "bigram" in proc.stdout
    _, meta = load_prior(out / "checkpoints" / "best.pt")
    assert meta["speakers"] == SPEAKERS  # the manifest's speakers, sorted


def test_train_prior_speakers_default_to_the_units_manifest(tmp_path):
    """Without data.manifest the speakers come from the manifest named in the units' sidecar; with
    none known, no speaker tokens at all (sampling must not use tokens training never saw)."""
    from speechvq.prior import prior_data
    from speechvq.units import write_sidecar

    rows = [ManifestRow(f"u{k}", "/nonexistent.wav", 16000, SPEAKERS[k % 2]) for k in range(4)]
    write_manifest(tmp_path / "m.tsv", rows)
    unit_file = tmp_path / "u.txt"
    write_units(unit_file, {r.id: np.arange(6) % 8 for r in rows}, "gslm")
    write_sidecar(unit_file, {"format": "gslm", "manifest": str(tmp_path / "m.tsv")})
    vq = _tiny_vqvae(tmp_path / "vq.pt", speakers=["bob", "alice", "carol"])
    data = prior_data(str(unit_file), None, 0.25, 0, None, str(vq), None, True)
    assert data.speaker_of == {"u0": "alice", "u1": "bob", "u2": "alice", "u3": "bob"}
    assert data.speakers == ["bob", "alice", "carol"]  # the decoder's names, so tokens match
    assert data.n_codes == 32 and len(data.train) == 3 and len(data.valid) == 1
    write_sidecar(unit_file, {"format": "gslm", "manifest": str(tmp_path / "gone.tsv")})
    data = prior_data(str(unit_file), None, 0.25, 0, None, str(vq), None, True)
    assert (data.speaker_of, data.speakers) == ({}, [])


# ---------------------------------------------------------------- synthesis


def test_synthesizer_round_trip_lengths_and_seeds(tmp_path):
    synth = Synthesizer.from_checkpoint(_tiny_vqvae(tmp_path / "vq.pt"), {"n_iter": 4})
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


def test_sample_units_seeded_prompted_and_in_codebook(tmp_path):
    prior, _ = load_prior(_tiny_prior(tmp_path / "prior.pt"))
    a = sample_units(prior, 3, 40, speaker=[0, 1, None], temperature=5.0, seed=1)
    assert a.shape == (3, 40) and a.min() >= 0 and a.max() < 32
    assert torch.equal(a, sample_units(prior, 3, 40, speaker=[0, 1, None], temperature=5.0, seed=1))
    assert not torch.equal(a, sample_units(prior, 3, 40, speaker=[0, 1, None], seed=2))
    prompt = torch.tensor([5, 5, 7, 9])
    b = sample_units(prior, 2, 10, speaker=0, prompt=prompt, seed=0)
    assert torch.equal(b[:, :4], prompt.expand(2, -1))


# ---------------------------------------------------------------- CLIs


def _wav_ok(path: Path, seconds: float) -> None:
    data, rate = sf.read(path)
    assert rate == 16000 and data.ndim == 1
    assert len(data) == round(seconds * 16000)
    assert np.sqrt(np.mean(data**2)) > 1e-3


def test_write_samples_same_seed_same_audio(tmp_path):
    synth = Synthesizer.from_checkpoint(_tiny_vqvae(tmp_path / "vq.pt"), {"n_iter": 4})
    prior, meta = load_prior(_tiny_prior(tmp_path / "prior.pt"))

    def run(out: str, n: int, seed: int) -> list[bytes]:
        write_samples(synth, prior, meta["speakers"], tmp_path / out, n=n, seconds=0.5,
                      speakers=SPEAKERS, seed=seed)
        return [p.read_bytes() for p in sorted((tmp_path / out).glob("sample_*.wav"))]

    first = run("a", 3, seed=0)
    assert run("b", 3, seed=0) == first
    assert run("c", 1, seed=0) == first[:1]  # clip i does not depend on n
    assert run("d", 3, seed=1) != first


def test_sample_cli_writes_clips_units_and_page(tmp_path):
    vq = _tiny_vqvae(tmp_path / "vq.pt")
    prior = _tiny_prior(tmp_path / "prior.pt")
    common = [str(BIN / "speechvq-sample"), f"vqvae={vq}", f"prior_checkpoint={prior}", "seed=0",
              "vocoder.n_iter=4", "device=cpu"]
    out = tmp_path / "s1"
    _run(common + ["n=8", "seconds=4", "speaker=all", f"out_dir={out}"], tmp_path)
    wavs = sorted(out.glob("sample_*.wav"))
    assert len(wavs) == 8
    for path in wavs:
        _wav_ok(path, 4.0)
    assert (out / "index.html").exists() and len(list((out / "img").glob("*.png"))) == 8
    lines = (out / "units.txt").read_text().splitlines()
    assert len(lines) == 8 and len(lines[0].split("|")[1].split()) == 200
    assert list((out / "tb").glob("events.*"))


def test_prompted_sampling_continues_the_prompt(tmp_path):
    from speechvq.cli import sample

    vq = _tiny_vqvae(tmp_path / "vq.pt")
    prior = _tiny_prior(tmp_path / "prior.pt")
    manifest = _corpus(tmp_path)
    out = tmp_path / "s"
    cfg = _compose("sample", [f"vqvae={vq}", f"prior_checkpoint={prior}", "n=2", "seconds=2",
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


def test_resynth_cli_reconstruction_and_conversion(tmp_path):
    vq = _tiny_vqvae(tmp_path / "vq.pt")
    manifest = _corpus(tmp_path, n=3)
    out = tmp_path / "r"
    _run(
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


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_stage_errors_name_the_problem(tmp_path):
    from speechvq.cli import resynth, sample
    from speechvq.cli._hydra import StageError

    vq = _tiny_vqvae(tmp_path / "vq.pt")
    manifest = _corpus(tmp_path, n=2)
    cfg = _compose("resynth", [f"checkpoint={vq}", f"data.manifest={manifest}", "speaker=carol",
                               f"out_dir={tmp_path / 'r'}", "device=cpu"])
    with pytest.raises(StageError, match="carol"):
        resynth.run(cfg)
    cfg = _compose("sample", [f"vqvae={vq}", f"prior_checkpoint={tmp_path / 'missing.pt'}",
                              f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="missing.pt"):
        sample.run(cfg)
    cfg = _compose("sample", [f"vqvae={vq}", f"prior_checkpoint={_tiny_prior(tmp_path / 'p.pt')}",
                              "prompt=utt0", f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="data.manifest"):
        sample.run(cfg)
    # a prior trained on another codebook size cannot drive this decoder
    other = _tiny_prior(tmp_path / "p16.pt", n_codes=16)
    cfg = _compose("sample", [f"vqvae={vq}", f"prior_checkpoint={other}",
                              f"out_dir={tmp_path / 's'}", "device=cpu"])
    with pytest.raises(StageError, match="16 units"):
        sample.run(cfg)


def test_griffin_lim_inverts_the_front_end():
    from speechvq.features import build_logmel
    from speechvq.vocoder import griffin_lim

    features = _features()
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
    from speechvq.synthesis import resolve_speakers

    known = ["1001", "1002", "bob"]
    assert resolve_speakers(None, known, "ckpt") == []
    assert resolve_speakers("all", known, "ckpt") == known
    assert resolve_speakers(1001, known, "ckpt") == ["1001"]  # hydra parses `speaker=1001` as int
    assert resolve_speakers(["bob", 1002], known, "ckpt") == ["bob", "1002"]
    with pytest.raises(ValueError, match="ckpt: unknown speaker.*carol"):
        resolve_speakers(["bob", "carol"], known, "ckpt")
