"""MFCC + k-means units: the floor every unit evaluation is compared against.

13 MFCCs (``torchaudio.transforms.MFCC``) with deltas and delta-deltas, framed exactly like the
log-mel front-end (same window, hop, mel range, reflect padding and ``center=False``, all read
from the ``features`` config, so frame ``k`` is centred at ``(k + 0.5) * hop / sample_rate``),
pooled over the ``mel frame rate / unit rate`` (2) frames each unit covers, then
MiniBatchKMeans fitted on a training manifest. The result has the units' frame count and rate, so
every metric compares like with like.

:func:`evaluate` is ``speechvq-evaluate``: a unit file's phone purity, cluster purity, PNMI, ABX
(one-hot and code vectors), bitrate and codebook use against phone alignments
(:func:`speechvq.metrics.unit_metrics`), with this baseline's beside them, as a JSON report.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.checkpoint import CheckpointError, checkpoint_hash
from speechvq.data.alignments import load_alignments, match_alignments
from speechvq.data.manifest import ManifestRow, read_manifest
from speechvq.files import write_json
from speechvq.metrics import unit_metrics
from speechvq.units import Sidecar, read_sidecar, read_units
from speechvq.vqvae import load_vqvae

log = logging.getLogger(__name__)


class MfccUnitsFeatures:
    """Waveform ``(T,)`` -> MFCC + deltas + delta-deltas at the unit rate: ``(U, D)`` float32.

    ``U = (T // hop) // factor`` with ``factor = mel frame rate / unit rate`` (an
    integer); ``pool="mean"`` averages the ``factor`` frames of a unit (``D = 3 n_mfcc``),
    ``"stack"`` concatenates them (``D = 3 n_mfcc factor``).
    """

    def __init__(
        self, features_cfg: Mapping[str, Any], unit_rate: float, n_mfcc: int, pool: str
    ) -> None:
        self.sample_rate = int(features_cfg["sample_rate"])
        n_fft, hop = int(features_cfg["n_fft"]), int(features_cfg["hop_length"])
        ratio = self.sample_rate / hop / unit_rate
        if abs(ratio - round(ratio)) > 1e-6 or round(ratio) < 1:
            raise ValueError(
                f"unit rate {unit_rate} Hz is not the features' {self.sample_rate / hop} Hz "
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

    @torch.no_grad()
    def batch(self, wavs: torch.Tensor) -> torch.Tensor:
        """``wavs (B, T)`` -> ``(B, U, D)`` float32 tensor on their device: each row as
        ``__call__`` makes it (up to float rounding), in one pass (training targets,
        :mod:`speechvq.targets`)."""
        self.mfcc = self.mfcc.to(wavs.device)
        rows = wavs.shape[0]
        n_frames = wavs.shape[-1] // self.hop
        n_units = n_frames // self.factor
        if n_units == 0:
            return wavs.new_zeros(rows, 0, self.dim, dtype=torch.float32)
        x = F.pad(wavs.float().reshape(rows, 1, -1), (self.pad_left, self.pad_right),
                  mode="reflect")
        # (B, 1, T): one channel each, so MFCC's 80 dB floor is each row's own (as one by one)
        mfcc = self.mfcc(x)[:, 0, :, :n_frames]  # (B, n_mfcc, F)
        delta = torchaudio.functional.compute_deltas(mfcc)
        feats = torch.cat([mfcc, delta, torchaudio.functional.compute_deltas(delta)], 1)
        feats = feats[..., : n_units * self.factor].reshape(rows, -1, n_units, self.factor)
        if self.pool == "mean":
            feats = feats.mean(-1)
        else:
            feats = feats.permute(0, 1, 3, 2).reshape(rows, -1, n_units)
        return feats.transpose(1, 2).contiguous()

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


def fit_kmeans(x: np.ndarray, k: int, seed: int = 0):
    """``x (N, D)`` -> a fitted ``sklearn`` MiniBatchKMeans with ``min(k, N)`` clusters: the
    baseline's settings (batches of 4096, one initialisation, 100 passes, ``seed``), shared by
    every k-means reference the benchmarks place units against."""
    from sklearn.cluster import MiniBatchKMeans

    return MiniBatchKMeans(n_clusters=min(int(k), len(x)), random_state=seed, batch_size=4096,
                           n_init=1, max_iter=100).fit(x)


class MfccKmeans:
    """MFCC + k-means units: ``fit`` on training utterances, ``transform`` any utterances.

    Args:
        features_cfg: the log-mel ``features`` config (window, hop, mel range, sample rate).
        unit_rate: the units per second to match (50 Hz).
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
        unit_rate: float,
        n_clusters: int,
        n_mfcc: int = 13,
        pool: str = "mean",
        standardize: bool = True,
        max_train_frames: int = 200_000,
        seed: int = 0,
    ) -> None:
        self.extractor = MfccUnitsFeatures(features_cfg, unit_rate, n_mfcc, pool)
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
        self.kmeans = fit_kmeans(x, k, self.seed)
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

