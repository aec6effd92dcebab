"""Sharded, resumable extraction: every utterance of a manifest -> a unit file and its sidecar.

:func:`extract` is what ``speechvq-extract`` runs: this job's block of the manifest (``shard`` of
``nshards``, consecutive blocks so that joining the shards in order gives manifest order back) is
encoded into ``OUT`` (``OUT.shard-I-of-N``) with its :class:`speechvq.units.Sidecar` and, with
``dedup``, ``OUT.durations``; :func:`merge` joins the shards; :func:`merge_from_units` builds the
unit file of a split from the unit files of the subsets it is made of (each utterance is encoded
once). Features are made and normalised as in training (the checkpoint's features config through
:class:`speechvq.features.FrontEnd`; the per-speaker statistics by
:func:`speechvq.features.stats_for_rows`). Unreadable files are reported, skipped and listed in
the sidecar.

Parts: a job's rows are cut into consecutive blocks of about ``part_seconds`` of audio (manifest
order; :func:`plan_parts`), each encoded longest-first within itself and written at once, atomically,
as ``OUT.part-KKKKK.npz`` + ``OUT.part-KKKKK.json`` (what it was made with, which rows). A re-run
after a crash keeps the parts whose signature matches (checkpoint hash, manifest and its hash,
format, dedup, shard, part plan) and encodes only the others; stale parts are discarded with a log
line. At the end the parts are joined into OUT (byte-identical to a run without parts) and removed.

One writer per output: ``.OUT.lock`` beside it is held while a job works on OUT (:func:`output_lock`),
and a second job into the same OUT is refused at once. The sidecar is written last and holds the
sha256 of the unit (and durations) file, so it describes exactly the files beside it; a re-run
whose output and sidecar match the checkpoint hash and job (:func:`signature`) is "already done".

Numerics: on CUDA the encoder runs under :func:`extraction_numerics` (no TF32 for matmuls and
convolutions, deterministic cuDNN kernels, no autotuning; restored afterwards). The nearest code is the lowest index among equal distances (``argmin``'s
first minimum, :func:`speechvq.nn.quantizer.nearest_codes`); CUDA and CPU may differ only on frames
whose two nearest codes are within float rounding of each other.

The machinery (rows -> units, exactly, in bounded memory) is :mod:`speechvq.chunked`; its public
names are importable from here too.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from speechvq.checkpoint import CheckpointError, OutputLock, checkpoint_hash
from speechvq.chunked import (  # noqa: F401 (re-exported: speechvq.extract's public names)
    ChunkedEncoder,
    Extraction,
    ModelInput,
    extract_units,
    iter_units,
    measured_receptive_field,
    plan_chunks,
    receptive_field,
)
from speechvq.data.manifest import read_manifest
from speechvq.features import FeatureStats, stats_for_rows
from speechvq.files import file_hash, read_json, write_json
from speechvq.numerics import exact_numerics
from speechvq.runtime import resolve_device
from speechvq.unit_merge import merge_shards, merge_units
from speechvq.units import (
    FORMATS,
    Sidecar,
    Units,
    durations_path,
    read_sidecar,
    read_units,
    shard_path,
    sidecar_path,
    write_sidecar,
    write_units,
)
from speechvq.vqvae import load_vqvae

log = logging.getLogger(__name__)


class ExtractError(ValueError):
    """An extraction that cannot run as asked; the message is one line naming the problem."""


@dataclass(frozen=True)
class ExtractJob:
    """One ``speechvq-extract`` run as plain data (the keys of ``conf/extract.yaml``).

    ``config`` is the full resolved config, kept in the sidecar. ``part_seconds``: audio per
    part (None: no parts). ``from_units``: unit files to build OUT from instead of encoding
    (:func:`merge_from_units`).
    """

    checkpoint: str
    manifest: str
    out: str
    format: str
    dedup: bool
    shard: int
    nshards: int
    force: bool
    device: str
    chunk_seconds: float
    context_seconds: float | None
    max_batch_seconds: float
    num_workers: int
    threads: int | None
    progress: bool
    config: dict = field(default_factory=dict)
    part_seconds: float | None = None
    from_units: tuple[str, ...] = ()

    @property
    def target(self) -> Path:
        """The file this job writes: ``OUT``, or ``OUT.shard-I-of-N`` when sharded."""
        out = Path(self.out)
        return shard_path(out, self.shard, self.nshards) if self.nshards > 1 else out


def check_shards(fmt: str, shard: int, nshards: int) -> None:
    """ExtractError unless ``fmt`` is a unit format and ``0 <= shard < nshards``."""
    if fmt not in FORMATS:
        raise ExtractError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    if nshards < 1 or not 0 <= shard < nshards:
        raise ExtractError(f"need 0 <= shard < nshards, got shard={shard} nshards={nshards}")


def output_lock(target: str | Path) -> OutputLock:
    """``.OUT.lock`` beside OUT: one extraction per output (shards lock their own file)."""
    target = Path(target)
    return OutputLock(target.with_name(f".{target.name}.lock"), target, "speechvq-extract")


def output_hashes(target: str | Path) -> dict[str, str | None]:
    """``units_hash`` and ``durations_hash`` (None without durations) of the files beside the
    sidecar: what makes a sidecar describe these very files."""
    dpath = durations_path(target)
    return {"units_hash": file_hash(target),
            "durations_hash": file_hash(dpath) if dpath.exists() else None}


def signature(job: ExtractJob, ckpt_hash: str) -> dict:
    """What an "already done" output must have been made with."""
    manifest = Path(job.manifest)
    return {"checkpoint_hash": ckpt_hash, "manifest": str(manifest.resolve()),
            "manifest_hash": file_hash(manifest), "format": job.format, "dedup": job.dedup,
            "shard": job.shard, "nshards": job.nshards}


def is_done(target: Path, wanted: dict, dedup: bool) -> bool:
    """Output, sidecar (and durations) exist, were made by this checkpoint and job, and are the
    files the sidecar describes (not since replaced by another run)."""
    if not target.exists() or (dedup and not durations_path(target).exists()):
        return False
    try:
        meta = read_sidecar(target)
    except ValueError:
        return False
    if meta is None or meta.signature != wanted:
        return False
    hashes = output_hashes(target)
    return meta.units_hash == hashes["units_hash"] and meta.durations_hash == hashes[
        "durations_hash"]


def merge(out: str | Path, nshards: int, remove: bool = False) -> Sidecar:
    """Join ``OUT.shard-*-of-N`` into OUT (holding every lock: no shard may still be extracting);
    returns the merged sidecar, which records the merged files' hashes."""
    out = Path(out)
    if nshards < 2:
        raise ExtractError("merge=true needs nshards=N (N > 1): the number of shards to join")
    with contextlib.ExitStack() as locks:
        for path in (out, *(shard_path(out, i, nshards) for i in range(nshards))):
            locks.enter_context(output_lock(path))
        try:
            meta = merge_shards(out, nshards, remove=remove)
            hashes = output_hashes(out)
            meta.units_hash, meta.durations_hash = hashes["units_hash"], hashes["durations_hash"]
            write_sidecar(out, meta)
        except (OSError, ValueError) as err:
            raise ExtractError(str(err)) from None
    return meta


