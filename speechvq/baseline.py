"""MFCC + k-means units: the floor every unit evaluation is compared against.

13 MFCCs (``torchaudio.transforms.MFCC``) with deltas and delta-deltas, framed exactly like the
log-mel front-end (same window, hop, mel range, reflect padding and ``center=False``, all read
from the ``features`` config, so frame ``k`` is centred at ``(k + 0.5) * hop / sample_rate``),
pooled over the ``features frame rate / unit frame rate`` (2) frames each unit covers, then
MiniBatchKMeans fitted on a training manifest. The result has the units' frame count and rate, so
every metric compares like with like.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio

log = logging.getLogger(__name__)


class MfccUnitsFeatures:
    """Waveform ``(T,)`` -> MFCC + deltas + delta-deltas at the unit rate: ``(U, D)`` float32.

    ``U = (T // hop) // factor`` with ``factor = features frame rate / unit frame rate`` (an
    integer); ``pool="mean"`` averages the ``factor`` frames of a unit (``D = 3 n_mfcc``),
    ``"stack"`` concatenates them (``D = 3 n_mfcc factor``).
    """

    def __init__(
        self, features_cfg: Mapping[str, Any], frame_rate: float, n_mfcc: int, pool: str
    ) -> None:
        self.sample_rate = int(features_cfg["sample_rate"])
        n_fft, hop = int(features_cfg["n_fft"]), int(features_cfg["hop_length"])
        ratio = self.sample_rate / hop / frame_rate
        if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
            raise ValueError(
                f"unit frame rate {frame_rate} Hz is not the features' {self.sample_rate / hop} Hz "
                "divided by a whole number"
            )
        if pool not in ("mean", "stack"):
            raise ValueError(f"baseline pool must be 'mean' or 'stack', got {pool!r}")
        self.factor, self.pool, self.hop = round(ratio), pool, hop
        self.pad_left = (n_fft - hop) // 2
        self.pad_right = n_fft - hop - self.pad_left
        self.mfcc = torchaudio.transforms.MFCC(
            sample_rate=self.sample_rate,
            n_mfcc=n_mfcc,
            melkwargs={
                "n_fft": n_fft,
                "win_length": int(features_cfg["win_length"]),
                "hop_length": hop,
                "n_mels": int(features_cfg["n_mels"]),
                "f_min": float(features_cfg["f_min"]),
                "f_max": float(features_cfg["f_max"]),
                "center": False,
            },
        )

    @torch.no_grad()
    def __call__(self, wav: torch.Tensor) -> np.ndarray:
        n_frames = wav.shape[-1] // self.hop
        n_units = n_frames // self.factor
        if n_units == 0:
            return np.zeros((0, self.dim), np.float32)
        x = F.pad(wav.float().reshape(1, 1, -1), (self.pad_left, self.pad_right), mode="reflect")
        mfcc = self.mfcc(x[:, 0])[0, :, :n_frames]  # (n_mfcc, F)
        delta = torchaudio.functional.compute_deltas(mfcc)
        feats = torch.cat([mfcc, delta, torchaudio.functional.compute_deltas(delta)])  # (3n, F)
        feats = feats[:, : n_units * self.factor].reshape(feats.shape[0], n_units, self.factor)
        if self.pool == "mean":
            feats = feats.mean(-1)
        else:
            feats = feats.permute(0, 2, 1).reshape(-1, n_units)
        return feats.T.contiguous().numpy().astype(np.float32)

    @property
    def dim(self) -> int:
        n = 3 * self.mfcc.n_mfcc
        return n if self.pool == "mean" else n * self.factor


def _features(rows: Sequence[Any], extractor: MfccUnitsFeatures, desc: str, progress: bool):
    """Yield ``(row, (U, D) features)`` for readable rows; unreadable ones are logged and skipped."""
    for row in tqdm(rows, desc=desc, unit="utt", disable=not progress):
        try:
            wav = load_audio(row.path, extractor.sample_rate)
        except AudioError as err:
            log.warning("baseline: skipping %s", err)
            continue
        yield row, extractor(wav)


class MfccKmeans:
    """MFCC + k-means units: ``fit`` on training utterances, ``transform`` any utterances.

    Args:
        features_cfg: the log-mel ``features`` config (window, hop, mel range, sample rate).
        frame_rate: the unit frame rate to match (50 Hz).
        n_clusters: number of k-means clusters (the evaluated units' number of USED units).
        n_mfcc, pool: see :class:`MfccUnitsFeatures`.
        standardize: scale every feature dimension to zero mean / unit variance (training stats)
            so c0's large range does not dominate the k-means distance.
        max_train_frames: frames the k-means sees at most (a seeded random subset).
        seed: for the subset and the k-means.
    """

    def __init__(
        self,
        features_cfg: Mapping[str, Any],
        frame_rate: float,
        n_clusters: int,
        n_mfcc: int = 13,
        pool: str = "mean",
        standardize: bool = True,
        max_train_frames: int = 200_000,
        seed: int = 0,
    ) -> None:
        self.extractor = MfccUnitsFeatures(features_cfg, frame_rate, n_mfcc, pool)
        self.n_clusters = int(n_clusters)
        self.standardize = standardize
        self.max_train_frames = int(max_train_frames)
        self.seed = int(seed)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.kmeans = None

    def fit(self, rows: Sequence[Any], progress: bool = True) -> MfccKmeans:
        """Fit on manifest ``rows`` (``.path``); reads utterances in a seeded random order until
        ``max_train_frames`` frames are collected."""
        from sklearn.cluster import MiniBatchKMeans

        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(rows))
        total, picked = 0, []
        for i in order:
            picked.append(rows[i])
            total += rows[i].num_samples // (self.extractor.hop * self.extractor.factor)
            if total >= self.max_train_frames:
                break
        chunks = [f for _, f in _features(picked, self.extractor, "baseline fit", progress)]
        if not chunks:
            raise ValueError("baseline: no readable training audio")
        x = np.concatenate(chunks)
        if len(x) > self.max_train_frames:
            x = x[np.sort(rng.choice(len(x), self.max_train_frames, replace=False))]
        if self.standardize:
            self.mean, self.std = x.mean(0), np.maximum(x.std(0), 1e-5)
            x = (x - self.mean) / self.std
        k = min(self.n_clusters, len(x))
        if k < self.n_clusters:
            log.warning("baseline: only %d training frames, using %d clusters", len(x), k)
        self.kmeans = MiniBatchKMeans(
            n_clusters=k, random_state=self.seed, batch_size=4096, n_init=1, max_iter=100
        ).fit(x)
        log.info("baseline: k-means with %d clusters on %d frames", k, len(x))
        return self

    @property
    def centroids(self) -> np.ndarray:
        """The k-means centroids ``(K, D)`` float64, row ``i`` for unit ``i``, in the space the
        k-means distance is computed in (standardised features when ``standardize``)."""
        if self.kmeans is None:
            raise RuntimeError("fit the baseline first")
        return np.asarray(self.kmeans.cluster_centers_, dtype=np.float64)

    def _predict(self, feats: np.ndarray) -> np.ndarray:
        if self.kmeans is None:
            raise RuntimeError("fit the baseline first")
        if not len(feats):
            return np.zeros(0, np.int32)
        if self.standardize:
            feats = (feats - self.mean) / self.std
        return self.kmeans.predict(feats).astype(np.int32)

    def transform_wav(self, wav: torch.Tensor) -> np.ndarray:
        """``wav: (T,)`` -> units ``(U,)`` int32, ``U = T // (hop * factor)`` (320 samples)."""
        return self._predict(self.extractor(wav))

    def transform(self, rows: Sequence[Any], progress: bool = True) -> dict[str, np.ndarray]:
        """Units for every readable manifest row (``.id``, ``.path``): ``{id: (U,) int32}``."""
        return {
            row.id: self._predict(feats)
            for row, feats in _features(rows, self.extractor, "baseline units", progress)
        }