# ------------------------------------------------------------------------------------------------
# evaluating a unit file, with this baseline beside it (speechvq-evaluate)

DEFAULT_UNIT_RATE = 50.0


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the file or the setting."""


@dataclass(frozen=True)
class EvalJob:
    """One ``speechvq-evaluate`` run as plain data (the keys of ``conf/evaluate.yaml``).

    ``metrics`` holds :func:`speechvq.metrics.unit_metrics` keyword arguments (silence labels,
    ABX settings); ``baseline`` the ``baseline`` group (``enabled``, ``train_manifest``, MfccKmeans
    settings); ``features`` the front-end config used when the units' sidecar has none; ``config``
    the whole resolved config, kept in the report.
    """

    units: str
    format: str | None
    alignments: str
    tier: str
    out: str | None
    unit_rate: float | None
    n_codes: int | None
    codebook: str | None
    manifest: str | None
    metrics: dict
    baseline: dict
    features: dict
    progress: bool = True
    config: dict = field(default_factory=dict)

    @property
    def out_path(self) -> Path:
        unit_file = Path(self.units)
        return Path(self.out) if self.out else unit_file.with_name(unit_file.name + ".metrics.json")


def evaluate(job: EvalJob) -> dict:
    """Metrics of the units (and of MFCC + k-means with as many clusters), written as JSON to
    ``job.out_path``; returns the report (``metrics``, ``baseline.metrics``, ...)."""
    start = time.perf_counter()
    units, sidecar, alignments, rows = _load(job)
    unit_rate = float(job.unit_rate or sidecar.unit_rate or DEFAULT_UNIT_RATE)
    n_codes = job.n_codes or sidecar.n_codes
    _check_unit_range(job.units, units, n_codes)
    features = sidecar.features or job.features
    ids, alignments = _select(job, units, alignments, rows)
    units = {u: units[u] for u in ids}
    speakers = {r.id: r.speaker for r in rows} if rows is not None else None
    abx = bool(job.metrics.get("abx_modes"))
    if speakers is None and abx:
        log.warning("no data.manifest: ABX needs speakers and is left out")
    codebook, codebook_path = (None, None)
    if speakers is not None and abx:
        codebook, codebook_path = _codebook(job, sidecar)
    if codebook is not None:
        _check_codebook(codebook, units, n_codes)
    metrics = unit_metrics(units, alignments, unit_rate, embeddings=codebook, n_codes=n_codes,
                           speakers=speakers, **job.metrics)
    base = None
    if job.baseline["enabled"]:
        model, base_units = _baseline(job, rows, units, features, unit_rate,
                                      int(metrics["used"]))
        base = {"n_clusters": int(model.kmeans.n_clusters),
                "train_manifest": str(Path(job.baseline["train_manifest"]).resolve()),
                "features": dict(features),
                "metrics": unit_metrics(base_units, alignments, unit_rate,
                                        embeddings=model.centroids,
                                        n_codes=model.kmeans.n_clusters, speakers=speakers,
                                        **job.metrics)}
    report = {
        "units_file": str(Path(job.units).resolve()),
        "alignments": str(Path(job.alignments).resolve()),
        "manifest": str(Path(job.manifest).resolve()) if job.manifest else None,
        "unit_rate": unit_rate, "n_codes": n_codes, "checkpoint_hash": sidecar.checkpoint_hash,
        "codebook": codebook_path, "metrics": metrics, "baseline": base,
        "seconds": round(time.perf_counter() - start, 2), "config": job.config,
    }
    write_json(job.out_path, _jsonable(report))
    return report


# (JSON key, table label, scale, format)
ROWS = [
    ("phone_purity", "phone purity", 1.0, "{:.3f}"),
    ("cluster_purity", "cluster purity", 1.0, "{:.3f}"),
    ("pnmi", "PNMI", 1.0, "{:.3f}"),
    ("abx_within", "ABX within (%)", 100.0, "{:.2f}"),
    ("abx_across", "ABX across (%)", 100.0, "{:.2f}"),
    ("abx_within_codevec", "ABX within, code vectors (%)", 100.0, "{:.2f}"),
    ("abx_across_codevec", "ABX across, code vectors (%)", 100.0, "{:.2f}"),
    ("bitrate", "bitrate (bit/s)", 1.0, "{:.1f}"),
    ("used", "units used", 1.0, "{:.0f}"),
    ("usage", "codebook usage", 1.0, "{:.3f}"),
    ("perplexity", "unit perplexity", 1.0, "{:.1f}"),
    ("frames", "phone frames", 1.0, "{:.0f}"),
    ("utterances", "utterances", 1.0, "{:.0f}"),
]


def format_table(columns: dict[str, dict]) -> str:
    """Metrics side by side: one row per metric, one column per system."""
    names = list(columns)
    width = max(len(label) for _, label, _, _ in ROWS) + 2
    lines = ["metric".ljust(width) + "".join(n.rjust(14) for n in names)]
    for key, label, scale, fmt in ROWS:
        cells = []
        for name in names:
            value = columns[name].get(key)
            ok = isinstance(value, (int, float)) and not math.isnan(value)
            cells.append((fmt.format(value * scale) if ok else "-").rjust(14))
        lines.append(label.ljust(width) + "".join(cells))
    return "\n".join(lines)


def report_table(report: Mapping) -> str:
    """The printed table of an :func:`evaluate` report: units, and the baseline beside them."""
    columns = {"units": report["metrics"]}
    if report.get("baseline"):
        columns["mfcc+kmeans"] = report["baseline"]["metrics"]
    return format_table(columns)


def _jsonable(value):
    """Plain JSON: NaN (an undefined metric) becomes null, numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _example(keys) -> str:
    first = next(iter(keys), None)
    return f"e.g. {first!r}" if first is not None else "none"

