"""Encoders, decoders and the VQ-VAE assembly: shapes, speaker conditioning, jitter, masking,
configs, autocast, a tiny overfit, and rebuilding from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from speechvq.checkpoint import CheckpointError, save_checkpoint
from speechvq.nn.decoder import MelDecoder, MultiResolutionSTFTLoss, WaveDecoder, time_jitter
from speechvq.nn.discriminator import adversarial_losses
from speechvq.nn.encoder import MelEncoder, WaveEncoder
from speechvq.vqvae import VQVAE, build_vqvae, load_vqvae

CONF = Path(__file__).resolve().parents[1] / "conf"
N_MELS = 80


def _quantizer(dim: int = 16, **kw) -> dict:
    """conf/quantizer/ema.yaml at 32 codes of dimension ``dim`` (+ ``kw``)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "quantizer" / "ema.yaml"))
    return {**cfg, "n_codes": 32, "dim": dim, "kmeans_iters": 5, **kw}


def _mel_cfg(jitter: float = 0.5) -> dict:
    return dict(
        kind="mel",
        sample_rate=16000,
        mel_hop=160,
        encoder=dict(
            in_channels=N_MELS,
            channels=32,
            out_channels=16,
            kernel_size=3,
            pre_blocks=1,
            post_blocks=1,
        ),
        decoder=dict(
            in_channels=16,
            channels=32,
            out_channels=N_MELS,
            speaker_dim=8,
            jitter=jitter,
            kernel_size=3,
            pre_blocks=1,
            post_blocks=1,
        ),
        loss_weights=dict(recon=1.0, vq_codebook=1.0, vq_commit=0.25),
    )


def _wave_cfg() -> dict:
    return dict(
        kind="wave",
        sample_rate=16000,
        encoder=dict(
            channels=[8, 8, 16, 16],
            strides=[5, 4, 4, 4],
            out_channels=16,
            kernel_size=7,
            res_blocks=1,
        ),
        decoder=dict(
            in_channels=16,
            channels=[16, 16, 8, 8, 8],
            strides=[4, 4, 4, 5],
            speaker_dim=8,
            jitter=0.5,
            kernel_size=7,
            res_blocks=1,
        ),
        stft_resolutions=[[256, 64, 256], [512, 128, 512]],
        loss_weights=dict(stft=1.0, l1=1.0, vq_codebook=1.0, vq_commit=0.25),
    )


