"""speechvq-evaluate: phone purity, cluster purity, PNMI, ABX, bitrate and codebook use of a unit
file, beside the same metrics for MFCC + k-means units with as many clusters.

    speechvq-evaluate units=U.txt alignments=ALIGN_DIR data.manifest=test.tsv \
        baseline.train_manifest=train.tsv [out=metrics.json] [baseline.enabled=false] \
        [codebook=EXP/checkpoints/best.pt]

Prints a table and writes the metrics as JSON (default ``<units>.metrics.json``). ``data.manifest``
gives the evaluated utterances' speakers (ABX) and audio (baseline), and alignment files are
matched to its rows by id, audio stem or path; without it, only the frame-level metrics of the
units are computed. A deduplicated unit file is expanded to frames with its ``.durations`` file
first.

ABX is reported twice: over one-hot units (``abx_within``, ``abx_across``) and, as ZeroSpeech 2019
scored it, over each frame's code vector with the angular distance (``abx_within_codevec``,
``abx_across_codevec``): the VQ-VAE's codebook from the checkpoint named in the units' sidecar (or
``codebook=CKPT``), the baseline's k-means centroids.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from speechvq.baseline import MfccKmeans
from speechvq.checkpoint import CheckpointError, checkpoint_hash
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.alignments import load_alignments, match_alignments
from speechvq.data.manifest import ManifestRow, read_manifest
from speechvq.files import write_json
from speechvq.metrics import unit_metrics
from speechvq.units import read_sidecar, read_units
from speechvq.vqvae import load_vqvae

log = logging.getLogger("speechvq.evaluate")

DEFAULT_FRAME_RATE = 50.0

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


def _metric_kwargs(cfg: DictConfig, n_codes: int | None, speakers: dict | None) -> dict:
    modes = list(cfg.abx.modes) if cfg.abx.enabled else []
    return {
        "n_codes": n_codes,
        "speakers": speakers,
        "include_silence": bool(cfg.metrics.include_silence),
        "silence": [str(s) for s in cfg.metrics.silence],
        "abx_max_per_cell": int(cfg.abx.max_per_cell),
        "abx_max_x_speakers": int(cfg.abx.max_x_speakers),
        "abx_seed": int(cfg.abx.seed),
        "abx_modes": modes,
    }


def _example(keys) -> str:
    first = next(iter(keys), None)
    return f"e.g. {first!r}" if first is not None else "none"


def _select(
    cfg: DictConfig, units: dict, alignments: dict, rows: list[ManifestRow] | None
) -> tuple[list[str], dict]:
    """Ids of the utterances to evaluate and the alignments keyed by utterance id.

    With a manifest, alignment files are matched to its rows by id, audio stem or path
    (:func:`match_alignments`) and only its utterances are kept.
    """
    matched = match_alignments(alignments, rows) if rows is not None else alignments
    ids = [u for u in units if u in matched]
    if not ids:
        raise StageError(
            f"{cfg.units}: no utterance has both units and an alignment: {len(units)} unit ids "
            f"({_example(units)}), {len(alignments)} alignment files in {cfg.alignments} "
            f"({_example(alignments)})"
            + (f", {len(rows)} rows in {cfg.data.manifest} ({_example(r.id for r in rows)}) of "
               f"which {len(matched)} matched an alignment" if rows is not None else "")
        )
    if len(ids) < len(units):
        log.info("evaluating %d utterances (%d without alignments or not in the manifest)",
                 len(ids), len(units) - len(ids))
    return ids, matched


def load_codebook(path: str | Path) -> np.ndarray:
    """The code vectors ``(K, D)`` of a VQ-VAE checkpoint, as its quantizer looks them up."""
    model, _ = load_vqvae(path, map_location="cpu")
    return model.quantizer.decode_codes().double().numpy()


def _codebook(cfg: DictConfig, sidecar: dict) -> tuple[np.ndarray | None, str | None]:
    """The units' code vectors ``(K, D)`` and their checkpoint, or ``(None, None)`` if unknown.

    ``codebook=PATH`` wins (a failure to load it is an error); else the sidecar's checkpoint,
    skipped with a warning when it is gone or is no longer the file the units came from.
    """
    explicit = bool(cfg.codebook)
    path = str(cfg.codebook or sidecar.get("checkpoint") or "")
    if not path:
        log.info("no codebook=... and no checkpoint in the units' sidecar: code-vector ABX is "
                 "left out")
        return None, None
    try:
        changed = sidecar.get("checkpoint_hash") not in (None, checkpoint_hash(path))
        if changed and not explicit:
            log.warning("%s is not the checkpoint the units were extracted with (its hash "
                        "changed): code-vector ABX is left out; pass codebook=PATH", path)
            return None, None
        if changed:
            log.warning("codebook %s: not the checkpoint the units were extracted with", path)
        codebook = load_codebook(path)
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        if explicit:
            raise StageError(f"codebook: {err}") from None
        log.warning("code-vector ABX is left out (%s); pass codebook=PATH", err)
        return None, None
    log.info("code vectors: %s codes of dimension %d from %s", *codebook.shape, path)
    return codebook, str(Path(path).resolve())


def _check_codebook(codebook: np.ndarray, units: dict, n_codes: int | None) -> None:
    top = max((int(s.max()) for s in units.values() if len(s)), default=-1)
    if top >= len(codebook):
        raise StageError(f"the units go up to {top} but the codebook has {len(codebook)} codes")
    if n_codes and int(n_codes) != len(codebook):
        log.warning("the units' sidecar says %d codes, the codebook has %d", n_codes,
                    len(codebook))


def _baseline(
    cfg: DictConfig, rows: list[ManifestRow] | None, units: dict, features: dict,
    frame_rate: float, n_clusters: int,
) -> tuple[MfccKmeans, dict]:
    """MFCC + k-means fitted on ``baseline.train_manifest``; its units for ``units``' ids."""
    if rows is None or not cfg.baseline.train_manifest:
        raise StageError(
            "the MFCC + k-means baseline needs data.manifest (audio of the evaluated "
            "utterances) and baseline.train_manifest (what k-means is fitted on); or pass "
            "baseline.enabled=false"
        )
    try:
        train_rows = read_manifest(cfg.baseline.train_manifest)
    except ValueError as err:
        raise StageError(str(err)) from None
    model = MfccKmeans(
        features, frame_rate, n_clusters,
        n_mfcc=int(cfg.baseline.n_mfcc), pool=str(cfg.baseline.pool),
        standardize=bool(cfg.baseline.standardize),
        max_train_frames=int(cfg.baseline.max_train_frames), seed=int(cfg.baseline.seed),
    )
    try:
        model.fit(train_rows, progress=bool(cfg.progress))
    except ValueError as err:
        raise StageError(f"{cfg.baseline.train_manifest}: {err}") from None
    by_id = {r.id: r for r in rows}
    base_units = model.transform([by_id[u] for u in units], progress=bool(cfg.progress))
    # the same frames as the units (they agree by construction; guard against off-by-ones)
    return model, {u: s[: len(units[u])] for u, s in base_units.items()}


