"""A patch discriminator over log-mel spectrograms, for adversarial and feature-matching losses on
the mel decoder (the decoder's MSE-trained output is the average over what the units leave open,
hence over-smoothed; a discriminator penalises what real spectra never look like).

Only training uses it: it lives in the VQ-VAE so that its weights are saved, resumed and
distributed with the rest, and it is never called to make audio.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class MelDiscriminator(nn.Module):
    """2-D convolutions over (mel bin, frame) patches of normalised log-mels.

    ``forward(mels)`` with mels ``(B, n_mels, F)`` returns ``(scores, features)``: scores
    ``(B, 1, n_mels / 2^L, F / 2^L)`` (one per patch, LSGAN targets 1 real / 0 fake) and the
    output of every hidden layer (for feature matching). Each hidden layer halves both axes.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), kernel_size: int = 3) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.layers = nn.ModuleList()
        c_in = 1
        for c in channels:
            self.layers.append(nn.Conv2d(c_in, int(c), kernel_size, stride=2, padding=pad))
            c_in = int(c)
        self.out = nn.Conv2d(c_in, 1, kernel_size, padding=pad)

    def forward(self, mels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """mels: (B, n_mels, F) -> (scores (B, 1, H, W), [hidden features])."""
        x = mels.unsqueeze(1)
        feats = []
        for layer in self.layers:
            x = F.leaky_relu(layer(x), 0.2)
            feats.append(x)
        return self.out(x), feats


def adversarial_losses(
    disc: MelDiscriminator, real: torch.Tensor, fake: torch.Tensor
) -> dict[str, torch.Tensor]:
    """LSGAN losses of one batch, all from one backward pass and one optimizer.

    real, fake: (B, n_mels, F) (padding zeroed in both). Returns

    - ``disc``: the discriminator's loss; its gradient reaches only the discriminator (``fake``
      is detached);
    - ``adv``: the decoder's adversarial loss and ``fm``: its feature-matching loss (L1 between
      the discriminator's hidden features of fake and real, per layer, averaged); computed with
      the discriminator's parameters detached, so their gradient reaches only the decoder side.
    """
    real_scores, real_feats = disc(real)
    fake_scores, _ = disc(fake.detach())
    disc_loss = (real_scores - 1).pow(2).mean() + fake_scores.pow(2).mean()
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    g_scores, g_feats = functional_call(disc, frozen, (fake,))
    adv = (g_scores - 1).pow(2).mean()
    fm = torch.stack([(g - r.detach()).abs().mean() for g, r in zip(g_feats, real_feats,
                                                                   strict=True)]).mean()
    return {"disc": disc_loss, "adv": adv, "fm": fm}


__all__ = ["MelDiscriminator", "adversarial_losses"]
