"""speechvq-evaluate: phone purity, cluster purity, PNMI, ABX, bitrate and codebook use of a unit
file, beside the same metrics for MFCC + k-means units with as many clusters.

    speechvq-evaluate units=U.txt alignments=ALIGN_DIR data.manifest=test.tsv \
        baseline.train_manifest=train.tsv [out=metrics.json] [baseline.enabled=false]

Prints a table and writes the metrics as JSON (default ``<units>.metrics.json``). ``data.manifest``
gives the evaluated utterances' speakers (ABX) and audio (baseline); without it, only the
frame-level metrics of the units are computed. A deduplicated unit file is expanded to frames with
its ``.durations`` file first.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from speechvq.baseline import MfccKmeans
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.alignments import load_alignments
from speechvq.data.manifest import read_manifest
from speechvq.metrics import unit_metrics
from speechvq.units import read_sidecar, read_units, write_json

log = logging.getLogger("speechvq.evaluate")

DEFAULT_FRAME_RATE = 50.0

# (JSON key, table label, scale, format)
ROWS = [
    ("phone_purity", "phone purity", 1.0, "{:.3f}"),
    ("cluster_purity", "cluster purity", 1.0, "{:.3f}"),
    ("pnmi", "PNMI", 1.0, "{:.3f}"),
    ("abx_within", "ABX within (%)", 100.0, "{:.2f}"),
    ("abx_across", "ABX across (%)", 100.0, "{:.2f}"),
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


def run(cfg: DictConfig) -> int:
    start = time.perf_counter()
    unit_file = Path(cfg.units)
    try:
        units = read_units(unit_file, cfg.format, expand=True)
        sidecar = read_sidecar(unit_file) or {}
        alignments = load_alignments(cfg.alignments, tier=str(cfg.tier))
        rows = read_manifest(cfg.data.manifest) if cfg.data.manifest else None
    except (OSError, ValueError) as err:
        raise StageError(str(err)) from None
    frame_rate = float(cfg.frame_rate or sidecar.get("frame_rate") or DEFAULT_FRAME_RATE)
    n_codes = cfg.n_codes or sidecar.get("n_codes")
    features = sidecar.get("features") or OmegaConf.to_container(cfg.features, resolve=True)

    ids = [u for u in units if u in alignments]
    if rows is not None:
        in_manifest = {r.id for r in rows}
        ids = [u for u in ids if u in in_manifest]
    if not ids:
        raise StageError(
            f"{unit_file}: no utterance has units, alignments in {cfg.alignments}"
            + (f" and a row in {cfg.data.manifest}" if rows is not None else "")
        )
    skipped = len(units) - len(ids)
    if skipped:
        log.info("evaluating %d utterances (%d without alignments or not in the manifest)",
                 len(ids), skipped)
    units = {u: units[u] for u in ids}
    speakers = {r.id: r.speaker for r in rows} if rows is not None else None
    if speakers is None and cfg.abx.enabled:
        log.warning("no data.manifest: ABX needs speakers and is left out")

    results = {"units": unit_metrics(units, alignments, frame_rate,
                                     **_metric_kwargs(cfg, n_codes, speakers))}
    baseline_info = None
    if cfg.baseline.enabled:
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
        n_clusters = int(results["units"]["used"])
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
        base_units = model.transform([by_id[u] for u in ids], progress=bool(cfg.progress))
        # the same frames as the units (they agree by construction; guard against off-by-ones)
        base_units = {u: s[: len(units[u])] for u, s in base_units.items()}
        results["mfcc_kmeans"] = unit_metrics(
            base_units, alignments, frame_rate,
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
