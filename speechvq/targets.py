"""Cluster targets for masked prediction (HuBERT-style; Hsu et al. 2021): every unit frame of a
training crop labelled with a k-means cluster of its features, for the VQ-VAE's ``mpred`` term
(``model.loss_weights.mpred``; the prediction head is in :class:`speechvq.vqvae.VQVAE`).

- ``kind: mfcc`` (iteration 1): MFCC + deltas + delta-deltas at the unit rate, the baseline's
  features (:class:`speechvq.baseline.MfccUnitsFeatures`), standardised, k-means fitted on a
  seeded sample of the training audio (:class:`speechvq.baseline.MfccKmeans`);
- ``kind: checkpoint`` (iteration 2): the encoder latents of a trained VQ-VAE (``checkpoint``),
  k-means fitted on the latents of a seeded sample of the training utterances; its encoder labels
  each crop's clean log-mels during training (it must share this run's features config).

The fitted clusters are saved in the run folder (``targets.npz``): a resumed run, and every DDP
rank, labels crops with the same clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.baseline import MfccKmeans, MfccUnitsFeatures, fit_kmeans
from speechvq.data.manifest import ManifestRow
from speechvq.features import FrontEnd
from speechvq.files import atomic_write
from speechvq.vqvae import load_vqvae

log = logging.getLogger(__name__)

KINDS = ("mfcc", "checkpoint")
TARGETS_FILE = "targets.npz"


class ClusterTargets:
    """``__call__(batch)`` -> the cluster of every unit frame of the batch's crops ``(B, U)`` long.

    ``centroids (K, D)``, ``mean``/``std (D,)``: the k-means in the space it was fitted in (the
    features are standardised with ``mean``/``std`` first). ``kind="mfcc"`` reads ``batch["wav"]
    (B, T)``; ``kind="checkpoint"`` reads ``batch["feats"] (B, n_mels, F)`` through ``teacher``
    (a VQ-VAE encoder).
    """

    def __init__(self, kind: str, centroids: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 features_cfg: Mapping[str, Any], unit_rate: float,
                 teacher: torch.nn.Module | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"model.targets.kind must be one of {KINDS}, not {kind!r}")
        if kind == "checkpoint" and teacher is None:
            raise ValueError("checkpoint targets need the teacher encoder")
        self.kind = kind
        self.centroids = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
        self.mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        self.std = torch.as_tensor(np.asarray(std), dtype=torch.float32)
        self.mfcc = MfccUnitsFeatures(features_cfg, unit_rate, 13, "mean") if kind == "mfcc" else None
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None

    @property
    def n_clusters(self) -> int:
        return len(self.centroids)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, Tensor]) -> Tensor:
        if self.kind == "mfcc":
            x = self.mfcc.batch(batch["wav"])                              # (B, U, D)
        else:
            self.teacher.to(batch["feats"].device)
            x = self.teacher(batch["feats"].float()).transpose(1, 2)      # (B, U, D)
        dev = x.device
        z = (x - self.mean.to(dev)) / self.std.to(dev)
        centroids = self.centroids.to(dev)
        dist = z.pow(2).sum(-1, keepdim=True) - 2 * z @ centroids.T + centroids.pow(2).sum(-1)
        return dist.argmin(-1)

    def save(self, path: str | Path) -> None:
        arrays = {"kind": np.array(self.kind), "centroids": self.centroids.numpy(),
                  "mean": self.mean.numpy(), "std": self.std.numpy()}
        atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


def _sample(rows: Sequence[ManifestRow], frames: int, samples_per_unit: int, seed: int
            ) -> list[ManifestRow]:
    """Rows in a seeded random order until they hold ``frames`` unit frames."""
    picked, total = [], 0
    for i in np.random.default_rng(seed).permutation(len(rows)):
        picked.append(rows[i])
        total += rows[i].num_samples // samples_per_unit
        if total >= frames:
            break
    return picked


def build_targets(cfg: Mapping[str, Any], rows: Sequence[ManifestRow],
                  features_cfg: Mapping[str, Any], front: FrontEnd | None, unit_rate: float,
                  samples_per_unit: int, seed: int, out_dir: str | Path | None = None,
                  progress: bool = True) -> ClusterTargets:
    """The run's targets (``model.targets``): loaded from ``OUT/targets.npz`` when an earlier
    start of this run fitted them, else fitted on ``rows`` and saved there."""
    kind = str(cfg.get("kind", "mfcc"))
    n_clusters, frames = int(cfg.get("n_clusters", 100)), int(cfg.get("max_train_frames", 100_000))
    teacher = None
    if kind == "checkpoint":
        if not cfg.get("checkpoint"):
            raise ValueError("model.targets.kind=checkpoint needs model.targets.checkpoint=PATH")
        model, meta = load_vqvae(cfg["checkpoint"])
        if dict(meta.features) != dict(features_cfg):
            raise ValueError(f"model.targets.checkpoint {cfg['checkpoint']}: trained with another "
                             "features config than this run's")
        teacher = model.encoder
    saved = Path(out_dir) / TARGETS_FILE if out_dir is not None else None
    if saved is not None and saved.exists():
        with np.load(saved) as data:
            if str(data["kind"]) != kind or len(data["centroids"]) != n_clusters:
                raise ValueError(f"{saved}: {data['kind']} targets with {len(data['centroids'])} "
                                 f"clusters, the config asks for {kind} with {n_clusters}; "
                                 "delete it to fit new ones")
            log.info("cluster targets: %s", saved)
            return ClusterTargets(kind, data["centroids"], data["mean"], data["std"], features_cfg,
                                  unit_rate, teacher)
    if kind == "mfcc":
        km = MfccKmeans(features_cfg, unit_rate, n_clusters, max_train_frames=frames, seed=seed)
        km.fit(rows, progress=progress)
        targets = ClusterTargets(kind, km.centroids, km.mean, km.std, features_cfg, unit_rate)
    elif kind == "checkpoint":
        chunks = []
        for row in tqdm(_sample(rows, frames, samples_per_unit, seed), desc="target latents",
                        unit="utt", disable=not progress):
            try:
                wav = load_audio(row.path, front.sample_rate)
            except AudioError as err:
                log.warning("targets: skipping %s", err)
                continue
            with torch.no_grad():
                z = teacher(front(wav, row.speaker).unsqueeze(0))[0].T
            chunks.append(z.numpy())
        if not chunks:
            raise ValueError("targets: no readable training audio")
        x = np.concatenate(chunks).astype(np.float64)
        km = fit_kmeans(x, n_clusters, seed)
        targets = ClusterTargets(kind, km.cluster_centers_, np.zeros(x.shape[1]),
                                 np.ones(x.shape[1]), features_cfg, unit_rate, teacher)
    else:
        raise ValueError(f"model.targets.kind must be one of {KINDS}, not {kind!r}")
    log.info("cluster targets: %s, %d clusters", kind, targets.n_clusters)
    if saved is not None:
        targets.save(saved)
    return targets
