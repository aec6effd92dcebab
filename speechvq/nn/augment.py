"""Perturbations of normalised log-mels for the encoder's input (the decoder sees the clean ones).

Every random draw and every helper tensor is made on the features' own device, so a training step
on a GPU copies nothing from the host and never waits for it. On the CPU the draws are those of
the CPU generator, in the same order as always.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def augment_mels(feats: Tensor, warp: float = 0.0, eq: float = 0.0, bandlimit: float = 0.0,
                 min_bins: int = 0, mask: float = 0.0, mask_span: int = 5,
                 generator: torch.Generator | None = None, return_hidden: bool = False
                 ) -> Tensor | tuple[Tensor, Tensor]:
    """Speaker- and channel-like perturbations of normalised log-mels ``(B, n_mels, F)`` (same
    shape back), for the encoder's input while the decoder reconstructs the clean features.

    ``warp``: each utterance's mel axis is stretched by a factor drawn from ``[1 - warp, 1 + warp]``
    (a vocal-tract-length change, as VTLP); ``eq``: a smooth random curve over the bins (three
    cosines with N(0, eq) amplitudes, in normalised units) is added (a channel's colouring);
    ``bandlimit``: with this probability an utterance loses every bin above a cutoff drawn from
    ``[min_bins, n_mels)`` (set to 0, the value a band-limited recording's empty bins get from
    its own statistics: 8 kHz sources, telephone channels); ``mask``: about this share of each
    utterance's frames is set to 0 (the normalised mean) in spans of ``mask_span`` frames at
    random places (spans may overlap), so the encoder has to infer them from their context while
    the decoder still reconstructs them (masked reconstruction, as TERA / MAE).
    ``generator``: on the features' device (default: that device's global generator).
    ``return_hidden``: also return which frames ``mask`` hid, ``(B, F)`` bool (all False without
    masking), for a loss on the hidden frames.
    """
    if feats.dim() != 3:
        raise ValueError(f"augment_mels expects (B, n_mels, F), got {tuple(feats.shape)}")
    B, n, _ = feats.shape
    dev = feats.device
    out = feats
    hidden = torch.zeros(B, feats.shape[-1], dtype=torch.bool, device=dev)
    if warp > 0:
        alpha = 1.0 + (torch.rand(B, 1, generator=generator, device=dev) * 2 - 1) * warp
        pos = (torch.arange(n, dtype=torch.float32, device=dev)[None, :] * alpha).clamp(0, n - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = (pos - lo.float())[:, :, None].to(feats)
        index = torch.cat([lo, hi], 1)[:, :, None].expand(-1, -1, out.shape[-1])
        low, high = torch.gather(out, 1, index).split(n, dim=1)
        out = low * (1 - frac) + high * frac
    if eq > 0:
        k = torch.arange(1, 4, dtype=torch.float32, device=dev)
        amp = torch.randn(B, 3, generator=generator, device=dev) * eq
        phase = torch.rand(B, 3, generator=generator, device=dev) * 2 * math.pi
        bins = torch.linspace(0, math.pi, n, device=dev)
        curve = (amp[:, :, None] * torch.cos(k[None, :, None] * bins + phase[:, :, None])).sum(1)
        out = out + curve[:, :, None].to(feats)
    if bandlimit > 0:
        cut = torch.randint(min(min_bins, n - 1), n, (B,), generator=generator, device=dev)
        chosen = torch.rand(B, generator=generator, device=dev) < bandlimit
        cut = torch.where(chosen, cut, torch.full_like(cut, n))
        keep = torch.arange(n, device=dev)[None, :] < cut[:, None]
        out = out * keep[:, :, None].to(feats)
    if mask > 0:
        frames = out.shape[-1]
        span = max(1, min(int(mask_span), frames))
        n_spans = max(1, round(mask * frames / span))
        starts = torch.randint(0, frames - span + 1, (B, n_spans), generator=generator, device=dev)
        covered = torch.zeros(B, frames + 1, device=dev)
        ones = torch.ones(B, n_spans, device=dev)
        covered.scatter_add_(1, starts, ones)
        covered.scatter_add_(1, starts + span, -ones)
        hidden = covered.cumsum(1)[:, :frames] > 0
        out = out.masked_fill(hidden[:, None, :], 0.0)
    return (out, hidden) if return_hidden else out