def _load(cfg: DictConfig) -> tuple[dict, dict, dict, list[ManifestRow] | None]:
    """Units (frame level), sidecar, alignments and manifest rows (or None)."""
    try:
        units = read_units(Path(cfg.units), cfg.format, expand=True)
        found = read_sidecar(Path(cfg.units))
        sidecar = found.to_dict() if found else {}
        alignments = load_alignments(cfg.alignments, tier=str(cfg.tier))
        rows = read_manifest(cfg.data.manifest) if cfg.data.manifest else None
    except (OSError, ValueError) as err:
        raise StageError(str(err)) from None
    return units, sidecar, alignments, rows


def _check_unit_range(unit_file: Path, units: dict, n_codes: int | None) -> None:
    """Refuse units outside ``[0, n_codes)``: the file is not what its sidecar (or n_codes=) says."""
    for utt, seq in units.items():
        if not len(seq):
            continue
        low, high = int(seq.min()), int(seq.max())
        if low < 0 or (n_codes and high >= int(n_codes)):
            bad = low if low < 0 else high
            codes = f"codes 0..{int(n_codes) - 1}" if n_codes else "codes from 0"
            raise StageError(f"{unit_file}: utterance {utt!r} holds unit {bad}, outside the "
                             f"{codes} of its model (n_codes from the sidecar or n_codes=)")


def run(cfg: DictConfig) -> int:
    start = time.perf_counter()
    unit_file = Path(cfg.units)
    units, sidecar, alignments, rows = _load(cfg)
    frame_rate = float(cfg.frame_rate or sidecar.get("frame_rate") or DEFAULT_FRAME_RATE)
    n_codes = cfg.n_codes or sidecar.get("n_codes")
    _check_unit_range(unit_file, units, n_codes)
    features = sidecar.get("features") or OmegaConf.to_container(cfg.features, resolve=True)

    ids, alignments = _select(cfg, units, alignments, rows)
    units = {u: units[u] for u in ids}
    speakers = {r.id: r.speaker for r in rows} if rows is not None else None
    if speakers is None and cfg.abx.enabled:
        log.warning("no data.manifest: ABX needs speakers and is left out")
    codebook, codebook_path = (None, None)
    if speakers is not None and cfg.abx.enabled and cfg.abx.modes:
        codebook, codebook_path = _codebook(cfg, sidecar)
    if codebook is not None:
        _check_codebook(codebook, units, n_codes)

    results = {"units": unit_metrics(units, alignments, frame_rate, embeddings=codebook,
                                     **_metric_kwargs(cfg, n_codes, speakers))}
    baseline_info = None
    if cfg.baseline.enabled:
        n_clusters = int(results["units"]["used"])
        model, base_units = _baseline(cfg, rows, units, features, frame_rate, n_clusters)
        results["mfcc_kmeans"] = unit_metrics(
            base_units, alignments, frame_rate,
            embeddings=model.centroids,
            **_metric_kwargs(cfg, model.kmeans.n_clusters, speakers),
        )
        baseline_info = {
            "n_clusters": int(model.kmeans.n_clusters),
            "train_manifest": str(Path(cfg.baseline.train_manifest).resolve()),
            "features": dict(features),
        }

    out = Path(cfg.out) if cfg.out else unit_file.with_name(unit_file.name + ".metrics.json")
    report = {
        "units_file": str(unit_file.resolve()),
        "alignments": str(Path(cfg.alignments).resolve()),
        "manifest": str(Path(cfg.data.manifest).resolve()) if cfg.data.manifest else None,
        "frame_rate": frame_rate,
        "n_codes": n_codes,
        "checkpoint_hash": sidecar.get("checkpoint_hash"),
        "codebook": codebook_path,
        "metrics": results["units"],
        "baseline": {**baseline_info, "metrics": results["mfcc_kmeans"]} if baseline_info else None,
        "seconds": round(time.perf_counter() - start, 2),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json(out, _jsonable(report))
    print(format_table({"units": results["units"], **(
        {"mfcc+kmeans": results["mfcc_kmeans"]} if "mfcc_kmeans" in results else {})}))
    print(f"wrote {out} ({report['seconds']} s)")
    return 0


main = hydra_main("evaluate", run)

if __name__ == "__main__":
    main()
