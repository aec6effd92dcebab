"""Speaker-invariance pressure on the encoder: an adversarial speaker classifier (Ganin & Lempitsky
2015's gradient reversal; speaker-adversarial training as in Meng et al. 2018).

A small classifier reads each valid latent frame and learns to name its speaker; between it and
the encoder a gradient-reversal layer flips the gradient's sign, so the same loss that teaches the
classifier teaches the encoder to hide the speaker. The decoder is speaker-conditioned, so the
codes need not carry who speaks: with hundreds of training speakers, what the classifier can still
find in the latents is speaker information the units waste codes on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class _Reverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient is multiplied by ``-scale`` on the way back."""
    return _Reverse.apply(x, float(scale))


class SpeakerAdversary(nn.Module):
    """Frame-level speaker classifier behind a gradient reversal.

    Args:
        dim: latent dimension D.
        n_speakers: number of speaker classes (the decoder's speaker table).
        channels: width of the classifier's hidden layer.
        scale: the reversed gradient's factor reaching the encoder.
    """

    def __init__(self, dim: int, n_speakers: int, channels: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        if n_speakers < 2:
            raise ValueError(f"a speaker adversary needs >= 2 speakers, got {n_speakers}")
        self.scale = float(scale)
        self.net = nn.Sequential(nn.Conv1d(dim, channels, 1), nn.ReLU(),
                                 nn.Conv1d(channels, n_speakers, 1))

    def forward(self, z: torch.Tensor, speaker: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """z: (B, D, U) latents, speaker: (B,) long, mask: (B, U) valid frames -> the classifier's
        mean cross-entropy over valid frames (scalar); the encoder gets its reversed gradient."""
        logits = self.net(reverse_gradient(z.float(), self.scale))  # (B, S, U)
        target = speaker.to(z.device)[:, None].expand(-1, logits.shape[-1])
        nll = F.cross_entropy(logits, target, reduction="none")  # (B, U)
        w = mask.float()
        return (nll * w).sum() / w.sum().clamp_min(1)
