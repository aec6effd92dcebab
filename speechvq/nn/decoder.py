"""Speaker-conditioned decoders (mirrors of the encoders), time jitter and the MR-STFT loss.

The decoders know who is speaking (a learned speaker embedding, concatenated to the latents at the
input and applied as FiLM in every residual block), so the units need not carry the voice: the
bottleneck then spends its bits on what is said.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechvq.nn.encoder import ChannelNorm, activation, strided_conv_geometry


def time_jitter(z: torch.Tensor, p: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Chorowski et al. (2019) time jitter: each latent frame is replaced by its left neighbour
    with probability ``p / 2`` and by its right neighbour with probability ``p / 2`` (so ``p`` in
    total, as in the ZeroSpeech 2020 VQ-VAE), else kept.

    z: (B, D, U); mask: (B, U) bool valid frames (valid frames form a prefix). A neighbour outside
    the sequence or in its padding means the frame is kept; padded frames are never moved.
    """
    B, D, U = z.shape
    if p <= 0 or U < 2:
        return z
    r = torch.rand(B, U, device=z.device)
    shift = (r > 1 - p / 2).long() - (r < p / 2).long()  # -1 / +1 with probability p/2 each
    frames = torch.arange(U, device=z.device)
    index = (frames + shift).clamp(0, U - 1)
    if mask is not None:  # the last valid frame keeps to the valid part; padding stays put
        last = (mask.sum(1, keepdim=True) - 1).clamp(min=0)
        index = torch.where(frames <= last, torch.minimum(index, last), frames)
    return torch.gather(z, 2, index.unsqueeze(1).expand(B, D, U))


def _leaky(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.1)