def _batch(num_samples: list[int], n_speakers: int = 3) -> dict:
    """A batch as collate makes it: zero-padded wav/feats, unit mask (B, T // 320)."""
    T = max(num_samples)
    B = len(num_samples)
    wav = torch.zeros(B, T)
    feats = torch.zeros(B, N_MELS, T // 160)
    mask = torch.zeros(B, T // 320, dtype=torch.bool)
    for i, n in enumerate(num_samples):
        wav[i, :n] = 0.1 * torch.randn(n)
        feats[i, :, : n // 160] = torch.randn(N_MELS, n // 160)
        mask[i, : n // 320] = True
    return dict(
        wav=wav,
        feats=feats,
        speaker=torch.arange(B) % n_speakers,
        mask=mask,
        num_samples=torch.tensor(num_samples),
    )


@pytest.mark.parametrize("frames", [1, 2, 7, 100, 101])
def test_mel_encoder_decoder_shapes(frames):
    enc = MelEncoder(N_MELS, 32, 16, 3, 1, 1)
    z = enc(torch.randn(2, N_MELS, frames))
    assert z.shape == (2, 16, frames // 2)
    dec = MelDecoder(16, 32, N_MELS, n_speakers=3, speaker_dim=8, jitter=0.5)
    if frames >= 2:
        assert dec(z, torch.tensor([0, 2])).shape == (2, N_MELS, 2 * (frames // 2))


def test_25_hz_units_stride_4_end_to_end():
    from speechvq.extract import ChunkedEncoder

    cfg = _mel_cfg()
    cfg["encoder"]["stride"] = cfg["decoder"]["stride"] = 4
    torch.manual_seed(0)
    model = build_vqvae(cfg, _quantizer(), n_speakers=3)
    assert (model.unit_rate, model.samples_per_unit, model.downsampling) == (25.0, 640, 4)
    out = model(_batch([16000 + 170, 9000]))
    assert torch.isfinite(out["loss"])
    model.eval()
    x = torch.randn(1, N_MELS, 1003)
    units = model.encode(x)
    assert units.shape == (1, 250)
    assert model.decode(units, torch.tensor([1])).shape == (1, N_MELS, 1000)
    chunked = ChunkedEncoder(model, chunk_seconds=2.0, context_seconds=None,
                             max_batch_seconds=8.0)([x[0]])[0]
    assert torch.equal(torch.as_tensor(chunked), units[0])  # chunking changes nothing
    bad = _mel_cfg()
    bad["encoder"]["stride"] = 4
    with pytest.raises(ValueError, match="decoder.stride"):
        build_vqvae(bad, _quantizer(), n_speakers=3)


@pytest.mark.parametrize("samples", [320, 639, 16000 + 123, 32000])
def test_wave_encoder_decoder_shapes(samples):
    cfg = _wave_cfg()
    enc = WaveEncoder(**cfg["encoder"])
    z = enc(torch.randn(2, samples))
    assert enc.downsampling == 320 and z.shape == (2, 16, samples // 320)
    dec = WaveDecoder(**cfg["decoder"], n_speakers=3)
    assert dec(z, torch.tensor([0, 1])).shape == (2, 320 * (samples // 320))


def test_units_are_local_in_time():
    """Unit j of the mel encoder depends on frames near 2j, 2j+1 only (no global statistics), so
    padding far away cannot change it."""
    torch.manual_seed(0)
    enc = MelEncoder(N_MELS, 32, 16, 3, 1, 2).eval()
    x = torch.randn(1, N_MELS, 60)
    y = x.clone()
    y[..., 40:] = 100.0  # "padding" garbage
    assert torch.allclose(enc(x)[..., :15], enc(y)[..., :15], atol=1e-5)


@pytest.mark.parametrize("cfg", [_mel_cfg, _wave_cfg])
def test_vqvae_forward_odd_lengths_and_named_losses(cfg):
    torch.manual_seed(0)
    model = build_vqvae(cfg(), _quantizer(), n_speakers=3).train()
    out = model(_batch([16000 + 170, 9000]))  # odd lengths, padding in row 2
    names = set(model.loss_weights) | {"loss", "perplexity", "usage", "dead_codes"}
    assert names <= set(out)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    expected = sum(model.loss_weights[k] * out[k] for k in model.loss_weights)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.unit_rate == 50.0 and model.n_codes == 32
    x = _batch([16000 + 170])["feats" if model.kind == "mel" else "wav"]
    indices = model.encode(x)
    assert indices.shape == (1, 50) and indices.dtype == torch.long
    y = model.decode(indices, torch.tensor([1]))
    assert y.shape == ((1, N_MELS, 100) if model.kind == "mel" else (1, 16000))


def test_recon_loss_ignores_padded_frames():
    torch.manual_seed(0)
    model = build_vqvae(_mel_cfg(), _quantizer(), n_speakers=3).eval()
    batch = _batch([16000, 8000])
    y_hat = torch.randn(2, N_MELS, 100)
    mask = batch["mask"]
    clean = model._recon_losses(batch["feats"], y_hat, mask)["recon"]
    noisy = batch["feats"].clone()
    noisy[1, :, 50:] = 1e3  # beyond row 2's valid 50 frames
    assert model._recon_losses(noisy, y_hat, mask)["recon"] == clean
    valid = torch.cat(
        [
            (y_hat[0] - batch["feats"][0]).flatten(),
            (y_hat[1, :, :50] - batch["feats"][1, :, :50]).flatten(),
        ]
    )
    torch.testing.assert_close(clean, valid.pow(2).mean())


def test_speaker_embedding_changes_decoder_output():
    torch.manual_seed(0)
    model = build_vqvae(_mel_cfg(), _quantizer(), n_speakers=3).eval()
    indices = torch.randint(0, 32, (1, 20))
    a = model.decode(indices, torch.tensor([0]))
    b = model.decode(indices, torch.tensor([1]))
    assert not torch.allclose(a, b)
    assert torch.equal(a, model.decode(indices, torch.tensor([0])))


def test_time_jitter_statistics_and_mask():
    torch.manual_seed(0)
    U = 2000
    z = torch.arange(U, dtype=torch.float32).view(1, 1, U).repeat(2, 3, 1)
    mask = torch.ones(2, U, dtype=torch.bool)
    mask[1, 1000:] = False
    out = time_jitter(z, 0.5, mask)
    shift = out[:, 0] - z[:, 0]
    assert set(shift.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert torch.equal(out[:, 0], out[:, 2])  # whole frames move, not single channels
    assert abs((shift[0] != 0).float().mean().item() - 0.5) < 0.05  # p in total
    assert abs((shift[0] == -1).float().mean().item() - 0.25) < 0.05  # p / 2 each side
    assert out[1, 0, :1000].max() <= 999  # valid frames never take from padding ...
    assert torch.equal(out[1, :, 1000:], z[1, :, 1000:])  # ... and padding stays put
    assert torch.equal(time_jitter(z, 0.0), z)


def test_jitter_only_in_training_mode():
    torch.manual_seed(0)
    dec = MelDecoder(16, 32, N_MELS, n_speakers=2, speaker_dim=8, jitter=0.5)
    z, spk = torch.randn(1, 16, 50), torch.tensor([1])
    dec.eval()
    assert torch.equal(dec(z, spk), dec(z, spk))
    dec.train()
    assert not torch.equal(dec(z, spk), dec(z, spk))
    assert torch.equal(dec(z, spk, jitter=False), dec(z, spk, jitter=False))


def test_encode_does_not_touch_the_codebook():
    torch.manual_seed(0)
    model = build_vqvae(_mel_cfg(), _quantizer(), n_speakers=3).train()
    batch = _batch([16000, 16000])
    model(batch)
    before = {k: v.clone() for k, v in model.quantizer.state_dict().items()}
    model.encode(batch["feats"])
    for k, v in model.quantizer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("cfg", [_mel_cfg, _wave_cfg])
def test_bf16_autocast_forward_is_finite(cfg):
    torch.manual_seed(0)
    model = build_vqvae(cfg(), _quantizer(), n_speakers=3).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch([8000, 6400]))
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_tiny_overfit_reduces_loss():
    torch.manual_seed(0)
    model = build_vqvae(_mel_cfg(jitter=0.0), _quantizer(n_codes=64), n_speakers=3).train()
    batch = _batch([4800, 4800])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["recon"].item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_wave_stft_loss_zero_for_identical_and_masked():
    torch.manual_seed(0)
    loss = MultiResolutionSTFTLoss([[256, 64, 256], [512, 128, 512]])
    y = torch.randn(2, 8000)
    assert loss(y, y).item() == pytest.approx(0.0, abs=1e-5)
    assert loss(y + 0.1 * torch.randn_like(y), y).item() > 0.01
    mask = torch.ones(2, 8000, dtype=torch.bool)
    mask[1, 4000:] = False
    garbage = y.clone()
    garbage[1, 4000:] = 5.0
    assert loss(garbage, y, mask).item() == pytest.approx(0.0, abs=1e-5)


def test_configs_compose_and_build():
    """conf/model/*.yaml + conf/quantizer/*.yaml resolve (dims by interpolation) and build."""
    logmel = CONF / "features" / "logmel.yaml"
    features = (
        OmegaConf.load(logmel)
        if logmel.exists()
        else OmegaConf.create(dict(sample_rate=16000, hop_length=160, n_mels=N_MELS))
    )
    for kind in ("mel", "wave"):
        for q in ("ema", "vq"):
            cfg = OmegaConf.create(
                {
                    "features": features,
                    "model": OmegaConf.load(CONF / "model" / f"{kind}.yaml"),
                    "quantizer": OmegaConf.load(CONF / "quantizer" / f"{q}.yaml"),
                }
            )
            model = build_vqvae(cfg.model, cfg.quantizer, n_speakers=2)
            assert model.kind == kind and model.unit_rate == 50.0
            assert model.quantizer.dim == cfg.model.encoder.out_channels
            assert model.quantizer.ema == (q == "ema")


def test_build_errors_name_the_key():
    with pytest.raises(ValueError, match="quantizer.dim"):
        build_vqvae(_mel_cfg(), _quantizer(dim=8), n_speakers=2)
    bad = _mel_cfg()
    bad["loss_weights"]["stft"] = 1.0
    with pytest.raises(ValueError, match="stft"):
        build_vqvae(bad, _quantizer(), n_speakers=2)
    legacy = {**_mel_cfg()}
    legacy["hop_length"] = legacy.pop("mel_hop")  # checkpoints from before the rename
    assert build_vqvae(legacy, _quantizer(), n_speakers=2).mel_hop == 160
    with pytest.raises(ValueError, match="kind"):
        VQVAE("spectrogram", {}, {}, _quantizer(), 2, {}, 16000)


def test_load_vqvae_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = {"model": _mel_cfg(), "quantizer": _quantizer(), "n_speakers": 3}
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=3).train()
    batch = _batch([16000, 12000])
    model(batch)  # k-means init + one EMA step
    meta = {"speakers": ["a", "b", "c"], "unit_rate": 50.0, "n_codes": 32}
    path = tmp_path / "last.pt"
    state = {
        "kind": "vqvae",
        "model_config": cfg,
        "meta": meta,
        "model": model.state_dict(),
        "step": 1,
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "rng": {},
        "best": 1.0,
        "config": {},
    }
    save_checkpoint(path, state)
    loaded, loaded_meta = load_vqvae(path)
    assert loaded_meta.speakers == meta["speakers"] and not loaded.training
    assert (loaded_meta.unit_rate, loaded_meta.n_codes, loaded_meta.kind) == (50.0, 32, "mel")
    assert bool(loaded.quantizer.inited)
    model.eval()
    assert torch.equal(loaded.encode(batch["feats"]), model.encode(batch["feats"]))

    # a checkpoint without the builder kwargs names the missing key and the file
    del state["model_config"]["n_speakers"]
    save_checkpoint(tmp_path / "bad.pt", state)
    with pytest.raises(CheckpointError, match="n_speakers"):
        load_vqvae(tmp_path / "bad.pt")


def test_adversarial_losses_train_each_side_only_and_the_discriminator_learns():
    cfg = _mel_cfg()
    cfg["loss_weights"].update(adv=0.1, fm=1.0, disc=1.0)
    cfg["discriminator"] = {"channels": [4, 8], "kernel_size": 3}
    torch.manual_seed(0)
    model = build_vqvae(cfg, _quantizer(), n_speakers=3).train()
    assert build_vqvae(_mel_cfg(), _quantizer(), n_speakers=3).discriminator is None  # off
    batch = _batch([16000, 9000])  # padding in row 2
    disc, dec = model.discriminator, model.decoder

    def grads(loss: str) -> tuple[bool, bool]:
        model.zero_grad(set_to_none=True)
        model(batch)[loss].backward()
        touched = [any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
                   for m in (disc, dec)]
        return touched[0], touched[1]

    assert grads("disc") == (True, False)  # the discriminator's loss trains it alone
    assert grads("adv") == (False, True)  # the decoder's terms never move the discriminator
    assert grads("fm") == (False, True)
    with torch.no_grad():
        out = model(batch)
    assert float(out["disc"]) > 0 and float(out["fm"]) > 0
    # best.pt is chosen without the terms measured by the (moving) discriminator
    w = model.loss_weights
    torch.testing.assert_close(out["criterion"], (out["loss"] - w["disc"] * out["disc"]
                                                  - w["adv"] * out["adv"]
                                                  - w["fm"] * out["fm"]).detach())
    # trained alone on a fixed pair, the discriminator learns to tell them apart
    real = torch.randn(2, N_MELS, 64)
    fake = torch.zeros_like(real)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    first = float(adversarial_losses(disc, real, fake)["disc"].detach())
    for _ in range(40):
        opt.zero_grad()
        adversarial_losses(disc, real, fake)["disc"].backward()
        opt.step()
    assert float(adversarial_losses(disc, real, fake)["disc"].detach()) < 0.5 * first
