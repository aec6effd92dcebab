"""Mel spectrogram -> waveform for mel decoders: Griffin-Lim through torchaudio.

Every parameter (sample rate, FFT size, window, hop, mel bins, band edges, power, pre-emphasis)
comes from the features config via :func:`speechvq.features.build_logmel`, so the inversion always
matches the front-end that made the features. The phase reconstruction is seeded, so the same
spectrogram and seed give the same waveform.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
import torchaudio
from torch import Tensor

from speechvq.features import build_logmel

PEAK = 0.99  # output louder than this is scaled down so 16-bit files do not clip


def griffin_lim(logmel: Tensor, features_cfg: Mapping, n_iter: int = 32, momentum: float = 0.99,
                seed: int = 0) -> Tensor:
    """Invert denormalised natural-log mels to audio.

    logmel: ``(n_mels, F)`` or ``(B, n_mels, F)`` (the front-end's ``log(clamp(mel, floor))``, i.e.
    after undoing normalisation). Returns ``(F * hop,)`` or ``(B, F * hop)`` float32 audio at the
    features' sample rate, aligned like the front-end (frame ``k`` centred at ``(k + 0.5) * hop``),
    with pre-emphasis undone and peaks above 0.99 scaled down.
    """
    front = build_logmel(features_cfg)
    if logmel.dim() not in (2, 3) or logmel.shape[-2] != front.n_mels:
        raise ValueError(f"expected (n_mels={front.n_mels}, F) or (B, n_mels, F) log-mels, "
                         f"got shape {tuple(logmel.shape)}")
    device = logmel.device
    mel = logmel.detach().float().cpu().exp()
    # The mel filterbank is rank-deficient when narrow low bands get no FFT bin; the SVD-based
    # least-squares driver copes with that where the default QR driver returns garbage.
    inverse_mel = torchaudio.transforms.InverseMelScale(
        n_stft=front.n_fft // 2 + 1, n_mels=front.n_mels, sample_rate=front.sample_rate,
        f_min=front.f_min, f_max=front.f_max, driver="gelsd")
    inverse_mel.fb = front.filterbank.clone()  # exactly the front-end's filters
    spec = inverse_mel(mel).to(device)
    n_frames = logmel.shape[-1]
    # torchaudio's Griffin-Lim centres frame k at k * hop; the front-end centres it at
    # k * hop + (n_fft // 2 - pad_left), so shift by that many samples.
    offset = front.n_fft // 2 - front.pad_left
    length = n_frames * front.hop_length
    gl = torchaudio.transforms.GriffinLim(
        n_fft=front.n_fft, n_iter=n_iter, win_length=front.win_length,
        hop_length=front.hop_length, power=front.power, momentum=momentum,
        length=max(length - offset, 0)).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the initial phases; forked so the caller's RNG is untouched
        wav = gl(spec)
    wav = F.pad(wav, (offset, 0))[..., :length]
    if front.preemphasis:
        # the front-end applied y[n] = x[n] - a x[n-1]; invert with x[n] = y[n] + a x[n-1]
        a = torch.tensor([1.0, -front.preemphasis], device=device)
        b = torch.tensor([1.0, 0.0], device=device)
        wav = torchaudio.functional.lfilter(wav, a, b, clamp=False)
    peak = wav.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8)
    return wav * torch.clamp(PEAK / peak, max=1.0)