class FiLMResidualUnit(nn.Module):
    """Pre-norm residual unit whose normalised input is scaled and shifted per speaker (FiLM)."""

    def __init__(self, channels: int, cond_dim: int, kernel_size: int, dilation: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.film.weight)  # start as the identity: scale 1, shift 0
        nn.init.zeros_(self.film.bias)
        padding = dilation * (kernel_size - 1) // 2
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=padding, dilation=dilation)
        self.conv2 = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x: (B, C, T), cond: (B, cond_dim) -> (B, C, T)."""
        scale, shift = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        return x + self.conv2(_leaky(self.conv1(_leaky(h))))


class _Stage(nn.Module):
    """Residual FiLM units with dilations 1, 2, 4, ... (the decoder may use wide context)."""

    def __init__(self, channels: int, cond_dim: int, kernel_size: int, n_blocks: int) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            FiLMResidualUnit(channels, cond_dim, kernel_size, 2**i) for i in range(n_blocks)
        )

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for unit in self.units:
            x = unit(x, cond)
        return x


class _SpeakerDecoder(nn.Module):
    """Shared front: speaker table, jitter, latents ++ speaker embedding (++ the pitch condition
    averaged to the unit rate, with ``pitch_channels``) -> ``channels``; a subclass's
    ``body(hidden, embedding, pitch)`` makes the output from there."""

    def __init__(
        self, in_channels: int, channels: int, n_speakers: int, speaker_dim: int, jitter: float,
        pitch_channels: int = 0,
    ) -> None:
        super().__init__()
        self.jitter = jitter
        self.pitch_channels = int(pitch_channels)
        self.speaker = nn.Embedding(n_speakers, speaker_dim)
        self.conv_in = nn.Conv1d(in_channels + speaker_dim + self.pitch_channels, channels, 3,
                                 padding=1)

    def front(
        self,
        z: torch.Tensor,
        speaker: torch.Tensor,
        mask: torch.Tensor | None,
        jitter: bool | None,
        pitch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (B, D, U), speaker: (B,) long, pitch: (B, P, r * U) at the output frame rate ->
        (hidden (B, channels, U), embedding (B, S))."""
        if self.training if jitter is None else jitter:
            z = time_jitter(z, self.jitter, mask)
        s = self.speaker(speaker)
        parts = [z, s.unsqueeze(-1).expand(-1, -1, z.shape[-1]).to(z.dtype)]
        if self.pitch_channels:
            if pitch is None or pitch.shape[1] != self.pitch_channels:
                raise ValueError(f"this decoder needs a pitch condition (B, {self.pitch_channels}"
                                 f", frames), got {None if pitch is None else tuple(pitch.shape)}")
            U = z.shape[-1]
            r = max(1, pitch.shape[-1] // U)
            parts.append(F.avg_pool1d(pitch[..., : r * U].to(z.dtype), r) if r > 1
                         else pitch[..., :U].to(z.dtype))
        return self.conv_in(torch.cat(parts, dim=1)), s

    def forward(
        self,
        z: torch.Tensor,
        speaker: torch.Tensor,
        mask: torch.Tensor | None = None,
        jitter: bool | None = None,
        pitch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """z: (B, D, U), speaker: (B,) long, mask: (B, U), pitch: (B, 2, 2U) (decoders built
        with ``pitch_channels``) -> the decoder's output: mels (B, out_channels, 2U) or a
        waveform (B, U * prod(strides)).

        ``jitter``: apply time jitter (default: in training mode only).
        """
        x, s = self.front(z, speaker, mask, jitter, pitch)
        return self.body(x, s, pitch)

    def body(self, x: torch.Tensor, s: torch.Tensor, pitch: torch.Tensor | None = None
             ) -> torch.Tensor:
        raise NotImplementedError


class MelDecoder(_SpeakerDecoder):
    """Latents at 100 / ``stride`` Hz (50 Hz by default) + speaker -> normalised log-mels at 100 Hz.

    conv_in -> ``pre_blocks`` FiLM units at the unit rate -> transposed conv x ``stride`` ->
    ``post_blocks`` FiLM
    units at 100 Hz -> norm, activation, 1x1 conv to ``out_channels`` mels. With
    ``pitch_channels`` the pitch condition (F0 and voicing at 100 Hz) enters twice: averaged to
    50 Hz at the input, and through a conv added after the upsampling (so the harmonics can
    follow the contour frame by frame).
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        out_channels: int,
        n_speakers: int,
        speaker_dim: int,
        jitter: float,
        kernel_size: int = 3,
        pre_blocks: int = 2,
        post_blocks: int = 2,
        pitch_channels: int = 0,
        stride: int = 2,
    ) -> None:
        super().__init__(in_channels, channels, n_speakers, speaker_dim, jitter, pitch_channels)
        self.upsampling = int(stride)  # mel frames per unit
        self.pitch_in = (nn.Conv1d(pitch_channels, channels, 3, padding=1) if pitch_channels
                         else None)
        self.pre = _Stage(channels, speaker_dim, kernel_size, pre_blocks)
        kernel, padding = strided_conv_geometry(self.upsampling)
        self.up = nn.ConvTranspose1d(channels, channels, kernel, stride=self.upsampling,
                                     padding=padding)
        self.post = _Stage(channels, speaker_dim, kernel_size, post_blocks)
        self.conv_out = nn.Sequential(
            ChannelNorm(channels), activation(), nn.Conv1d(channels, out_channels, 1)
        )

    def body(self, x: torch.Tensor, s: torch.Tensor, pitch: torch.Tensor | None = None
             ) -> torch.Tensor:
        """hidden (B, channels, U), speaker embedding (B, S), pitch (B, P, stride * U) -> mels
        (B, out_channels, stride * U)."""
        x = self.up(self.pre(x, s))
        if self.pitch_in is not None:
            p = pitch[..., : x.shape[-1]].to(x.dtype)
            x = x + self.pitch_in(F.pad(p, (0, x.shape[-1] - p.shape[-1])))
        return self.conv_out(self.post(x, s))


class WaveDecoder(_SpeakerDecoder):
    """Latents + speaker -> waveform in [-1, 1]; ``strides`` multiply to the encoder's hop.

    ``channels`` has one more entry than ``strides``: ``channels[0]`` is the width after the
    input conv and stage ``i`` (FiLM residual units at width ``channels[i]``, then a transposed
    conv by ``strides[i]``) outputs ``channels[i + 1]``. Then norm, activation, a conv to one
    channel and tanh; as in the encoder only that last part runs at the full sample rate.
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        strides: list[int],
        n_speakers: int,
        speaker_dim: int,
        jitter: float,
        kernel_size: int = 7,
        res_blocks: int = 1,
    ) -> None:
        if len(channels) != len(strides) + 1:
            raise ValueError(f"channels {channels} needs one entry more than strides {strides}")
        super().__init__(in_channels, channels[0], n_speakers, speaker_dim, jitter)
        self.stages = nn.ModuleList(
            _Stage(c, speaker_dim, kernel_size, res_blocks) for c in channels[:-1]
        )
        self.ups = nn.ModuleList()
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides, strict=True):
            kernel, padding = strided_conv_geometry(stride)
            self.ups.append(
                nn.Sequential(
                    ChannelNorm(c_in),
                    activation(),
                    nn.ConvTranspose1d(c_in, c_out, kernel, stride=stride, padding=padding),
                )
            )
        self.conv_out = nn.Sequential(
            ChannelNorm(channels[-1]),
            activation(),
            nn.Conv1d(channels[-1], 1, kernel_size, padding=kernel_size // 2),
            nn.Tanh(),
        )

    def body(self, x: torch.Tensor, s: torch.Tensor, pitch: torch.Tensor | None = None
             ) -> torch.Tensor:
        """hidden (B, channels[0], U), speaker embedding (B, S) -> wav (B, U * prod(strides))."""
        for stage, up in zip(self.stages, self.ups, strict=True):
            x = up(stage(x, s))
        return self.conv_out(x).squeeze(1)


class F0Predictor(nn.Module):
    """Units + speaker -> the pitch condition, for decoding without a source F0 (prior samples,
    ``speak(units)``): quantised latents ``(B, D, U)`` and a speaker embedding ``(B, S)`` ->
    ``(B, 2, upsampling * U)``: standardised log-F0 and a voicing logit at the mel frame rate.

    Trained beside the VQ-VAE on detached inputs (it never shapes the codes): MSE on voiced frames
    plus voicing cross-entropy (:meth:`loss`).
    """

    def __init__(self, in_channels: int, speaker_dim: int, channels: int = 64,
                 kernel_size: int = 5, n_blocks: int = 3, upsampling: int = 2) -> None:
        super().__init__()
        self.upsampling = int(upsampling)  # mel frames per unit
        self.conv_in = nn.Conv1d(in_channels + speaker_dim, channels, kernel_size,
                                 padding=kernel_size // 2)
        self.stage = _Stage(channels, speaker_dim, 3, n_blocks)
        kernel, padding = strided_conv_geometry(self.upsampling)
        self.up = nn.ConvTranspose1d(channels, channels, kernel, stride=self.upsampling,
                                     padding=padding)
        self.conv_out = nn.Sequential(ChannelNorm(channels), activation(),
                                      nn.Conv1d(channels, 2, 3, padding=1))

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """z: (B, D, U), s: (B, S) -> (B, 2, upsampling * U) raw outputs (log-F0 z-score, voicing logit)."""
        x = torch.cat([z, s.unsqueeze(-1).expand(-1, -1, z.shape[-1]).to(z.dtype)], dim=1)
        return self.conv_out(self.up(self.stage(self.conv_in(x), s)))

    @staticmethod
    def condition(raw: torch.Tensor) -> torch.Tensor:
        """Raw outputs (B, 2, F) -> a pitch condition: voiced where the logit is positive, the
        predicted z-score there, 0 elsewhere."""
        voiced = (raw[:, 1:2] > 0).to(raw.dtype)
        return torch.cat([raw[:, :1].clamp(-4, 4) * voiced, voiced], dim=1)

    @staticmethod
    def loss(raw: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """raw, target: (B, 2, F), valid: (B, F) bool -> MSE on voiced valid frames + BCE."""
        n = min(raw.shape[-1], target.shape[-1], valid.shape[-1])
        raw, target, w = raw[..., :n].float(), target[..., :n].float(), valid[..., :n].float()
        voiced = target[:, 1] * w
        mse = ((raw[:, 0] - target[:, 0]).pow(2) * voiced).sum() / voiced.sum().clamp(min=1)
        bce = F.binary_cross_entropy_with_logits(raw[:, 1], target[:, 1], reduction="none")
        return mse + (bce * w).sum() / w.sum().clamp(min=1)


class MultiResolutionSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1, averaged over STFT resolutions.

    ``resolutions``: ``[[n_fft, hop_length, win_length], ...]``. With a sample mask, padding is
    zeroed in both signals and only frames whose centre lies in the valid part are scored.
    """

    def __init__(self, resolutions: list[list[int]]) -> None:
        super().__init__()
        self.resolutions = [tuple(int(v) for v in r) for r in resolutions]
        for n_fft, _, win in self.resolutions:
            self.register_buffer(f"window_{n_fft}_{win}", torch.hann_window(win), persistent=False)

    def _magnitude(self, x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        window = getattr(self, f"window_{n_fft}_{win}")
        spec = torch.stft(x, n_fft, hop, win, window, center=True, return_complex=True)
        return spec.abs().clamp(min=1e-7)  # (B, n_fft // 2 + 1, frames)

    def forward(
        self, y_hat: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """y_hat, y: (B, T) waveforms; mask: (B, T) bool valid samples or None -> scalar."""
        with torch.autocast(device_type=y.device.type, enabled=False):
            y_hat, y = y_hat.float(), y.float()
            if mask is not None:
                y_hat, y = y_hat * mask, y * mask
            total = y.new_zeros(())
            for n_fft, hop, win in self.resolutions:
                mag_hat = self._magnitude(y_hat, n_fft, hop, win)
                mag = self._magnitude(y, n_fft, hop, win)
                w = torch.ones_like(mag[:, :1])  # (B, 1, frames)
                if mask is not None:  # frame t is centred on sample t * hop (center=True)
                    centres = (torch.arange(mag.shape[-1], device=y.device) * hop).clamp(
                        max=y.shape[-1] - 1
                    )
                    w = mask[:, centres].unsqueeze(1).to(mag.dtype)
                err = ((mag - mag_hat).pow(2) * w).sum().sqrt()
                sc = err / (mag.pow(2) * w).sum().sqrt().clamp(min=1e-7)
                log_err = ((mag.log() - mag_hat.log()).abs() * w).sum()
                log_l1 = log_err / (w.sum() * mag.shape[1]).clamp(min=1)
                total = total + sc + log_l1
        return total / len(self.resolutions)