def merge_from_units(job: ExtractJob) -> Sidecar | None:
    """OUT for the utterances of ``job.manifest``, in its order, from the unit files
    ``job.from_units`` (e.g. a split from its subsets' files: each utterance encoded once).

    The sources must have the job's format and dedup, agree with each other and, when
    ``job.checkpoint`` is given, come from that checkpoint; every utterance of the manifest must
    be in one of them (or be one of their rejected files). The sidecar names the sources
    (``merged_from``) and the manifest; None when OUT is already done (same sources, unchanged).
    """
    target, sources = job.target, [Path(p) for p in job.from_units]
    if job.nshards > 1:
        raise ExtractError("from_units=[...] builds one file: leave shard/nshards out")
    with output_lock(target):
        try:
            ids = [row.id for row in read_manifest(job.manifest)]
            metas = [read_sidecar(p) for p in sources]
            ckpt = checkpoint_hash(job.checkpoint) if job.checkpoint else None
        except (OSError, ValueError, CheckpointError) as err:
            raise ExtractError(str(err)) from None
        for p, meta in zip(sources, metas, strict=True):
            if not p.is_file():
                raise ExtractError(f"{p}: no such unit file (from_units)")
            if meta is None:
                raise ExtractError(f"{p}: no sidecar {p}.json: not a speechvq-extract unit file")
            for key, value in (("format", job.format), ("dedup", job.dedup),
                               ("checkpoint_hash", ckpt)):
                if value is not None and getattr(meta, key) != value:
                    raise ExtractError(f"{p} has {key}={getattr(meta, key)!r}, not {value!r} "
                                       f"(this job's): extract it again, or merge like with like")
        wanted = signature(job, ckpt or (metas[0].checkpoint_hash if metas else ""))
        wanted["from_units"] = [{"path": str(p.resolve()), "units_hash": m.units_hash}
                                for p, m in zip(sources, metas, strict=True)]
        if not job.force and is_done(target, wanted, job.dedup):
            log.info("%s: already done (same unit files); force=true merges again", target)
            return None
        for p, m in zip(sources, metas, strict=True):
            if (m.normalization or {}).get("speakers_computed"):
                log.warning("%s: some speakers' statistics were computed over its own manifest: "
                            "a speaker whose utterances %s groups differently may get other units "
                            "than extracting it directly (a stats.json beside the manifests that "
                            "covers every speaker avoids this)", p, job.manifest)
        try:
            meta = merge_units(target, sources, ids)
        except (OSError, ValueError) as err:
            raise ExtractError(str(err)) from None
        meta.manifest, meta.manifest_hash = wanted["manifest"], wanted["manifest_hash"]
        meta.signature = wanted
        hashes = output_hashes(target)
        meta.units_hash, meta.durations_hash = hashes["units_hash"], hashes["durations_hash"]
        meta.created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_sidecar(target, meta)
    return meta


