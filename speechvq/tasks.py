"""The VQ-VAE as a :class:`speechvq.training.Task`: data from a manifest, model from the configs.

``VQVAETask(cfg)`` takes the resolved ``speechvq-train`` config as plain data (``data``,
``features``, ``model``, ``quantizer``, ``seed``) and builds:

- ``train_set``: random crops of the training manifest (``data.crop_seconds``), normalised
  log-mels for the mel model, waveforms for the wave model;
- ``valid_set``: whole utterances of ``data.valid_manifest`` (or ``None``);
- ``model``: :func:`speechvq.vqvae.build_vqvae` with one speaker embedding per speaker of both
  manifests;
- ``meta``: what every later stage needs to rebuild the pipeline from the checkpoint alone.

Feature statistics come from ``data.stats`` (default: ``stats.json`` beside the manifest, written by
``speechvq-prepare``) or are computed from the training manifest when that file is absent.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from speechvq.data.dataset import UNIT_HOP, CropDataset, UtteranceDataset, collate
from speechvq.data.manifest import ManifestRow, read_manifest, speakers_of
from speechvq.features import (
    FeatureStats,
    FrontEnd,
    augment_mels,
    build_logmel,
    compute_stats,
    mel_centres,
)
from speechvq.vocoder import griffin_lim
from speechvq.vqvae import build_vqvae

log = logging.getLogger(__name__)


class VQVAETask:
    """See the module docstring. ``out_dir`` receives ``stats.json`` when it had to be computed."""

    kind = "vqvae"

    def __init__(self, cfg: Mapping[str, Any], out_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        data, self.features = cfg["data"], _plain(cfg["features"])
        manifest = Path(data["manifest"])
        train_rows = read_manifest(manifest)
        valid_rows = read_manifest(data["valid_manifest"]) if data.get("valid_manifest") else []
        if not train_rows:
            raise ValueError(f"{manifest}: the training manifest lists no utterances")
        self.speakers = speakers_of([*train_rows, *valid_rows])
        unseen = sorted(set(speakers_of(valid_rows)) - set(speakers_of(train_rows)))
        if unseen:
            log.info("%d validation speaker(s) are not in the training manifest (e.g. %s): their "
                     "embeddings stay untrained", len(unseen), unseen[0])
        self.model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=len(self.speakers))
        self.model_config = {"model": _plain(cfg["model"]), "quantizer": _plain(cfg["quantizer"]),
                             "n_speakers": len(self.speakers)}
        mel = self.model.kind == "mel"
        self.stats = _load_stats(data, manifest, train_rows, valid_rows, self.features,
                                 required=mel, out_dir=out_dir, progress=progress)
        sample_rate = int(self.features["sample_rate"])
        feats_cfg = self.features if mel else None
        if int(self.model.samples_per_unit) != UNIT_HOP:
            # the datasets crop, pad and mask in whole 20 ms units of 320 samples
            raise ValueError(
                f"the model has {self.model.samples_per_unit} samples per unit but the datasets "
                f"work in units of {UNIT_HOP} (16 kHz, hop 160, 2x downsampling): "
                "features.hop_length/sample_rate or the wave strides were changed"
            )
        self.train_set = CropDataset(train_rows, self.speakers, self.stats, feats_cfg,
                                     crop_seconds=float(data["crop_seconds"]),
                                     sample_rate=sample_rate, seed=int(cfg["seed"]),
                                     cache_audio=_cache_audio(data.get("cache", False), train_rows))
        self.valid_set = (UtteranceDataset(valid_rows, self.speakers, self.stats, feats_cfg,
                                           sample_rate=sample_rate) if valid_rows else None)
        self.meta = {
            "kind": self.model.kind,
            "speakers": list(self.speakers),
            "stats": self.stats.to_dict() if self.stats is not None else None,
            "features": dict(self.features),
            "sample_rate": sample_rate,
            "frame_rate": float(self.model.frame_rate),
            "n_codes": int(self.model.n_codes),
            "samples_per_unit": int(self.model.samples_per_unit),
            "manifest": str(manifest.resolve()),
            "valid_manifest": (str(Path(data["valid_manifest"]).resolve())
                               if valid_rows else None),
        }
        augment = dict(data.get("augment") or {})
        self.augment = {k: float(augment.get(k, 0.0)) for k in ("warp", "eq", "bandlimit")}
        if mel:  # a band-limited input keeps at least the bins below 3.4 kHz (telephone band)
            centres = mel_centres(build_logmel(self.features))
            self.augment["min_bins"] = int((centres < 3400.0).sum())
        self._media_seconds = float(data["media_seconds"])
        self._media_rows = valid_rows or train_rows
        self._example: dict | None = None
        self._logged_reference = False

    # ---- Task protocol

    def collate(self, items: list) -> dict | None:
        """Dataset items -> ``speechvq.data.dataset.collate`` batch (``None`` if all unreadable)."""
        return collate(items)

    def step(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """The VQ-VAE's own forward: ``loss``, the named losses, perplexity/usage/dead_codes.
        In training, with ``data.augment``, the encoder sees perturbed features
        (:func:`speechvq.features.augment_mels`) and the decoder reconstructs the clean ones."""
        if model.training and "feats" in batch and any(
                self.augment[k] for k in ("warp", "eq", "bandlimit")):
            batch = {**batch, "encoder_input": augment_mels(batch["feats"], **self.augment)}
        return model(batch)

    def log_media(self, model: nn.Module, writer: Any, step: int) -> None:
        """Input vs reconstruction mel image, and the reconstruction as audio (Griffin-Lim for the
        mel model), for one fixed utterance (the first readable validation one), at most
        ``data.media_seconds`` long. The original audio is logged once, as the reference."""
        example = self._media_example()
        if example is None:
            return
        device = next(model.parameters()).device
        batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in example.items()}
        sr = int(self.features["sample_rate"])
        if model.kind == "mel":
            recon = model.reconstruct(batch["feats"], batch["speaker"], batch["mask"])
            target = self._denormalize(batch["feats"][0])
            output = self._denormalize(recon[0])
            audio = griffin_lim(output, self.features)
        else:
            audio = model.reconstruct(batch["wav"], batch["speaker"], batch["mask"])[0]
            logmel = build_logmel(self.features).to(device)
            target, output = logmel(batch["wav"][0]), logmel(audio)
        writer.add_image("media/mel", mel_image(target, output), step, dataformats="HWC")
        writer.add_audio("media/reconstruction", _clip(audio), step, sample_rate=sr)
        if not self._logged_reference:
            writer.add_audio("media/original", _clip(batch["wav"][0]), step, sample_rate=sr)
            if model.kind == "mel":  # what Griffin-Lim alone does to the input: the vocoder's floor
                writer.add_audio("media/original_griffin_lim",
                                 _clip(griffin_lim(target, self.features)), step, sample_rate=sr)
            self._logged_reference = True

    # ---- helpers

    def _media_example(self) -> dict | None:
        if self._example is None:
            dataset = UtteranceDataset(self._media_rows[:20], self.speakers, self.stats,
                                       self.features if self.model.kind == "mel" else None,
                                       sample_rate=int(self.features["sample_rate"]))
            item = next((it for it in (dataset[i] for i in range(len(dataset))) if it), None)
            if item is None:
                return None
            sample_rate = int(self.features["sample_rate"])
            self._example = collate([_trim(item, self._media_seconds, sample_rate)])
        return self._example

    def _denormalize(self, feats: Tensor) -> Tensor:
        """Normalised (n_mels, F) -> natural-log mels, as the front-end normalised the example."""
        front = FrontEnd(self.features, self.stats)
        speaker = self.speakers[int(self._example["speaker"][0])]
        wav = self._example["wav"][0, : int(self._example["num_samples"][0])]
        return front.denormalize(feats.float().cpu(), speaker, front.measure(wav))


def mel_image(target: Tensor, output: Tensor) -> np.ndarray:
    """Two log-mel spectrograms (n_mels, F) stacked as one RGB image (H, W, 3) uint8:
    the input on top, the reconstruction below, on the same colour scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target, output = target.detach().float().cpu(), output.detach().float().cpu()
    lo, hi = float(target.min()), float(target.max())
    fig = Figure(figsize=(8, 5), dpi=80)
    FigureCanvasAgg(fig)
    for i, (title, mel) in enumerate((("input", target), ("reconstruction", output))):
        ax = fig.add_subplot(2, 1, i + 1)
        ax.imshow(mel.numpy(), origin="lower", aspect="auto", vmin=lo, vmax=hi, cmap="magma")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("mel bin")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _load_stats(
    data: Mapping, manifest: Path, train_rows: Sequence[ManifestRow],
    valid_rows: Sequence[ManifestRow], features: Mapping, required: bool,
    out_dir: str | Path | None, progress: bool,
) -> FeatureStats | None:
    """stats.json (checked against the features config), or computed from the training rows;
    speakers it lacks get their own statistics added (speaker normalisation needs them)."""
    path = Path(data["stats"]) if data.get("stats") else manifest.parent / "stats.json"
    if path.exists():
        stats = FeatureStats.load(path)
        stats.check_features(features)
    elif not required:
        return None
    else:
        log.info("%s not found: computing feature statistics from %s (%d utterances)", path,
                 manifest, len(train_rows))
        stats = compute_stats(train_rows, features, progress=progress)
        if out_dir is not None and _is_rank0():
            stats.save(Path(out_dir) / "stats.json")
    if required and features.get("normalize") == "speaker":
        missing = [r for r in [*train_rows, *valid_rows] if r.speaker not in stats.speakers]
        if missing:
            names = sorted({r.speaker for r in missing})
            log.info("%s has no statistics for %d speaker(s) (e.g. %s): computing them", path,
                     len(names), names[0])
            extra = compute_stats(missing, features, progress=progress)
            stats.speakers.update(extra.speakers)
    return stats


