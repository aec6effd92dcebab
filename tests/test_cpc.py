"""The optional contrastive (VQ-CPC) term: finite with padding, trains the encoder, off by default."""

from __future__ import annotations

import math

import torch

from speechvq.nn.cpc import CPCHead


def test_cpc_ignores_padding_and_reaches_the_latents():
    torch.manual_seed(0)
    head = CPCHead(dim=8, context_channels=16, steps=3)
    z = torch.randn(2, 8, 20, requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 12:] = False
    loss = head(z, mask)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and z.grad is not None and torch.isfinite(z.grad).all()
    assert z.grad[1, :, 12:].abs().sum() == 0  # padded frames are neither targets nor contexts
    # a predictable sequence (the future is the past shifted) is learned: the loss falls
    seq = torch.randn(1, 8, 40).repeat(4, 1, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    first = float(head(seq, torch.ones(4, 40, dtype=torch.bool)).detach())
    for _ in range(60):
        opt.zero_grad()
        step_loss = head(seq, torch.ones(4, 40, dtype=torch.bool))
        step_loss.backward()
        opt.step()
    assert float(step_loss.detach()) < 0.5 * first


def test_vqvae_reports_cpc_only_when_weighted(mel_model_cfg):
    from speechvq.vqvae import build_vqvae

    model_cfg, quantizer = mel_model_cfg
    batch = {"feats": torch.randn(2, 80, 64), "speaker": torch.tensor([0, 1])}
    plain = build_vqvae(model_cfg, quantizer, n_speakers=2)
    assert plain.cpc is None and float(plain(batch)["cpc"]) == 0.0
    model_cfg.loss_weights.cpc = 0.5
    with_cpc = build_vqvae(model_cfg, quantizer, n_speakers=2)
    out = with_cpc(batch)
    assert with_cpc.cpc is not None and float(out["cpc"].detach()) > 0
    assert torch.isclose(out["loss"], out["recon"] + 0.25 * out["vq_commit"] + 0.5 * out["cpc"])
