"""Convolutional encoders from log-mels or raw waveform to 50 Hz latents.

Both encoders are padding-safe: normalisation is per frame (over channels only), so padded frames
of a batch never change the outputs at valid frames beyond a convolution's receptive field. Their
output lengths are exact: ``U = F // 2`` mel frames or ``U = T // downsampling`` samples, and unit
``j`` is centred over the input it covers (mel frames ``2j, 2j+1``; samples ``[320j, 320j+320)``).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def activation() -> nn.Module:
    """The activation of every block (leaky ReLU, as in HiFi-GAN: cheaper than GELU on CPU)."""
    return nn.LeakyReLU(0.1)


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each time step; ``x: (B, C, T)``.

    Unlike BatchNorm/GroupNorm it uses no statistics across time or batch, so zero-padded frames
    cannot leak into the normalisation of valid frames.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.transpose(1, 2)).transpose(1, 2)


class ResidualUnit(nn.Module):
    """``x + conv1x1(act(conv_k(act(norm(x)))))``: a pre-norm residual block, length-preserving."""

    def __init__(self, channels: int, kernel_size: int = 3, dilation: int = 1) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.block = nn.Sequential(
            ChannelNorm(channels),
            activation(),
            nn.Conv1d(channels, channels, kernel_size, padding=padding, dilation=dilation),
            activation(),
            nn.Conv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T) -> (B, C, T)."""
        return x + self.block(x)


def strided_conv_geometry(stride: int) -> tuple[int, int]:
    """(kernel_size, padding) of a stride-``s`` conv whose output has exactly ``T // s`` frames
    centred over the ``s`` inputs it summarises (and, transposed, exactly ``U * s`` outputs).

    Needs ``kernel - 2 * padding == stride``; the kernel spans about two strides for overlap.
    """
    kernel = 2 * stride + stride % 2
    return kernel, (kernel - stride) // 2


def _crop(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Drop trailing frames so the length is a multiple of ``multiple`` (exact output lengths)."""
    usable = x.shape[-1] // multiple * multiple
    return x[..., :usable]


class MelEncoder(nn.Module):
    """Log-mels at 100 Hz -> latents at 100 / ``stride`` Hz (50 Hz by default).

    ``conv_in`` -> ``pre_blocks`` residual units at 100 Hz -> one stride-``stride`` conv (kernel
    ``2 * stride``, so with stride 2 unit ``j`` is centred between mel frames ``2j`` and
    ``2j+1``) -> ``post_blocks`` residual units at the unit rate -> norm, activation, 1x1 conv to
    ``out_channels``. Dilation stays 1 so each unit sees only about 100-200 ms: units should
    describe local (phone-sized) content.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_channels: int,
        kernel_size: int = 3,
        pre_blocks: int = 1,
        post_blocks: int = 2,
        stride: int = 2,
    ) -> None:
        super().__init__()
        if int(stride) < 1:
            raise ValueError(f"the mel encoder's stride must be >= 1, got {stride}")
        self.downsampling = int(stride)  # mel frames per unit
        self.out_channels = out_channels
        self.conv_in = nn.Conv1d(in_channels, channels, kernel_size, padding=kernel_size // 2)
        self.pre = nn.Sequential(*[ResidualUnit(channels, kernel_size) for _ in range(pre_blocks)])
        kernel, padding = strided_conv_geometry(self.downsampling)
        self.down = nn.Conv1d(channels, channels, kernel, stride=self.downsampling,
                              padding=padding)
        self.post = nn.Sequential(
            *[ResidualUnit(channels, kernel_size) for _ in range(post_blocks)]
        )
        self.conv_out = nn.Sequential(
            ChannelNorm(channels), activation(), nn.Conv1d(channels, out_channels, 1)
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats: (B, n_mels, F) -> z: (B, out_channels, F // stride)."""
        feats = _crop(feats, self.downsampling)
        if feats.shape[-1] == 0:  # shorter than one unit: no units (convs reject empty input)
            return feats.new_zeros(feats.shape[0], self.out_channels, 0)
        x = self.conv_in(feats)
        x = self.down(self.pre(x))
        return self.conv_out(self.post(x))


class WaveEncoder(nn.Module):
    """Raw waveform -> latents at ``sample_rate / prod(strides)`` Hz (320 -> 50 Hz at 16 kHz).

    Stage ``i`` is a stride-``strides[i]`` conv to ``channels[i]`` followed by ``res_blocks``
    residual units (dilations 1, 3, 9, ...) at the reduced rate; nothing runs at the full sample
    rate except the first strided conv, which keeps the model trainable on a CPU. Then norm,
    activation and a 1x1 conv to ``out_channels``.
    """

    def __init__(
        self,
        channels: list[int],
        strides: list[int],
        out_channels: int,
        kernel_size: int = 7,
        res_blocks: int = 1,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels {channels} and strides {strides} differ in length")
        self.downsampling = math.prod(strides)  # samples per unit
        self.out_channels = out_channels
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip([1, *channels[:-1]], channels, strides, strict=True):
            kernel, padding = strided_conv_geometry(stride)
            if c_in > 1:  # normalise and activate the previous stage's output
                layers += [ChannelNorm(c_in), activation()]
            layers.append(nn.Conv1d(c_in, c_out, kernel, stride=stride, padding=padding))
            layers += [ResidualUnit(c_out, kernel_size, 3**i) for i in range(res_blocks)]
        self.blocks = nn.Sequential(*layers)
        self.conv_out = nn.Sequential(
            ChannelNorm(channels[-1]), activation(), nn.Conv1d(channels[-1], out_channels, 1)
        )

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        """wav: (B, T) -> z: (B, out_channels, T // downsampling)."""
        wav = _crop(wav, self.downsampling)
        if wav.shape[-1] == 0:  # shorter than one unit: no units (convs reject empty input)
            return wav.new_zeros(wav.shape[0], self.out_channels, 0)
        x = self.blocks(wav.unsqueeze(1))
        return self.conv_out(x)