# data.cache=auto keeps decoded training audio in memory up to this size (float32 samples)
AUTO_CACHE_BYTES = 2 * 1024**3


def _cache_audio(setting: Any, rows: Sequence[ManifestRow]) -> bool:
    """``data.cache``: true | false | auto (cache when the training audio fits in 2 GiB)."""
    if isinstance(setting, str) and setting.lower() == "auto":
        return sum(r.num_samples for r in rows) * 4 <= AUTO_CACHE_BYTES
    if isinstance(setting, str):
        raise ValueError(f"data.cache must be true, false or auto, got {setting!r}")
    return bool(setting)


def _trim(item: dict, seconds: float, sample_rate: int) -> dict:
    """An utterance item cut to at most ``seconds`` (whole units)."""
    wav = item["wav"]
    n = min(wav.numel(), max(UNIT_HOP, int(seconds * sample_rate) // UNIT_HOP * UNIT_HOP))
    out = {**item, "wav": wav[:n], "num_samples": min(item["num_samples"], n)}
    if "feats" in item:
        out["feats"] = item["feats"][:, : n * item["feats"].shape[-1] // max(wav.numel(), 1)]
    return out


def _clip(wav: Tensor) -> Tensor:
    return wav.detach().float().cpu().clamp(-1.0, 1.0).reshape(-1)


def _is_rank0() -> bool:
    # the task is built before fit() joins the process group: torchrun's env var says the rank
    return int(os.environ.get("RANK", "0")) == 0


def _plain(cfg: Any) -> Any:
    """A plain-container copy of a (possibly OmegaConf) config."""
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        return [_plain(v) for v in cfg]
    return cfg
