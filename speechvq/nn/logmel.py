"""The log-mel spectrogram: waveform -> mel power and log-mels, exactly framed, in bounded memory.

Pure DSP (no config objects, no files): :func:`speechvq.features.build_logmel` builds
:class:`LogMel` from the ``features`` config, the one place mel parameters are set, and
:class:`speechvq.features.FrontEnd` turns its output into the model's input.

Framing convention: the waveform is pre-emphasised, reflect-padded by ``(n_fft - hop) // 2``
samples on each side and framed with ``center=False``, so mel frame ``k`` is centred at
``(k + 0.5) * hop / sample_rate`` seconds and ``num_frames(T) == T // hop``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor, nn


class LogMel(nn.Module):
    """Waveform to log-mel spectrogram: ``(T,) -> (n_mels, F)`` or ``(B, T) -> (B, n_mels, F)``.

    Keyword arguments are the keys of ``conf/features/logmel.yaml`` (except ``normalize``); build it
    with :func:`speechvq.features.build_logmel` rather than spelling the values out. ``F = T // hop_length``.
    """

    def __init__(
        self,
        sample_rate: int,
        n_fft: int,
        win_length: int,
        hop_length: int,
        n_mels: int,
        f_min: float,
        f_max: float,
        preemphasis: float,
        log_floor: float,
        power: float = 2.0,
    ) -> None:
        super().__init__()
        if win_length > n_fft:
            raise ValueError(f"win_length {win_length} > n_fft {n_fft}")
        if hop_length > n_fft:
            raise ValueError(f"hop_length {hop_length} > n_fft {n_fft}")
        self.sample_rate = int(sample_rate)
        self.n_fft = int(n_fft)
        self.win_length = int(win_length)
        self.hop_length = int(hop_length)
        self.n_mels = int(n_mels)
        self.f_min = float(f_min)
        self.f_max = float(f_max)
        self.preemphasis = float(preemphasis)
        self.log_floor = float(log_floor)
        self.power = float(power)
        # Padding (n_fft - hop) in total makes the frame count exactly T // hop and puts frame k's
        # centre at (k + 0.5) * hop, so mel frames and 50 Hz units line up by construction.
        total_pad = self.n_fft - self.hop_length
        self.pad_left = total_pad // 2
        self.pad_right = total_pad - self.pad_left
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.sample_rate,
            n_fft=self.n_fft,
            win_length=self.win_length,
            hop_length=self.hop_length,
            f_min=self.f_min,
            f_max=self.f_max,
            n_mels=self.n_mels,
            power=self.power,
            center=False,
        )

    @property
    def frame_rate(self) -> float:
        """Mel frames per second (100.0 for a 160-sample hop at 16 kHz)."""
        return self.sample_rate / self.hop_length

    @property
    def filterbank(self) -> Tensor:
        """The mel filterbank, ``(n_fft // 2 + 1, n_mels)`` (for inverting to a linear spectrum)."""
        return self.mel.mel_scale.fb

    def num_frames(self, num_samples: int) -> int:
        """Number of mel frames for ``num_samples`` samples: ``num_samples // hop_length``."""
        return int(num_samples) // self.hop_length

    def mel_power(self, wav: Tensor) -> Tensor:
        """``wav: (T,)`` or ``(B, T)`` -> mel power ``(n_mels, F)`` or ``(B, n_mels, F)``, float32,
        before the log (what :class:`speechvq.features.FrontEnd` measures levels on)."""
        if wav.dim() not in (1, 2):
            raise ValueError(f"LogMel expects (T,) or (B, T) audio, got shape {tuple(wav.shape)}")
        batch_shape = wav.shape[:-1]
        x = wav.reshape(-1, 1, wav.shape[-1]).float()
        n_frames = self.num_frames(x.shape[-1])
        if n_frames == 0:
            return x.new_zeros(*batch_shape, self.n_mels, 0)
        # Features are always fp32, whatever autocast the caller runs under.
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.preemphasis:
                x = torch.cat([x[..., :1], x[..., 1:] - self.preemphasis * x[..., :-1]], dim=-1)
            x = F.pad(x, (self.pad_left, self.pad_right), mode="reflect")
            mel = self.mel(x[:, 0])
        return mel.reshape(*batch_shape, self.n_mels, mel.shape[-1])

    def forward(self, wav: Tensor) -> Tensor:
        """``wav: (T,)`` or ``(B, T)`` -> log-mels ``(n_mels, F)`` or ``(B, n_mels, F)``, float32:
        ``log(clamp(mel_power, log_floor))`` (absolute level; see :class:`speechvq.features.FrontEnd` for the
        level-independent model input)."""
        return torch.log(torch.clamp(self.mel_power(wav), min=self.log_floor))




def chunked_mel_power(logmel: LogMel, wav: Tensor, chunk_frames: int) -> Tensor:
    """``logmel.mel_power(wav)`` for a long ``wav: (T,)`` computed in pieces of ``chunk_frames``
    frames: ``(n_mels, T // hop)``, the same frames as one call (STFT memory stays bounded).

    Each piece is computed over extra samples on both sides, so a kept frame's window never
    touches a piece border (reflect padding, pre-emphasis); frames at the real ends of ``wav``
    are computed from the real ends, as in one call.
    """
    hop = logmel.hop_length
    n_frames = wav.shape[-1] // hop
    if n_frames <= chunk_frames:
        return logmel.mel_power(wav)
    margin = math.ceil(logmel.n_fft / hop) + 1
    out = torch.empty(logmel.n_mels, n_frames)
    for f0 in range(0, n_frames, chunk_frames):
        f1 = min(n_frames, f0 + chunk_frames)
        a, b = max(0, f0 - margin), min(n_frames, f1 + margin)
        piece = wav[a * hop : (wav.shape[-1] if b == n_frames else b * hop)]
        out[:, f0:f1] = logmel.mel_power(piece)[:, f0 - a : f1 - a]
    return out


def mel_centres(logmel: LogMel) -> Tensor:
    """Centre frequency (Hz) of each mel bin of ``logmel``, ``(n_mels,)``."""
    fb = logmel.filterbank  # (n_fft // 2 + 1, n_mels)
    return fb.argmax(0).double() * logmel.sample_rate / logmel.n_fft


