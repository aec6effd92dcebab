"""A Vocos-style neural vocoder: log-mels -> STFT magnitude and phase -> inverse STFT.

Siuzdak (2023), "Vocos: Closing the gap between time-domain and Fourier-based neural vocoders":
every layer runs at the frame rate (100 Hz here) and one inverse STFT makes the samples, so it is
fast on a CPU. ConvNeXt blocks over the frames, then per frame a log-magnitude and a phase (as an
unconstrained angle, ``cos``/``sin``) for each of ``n_fft // 2 + 1`` bins.

Frames follow the front-end's convention: frame ``k`` is centred at ``(k + 0.5) * hop`` samples,
so ``F`` frames make exactly ``F * hop`` samples, aligned with the audio the mels came from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv -> LayerNorm over channels -> pointwise expand, GELU, project -> layer-scaled
    residual. ``x: (B, C, T) -> (B, C, T)``."""

    def __init__(self, channels: int, expansion: int = 3, kernel_size: int = 7) -> None:
        super().__init__()
        self.dwconv = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                                groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.pw1 = nn.Linear(channels, expansion * channels)
        self.pw2 = nn.Linear(expansion * channels, channels)
        self.scale = nn.Parameter(torch.full((channels,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dwconv(x).transpose(1, 2)
        h = self.pw2(F.gelu(self.pw1(self.norm(h))))
        return x + (self.scale * h).transpose(1, 2)


class ISTFTVocoder(nn.Module):
    """Log-mels ``(B, n_mels, F)`` (natural log of mel power, relative to the utterance's level,
    as :class:`speechvq.features.FrontEnd` makes them) -> waveform ``(B, F * hop)``.

    Args:
        n_mels: mel bins of the input.
        hop_length: samples per frame (the front-end's hop).
        n_fft: the inverse STFT's size (and window length); a multiple of ``hop_length``.
        channels, n_blocks: the ConvNeXt trunk.
    """

    def __init__(self, n_mels: int, hop_length: int, n_fft: int = 640, channels: int = 192,
                 n_blocks: int = 6) -> None:
        super().__init__()
        if n_fft % hop_length or n_fft < 2 * hop_length:
            raise ValueError(f"n_fft {n_fft} must be a multiple (>= 2) of hop_length {hop_length}")
        self.n_mels, self.hop_length, self.n_fft = int(n_mels), int(hop_length), int(n_fft)
        self.conv_in = nn.Conv1d(n_mels, channels, 7, padding=3)
        self.norm_in = nn.LayerNorm(channels)
        self.blocks = nn.ModuleList(ConvNeXtBlock(channels) for _ in range(n_blocks))
        self.norm_out = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 2 * (n_fft // 2 + 1))
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def forward(self, logmel: torch.Tensor) -> torch.Tensor:
        """logmel: (B, n_mels, F) -> (B, F * hop) waveform."""
        x = self.conv_in(logmel / 5.0)  # log-mels span about -16..+3: keep activations small
        x = self.norm_in(x.transpose(1, 2)).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm_out(x.transpose(1, 2))).transpose(1, 2)  # (B, 2K, F)
        log_mag, angle = out.float().chunk(2, dim=1)
        mag = torch.exp(log_mag.clamp(max=6.0))
        spec = torch.polar(mag, angle)
        return self._istft(spec)

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        """spec (B, n_fft // 2 + 1, F) -> (B, F * hop), frame k centred at (k + 0.5) * hop."""
        n_frames = spec.shape[-1]
        hop = self.hop_length
        # torch.istft (center=True) centres frame k at k * hop; shift by hop / 2 samples
        wav = torch.istft(spec, self.n_fft, hop, self.n_fft, self.window.to(spec.device),
                          center=True, length=n_frames * hop)
        return F.pad(wav, (hop // 2, 0))[..., : n_frames * hop]


__all__ = ["ConvNeXtBlock", "ISTFTVocoder"]