def _select(
    job: EvalJob, units: dict, alignments: dict, rows: list[ManifestRow] | None
) -> tuple[list[str], dict]:
    """Ids of the utterances to evaluate and the alignments keyed by utterance id.

    With a manifest, alignment files are matched to its rows by id, audio stem or path
    (:func:`match_alignments`) and only its utterances are kept.
    """
    matched = match_alignments(alignments, rows) if rows is not None else alignments
    ids = [u for u in units if u in matched]
    if not ids:
        raise EvaluationError(
            f"{job.units}: no utterance has both units and an alignment: {len(units)} unit ids "
            f"({_example(units)}), {len(alignments)} alignment files in {job.alignments} "
            f"({_example(alignments)})"
            + (f", {len(rows)} rows in {job.manifest} ({_example(r.id for r in rows)}) of "
               f"which {len(matched)} matched an alignment" if rows is not None else "")
        )
    if len(ids) < len(units):
        log.info("evaluating %d utterances (%d without alignments or not in the manifest)",
                 len(ids), len(units) - len(ids))
    return ids, matched


def load_codebook(path: str | Path) -> np.ndarray:
    """The code vectors ``(K, D)`` of a VQ-VAE checkpoint, as its quantizer looks them up, or of a
    ``.npy`` file holding them (row ``i``: unit ``i``'s vector; another system's codes or
    centroids)."""
    if Path(path).suffix == ".npy":
        try:
            codebook = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: not a readable .npy array ({err})") from None
        if codebook.ndim != 2 or not np.issubdtype(codebook.dtype, np.number) or not len(codebook):
            raise ValueError(f"{path}: a codebook is a (K, D) array of numbers, this one is "
                             f"{codebook.dtype} {codebook.shape}")
        return codebook.astype(np.float64)
    model, _ = load_vqvae(path, map_location="cpu")
    return model.quantizer.decode_codes().double().numpy()


