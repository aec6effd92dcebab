"""The one front-end (speechvq.features.FrontEnd): the same input at every stage, and robust to
level, DC, clipping, band-limiting and silence (real speech from the shipped mini corpus)."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speechvq.audio import load_audio
from speechvq.data.dataset import UtteranceDataset
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.extract import ChunkedEncoder, ModelInput, extract_units
from speechvq.features import (
    STD_FLOOR,
    Z_MAX,
    FrontEnd,
    active_frames,
    compute_stats,
    level_reference,
    stats_for_rows,
)
from speechvq.nn.augment import augment_mels
from speechvq.synthesis import Synthesizer
from speechvq.tasks import VQVAETask
from speechvq.training import fit
from speechvq.vqvae import load_vqvae

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MINI = REPO / "egs" / "mini" / "corpus"
SR = 16000
TINY = ["model.encoder.channels=32", "model.encoder.out_channels=16", "model.decoder.channels=32",
        "model.decoder.speaker_dim=8", "quantizer.n_codes=64", "quantizer.kmeans_iters=4"]


def _mini_rows(split: str, per_speaker: int) -> list[ManifestRow]:
    rows = []
    for spk_dir in sorted((MINI / split).iterdir()):
        for path in sorted(spk_dir.rglob("*.flac"))[:per_speaker]:
            n = sf.info(path).frames
            rows.append(ManifestRow(path.stem, str(path), n, spk_dir.name))
    return rows


def _scaled_copy(rows: list[ManifestRow], folder: Path, gain: float) -> list[ManifestRow]:
    """The same utterances, multiplied by ``gain`` (float WAV: no requantisation)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for r in rows:
        path = folder / f"{r.id}.wav"
        sf.write(path, load_audio(r.path).numpy() * gain, SR, subtype="FLOAT")
        out.append(ManifestRow(r.id, str(path), r.num_samples, r.speaker))
    return out


def _train_cfg(manifest: Path) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["out_dir=unused", f"data.manifest={manifest}",
                                          "data.crop_seconds=0.64", *TINY])
    return OmegaConf.to_container(cfg, resolve=True)


def _trainer(steps: int) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
    cfg.update(batch_size=8, warmup_steps=2, log_every=2, valid_every=None, save_every=100,
               media_every=None, lr=2e-3, precision="fp32", max_steps=steps)
    return cfg


