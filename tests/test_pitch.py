"""The F0 path (speechvq.pitch, FrontEnd.pitch, the pitch-conditioned decoder) and the quality
figures of resynthesis (speechvq.quality)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from speechvq import quality
from speechvq.data.dataset import CropDataset, UtteranceDataset, collate
from speechvq.data.manifest import read_manifest
from speechvq.features import FrontEnd
from speechvq.pitch import F0Moments, convert_f0, f0_track, pitch_features
from speechvq.synthesis import Synthesizer
from speechvq.vqvae import build_vqvae

SR, HOP = 16000, 160


def _tone(f0: float | torch.Tensor, seconds: float = 1.0, amp: float = 0.3) -> torch.Tensor:
    if isinstance(f0, torch.Tensor):  # a contour, one value per sample
        phase = 2 * math.pi * torch.cumsum(f0.double(), 0) / SR
    else:
        phase = 2 * math.pi * f0 * torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return (amp * sum(torch.sin(k * phase) / k for k in range(1, 6))).float()


@pytest.mark.parametrize("f0", [80.0, 150.0, 300.0])
def test_a_tone_s_f0_is_recovered(f0):
    track = f0_track(_tone(f0), SR, HOP)
    assert track.shape == (100,)
    voiced = track > 0
    assert voiced.float().mean() > 0.9
    assert torch.allclose(track[voiced].median(), torch.tensor(f0), rtol=0.01)


def test_a_glide_is_followed_frame_by_frame():
    glide = torch.linspace(120.0, 240.0, SR)
    track = f0_track(_tone(glide), SR, HOP)
    centres = glide[(torch.arange(100) * HOP + HOP // 2)]
    voiced = track > 0
    assert voiced[5:-5].all()
    assert ((track[voiced] / centres[voiced]).log2().abs() * 1200).median() < 25  # cents


def test_silence_and_noise_are_unvoiced_and_gain_does_not_matter():
    assert not (f0_track(torch.zeros(SR), SR, HOP) > 0).any()
    noise = torch.randn(SR, generator=torch.Generator().manual_seed(0)) * 0.1
    assert (f0_track(noise, SR, HOP) > 0).float().mean() < 0.2
    tone = _tone(200.0)
    assert torch.allclose(f0_track(tone, SR, HOP), f0_track(tone * 0.01, SR, HOP), rtol=1e-3)


def test_pitch_features_are_the_contour_not_the_register():
    low, high = f0_track(_tone(torch.linspace(100., 150., SR)), SR, HOP), None
    high = low * 2  # the same melody an octave up
    a, b = pitch_features(low), pitch_features(high)
    assert a.shape == (2, 100)
    assert torch.equal(a[1], (low > 0).float())
    assert torch.allclose(a, b, atol=1e-5)  # standardised log-F0: the register is gone
    voiced = a[1] > 0
    assert abs(float(a[0, voiced].mean())) < 1e-4 and float(a[0, voiced].std()) > 0.5
    assert torch.equal(a[0, ~voiced], torch.zeros(int((~voiced).sum())))


def test_conversion_moves_the_contour_to_the_target_range():
    source_tracks = [f0_track(_tone(torch.linspace(100., 140., SR)), SR, HOP)]
    target_tracks = [f0_track(_tone(torch.linspace(200., 300., SR)), SR, HOP)]
    source, target = F0Moments.from_tracks(source_tracks), F0Moments.from_tracks(target_tracks)
    converted = convert_f0(source_tracks[0], source, target)
    moved = F0Moments.from_tracks([converted])
    assert moved.mean == pytest.approx(target.mean, abs=1e-6)
    assert moved.std == pytest.approx(target.std, rel=1e-4)
    assert torch.equal(converted > 0, source_tracks[0] > 0)  # unvoiced stays unvoiced
    assert target.median_hz > 2 * source.median_hz * 0.9
    with pytest.raises(ValueError, match="voiced"):
        F0Moments.from_tracks([torch.zeros(10)])


def test_front_end_pitch_is_dc_free_and_cropped_like_the_utterance(tmp_path, tone_corpus,
                                                                    tiny_vqvae_cfg):
    cfg = tiny_vqvae_cfg("mel")["features"]
    front = FrontEnd({**cfg, "normalize": "none"})
    wav = _tone(torch.linspace(110., 220., SR))
    whole = front.pitch(wav)
    assert whole.shape == (2, 100)
    assert torch.allclose(front.pitch(wav + 0.2), whole, atol=1e-4)  # DC removed first
    padded = front.pitch(torch.cat([wav, torch.zeros(SR // 2)]), num_samples=SR)
    assert padded.shape == (2, 150) and torch.equal(padded[:, 100:], torch.zeros(2, 50))
    manifest = tone_corpus(tmp_path, n=2, seconds=2.0)
    rows = read_manifest(manifest)
    spu = 320
    crops = CropDataset(rows, ["alice", "bob"], None, {**cfg, "normalize": "none"},
                        crop_seconds=0.64, sample_rate=SR, samples_per_unit=spu, pitch=(50, 600))
    utts = UtteranceDataset(rows, ["alice", "bob"], None, {**cfg, "normalize": "none"},
                            sample_rate=SR, samples_per_unit=spu, pitch=(50, 600))
    starts = set()
    for epoch in range(3):
        crops.set_epoch(epoch)
        for i in range(2):
            item, full = crops[i], utts[i]
            assert item["pitch"].shape == (2, 64) and full["pitch"].shape == (2, 200)
            # the crop's frames are the whole utterance's at the nearest frame offset
            windows = full["wav"].unfold(0, item["wav"].numel(), 1)
            start = int((windows - item["wav"]).abs().sum(1).argmin())
            first = round(start / HOP)
            starts.add(first)
            assert torch.equal(item["pitch"], full["pitch"][:, first : first + 64])
    assert len(starts) > 1  # crops at several offsets were checked
    batch = collate([utts[0], utts[1]], spu)
    assert batch["pitch"].shape == (2, 2, 200)


def test_pitch_conditioned_model_trains_and_decodes_with_or_without_a_track(tiny_vqvae_cfg):
    cfg = tiny_vqvae_cfg("mel")
    cfg["model"]["pitch"]["enabled"] = True
    torch.manual_seed(0)
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=2)
    B, F = 2, 64
    pitch = torch.stack([pitch_features(f0_track(_tone(torch.linspace(100., 200., 10240)),
                                                 SR, HOP))] * B)
    batch = {"feats": torch.randn(B, 80, F), "speaker": torch.tensor([0, 1]), "pitch": pitch,
             "mask": torch.ones(B, F // 2, dtype=torch.bool)}
    out = model(batch)
    assert float(out["f0"].detach()) > 0 and torch.isfinite(out["loss"])
    # best.pt is chosen on the VQ-VAE's own objective, without the F0 predictor's loss
    assert float(out["criterion"]) == pytest.approx(float((out["loss"] - out["f0"]).detach()), rel=1e-6)
    out["loss"].backward()
    assert model.f0_predictor.conv_in.weight.grad.abs().sum() > 0
    with pytest.raises(KeyError, match="pitch"):
        model({k: v for k, v in batch.items() if k != "pitch"})
    model.eval()
    units = model.encode(batch["feats"])
    given = model.decode(units, batch["speaker"], pitch)
    predicted = model.decode(units, batch["speaker"])
    assert given.shape == predicted.shape == (B, 80, F)
    assert not torch.allclose(given, predicted)  # the track changes the output
    flat = torch.zeros_like(pitch)
    assert not torch.allclose(given, model.decode(units, batch["speaker"], flat))
    condition = model.predict_pitch(units, batch["speaker"])
    assert condition.shape == (B, 2, F) and set(condition[:, 1].unique().tolist()) <= {0.0, 1.0}


def test_wave_model_refuses_the_pitch_condition(tiny_vqvae_cfg):
    cfg = tiny_vqvae_cfg("wave")
    cfg["model"]["pitch"] = {"enabled": True}
    with pytest.raises(ValueError, match="mel model only"):
        build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=2)


def test_synthesizer_decodes_with_the_source_track_in_every_voice(tmp_path, tiny_vqvae):
    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "vq.pt", pitch=True),
                                        {"n_iter": 4})
    wav = _tone(torch.linspace(100., 180., SR))
    units, state = synth.encode_with_state(wav, "alice")
    assert state.pitch.shape == (2, 100)
    own = synth.decode(units, "alice", state=state)
    assert own.shape == (SR,) and torch.isfinite(own).all()
    assert not torch.allclose(own, synth.decode(units, "alice"))  # vs the predicted track
    both = synth.decode(torch.stack([units, units]), ["alice", "bob"], pitch=state.pitch)
    assert both.shape == (2, SR)
    assert torch.allclose(both[0], own, atol=1e-3)  # batched Griffin-Lim: rounding only


def test_quality_figures(tiny_vqvae_cfg):
    cfg = tiny_vqvae_cfg("mel")["features"]
    clean = _tone(torch.linspace(100., 200., SR)) + 0.01 * torch.randn(SR)
    noisy = clean + 0.1 * torch.randn(SR, generator=torch.Generator().manual_seed(1))
    same = quality.score(clean, clean, cfg)
    assert same["stoi"] == pytest.approx(1.0, abs=1e-6) and same["mcd"] == pytest.approx(0.0)
    worse = quality.score(clean, noisy, cfg)
    assert worse["stoi"] < 0.99 and worse["mcd"] > 1.0
    assert quality.score(clean, clean * 0.1, cfg)["mcd"] < 1e-3  # cepstra 1..24: gain-free
    err = quality.f0_error(clean, clean, SR, HOP)
    assert err["voicing_agreement"] == 1.0 and err["f0_cents"] == 0.0
    assert quality.describe({"mcd": 7.1, "stoi": 0.8123}) == "STOI 0.812, MCD 7.10 dB"
    assert quality.means([{"stoi": 0.5, "mcd": 2.0}, {"stoi": 1.0, "mcd": 4.0}]) == \
        {"stoi": 0.75, "mcd": 3.0}


def test_samples_from_a_pitch_model_use_the_predicted_track(tmp_path, tiny_vqvae, tiny_prior):
    from speechvq.prior import load_prior
    from speechvq.synthesis import write_samples

    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "vq.pt", pitch=True),
                                        {"n_iter": 4})
    prior, meta = load_prior(tiny_prior(tmp_path / "prior.pt"))
    rows = write_samples(synth, prior, meta["speakers"], tmp_path / "s", n=2, seconds=0.5,
                         speakers=["alice", "bob"])
    assert len(rows) == 2 and all(Path(r.clips[0].wav).stat().st_size > 1000 for r in rows)


def test_conversion_on_the_page_keeps_the_source_contour(tmp_path, tiny_vqvae, tone_corpus):
    import soundfile as sf

    from speechvq.synthesis import write_resynthesis

    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "vq.pt", pitch=True),
                                        {"n_iter": 4})
    row = read_manifest(tone_corpus(tmp_path, n=1))[0]  # alice
    write_resynthesis(synth, [row], tmp_path / "out", ["bob"], score=False)
    converted = torch.from_numpy(sf.read(tmp_path / "out" / "converted" / "bob" / "utt0.wav",
                                         dtype="float32")[0])
    wav = torch.from_numpy(sf.read(row.path, dtype="float32")[0])
    units, state = synth.encode_with_state(wav, "alice")
    expected = synth.decode(units, "bob", pitch=state.pitch)
    predicted = synth.decode(units, "bob")
    assert (converted - expected).abs().max() < 1e-3  # 16-bit file rounding only
    assert (converted - predicted).abs().max() > 1e-3
