"""speechvq-extract: frame-level units for every utterance of a manifest.

    speechvq-extract checkpoint=EXP/checkpoints/best.pt data.manifest=M.tsv out=units.txt \
        format=gslm|kaldi|npy|espnet|km [dedup=true] [shard=I nshards=N] [device=auto]
    speechvq-extract out=units.txt nshards=N merge=true

Writes OUT (``OUT.shard-I-of-N`` when ``nshards > 1``), its sidecar ``OUT.json`` and, with
``dedup=true``, ``OUT.durations``. Features are made and normalised as in training (the
checkpoint's features config; per-speaker statistics from ``stats.json`` beside the manifest or
computed over it). Long files are encoded in windows with enough context that the units equal
whole-file encoding. Unreadable files are reported and skipped (listed in the sidecar). A re-run
whose output and sidecar match the checkpoint hash and config says "already done" and exits 0.

One writer per output: ``.OUT.lock`` beside it is held while a run works on OUT, and a second run
into the same OUT is refused at once. The sidecar is written last and holds the sha256 of the
unit (and durations) file, so it describes exactly the files beside it; "already done" checks it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from speechvq.checkpoint import CheckpointError, OutputLock, checkpoint_hash
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.manifest import read_manifest
from speechvq.features import stats_for_rows
from speechvq.files import file_hash
from speechvq.runtime import resolve_device
from speechvq.units import (
    FORMATS,
    ChunkedEncoder,
    ModelInput,
    durations_path,
    extract_units,
    merge_shards,
    read_sidecar,
    shard_path,
    sidecar_path,
    write_sidecar,
    write_units,
)
from speechvq.vqvae import load_vqvae

log = logging.getLogger("speechvq.extract")


def _output_hashes(target: Path) -> dict:
    """``units_hash`` and ``durations_hash`` (None without durations) of the files beside the
    sidecar: what makes a sidecar describe these very files."""
    dpath = durations_path(target)
    return {"units_hash": file_hash(target),
            "durations_hash": file_hash(dpath) if dpath.exists() else None}


def _lock(target: Path) -> OutputLock:
    """``.OUT.lock`` beside OUT: one speechvq-extract per output (shards lock their own file)."""
    return OutputLock(target.with_name(f".{target.name}.lock"), target, "speechvq-extract")


def _done(target: Path, signature: dict, dedup: bool) -> bool:
    """Output, sidecar (and durations) exist, were made by this checkpoint and config, and are the
    files the sidecar describes (not since replaced by another run)."""
    if not target.exists() or (dedup and not durations_path(target).exists()):
        return False
    try:
        meta = read_sidecar(target)
    except ValueError:
        return False
    if not meta or meta.get("signature") != signature:
        return False
    hashes = _output_hashes(target)
    return all(meta.get(key) == value for key, value in hashes.items())


def _merge(cfg: DictConfig, out: Path, nshards: int) -> int:
    if nshards < 2:
        raise StageError("merge=true needs nshards=N (N > 1): the number of shards to join")
    try:
        meta = merge_shards(out, nshards, remove=bool(cfg.remove_shards))
        meta.update(_output_hashes(out))  # the merged files themselves
        write_sidecar(out, meta)
    except (OSError, ValueError) as err:
        raise StageError(str(err)) from None
    counts = meta.get("counts", {})
    print(
        f"merged {nshards} shards into {out}: {int(counts.get('utterances', 0))} utterances, "
        f"{len(meta.get('rejected', []))} rejected"
    )
    return 0


def run(cfg: DictConfig) -> int:
    out = Path(cfg.out)
    fmt, nshards, shard = str(cfg.format), int(cfg.nshards), int(cfg.shard)
    if fmt not in FORMATS:
        raise StageError(f"format={fmt} is not one of {', '.join(FORMATS)}")
    if nshards < 1 or not 0 <= shard < nshards:
        raise StageError(f"need 0 <= shard < nshards, got shard={shard} nshards={nshards}")
    if cfg.merge:
        with contextlib.ExitStack() as locks:  # OUT, and no shard may still be extracting
            shards = [shard_path(out, i, nshards) for i in range(nshards if nshards > 1 else 0)]
            for path in (out, *shards):
                locks.enter_context(_lock(path))
            return _merge(cfg, out, nshards)
    if not cfg.checkpoint or not cfg.data.manifest:
        raise StageError("checkpoint=... and data.manifest=... are required (unless merge=true)")
    target = shard_path(out, shard, nshards) if nshards > 1 else out
    with _lock(target):
        return _extract(cfg, target, fmt, shard, nshards)


def _extract(cfg: DictConfig, target: Path, fmt: str, shard: int, nshards: int) -> int:
    """Extract this job's block of the manifest into ``target`` (its lock held)."""
    manifest = Path(cfg.data.manifest)
    try:
        all_rows = read_manifest(manifest)
        ckpt_hash = checkpoint_hash(cfg.checkpoint)
    except (ValueError, CheckpointError) as err:
        raise StageError(str(err)) from None
    # consecutive blocks: joining the shards in order gives the manifest order back
    rows = all_rows[shard * len(all_rows) // nshards : (shard + 1) * len(all_rows) // nshards]
    signature = {
        "checkpoint_hash": ckpt_hash,
        "manifest": str(manifest.resolve()),
        "manifest_hash": file_hash(manifest),
        "format": fmt,
        "dedup": bool(cfg.dedup),
        "shard": shard,
        "nshards": nshards,
    }
    if not cfg.force and _done(target, signature, bool(cfg.dedup)):
        log.info("%s: already done (same checkpoint and config); force=true re-extracts", target)
        print(f"{target}: already done")
        return 0

    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    try:
        model, meta = load_vqvae(cfg.checkpoint, map_location=device)
        features = meta.get("features")
        if model.kind == "mel" and not features:
            raise StageError(f"{cfg.checkpoint}: checkpoint meta lacks 'features' (mel config)")
        stats, normalization = (None, {"mode": "none (waveform model)"})
        if model.kind == "mel":
            stats, normalization = stats_for_rows(
                features, meta.get("stats"), rows, all_rows, manifest.parent / "stats.json",
                progress=bool(cfg.progress), workers=max(1, int(cfg.num_workers)),
            )
        make_input = ModelInput(
            model.kind, model.samples_per_unit, model.sample_rate, features, stats,
            chunk_seconds=float(cfg.chunk_seconds),
        )
        encoder = ChunkedEncoder(
            model, float(cfg.chunk_seconds), cfg.context_seconds, float(cfg.max_batch_seconds),
            device,
        )
    except (CheckpointError, KeyError, ValueError, RuntimeError) as err:
        raise StageError(str(err).strip('"')) from None
    log.info(
        "%s: %d utterances (shard %d of %d), %s model, %d codes at %g Hz, context %d units, "
        "on %s", manifest, len(rows), shard, nshards, model.kind, model.n_codes,
        model.frame_rate, encoder.context, device,
    )
    result = extract_units(rows, make_input, encoder, int(cfg.num_workers), bool(cfg.progress))
    if rows and not result.units:
        raise StageError(f"{manifest}: none of the {len(rows)} utterances could be read")

    sidecar_path(target).unlink(missing_ok=True)  # never a sidecar describing older units
    write_units(target, result.units, fmt, dedup=bool(cfg.dedup), n_codes=model.n_codes)
    frames = sum(len(u) for u in result.units.values())
    sidecar = {
        **_output_hashes(target),
        "format": fmt,
        "dedup": bool(cfg.dedup),
        "frame_rate": float(model.frame_rate),
        "n_codes": int(model.n_codes),
        "model_kind": model.kind,
        "checkpoint": str(Path(cfg.checkpoint).resolve()),
        "checkpoint_hash": ckpt_hash,
        "manifest": signature["manifest"],
        "manifest_hash": signature["manifest_hash"],
        "shard": shard,
        "nshards": nshards,
        "signature": signature,
        "features": dict(features) if features else None,
        "normalization": normalization,
        "chunking": {
            "chunk_seconds": float(cfg.chunk_seconds),
            "context_units": encoder.context,
            "receptive_field_input_frames": encoder.receptive_field,
            "input_frames_per_unit": encoder.stride,
        },
        "counts": {
            "utterances": len(result.units),
            "frames": frames,
            "seconds": round(result.seconds, 3),
            "rejected": len(result.rejected),
        },
        "rejected": result.rejected,
        "device": str(device),
        "wall_seconds": round(result.wall_seconds, 3),
        "realtime_factor": round(result.realtime_factor, 1),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if fmt == "km":
        sidecar["ids"] = list(result.units)
    write_sidecar(target, sidecar)
    print(
        f"wrote {target}: {len(result.units)} utterances, {result.seconds:.1f} s of audio, "
        f"{result.realtime_factor:.0f}x real time on {device}; {len(result.rejected)} rejected"
        + (f" (see {sidecar_path(target)})" if result.rejected else "")
    )
    return 0


main = hydra_main("extract", run)

if __name__ == "__main__":
    main()
