"""What the fit loop trains (:class:`speechvq.trainer.Task`): the VQ-VAE and the unit prior.

:func:`train_vqvae` and :func:`train_prior` are ``speechvq-train`` and ``speechvq-train-prior``:
a task from plain data, :func:`speechvq.training.fit`, and (prior) the validation perplexity
beside the n-gram baselines. :class:`PriorTask` trains :class:`speechvq.nn.prior.Prior` on unit
sequences (:mod:`speechvq.prior`); the rest of this docstring is about :class:`VQVAETask`.

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
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from speechvq.audio import AudioError
from speechvq.checkpoint import VQVAEMeta
from speechvq.data.dataset import FEATURES_ON, CropDataset, UtteranceDataset, collate
from speechvq.data.manifest import ManifestRow, read_manifest, speakers_of
from speechvq.features import (
    STATE_FILE,
    FeatureStats,
    FrontEnd,
    build_logmel,
    compute_stats,
    mel_centres,
    states_for_rows,
)
from speechvq.files import write_json
from speechvq.nn.augment import augment_mels
from speechvq.prior import (
    UnitSequences,
    build_prior,
    collate_units,
    flat_sequences,
    load_prior,
    ngram_perplexities,
    prior_data,
    prior_model_config,
    sample_units,
    unit_perplexity,
)
from speechvq.runtime import is_main_process, resolve_device, seed_everything
from speechvq.targets import build_targets
from speechvq.trainer import Task as Task  # noqa: F401 (re-exported)
from speechvq.training import fit
from speechvq.units import Units
from speechvq.vocoder import griffin_lim
from speechvq.vqvae import build_vqvae

AUGMENTS = ("warp", "eq", "bandlimit", "mask")  # data.augment keys that switch an augmentation on

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
        self.samples_per_unit = int(self.model.samples_per_unit)  # the datasets' unit
        workers = int((cfg.get("trainer") or {}).get("num_workers", 0))
        self.features_on = _features_on(data.get("features_on", "loader"),
                                        str(cfg.get("device", "auto"))) if mel else "loader"
        self.front = FrontEnd(self.features, self.stats) if mel else None
        self._device_front: FrontEnd | None = None
        states = None
        if mel:
            kept = Path(out_dir) / STATE_FILE if out_dir is not None else None
            corpus_states = Path(data["state"]) if data.get("state") else manifest.parent / STATE_FILE
            states = states_for_rows(train_rows, self.features, self.samples_per_unit,
                                     self.model.pitch_range, [p for p in (kept, corpus_states) if p],
                                     cache=kept if is_main_process() else None,
                                     workers=os.cpu_count() or 1, progress=progress)
        self.train_set = CropDataset(train_rows, self.speakers, self.stats, feats_cfg,
                                     crop_seconds=float(data["crop_seconds"]),
                                     sample_rate=sample_rate,
                                     samples_per_unit=self.samples_per_unit, seed=int(cfg["seed"]),
                                     cache_audio=_cache_audio(data.get("cache", False), train_rows,
                                                              workers),
                                     pitch=self.model.pitch_range, states=states,
                                     features_on=self.features_on,
                                     sampling=str(data.get("crop_sampling", "utterance")),
                                     # the speech check reads the mel front-end's level
                                     speech=float(data.get("crop_speech", 0.0) or 0.0) if mel else 0.0)
        valid_rows = _valid_subset(valid_rows, data.get("valid_seconds"), sample_rate)
        self.valid_set = (UtteranceDataset(valid_rows, self.speakers, self.stats, feats_cfg,
                                           sample_rate=sample_rate,
                                           samples_per_unit=self.samples_per_unit,
                                           pitch=self.model.pitch_range)
                          if valid_rows else None)
        self.meta = VQVAEMeta(
            kind=self.model.kind,
            speakers=list(self.speakers),
            features=dict(self.features),
            stats=self.stats.to_dict() if self.stats is not None else None,
            sample_rate=sample_rate,
            unit_rate=float(self.model.unit_rate),
            n_codes=int(self.model.n_codes),
            samples_per_unit=int(self.model.samples_per_unit),
            manifest=str(manifest.resolve()),
            valid_manifest=str(Path(data["valid_manifest"]).resolve()) if valid_rows else None,
        ).to_dict()
        augment = dict(data.get("augment") or {})
        self.augment = {k: float(augment.get(k, 0.0)) for k in AUGMENTS}
        self.augment["mask_span"] = int(augment.get("mask_span", 5))
        bounds = {"warp": (0.0, 1.0, "in [0, 1)"), "eq": (0.0, math.inf, ">= 0"),
                  "bandlimit": (0.0, 1.0 + 1e-12, "in [0, 1]"), "mask": (0.0, 1.0, "in [0, 1)"),
                  "mask_span": (1.0, math.inf, ">= 1")}
        for key, (low, high, words) in bounds.items():
            if not low <= self.augment[key] < high:
                raise ValueError(f"data.augment.{key} must be {words}, got {self.augment[key]}")
        if mel:  # a band-limited input keeps at least the bins below 3.4 kHz (telephone band)
            centres = mel_centres(build_logmel(self.features))
            self.augment["min_bins"] = int((centres < 3400.0).sum())
        self.targets = None
        if mel and float(cfg["model"].get("loss_weights", {}).get("mpred", 0.0)):
            self.targets = build_targets(
                cfg["model"].get("targets") or {}, train_rows, self.features, self.front,
                self.model.unit_rate, self.samples_per_unit, int(cfg["seed"]),
                out_dir if is_main_process() else None, progress)
        self._media_seconds = float(data["media_seconds"])
        self._media_rows = valid_rows or train_rows
        self._example: dict | None = None
        self._logged_reference = False

    # ---- Task protocol

    def collate(self, items: list) -> dict | None:
        """Dataset items -> ``speechvq.data.dataset.collate`` batch (``None`` if all unreadable)."""
        return collate(items, self.samples_per_unit)

    def step(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """The VQ-VAE's own forward: ``loss``, the named losses, perplexity/usage/dead_codes.
        Crops that left their features to the device get them here, batched
        (:meth:`speechvq.features.FrontEnd.batch`). In training, with ``data.augment``, the
        encoder sees perturbed features (:func:`speechvq.nn.augment.augment_mels`) and the
        decoder reconstructs the clean ones; with ``mpred`` the crops' cluster targets
        (:mod:`speechvq.targets`) and the hidden frames go with them."""
        if "norm" in batch:
            front = self._front_on(batch["wav"].device)
            norm = batch["norm"] if front.mode != "none" else None
            feats = front.batch(batch["wav"], batch["dc"], batch["ref"], batch["num_samples"],
                                *((norm[:, 0], norm[:, 1]) if norm is not None else ()))
            batch = {**batch, "feats": feats}
        if model.training and "feats" in batch and any(
                self.augment[k] for k in AUGMENTS):
            encoder_input, hidden = augment_mels(batch["feats"], **self.augment,
                                                 return_hidden=True)
            batch = {**batch, "encoder_input": encoder_input}
            if self.augment["mask"] > 0:
                batch["hidden"] = hidden
        if model.training and self.targets is not None:  # masked prediction's cluster targets
            batch = {**batch, "targets": self.targets(batch)}
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
            recon = model.reconstruct(batch["feats"], batch["speaker"], batch["mask"],
                                      batch.get("pitch"))
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

    def _front_on(self, device: torch.device) -> FrontEnd:
        """The front-end with its filterbank on ``device`` (made once)."""
        if self._device_front is None or self._device_front.logmel.mel.mel_scale.fb.device != device:
            self._device_front = FrontEnd(self.features, self.stats)
            self._device_front.logmel.to(device)
        return self._device_front

    def _media_example(self) -> dict | None:
        if self._example is None:
            sample_rate = int(self.features["sample_rate"])
            dataset = UtteranceDataset(self._media_rows[:20], self.speakers, self.stats,
                                       self.features if self.model.kind == "mel" else None,
                                       sample_rate=sample_rate,
                                       samples_per_unit=self.samples_per_unit,
                                       pitch=self.model.pitch_range)
            item = next((it for it in (dataset[i] for i in range(len(dataset))) if it), None)
            if item is None:
                return None
            hop = self.samples_per_unit
            self._example = collate([_trim(item, self._media_seconds, sample_rate, hop)], hop)
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
        if out_dir is not None and is_main_process():
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


# data.cache=auto keeps decoded training audio in memory up to this size (float32 samples, all
# copies: each loader worker holds its own)
AUTO_CACHE_BYTES = 2 * 1024**3


def _cache_audio(setting: Any, rows: Sequence[ManifestRow], workers: int = 0) -> bool:
    """``data.cache``: true | false | auto (cache when the training audio, once per loader worker,
    fits in 2 GiB)."""
    if isinstance(setting, str) and setting.lower() == "auto":
        return sum(r.num_samples for r in rows) * 4 * max(1, workers) <= AUTO_CACHE_BYTES
    if isinstance(setting, str):
        raise ValueError(f"data.cache must be true, false or auto, got {setting!r}")
    return bool(setting)


def _features_on(setting: str, device: str) -> str:
    """``data.features_on``: loader | device | auto (device when training on CUDA: the loader
    then only decodes crops; on the CPU the loader's workers make them beside the training)."""
    if setting == "auto":
        return "device" if resolve_device(device).type == "cuda" else "loader"
    if setting not in FEATURES_ON:
        raise ValueError(f"data.features_on must be auto, loader or device, got {setting!r}")
    return setting


def _valid_subset(rows: Sequence[ManifestRow], seconds: float | None,
                  sample_rate: int) -> list[ManifestRow]:
    """At most ``seconds`` of validation audio (``data.valid_seconds``; None: all), utterances
    spread over the manifest by a fixed draw, longest first (batches of similar lengths)."""
    rows = list(rows)
    total = sum(r.num_samples for r in rows) / sample_rate
    if seconds is not None and total > float(seconds):
        picked, budget = [], float(seconds) * sample_rate
        for i in np.random.default_rng(0).permutation(len(rows)):
            if budget < rows[i].num_samples and picked:
                continue
            picked.append(rows[i])
            budget -= rows[i].num_samples
        log.info("validating on %d of %d utterances (%.1f of %.1f min; data.valid_seconds)",
                 len(picked), len(rows), sum(r.num_samples for r in picked) / sample_rate / 60,
                 total / 60)
        rows = picked
    return sorted(rows, key=lambda r: (-r.num_samples, r.id))


def _trim(item: dict, seconds: float, sample_rate: int, samples_per_unit: int) -> dict:
    """An utterance item cut to at most ``seconds`` (whole units)."""
    wav, hop = item["wav"], samples_per_unit
    n = min(wav.numel(), max(hop, int(seconds * sample_rate) // hop * hop))
    out = {**item, "wav": wav[:n], "num_samples": min(item["num_samples"], n)}
    for key in ("feats", "pitch"):
        if key in item:
            out[key] = item[key][:, : n * item[key].shape[-1] // max(wav.numel(), 1)]
    return out


def _clip(wav: Tensor) -> Tensor:
    return wav.detach().float().cpu().clamp(-1.0, 1.0).reshape(-1)


def _plain(cfg: Any) -> Any:
    """A plain-container copy of a (possibly OmegaConf) config."""
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence) and not isinstance(cfg, str):
        return [_plain(v) for v in cfg]
    return cfg


class PriorTask:
    """The prior as a :class:`speechvq.trainer.Task` for :func:`speechvq.training.fit`.

    Args:
        train, valid: id -> frame-level units (int arrays) of each split.
        speaker_of: id -> speaker name for utterances whose speaker is known (others get BOS).
        speakers: the speaker names behind the speaker tokens (saved in the checkpoint meta).
        prior_cfg: the ``prior`` config group (Prior kwargs minus n_codes / n_speakers).
        n_codes: codebook size of the VQ-VAE the units came from.
        max_units: units per training crop / validation window (at most ``block_size``).
        meta: extra plain data for the checkpoint (units file, frame rate, VQ-VAE hash...).
        seed: crops' seed.
    """

    kind = "prior"

    def __init__(self, train: Units, valid: Units, speaker_of: Mapping[str, str],
                 speakers: Sequence[str], prior_cfg: Mapping[str, Any], n_codes: int,
                 max_units: int | None = None, meta: Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        self.speakers = [str(s) for s in speakers]
        self.model = build_prior(prior_cfg, n_codes, len(self.speakers))
        self.model_config = prior_model_config(self.model)
        block = self.model.config.block_size
        self.max_units = min(int(max_units or block), block)
        for split, units in (("train", train), ("valid", valid)):
            flat = flat_sequences(list(units.values()))[0]  # one pass (960 h: 173 M units)
            if not flat.size or (flat.min() >= 0 and flat.max() < n_codes):
                continue
            bad = [i for i, u in units.items() if len(u) and (u.min() < 0 or u.max() >= n_codes)]
            if bad:
                raise ValueError(f"{split} utterance {bad[0]!r} has units outside [0, {n_codes})"
                                 f" ({len(bad)} such utterances)")
        index = {s: i for i, s in enumerate(self.speakers)}

        def leads(ids: Sequence[str]) -> list[int]:
            spk = (index.get(speaker_of.get(i)) for i in ids)  # type: ignore[arg-type]
            return [self.model.speaker_token(s) for s in spk]

        train_ids, valid_ids = sorted(train), sorted(valid)
        self.train_set = UnitSequences([train[i] for i in train_ids], leads(train_ids),
                                       self.max_units, crop=True, seed=seed)
        self.valid_set = UnitSequences([valid[i] for i in valid_ids], leads(valid_ids),
                                       self.max_units, crop=False)
        self.baselines = ngram_perplexities([train[i] for i in train_ids],
                                            [valid[i] for i in valid_ids], n_codes)
        self.meta = {**dict(meta or {}), "speakers": self.speakers, "n_codes": int(n_codes),
                     "baselines": dict(self.baselines),
                     "split": {"train": len(train_ids), "valid": len(valid_ids)}}
        known = sum(1 for i in train_ids if speaker_of.get(i) in index)
        log.info("prior data: %d train / %d valid utterances, %d train units, %d speakers "
                 "(%d train utterances with a speaker token)", len(train_ids), len(valid_ids),
                 sum(len(train[i]) for i in train_ids), len(self.speakers), known)

    def collate(self, items: list) -> dict:
        return collate_units(items)

    def step(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        _, loss = model(batch["idx"], batch["targets"])
        return {"loss": loss}

    def log_media(self, model: nn.Module, writer: Any, step: int) -> None:
        """Exact validation perplexity per unit beside the n-gram baselines, and a short sample."""
        ppl = unit_perplexity(model, self.valid_set)
        writer.add_scalar("valid/perplexity", ppl, step)
        writer.add_scalar("valid/unigram_perplexity", self.baselines["unigram"], step)
        writer.add_scalar("valid/bigram_perplexity", self.baselines["bigram"], step)
        units = sample_units(model, 1, min(100, self.max_units), seed=step)[0].tolist()
        writer.add_text("prior/sample_units", " ".join(map(str, units)), step)


# ------------------------------------------------------------------------------------------------
# the training stages


class TaskError(ValueError):
    """Training data or settings a task cannot be built from; the message names the file."""


def train_vqvae(config: Mapping[str, Any], out_dir: str | Path, resume: bool | str = False
                ) -> tuple[VQVAETask, dict]:
    """``speechvq-train``: a VQ-VAE from the resolved ``conf/train.yaml`` (plain data), trained
    into ``out_dir`` by :func:`speechvq.training.fit`; returns the task and fit's result."""
    seed_everything(int(config["seed"]))  # the same initial weights on every rank
    try:
        task = VQVAETask(config, out_dir=out_dir, progress=is_main_process())
    except (ValueError, AudioError) as err:
        raise TaskError(str(err)) from None
    result = fit(task, config["trainer"], out_dir, resume=resume, seed=int(config["seed"]),
                 device=str(config["device"]), config=config)
    return task, result


@dataclass(frozen=True)
class PriorJob:
    """One ``speechvq-train-prior`` run as plain data (the keys of ``conf/train_prior.yaml``;
    ``manifest`` is ``data.manifest``, ``prior`` and ``trainer`` the groups, ``config`` all)."""

    units: str
    valid_units: str | None
    valid_fraction: float
    manifest: str | None
    vqvae: str | None
    n_codes: int | None
    speaker_tokens: bool
    max_units: int | None
    prior: dict
    trainer: dict
    out_dir: str
    resume: bool | str
    seed: int
    device: str
    config: dict = field(default_factory=dict)


def train_prior(job: PriorJob) -> dict | None:
    """Train the prior of ``job``; on rank 0, the validation perplexity report (written to
    ``OUT/perplexity.json``) of the best checkpoint beside the n-gram baselines, plus ``n_codes``;
    None elsewhere."""
    data = prior_data(job.units, job.valid_units, job.valid_fraction, job.seed, job.manifest,
                      job.vqvae, job.n_codes, job.speaker_tokens)
    torch.manual_seed(job.seed)  # the prior's initial weights
    try:
        task = PriorTask(data.train, data.valid, data.speaker_of, data.speakers, job.prior,
                         data.n_codes, max_units=job.max_units, meta=data.meta, seed=job.seed)
    except ValueError as err:
        raise TaskError(f"{job.units}: {err}") from None
    result = fit(task, job.trainer, job.out_dir, resume=job.resume, seed=job.seed,
                 device=job.device, config=job.config)
    if not is_main_process():
        return None
    best = Path(result["best_path"])
    prior, _ = load_prior(best if best.exists() else result["last"])
    report = {"prior": unit_perplexity(prior, task.valid_set), "bigram": task.baselines["bigram"],
              "unigram": task.baselines["unigram"], "valid_units": task.baselines["units"],
              "valid_utterances": len(data.valid), "checkpoint": str(best),
              "step": result["step"],
              "smoothing": "add-one (Laplace) over the codebook; bigram start context"}
    write_json(Path(job.out_dir) / "perplexity.json", report)
    return {**report, "n_codes": data.n_codes}