def _train(rows: list[ManifestRow], out: Path, steps: int) -> tuple[dict, Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out / "train.tsv", rows)
    cfg = _train_cfg(out / "train.tsv")
    torch.manual_seed(0)
    task = VQVAETask(cfg, out_dir=out / "exp", progress=False)
    result = fit(task, _trainer(steps), out / "exp", seed=0, config=cfg)
    return result, out / "exp" / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny mel VQ-VAE trained a few steps on real (synthetic-voice) speech of 3 speakers."""
    tmp = tmp_path_factory.mktemp("frontend")
    rows = [r for r in _mini_rows("train", 6) if r.speaker != "1004"]
    result, ckpt = _train(rows, tmp / "normal", steps=12)
    return {"rows": rows, "ckpt": ckpt, "result": result, "tmp": tmp}


# ---------------------------------------------------------------- one input at every stage


def test_training_extraction_and_resynthesis_inputs_are_identical(trained):
    model, meta = load_vqvae(trained["ckpt"])
    features = meta.features
    synth = Synthesizer(model, meta)
    # a speaker the model was trained on
    known = trained["rows"][:3]
    stats, _ = stats_for_rows(features, meta.stats, known)
    dataset = UtteranceDataset(known, meta.speakers, stats, features, SR, model.samples_per_unit)
    extraction = ModelInput("mel", 320, SR, features, stats)
    for i, row in enumerate(known):
        wav = load_audio(row.path)
        wav = wav[: wav.numel() // 320 * 320]
        training_input = dataset[i]["feats"]
        assert torch.equal(training_input, extraction(row.path, row.speaker))
        assert torch.equal(training_input, synth.front(wav, row.speaker))
        assert torch.equal(model.encode(training_input[None])[0], synth.encode(wav, row.speaker))
    # a speaker the model never saw: extraction and resynthesis use its own statistics, the same
    unseen = _mini_rows("test", 3)
    unseen = [r for r in unseen if r.speaker == "1004"]
    assert unseen and "1004" not in meta.speakers
    stats, info = stats_for_rows(features, meta.stats, unseen)
    assert info["speakers_computed"] == 1
    extraction = ModelInput("mel", 320, SR, features, stats)
    synth.add_speakers(unseen)
    encoder = ChunkedEncoder(model, 30.0, None, 60.0)
    units = extract_units(unseen, extraction, encoder, progress=False).units
    for row in unseen:
        wav = load_audio(row.path)
        wav = wav[: wav.numel() // 320 * 320]
        assert torch.equal(synth.front(wav, row.speaker), extraction(row.path, row.speaker))
        assert np.array_equal(synth.encode(wav, row.speaker).numpy(), units[row.id])


# ---------------------------------------------------------------- level robustness


def test_a_gain_of_001_or_long_silences_keep_the_units(trained):
    model, meta = load_vqvae(trained["ckpt"])
    rows = _mini_rows("test", 2)
    quiet = _scaled_copy(rows, trained["tmp"] / "quiet_test", 0.01)
    loud = _scaled_copy(rows, trained["tmp"] / "loud_test", 3.0)  # clips nothing: float WAV
    padded = []  # the same recordings with 2 s of silence on each side
    for r in rows:
        path = trained["tmp"] / f"padded_{r.id}.wav"
        silence = np.zeros(2 * SR, dtype=np.float32)
        sf.write(path, np.concatenate([silence, load_audio(r.path).numpy(), silence]), SR,
                 subtype="FLOAT")
        padded.append(ManifestRow(r.id, str(path), r.num_samples + 4 * SR, r.speaker))
    encoder = ChunkedEncoder(model, 30.0, None, 60.0)
    units = {}
    for name, subset in (("normal", rows), ("quiet", quiet), ("loud", loud), ("padded", padded)):
        stats, _ = stats_for_rows(meta.features, meta.stats, subset)
        make_input = ModelInput("mel", 320, SR, meta.features, stats)
        units[name] = extract_units(subset, make_input, encoder, progress=False).units
    frames = sum(len(u) for u in units["normal"].values())
    assert frames > 500 and len(np.unique(np.concatenate(list(units["normal"].values())))) > 8
    units["padded"] = {i: u[100 : 100 + len(units["normal"][i])] for i, u in units["padded"].items()}
    # at the utterance's edges the encoder now sees silence instead of the file's end: compare
    # the units its receptive field keeps away from them
    edge = 8
    for name in ("normal", "padded"):
        units[f"{name} inner"] = {i: u[edge:-edge] for i, u in units[name].items()}
    for name, ref in (("quiet", "normal"), ("loud", "normal"), ("padded inner", "normal inner")):
        changed = sum(int((units[name][i] != units[ref][i]).sum()) for i in units[ref])
        assert changed <= 0.01 * frames, (name, changed, frames)


def test_a_quiet_corpus_trains_like_the_same_corpus_at_normal_level(trained):
    quiet = _scaled_copy(trained["rows"], trained["tmp"] / "quiet_train", 0.01)
    result, _ = _train(quiet, trained["tmp"] / "quiet", steps=12)
    normal = trained["result"]["best"]
    assert math.isfinite(result["best"]) and normal < 2.0
    assert abs(result["best"] - normal) <= 0.05 * normal, (result["best"], normal)


def _variants(wav: torch.Tensor) -> dict[str, torch.Tensor]:
    """One utterance as unusual recordings make it."""
    lowpass = torchaudio.functional.resample(torchaudio.functional.resample(wav, SR, 8000), 8000, SR)
    silence = torch.zeros(5 * SR)
    return {
        "normal": wav,
        "quiet": wav * 1e-3,
        "band-limited": lowpass[: wav.numel()],
        "clipped": (wav * 20).clamp(-1, 1),
        "dc offset": wav + 0.2,
        "long silences": torch.cat([silence, wav, silence, wav * 0.5, silence]),
        "digital silence": torch.zeros(SR),
    }


@pytest.mark.parametrize("mode", ["utterance", "speaker"])
def test_normalised_bins_have_bounded_variance(tmp_path, mode):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=["out_dir=unused", f"features.normalize={mode}"])
    features = OmegaConf.to_container(cfg.features, resolve=True)
    wav = load_audio(_mini_rows("test", 1)[0].path)
    rows = []
    for name, x in _variants(wav).items():
        path = tmp_path / f"{name.replace(' ', '_')}.wav"
        sf.write(path, x.numpy(), SR, subtype="FLOAT")
        rows.append(ManifestRow(path.stem, str(path), x.numel(), path.stem))
    stats = compute_stats(rows, features, progress=False) if mode == "speaker" else None
    front = FrontEnd(features, stats)
    for row in rows:
        wav = load_audio(row.path)
        feats = front(wav, row.speaker)
        assert torch.isfinite(feats).all() and feats.abs().max() <= Z_MAX, row.id
        # the stated bound: over the (active) frames its statistics came from, a bin's variance
        # is at most 1; over any frames, values stay within +-Z_MAX
        power = front.mel_power(wav, float(wav.double().mean()))
        active = active_frames(power, level_reference(power))
        var = feats[:, active].double().var(dim=1, unbiased=False)
        assert var.max() <= 1.0 + 1e-4, (row.id, float(var.max()))
    # the old failure: a quiet recording's high bins normalised by a near-zero std
    quiet = front.features_of(load_audio(rows[1].path))
    normal = front.features_of(load_audio(rows[0].path))
    torch.testing.assert_close(quiet, normal, atol=1e-3, rtol=0)
    assert STD_FLOOR >= 0.1


def test_unusual_corpora_are_reported_with_numbers(tmp_path, caplog):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("prepare", overrides=["out_dir=unused"])
    features = OmegaConf.to_container(cfg.features, resolve=True)
    wav = load_audio(_mini_rows("test", 1)[0].path)
    rows = []
    for i in range(4):
        for name in ("quiet", "clipped", "band-limited"):
            x = _variants(wav)[name]
            path = tmp_path / f"{name}{i}.wav"
            sf.write(path, x.numpy(), SR, subtype="FLOAT")
            rows.append(ManifestRow(path.stem, str(path), x.numel(), name))
    with caplog.at_level(logging.INFO, logger="speechvq.features"):
        compute_stats(rows, features, progress=False)
    text = caplog.text
    assert "4 of 12 files clip" in text
    assert "4 of 12 files have almost nothing above 4 kHz" in text
    assert "median peak" in text


def test_augmentation_perturbs_only_what_it_is_asked_to():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 80, 30, generator=gen)
    assert torch.equal(augment_mels(x), x)
    warped = augment_mels(x, warp=0.1, generator=gen)
    assert warped.shape == x.shape and not torch.equal(warped, x)
    torch.testing.assert_close(warped[:, 0], x[:, 0])  # bin 0 stays put
    eq = augment_mels(x, eq=0.5, generator=gen)
    shift = eq - x  # a colouring: one curve over the bins, the same in every frame
    torch.testing.assert_close(shift, shift[:, :, :1].expand_as(shift))
    cut = augment_mels(x, bandlimit=1.0, min_bins=40, generator=gen)  # always band-limited
    for b in range(4):
        kept = int((cut[b].abs().sum(1) > 0).sum())
        assert 40 <= kept < 80 and torch.equal(cut[b, :kept], x[b, :kept])
        assert not cut[b, kept:].any()
    assert torch.equal(augment_mels(x, bandlimit=1e-9, min_bins=40, generator=gen), x)
    hidden = augment_mels(x, mask=0.3, mask_span=5, generator=gen)
    gone = (hidden == 0).all(dim=1)  # (B, F): whole frames set to the mean
    assert torch.equal(hidden[~gone[:, None, :].expand_as(x)], x[~gone[:, None, :].expand_as(x)])
    for b in range(4):
        share = float(gone[b].float().mean())
        assert 0.15 <= share <= 0.35
        runs = torch.diff(torch.nonzero(torch.diff(torch.cat([torch.zeros(1), gone[b].float(),
                                                              torch.zeros(1)]))).flatten())
        assert (runs[::2] >= 5).all()  # spans of at least mask_span frames
    again, which = augment_mels(x, mask=0.3, mask_span=5, bandlimit=0.5, min_bins=40,
                                generator=torch.Generator().manual_seed(3), return_hidden=True)
    assert which.shape == (4, 30) and which.dtype == torch.bool and which.any()
    assert torch.equal(which, (again == 0).all(dim=1))  # exactly the frames it hid
    _, none = augment_mels(x, warp=0.1, generator=gen, return_hidden=True)
    assert not none.any()


class _Spy(torch.nn.Module):
    """Stands in for the model: records the batch the task hands it."""

    def forward(self, batch: dict) -> dict:
        self.seen = batch
        return {"loss": torch.zeros(())}


def test_training_steps_augment_the_encoder_input_only(trained):
    cfg = _train_cfg(trained["tmp"] / "normal" / "train.tsv")
    assert cfg["data"]["augment"]["bandlimit"] == 0.3  # the default (conf/data/manifest.yaml)
    cfg["data"]["augment"]["bandlimit"] = 1.0  # every crop band-limited
    task = VQVAETask(cfg, progress=False)
    batch = task.collate([task.train_set[i] for i in range(4)])
    spy = _Spy()
    task.step(spy, batch)
    seen = spy.seen
    assert torch.equal(seen["feats"], batch["feats"])  # the decoder's target stays clean
    lost = (seen["encoder_input"] == 0).all(dim=2)  # (B, n_mels): bins removed whole
    assert lost.any(dim=1).all() and not lost[:, : task.augment["min_bins"]].any()
    for key, bad in (("mask", 1.0), ("mask", -0.1), ("mask_span", 0), ("bandlimit", 1.5),
                     ("warp", -0.1)):
        wrong = copy.deepcopy(cfg)
        wrong["data"]["augment"][key] = bad
        with pytest.raises(ValueError, match=f"data.augment.{key} must be"):
            VQVAETask(wrong, progress=False)
    spy.eval()  # validation: no augmentation
    task.step(spy, batch)
    assert "encoder_input" not in spy.seen
