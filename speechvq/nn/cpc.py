"""A contrastive predictive coding term over the encoder's latents (VQ-CPC, van Niekerk et al. 2020).

A causal context network reads the latents up to frame t and predicts the latent at t + k for
k = 1..``steps``; each prediction must pick its true future latent out of the other frames of the
same utterance (InfoNCE). Negatives from the same utterance share its speaker and channel, so only
what changes over time (the phones) helps: the term pushes the latents towards slowly varying,
predictable content, and gives the encoder an objective that needs its context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CPCHead(nn.Module):
    """InfoNCE over future latents.

    Args:
        dim: latent dimension D.
        context_channels: GRU width of the context network.
        steps: how many frames ahead are predicted (one linear predictor per step).
    """

    def __init__(self, dim: int, context_channels: int = 128, steps: int = 4) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"cpc steps must be >= 1, got {steps}")
        self.steps = int(steps)
        self.context = nn.GRU(dim, context_channels, batch_first=True)
        self.predictors = nn.ModuleList(nn.Linear(context_channels, dim) for _ in range(steps))

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: (B, D, U) latents, mask: (B, U) valid frames -> the mean InfoNCE loss (scalar)."""
        z = z.float().transpose(1, 2)  # (B, U, D)
        context, _ = self.context(z)
        losses = []
        for k, predictor in enumerate(self.predictors, start=1):
            if z.shape[1] <= k:
                break
            pred = predictor(context[:, :-k])              # (B, U-k, D)
            target = z[:, k:]                              # (B, U-k, D)
            logits = pred @ target.transpose(1, 2)         # (B, U-k, U-k): row t, column s
            valid = mask[:, k:] & mask[:, :-k]             # both ends real
            logits = logits.masked_fill(~mask[:, k:][:, None, :], -1e4)  # padded futures
            labels = torch.arange(logits.shape[1], device=z.device).expand(logits.shape[0], -1)
            nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            w = valid.flatten().float()
            losses.append((nll * w).sum() / w.sum().clamp_min(1))
        if not losses:
            return z.new_zeros(())
        return torch.stack(losses).mean()
