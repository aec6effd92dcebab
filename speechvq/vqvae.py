"""The VQ-VAE: encoder -> vector quantizer -> speaker-conditioned decoder.

``VQVAE.forward(batch)`` takes a collated batch (see ``speechvq.data.dataset.collate``) and returns a
dict of named, unweighted losses, ``"loss"`` (their sum weighted by ``loss_weights``) and detached
codebook stats. The loss names are the keys ``loss_weights`` may use:

- mel model: ``recon`` (masked MSE on normalised log-mels), ``vq_codebook``, ``vq_commit``,
  ``cpc`` (contrastive prediction of future latents, :class:`speechvq.nn.cpc.CPCHead`; computed
  only with a non-zero weight), ``spk_adv`` (an adversarial speaker classifier on the latents
  behind a gradient reversal, :class:`speechvq.nn.adversary.SpeakerAdversary`; computed only with
  a non-zero weight), ``mpred`` (masked prediction of cluster targets, HuBERT-style: a linear
  head on the latents names each hidden unit frame's cluster, ``batch["targets"]`` from
  :mod:`speechvq.targets`; computed only with a non-zero weight), ``f0`` (the F0 predictor's
  loss, with ``pitch.enabled``),
  ``adv``, ``fm`` (the decoder's adversarial and feature-matching losses against a
  :class:`speechvq.nn.discriminator.MelDiscriminator`) and ``disc`` (that discriminator's own
  loss), computed only when ``adv`` or ``fm`` has a non-zero weight;
- wave model: ``stft`` (multi-resolution STFT loss), ``l1`` (waveform L1), ``vq_codebook``,
  ``vq_commit``.

A name missing from ``loss_weights`` is reported with weight 0; an unknown name is an error.

The model owns its frame geometry, one name per quantity: ``mel_hop`` (samples per mel frame; mel
model), ``downsampling`` (encoder input frames per unit: mel frames, or samples for the wave
model), ``samples_per_unit`` and ``unit_rate`` (units per second). Datasets, extraction and
synthesis take them from the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from speechvq.checkpoint import VQVAEMeta, load_checkpoint, load_model_state
from speechvq.nn.adversary import SpeakerAdversary
from speechvq.nn.cpc import CPCHead
from speechvq.nn.decoder import F0Predictor, MelDecoder, MultiResolutionSTFTLoss, WaveDecoder
from speechvq.nn.discriminator import MelDiscriminator, adversarial_losses
from speechvq.nn.encoder import MelEncoder, WaveEncoder
from speechvq.nn.quantizer import VectorQuantizer
from speechvq.pitch import F0_MAX, F0_MIN, PITCH_CHANNELS

LOSS_NAMES = {
    "mel": ("recon", "vq_codebook", "vq_commit", "cpc", "spk_adv", "mpred", "f0", "adv", "fm",
            "disc"),
    "wave": ("stft", "l1", "vq_codebook", "vq_commit"),
}
STAT_NAMES = ("perplexity", "usage", "dead_codes")
# losses that train helpers (the F0 predictor, the discriminator, the speaker adversary) or
# measure against a moving adversary: best.pt is chosen on the loss without them (``criterion``)
NOT_CRITERION = ("f0", "disc", "adv", "fm", "spk_adv", "mpred")


def _masked_mean(err: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of err (B, C, T) over valid time steps mask (B, T) and all channels."""
    w = mask.unsqueeze(1).to(err.dtype)
    return (err * w).sum() / (w.sum() * err.shape[1]).clamp(min=1)