def _codebook(job: EvalJob, sidecar: Sidecar) -> tuple[np.ndarray | None, str | None]:
    """The units' code vectors ``(K, D)`` and their checkpoint, or ``(None, None)`` if unknown.

    ``codebook=PATH`` wins (a failure to load it is an error); else the sidecar's checkpoint,
    skipped with a warning when it is gone or is no longer the file the units came from.
    """
    explicit = bool(job.codebook)
    path = str(job.codebook or sidecar.checkpoint or "")
    if not path:
        log.info("no codebook=... and no checkpoint in the units' sidecar: code-vector ABX is "
                 "left out")
        return None, None
    try:
        changed = sidecar.checkpoint_hash not in (None, checkpoint_hash(path))
        if changed and not explicit:
            log.warning("%s is not the checkpoint the units were extracted with (its hash "
                        "changed): code-vector ABX is left out; pass codebook=PATH", path)
            return None, None
        if changed:
            log.warning("codebook %s: not the checkpoint the units were extracted with", path)
        codebook = load_codebook(path)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        if explicit:
            raise EvaluationError(f"codebook: {err}") from None
        log.warning("code-vector ABX is left out (%s); pass codebook=PATH", err)
        return None, None
    log.info("code vectors: %s codes of dimension %d from %s", *codebook.shape, path)
    return codebook, str(Path(path).resolve())


def _check_codebook(codebook: np.ndarray, units: dict, n_codes: int | None) -> None:
    top = max((int(s.max()) for s in units.values() if len(s)), default=-1)
    if top >= len(codebook):
        raise EvaluationError(f"the units go up to {top} but the codebook has {len(codebook)} codes")
    if n_codes and int(n_codes) != len(codebook):
        log.warning("the units' sidecar says %d codes, the codebook has %d", n_codes,
                    len(codebook))


def _baseline(
    job: EvalJob, rows: list[ManifestRow] | None, units: dict, features: dict,
    unit_rate: float, n_clusters: int,
) -> tuple[MfccKmeans, dict]:
    """MFCC + k-means fitted on ``baseline.train_manifest``; its units for ``units``' ids."""
    settings = job.baseline
    if rows is None or not settings["train_manifest"]:
        raise EvaluationError(
            "the MFCC + k-means baseline needs data.manifest (audio of the evaluated "
            "utterances) and baseline.train_manifest (what k-means is fitted on); or pass "
            "baseline.enabled=false"
        )
    try:
        train_rows = read_manifest(settings["train_manifest"])
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    model = MfccKmeans(
        features, unit_rate, n_clusters,
        n_mfcc=int(settings["n_mfcc"]), pool=str(settings["pool"]),
        standardize=bool(settings["standardize"]),
        max_train_frames=int(settings["max_train_frames"]), seed=int(settings["seed"]),
    )
    try:
        model.fit(train_rows, progress=job.progress)
    except ValueError as err:
        raise EvaluationError(f"{settings['train_manifest']}: {err}") from None
    by_id = {r.id: r for r in rows}
    base_units = model.transform([by_id[u] for u in units], progress=job.progress)
    # the same frames as the units (they agree by construction; guard against off-by-ones)
    return model, {u: s[: len(units[u])] for u, s in base_units.items()}


def _load(job: EvalJob) -> tuple[dict, Sidecar, dict, list[ManifestRow] | None]:
    """Units (frame level), sidecar, alignments and manifest rows (or None)."""
    try:
        units = read_units(Path(job.units), job.format, expand=True)
        sidecar = read_sidecar(Path(job.units)) or Sidecar()
        alignments = load_alignments(job.alignments, tier=job.tier)
        rows = read_manifest(job.manifest) if job.manifest else None
    except (OSError, ValueError) as err:
        raise EvaluationError(str(err)) from None
    return units, sidecar, alignments, rows


def _check_unit_range(unit_file: str | Path, units: dict, n_codes: int | None) -> None:
    """Refuse units outside ``[0, n_codes)``: the file is not what its sidecar (or n_codes=) says."""
    for utt, seq in units.items():
        if not len(seq):
            continue
        low, high = int(seq.min()), int(seq.max())
        if low < 0 or (n_codes and high >= int(n_codes)):
            bad = low if low < 0 else high
            codes = f"codes 0..{int(n_codes) - 1}" if n_codes else "codes from 0"
            raise EvaluationError(f"{unit_file}: utterance {utt!r} holds unit {bad}, outside the "
                             f"{codes} of its model (n_codes from the sidecar or n_codes=)")