def extraction_numerics(device: str | torch.device) -> contextlib.AbstractContextManager:
    """What the encoder runs under on ``device``: on CUDA, IEEE fp32 matmuls and convolutions (no
    TF32: its 10-bit mantissa moves encoder outputs by ~1e-3 and would change units far from any
    tie), deterministic cuDNN kernels and no autotuning (the same units whatever the batching),
    the previous settings restored on exit (:func:`speechvq.numerics.exact_numerics`); nothing
    elsewhere."""
    return exact_numerics() if torch.device(device).type == "cuda" else contextlib.nullcontext()


def extract(job: ExtractJob) -> Sidecar | None:
    """Run ``job`` (holding its output's lock); its sidecar, or None when already done."""
    check_shards(job.format, job.shard, job.nshards)
    with output_lock(job.target):
        return _extract_locked(job)


def _extract_locked(job: ExtractJob) -> Sidecar | None:
    target, manifest = job.target, Path(job.manifest)
    try:
        all_rows = read_manifest(manifest)
        wanted = signature(job, checkpoint_hash(job.checkpoint))
    except (ValueError, CheckpointError) as err:
        raise ExtractError(str(err)) from None
    rows = all_rows[job.shard * len(all_rows) // job.nshards:
                    (job.shard + 1) * len(all_rows) // job.nshards]
    if not job.force and is_done(target, wanted, job.dedup):
        log.info("%s: already done (same checkpoint and config); force=true re-extracts", target)
        discard_parts(target)  # a run killed between writing OUT and removing its parts
        return None
    device = resolve_device(job.device)
    if job.threads:
        torch.set_num_threads(int(job.threads))
    model, features, stats, normalization = _load_model(job, rows, all_rows, device)
    make_input = ModelInput(model.kind, model.samples_per_unit, model.sample_rate, features,
                            stats, chunk_seconds=job.chunk_seconds)
    encoder = ChunkedEncoder(model, job.chunk_seconds, job.context_seconds,
                             job.max_batch_seconds, device)
    plan = plan_parts(rows, job.part_seconds, model.sample_rate)
    log.info("%s: %d utterances (shard %d of %d, %d part(s)), %s model, %d codes at %g Hz, "
             "context %d units, on %s", manifest, len(rows), job.shard, job.nshards, len(plan),
             model.kind, model.n_codes, model.unit_rate, encoder.context, device)
    with extraction_numerics(device):
        result, parts = _extract_parts(job, rows, plan, wanted, make_input, encoder)
    if rows and not result.units:
        raise ExtractError(f"{manifest}: none of the {len(rows)} utterances could be read")
    sidecar_path(target).unlink(missing_ok=True)  # never a sidecar describing older units
    write_units(target, result.units, job.format, dedup=job.dedup, n_codes=model.n_codes)
    meta = _sidecar(job, wanted, model, encoder, result, device)
    meta.features, meta.normalization = (dict(features) if features else None), normalization
    if parts:  # the audio this run encoded, not the parts it found done
        meta.parts = parts
        meta.realtime_factor = round(parts["encoded_seconds"] / max(result.wall_seconds, 1e-9), 1)
    write_sidecar(target, meta)
    discard_parts(target)
    return meta


# --------------------------------------------------------------------------------------------
# parts: what a crash can lose


def plan_parts(rows: Sequence[Any], part_seconds: float | None, sample_rate: int
               ) -> list[tuple[int, int]]:
    """Consecutive blocks ``[start, stop)`` of ``rows`` of at least ``part_seconds`` of audio
    each (by the manifest's ``num_samples``; the last block takes the rest), in order. None or 0:
    one block. The plan depends only on the rows and the arguments, so a re-run finds it again."""
    if not part_seconds or part_seconds <= 0:
        return [(0, len(rows))]
    limit, plan, start, size = part_seconds * sample_rate, [], 0, 0
    for i, row in enumerate(rows):
        size += row.num_samples
        if size >= limit:
            plan.append((start, i + 1))
            start, size = i + 1, 0
    if start < len(rows) or not plan:
        plan.append((start, len(rows)))
    return plan


def part_path(target: str | Path, index: int) -> Path:
    """``OUT.part-KKKKK.npz``: the frame-level units of part ``index`` of the job writing OUT."""
    target = Path(target)
    return target.with_name(f"{target.name}.part-{index:05d}.npz")


def _part_meta(path: Path) -> Path:
    return path.with_suffix(".json")


def discard_parts(target: str | Path, keep: Sequence[Path] = (), why: str | None = None) -> None:
    """Remove the part files of ``target`` but ``keep`` (with a log line saying ``why``)."""
    target = Path(target)
    kept = {Path(p) for p in keep} | {_part_meta(Path(p)) for p in keep}
    stale = sorted(p for p in target.parent.glob(glob.escape(target.name) + ".part-*")
                   if p not in kept)
    if stale and why:
        log.info("%s: discarding %d stale part file(s) (%s)", target, len(stale), why)
    for p in stale:
        p.unlink(missing_ok=True)


def _part_signature(wanted: dict, part_seconds: float | None, index: int, span: tuple[int, int]
                    ) -> dict:
    return {**wanted, "part_seconds": part_seconds, "part": index, "rows": list(span)}


def _load_part(path: Path, wanted: dict) -> tuple[Units, list[dict]] | str:
    """A finished part's units and rejected rows, or why it cannot be used."""
    try:
        meta = read_json(_part_meta(path))
    except (OSError, ValueError):
        return "no readable description"
    if meta.get("signature") != wanted:
        return "made with another checkpoint, manifest, format, shard or part plan"
    if not path.exists() or file_hash(path) != meta.get("units_hash"):
        return "its units are not the ones described"
    return read_units(path, "npy", dtype=np.int16), list(meta.get("rejected", []))


def _write_part(path: Path, wanted: dict, result: Extraction) -> None:
    """Units first, then the description (both atomic): a described part is a whole part."""
    write_units(path, result.units, "npy")
    write_json(_part_meta(path), {
        "signature": wanted, "units_hash": file_hash(path), "rejected": result.rejected,
        "utterances": len(result.units), "seconds": round(result.seconds, 3),
        "wall_seconds": round(result.wall_seconds, 3)})


def _extract_parts(job: ExtractJob, rows: Sequence[Any], plan: list[tuple[int, int]],
                   wanted: dict, make_input: ModelInput, encoder: ChunkedEncoder
                   ) -> tuple[Extraction, dict | None]:
    """Units of ``rows`` part by part, keeping the parts a crashed run finished; the parts
    summary for the sidecar (None: one part, nothing written before the end)."""
    target = job.target
    if len(plan) == 1:
        discard_parts(target, why="the job is one part now")
        return extract_units(rows, make_input, encoder, job.num_workers, job.progress), None
    start = time.perf_counter()
    done: dict[int, tuple[Units, list[dict]]] = {}
    paths = [part_path(target, k) for k in range(len(plan))]
    if not job.force:
        for k, span in enumerate(plan):
            found = _load_part(paths[k], _part_signature(wanted, job.part_seconds, k, span))
            if isinstance(found, str):
                if _part_meta(paths[k]).exists():
                    log.info("%s: part %d is stale (%s): encoding it again", target, k, found)
            else:
                done[k] = found
    discard_parts(target, keep=[paths[k] for k in done], why="not of this job or unfinished")
    resumed = len(done)
    if done:
        log.info("%s: resuming: %d of %d parts were already done", target, len(done), len(plan))
    bar = tqdm(total=len(rows), unit="utt", desc="extract", disable=not job.progress,
               file=sys.stderr, initial=sum(plan[k][1] - plan[k][0] for k in done))
    units: Units = {}
    rejected: list[dict] = []
    encoded = 0.0
    try:
        for k, (a, b) in enumerate(plan):
            if k not in done:
                part = extract_units(rows[a:b], make_input, encoder, job.num_workers, False)
                _write_part(paths[k], _part_signature(wanted, job.part_seconds, k, (a, b)), part)
                done[k] = (part.units, part.rejected)
                encoded += part.seconds
                bar.update(b - a)
            units.update(done[k][0])
            rejected.extend(done[k][1])
    finally:
        bar.close()
    frames = sum(len(u) for u in units.values())
    wall = time.perf_counter() - start
    result = Extraction(units, rejected, frames / encoder.unit_rate, wall)
    return result, {"parts": len(plan), "resumed": resumed, "part_seconds": job.part_seconds,
                    "encoded_seconds": round(encoded, 3)}


def _load_model(job: ExtractJob, rows: Sequence[Any], all_rows: Sequence[Any],
                device: torch.device) -> tuple[nn.Module, dict | None, FeatureStats | None, dict]:
    """The model on ``device``, its features config, the statistics for ``rows`` (mel model) and
    where they came from."""
    try:
        model, meta = load_vqvae(job.checkpoint, map_location=device)
        features = meta.features
        if model.kind == "mel" and not features:
            raise ExtractError(f"{job.checkpoint}: checkpoint meta lacks 'features' (mel config)")
        if model.kind != "mel":
            return model, features, None, {"mode": "none (waveform model)"}
        stats, normalization = stats_for_rows(
            features, meta.stats, rows, all_rows, Path(job.manifest).parent / "stats.json",
            progress=job.progress, workers=max(1, job.num_workers))
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        raise ExtractError(str(err).strip('"')) from None
    return model, features, stats, normalization


def _sidecar(job: ExtractJob, wanted: dict, model: nn.Module, encoder: ChunkedEncoder,
             result: Extraction, device: torch.device) -> Sidecar:
    target = job.target
    frames = sum(len(u) for u in result.units.values())
    return Sidecar(
        **output_hashes(target), format=job.format, dedup=job.dedup,
        unit_rate=float(model.unit_rate), n_codes=int(model.n_codes), model_kind=model.kind,
        checkpoint=str(Path(job.checkpoint).resolve()), checkpoint_hash=wanted["checkpoint_hash"],
        manifest=wanted["manifest"], manifest_hash=wanted["manifest_hash"], shard=job.shard,
        nshards=job.nshards, signature=wanted,
        chunking={"chunk_seconds": job.chunk_seconds, "context_units": encoder.context,
                  "receptive_field_input_frames": encoder.receptive_field,
                  "downsampling": encoder.downsampling},
        counts={"utterances": len(result.units), "frames": frames,
                "seconds": round(result.seconds, 3), "rejected": len(result.rejected)},
        rejected=result.rejected, device=str(device),
        wall_seconds=round(result.wall_seconds, 3),
        realtime_factor=round(result.realtime_factor, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), config=dict(job.config),
        ids=list(result.units) if job.format == "km" else None)