class VQVAE(nn.Module):
    """Encoder + quantizer + decoder over log-mels (``kind="mel"``) or waveforms (``"wave"``).

    Args:
        kind: ``"mel"`` or ``"wave"``.
        encoder: kwargs of :class:`MelEncoder` / :class:`WaveEncoder`.
        decoder: kwargs of :class:`MelDecoder` / :class:`WaveDecoder` minus ``n_speakers``.
        quantizer: kwargs of :class:`VectorQuantizer`.
        n_speakers: size of the decoder's speaker table.
        loss_weights: weight per loss name (see the module docstring).
        sample_rate: audio sample rate (Hz), for ``unit_rate``.
        mel_hop: samples per mel frame of the input (mel model only).
        stft_resolutions: ``[[n_fft, hop, win], ...]`` of the wave model's STFT loss (wave model
            only).
        cpc: kwargs of :class:`speechvq.nn.cpc.CPCHead` minus ``dim`` (mel model; used when
            ``loss_weights["cpc"]`` is non-zero).
        pitch: the F0 condition (mel model): ``{"enabled": bool, "f0_min": Hz, "f0_max": Hz,
            "predictor_channels": int}``. Enabled, the decoder takes the batch's ``pitch``
            ``(B, 2, F)`` (:meth:`speechvq.features.FrontEnd.pitch`) and an
            :class:`~speechvq.nn.decoder.F0Predictor` learns it from the units, for decoding
            without a source.
        recon_loss: ``"mse"`` or ``"l1"`` on the normalised log-mels (mel model).
        discriminator: kwargs of :class:`speechvq.nn.discriminator.MelDiscriminator` (mel
            model; built when ``loss_weights`` gives ``adv`` or ``fm`` a non-zero weight).
        speaker_adversary: kwargs of :class:`speechvq.nn.adversary.SpeakerAdversary` minus
            ``dim`` and ``n_speakers`` (mel model; built when ``loss_weights["spk_adv"]`` is
            non-zero).
        targets: the cluster targets of ``mpred`` (:mod:`speechvq.targets`); the model reads
            ``n_clusters`` (the head's classes) and the task the rest (mel model; built when
            ``loss_weights["mpred"]`` is non-zero).
    """

    def __init__(
        self,
        kind: str,
        encoder: Mapping[str, Any],
        decoder: Mapping[str, Any],
        quantizer: Mapping[str, Any],
        n_speakers: int,
        loss_weights: Mapping[str, float],
        sample_rate: int,
        mel_hop: int | None = None,
        stft_resolutions: list[list[int]] | None = None,
        cpc: Mapping[str, Any] | None = None,
        pitch: Mapping[str, Any] | None = None,
        recon_loss: str = "mse",
        discriminator: Mapping[str, Any] | None = None,
        speaker_adversary: Mapping[str, Any] | None = None,
        targets: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if recon_loss not in ("mse", "l1"):
            raise ValueError(f"recon_loss must be 'mse' or 'l1', got {recon_loss!r}")
        self.recon_loss = recon_loss
        pitch = dict(pitch or {})
        self.pitch_enabled = bool(pitch.get("enabled", False))
        if self.pitch_enabled and kind != "mel":
            raise ValueError("the pitch condition (model.pitch.enabled) is for the mel model only")
        self.pitch_range: tuple[float, float] | None = (
            (float(pitch.get("f0_min", F0_MIN)), float(pitch.get("f0_max", F0_MAX)))
            if self.pitch_enabled else None
        )
        if kind not in LOSS_NAMES:
            raise ValueError(f"model kind must be 'mel' or 'wave', got {kind!r}")
        unknown = sorted(set(loss_weights) - set(LOSS_NAMES[kind]))
        if unknown:
            raise ValueError(
                f"unknown loss_weights key(s) {unknown} for the {kind} model; "
                f"known: {list(LOSS_NAMES[kind])}"
            )
        self.kind = kind
        self.loss_weights = {k: float(v) for k, v in loss_weights.items()}
        self.n_speakers = n_speakers
        self.mel_hop: int | None = None
        if kind == "mel":
            if mel_hop is None:
                raise ValueError("the mel model needs mel_hop (the feature hop in samples)")
            self.encoder = MelEncoder(**encoder)
            self.decoder = MelDecoder(**decoder, n_speakers=n_speakers,
                                      pitch_channels=PITCH_CHANNELS if self.pitch_enabled else 0)
            self.mel_hop = int(mel_hop)
            if self.decoder.upsampling != self.encoder.downsampling:
                raise ValueError(f"model.decoder.stride ({self.decoder.upsampling}) must equal "
                                 f"model.encoder.stride ({self.encoder.downsampling})")
        else:
            if not stft_resolutions:
                raise ValueError("the wave model needs stft_resolutions ([[n_fft, hop, win], ...])")
            self.encoder = WaveEncoder(**encoder)
            self.decoder = WaveDecoder(**decoder, n_speakers=n_speakers)
            self.stft_loss = MultiResolutionSTFTLoss(stft_resolutions)
        self.downsampling: int = self.encoder.downsampling
        self.samples_per_unit: int = (self.mel_hop or 1) * self.downsampling
        self.quantizer = VectorQuantizer(**quantizer)
        self.f0_predictor = None
        if self.pitch_enabled:
            self.f0_predictor = F0Predictor(int(encoder["out_channels"]),
                                            int(decoder["speaker_dim"]),
                                            int(pitch.get("predictor_channels", 64)),
                                            upsampling=self.encoder.downsampling)
        self.discriminator = None
        if kind == "mel" and (self.loss_weights.get("adv", 0.0) or self.loss_weights.get("fm", 0.0)):
            self.discriminator = MelDiscriminator(**dict(discriminator or {}))
        self.cpc = None
        if self.loss_weights.get("cpc", 0.0):
            self.cpc = CPCHead(int(self.quantizer.dim), **dict(cpc or {}))
        self.mpred_head = None
        if self.loss_weights.get("mpred", 0.0):
            self.mpred_head = nn.Conv1d(int(self.quantizer.dim),
                                        int(dict(targets or {}).get("n_clusters", 100)), 1)
        self.speaker_adversary = None
        if self.loss_weights.get("spk_adv", 0.0):
            self.speaker_adversary = SpeakerAdversary(int(self.quantizer.dim), n_speakers,
                                                      **dict(speaker_adversary or {}))
        self.sample_rate = sample_rate
        self.unit_rate: float = sample_rate / self.samples_per_unit
        self.n_codes: int = self.quantizer.n_codes

    def _input(self, batch: Mapping[str, Any]) -> torch.Tensor:
        key = "feats" if self.kind == "mel" else "wav"
        if key not in batch:
            raise KeyError(f"the {self.kind} model needs batch[{key!r}]")
        return batch[key]

    def forward(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """batch: ``wav`` (B, T), ``feats`` (B, n_mels, F) [mel], ``speaker`` (B,) long,
        ``mask`` (B, U) bool valid units [optional], ``encoder_input`` (an augmented copy of the
        input, same shape) [optional: the encoder sees it, the decoder still reconstructs the
        clean input], ``pitch`` (B, 2, F) [with ``pitch.enabled``]. Returns
        ``{"loss", "criterion" (the loss without the F0 predictor's: what best.pt is chosen on),
        <losses>, <stats>}``."""
        x = self._input(batch)
        z = self.encoder(batch.get("encoder_input", x))
        B, _, U = z.shape
        mask = batch.get("mask")
        if mask is None:
            mask = torch.ones(B, U, dtype=torch.bool, device=z.device)
        elif mask.shape[-1] < U:
            raise ValueError(f"batch mask has {mask.shape[-1]} units, the encoder made {U}")
        mask = mask[:, :U].to(z.device)
        z_q, _, vq = self.quantizer(z, mask)
        pitch = None
        if self.pitch_enabled:
            if "pitch" not in batch:
                raise KeyError("a model with pitch.enabled needs batch['pitch'] (B, 2, F)")
            pitch = batch["pitch"].to(z.device)
        y_hat = self.decoder(z_q, batch["speaker"], mask, pitch=pitch)
        out = {**self._recon_losses(x, y_hat, mask), "vq_codebook": vq["vq_codebook"]}
        if self.kind == "mel":
            zero = z.new_zeros(())
            out.update(disc=zero, adv=zero, fm=zero)
            if self.discriminator is not None:
                n = y_hat.shape[-1]
                valid = mask.repeat_interleave(n // U, dim=1).unsqueeze(1).to(y_hat.dtype)
                out.update(adversarial_losses(self.discriminator, x[..., :n] * valid,
                                              y_hat * valid))
        out["vq_commit"] = vq["vq_commit"]
        if self.kind == "mel":
            out["cpc"] = self.cpc(z, mask) if self.cpc is not None else z.new_zeros(())
            out["spk_adv"] = (self.speaker_adversary(z, batch["speaker"], mask)
                              if self.speaker_adversary is not None else z.new_zeros(()))
            out["mpred"] = self._mpred(z, batch, mask)
            out["f0"] = z.new_zeros(())
            if self.f0_predictor is not None:
                s = self.decoder.speaker(batch["speaker"]).detach()
                raw = self.f0_predictor(z_q.detach(), s)
                out["f0"] = self.f0_predictor.loss(
                    raw, pitch, mask.repeat_interleave(self.decoder.upsampling, dim=1))
        out["loss"] = sum(self.loss_weights.get(k, 0.0) * out[k] for k in LOSS_NAMES[self.kind])
        # best.pt is chosen on the VQ-VAE's own objective: the F0 predictor (detached inputs)
        # neither shapes the codes nor should decide which codes are kept, and the adversarial
        # terms measure a moving discriminator, not the model
        out["criterion"] = (out["loss"] - sum(self.loss_weights.get(k, 0.0) * out[k]
                                              for k in NOT_CRITERION if k in out)).detach()
        out.update({k: vq[k].detach() for k in STAT_NAMES})
        return out

    def _mpred(self, z: torch.Tensor, batch: Mapping[str, Any], mask: torch.Tensor
               ) -> torch.Tensor:
        """Cross-entropy of the head's cluster predictions on the valid unit frames whose input
        frames were all hidden (``batch["hidden"] (B, F)``, present when masking is on), or on every
        valid unit frame without it; 0 without a head or without ``batch["targets"] (B, U)`` (validation)."""
        if self.mpred_head is None or "targets" not in batch:
            if self.mpred_head is not None and self.training:
                raise KeyError("a model with loss_weights.mpred needs batch['targets'] (B, U)")
            return z.new_zeros(())
        B, _, U = z.shape
        logits = self.mpred_head(z.float())                                   # (B, K, U)
        nll = F.cross_entropy(logits, batch["targets"][:, :U].to(z.device), reduction="none")
        keep = mask
        hidden = batch.get("hidden")
        if hidden is not None:  # (decided by the config, never by a read of the data: no sync)
            ds = self.encoder.downsampling
            units = hidden[:, : U * ds].reshape(B, U, ds).all(-1).to(z.device)
            keep = mask & units
        w = keep.float()
        return (nll * w).sum() / w.sum().clamp_min(1)

    def _recon_losses(
        self, x: torch.Tensor, y_hat: torch.Tensor, mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Reconstruction losses over valid frames (units' mask repeated to the output rate)."""
        n = y_hat.shape[-1]
        step = n // mask.shape[-1]
        valid = mask.repeat_interleave(step, dim=1)
        y_hat = y_hat.float()
        if self.kind == "mel":
            err = y_hat - x[..., :n].float()
            return {"recon": _masked_mean(err.abs() if self.recon_loss == "l1" else err.pow(2),
                                          valid)}
        wav = x[:, :n].float()
        return {
            "stft": self.stft_loss(y_hat, wav, valid),
            "l1": _masked_mean((y_hat - wav).abs().unsqueeze(1), valid),
        }

    @torch.no_grad()
    def encode(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: feats (B, n_mels, F) [mel] or wav (B, T) [wave] -> unit ids (B, U) long,
        U = F // downsampling or T // samples_per_unit. Deterministic: no codebook update, whatever the mode."""
        return self.quantizer.encode(self.encoder(x), mask)

    @torch.no_grad()
    def predict_pitch(self, indices: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """indices: (B, U) long, speaker: (B,) long -> the predicted pitch condition (B, 2, downsampling * U)
        (models with ``pitch.enabled``)."""
        if self.f0_predictor is None:
            raise ValueError("this model has no pitch condition (model.pitch.enabled: false)")
        z_q = self.quantizer.decode(indices)
        raw = self.f0_predictor(z_q, self.decoder.speaker(speaker))
        return F0Predictor.condition(raw)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor, speaker: torch.Tensor,
               pitch: torch.Tensor | None = None) -> torch.Tensor:
        """indices: (B, U) long, speaker: (B,) long -> normalised log-mels
        (B, n_mels, downsampling * U) [mel] or waveform (B, samples_per_unit * U) [wave]. No
        jitter. ``pitch`` (B, 2, downsampling * U): the F0 condition (models with ``pitch.enabled``; default:
        predicted from the units, :meth:`predict_pitch`); ignored by models without it."""
        if self.pitch_enabled and pitch is None:
            pitch = self.predict_pitch(indices, speaker)
        return self.decoder(self.quantizer.decode(indices), speaker, jitter=False,
                            pitch=pitch if self.pitch_enabled else None)

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, speaker: torch.Tensor, mask: torch.Tensor | None = None,
        pitch: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """decode(encode(x), speaker, pitch): resynthesis, or voice conversion with another
        speaker."""
        return self.decode(self.encode(x, mask), speaker, pitch)


def build_vqvae(
    model_cfg: Mapping[str, Any], quantizer_cfg: Mapping[str, Any], n_speakers: int
) -> VQVAE:
    """Build from the (resolved) ``model`` and ``quantizer`` config groups.

    The quantizer's ``dim`` must equal the encoder's ``out_channels`` (the configs interpolate it).
    """
    model_cfg, quantizer_cfg = _plain(model_cfg), _plain(quantizer_cfg)
    if "hop_length" in model_cfg:  # checkpoints written before the key was named mel_hop
        model_cfg["mel_hop"] = model_cfg.pop("hop_length")
    latent = model_cfg.get("encoder", {}).get("out_channels")
    if latent is not None and quantizer_cfg.get("dim") != latent:
        raise ValueError(
            f"quantizer.dim ({quantizer_cfg.get('dim')}) must equal "
            f"model.encoder.out_channels ({latent})"
        )
    return VQVAE(**model_cfg, quantizer=quantizer_cfg, n_speakers=n_speakers)


def _plain(cfg: Any) -> Any:
    """A plain-container copy of a (possibly OmegaConf) config; reading a node resolves its
    interpolations, so no omegaconf import is needed here."""
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        return [_plain(v) for v in cfg]
    return cfg


def load_vqvae(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[VQVAE, VQVAEMeta]:
    """Rebuild a trained VQ-VAE from a checkpoint alone; returns (model in eval mode, meta).

    ``meta`` is the checkpoint's :class:`speechvq.checkpoint.VQVAEMeta` (speakers, statistics,
    features config, frame geometry, ...).
    """
    ckpt = load_checkpoint(
        path,
        kind="vqvae",
        required=("model_config.model", "model_config.quantizer", "model_config.n_speakers"),
        map_location=map_location,
    )
    cfg = ckpt["model_config"]
    model = build_vqvae(cfg["model"], cfg["quantizer"], int(cfg["n_speakers"]))
    load_model_state(model, ckpt, path)
    return model.to(map_location).eval(), VQVAEMeta.from_dict(ckpt["meta"] or {}, model, path)


__all__ = ["VQVAE", "build_vqvae", "load_vqvae", "LOSS_NAMES", "STAT_NAMES"]
