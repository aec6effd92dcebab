"""The speaker adversary (``model.loss_weights.spk_adv``): its classifier learns the speaker, the
encoder is pushed the other way, padding is ignored, and it is off by default."""

from __future__ import annotations

import copy

import pytest
import torch

from speechvq.nn.adversary import SpeakerAdversary, reverse_gradient


def test_reverse_gradient_flips_and_scales_only_the_gradient():
    x = torch.randn(5, requires_grad=True)
    y = reverse_gradient(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, -0.5 * torch.arange(5.0))


def test_adversary_teaches_the_classifier_and_unteaches_the_encoder():
    """One plain gradient step: the classifier's own step lowers its loss, the latents' step
    (what the encoder receives) raises it."""
    torch.manual_seed(0)
    adv = SpeakerAdversary(dim=4, n_speakers=3, channels=8)
    speaker = torch.tensor([0, 1, 2, 0])
    z = (torch.randn(4, 4, 10) + 2 * torch.nn.functional.one_hot(speaker, 4).float()[:, :, None]
         ).requires_grad_(True)
    mask = torch.ones(4, 10, dtype=torch.bool)
    loss = adv(z, speaker, mask)
    loss.backward()
    with torch.no_grad():
        stepped = copy.deepcopy(adv)
        for p, q in zip(stepped.parameters(), adv.parameters(), strict=True):
            p -= 0.5 * q.grad
        assert stepped(z, speaker, mask) < loss  # the classifier descends
        assert adv(z - 0.5 * z.grad, speaker, mask) > loss  # the encoder's gradient ascends it


def test_adversary_ignores_padded_frames():
    torch.manual_seed(0)
    adv = SpeakerAdversary(dim=4, n_speakers=2)
    z = torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 3:] = False
    adv(z, torch.tensor([0, 1]), mask).backward()
    assert z.grad[1, :, 3:].abs().sum() == 0 and z.grad[1, :, :3].abs().sum() > 0
    with pytest.raises(ValueError, match=">= 2 speakers"):
        SpeakerAdversary(dim=4, n_speakers=1)


def test_vqvae_trains_the_adversary_only_when_weighted_and_keeps_it_out_of_best(mel_model_cfg):
    from speechvq.vqvae import build_vqvae

    model_cfg, quantizer = mel_model_cfg
    batch = {"feats": torch.randn(2, 80, 64), "speaker": torch.tensor([0, 1])}
    torch.manual_seed(0)
    plain = build_vqvae(model_cfg, quantizer, n_speakers=2)
    assert plain.speaker_adversary is None and float(plain(batch)["spk_adv"]) == 0.0
    model_cfg.loss_weights.spk_adv = 0.3
    model_cfg.speaker_adversary.scale = 2.0
    model = build_vqvae(model_cfg, quantizer, n_speakers=2)
    assert model.speaker_adversary is not None and model.speaker_adversary.scale == 2.0
    out = model(batch)
    assert float(out["spk_adv"].detach()) > 0
    assert torch.isclose(out["loss"], out["recon"] + 0.25 * out["vq_commit"] + 0.3 * out["spk_adv"])
    assert torch.isclose(out["criterion"], out["loss"] - 0.3 * out["spk_adv"])
    out["loss"].backward()
    head = model.speaker_adversary.net[0].weight.grad
    assert head is not None and head.abs().sum() > 0
