"""Joining unit files: shards into their file, subsets into a split.

- :func:`merge_shards`: ``FILE.shard-<i>-of-<n>`` (consecutive blocks of one manifest, what
  ``speechvq-extract shard=i nshards=n`` writes) -> ``FILE``, in shard order = manifest order;
- :func:`merge_units`: the unit file of a list of utterances (a split's manifest) from unit
  files that hold them (its subsets' files), in the list's order, so that a corpus whose splits
  are unions of subsets is encoded once (``speechvq-extract from_units=[...]``).

Both refuse files that do not agree on what the units are (format, dedup, checkpoint hash, unit
rate, codebook size) and carry durations (dedup) and the rejected files over. Kaldi and espnet
files come out sorted, as always. The merged sidecar is the first source's description with
``merged_from`` naming the sources; :mod:`speechvq.extract` adds the output's file hashes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from speechvq.units import (
    Sidecar,
    Units,
    durations_path,
    read_durations,
    read_sidecar,
    read_units,
    shard_path,
    sidecar_path,
    write_sidecar,
    write_units,
)

#: what unit files must agree on to be joined
AGREE = ("format", "dedup", "checkpoint_hash", "unit_rate", "n_codes")


def _sources(path: Path, sources: Sequence[Path], keys: Sequence[str], what: str
             ) -> list[Sidecar]:
    """The sources' sidecars; an error naming the first missing file or disagreeing key."""
    missing = [str(p) for p in sources if not p.exists() or not sidecar_path(p).exists()]
    if missing:
        raise FileNotFoundError(f"cannot merge {path}: missing {what} {', '.join(missing)}")
    metas = [read_sidecar(p) for p in sources]
    for p, meta in zip(sources[1:], metas[1:], strict=True):
        for key in keys:
            if getattr(meta, key) != getattr(metas[0], key):
                raise ValueError(
                    f"cannot merge {path}: {sidecar_path(p)} has {key}={getattr(meta, key)!r} "
                    f"but {sidecar_path(sources[0])} has {getattr(metas[0], key)!r}")
    return metas  # type: ignore[return-value]


def _join(path: Path, sources: Sequence[Path], meta: Sidecar
          ) -> tuple[Units, Units | None, dict[str, Path]]:
    """Every utterance of every source, in source order (+ durations when deduplicated), and
    the source each came from."""
    units: Units = {}
    durations: Units | None = {} if meta.dedup else None
    seen: dict[str, Path] = {}
    for p in sources:
        part = read_units(p, meta.format)
        clash = next((utt for utt in part if utt in seen), None)
        if clash is not None:
            raise ValueError(f"cannot merge {path}: id {clash!r} is in both {seen[clash]} and {p}")
        seen.update(dict.fromkeys(part, p))
        units.update(part)
        if durations is not None:
            part_d = read_durations(p, meta.format)
            if part_d is None:
                raise FileNotFoundError(f"{durations_path(p)}: missing")
            durations.update(part_d)
    return units, durations, seen


def merge_shards(path: str | os.PathLike, nshards: int, remove: bool = False) -> Sidecar:
    """Join ``FILE.shard-<i>-of-<nshards>`` (i = 0..n-1) into ``FILE`` (+ durations, sidecar).

    Shards hold consecutive blocks of the manifest, so joining them in shard order gives manifest
    order back (kaldi/espnet are re-sorted). Every shard must exist and their sidecars must agree
    on format, dedup, checkpoint hash, frame rate, codebook size and manifest. ``remove=True``
    deletes the shard files afterwards. Returns the merged sidecar (counts summed).
    """
    path = Path(path)
    shards = [shard_path(path, i, nshards) for i in range(nshards)]
    metas = _sources(path, shards, (*AGREE, "manifest_hash"), "shard(s)")
    fmt = metas[0].format
    units, durations, _ = _join(path, shards, metas[0])
    write_units(path, units, fmt, durations=durations, n_codes=metas[0].n_codes)
    counts: dict[str, float] = {}
    for m in metas:
        for key, value in m.counts.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + value
    merged = metas[0].for_other_file(  # shard 0's description, for the merged files
        shard=None, nshards=nshards, merged_from=[p.name for p in shards], counts=counts,
        rejected=[r for m in metas for r in m.rejected], ids=list(units) if fmt == "km" else None)
    write_sidecar(path, merged)
    if remove:
        for p in shards:
            for f in (p, durations_path(p), sidecar_path(p)):
                f.unlink(missing_ok=True)
    return merged


def merge_units(path: str | os.PathLike, sources: Sequence[str | os.PathLike],
                ids: Sequence[str]) -> Sidecar:
    """Write ``path``: the utterances ``ids``, in that order, taken from the unit files
    ``sources`` (+ durations, sidecar).

    Every id must be in a source, or among a source's rejected (unreadable) files, which the
    merged sidecar lists; otherwise ValueError naming the missing ids. The sources must agree
    (:data:`AGREE`) and hold no id twice. Counts are those of the merged file; ``merged_from``
    names the sources that gave it utterances. Returns the merged sidecar.
    """
    path, srcs = Path(path), [Path(p) for p in sources]
    if not srcs:
        raise ValueError(f"cannot merge {path}: no unit files to merge from")
    metas = _sources(path, srcs, AGREE, "unit file(s)")
    meta = metas[0]
    units, durations, origin = _join(path, srcs, meta)
    order = {utt: i for i, utt in enumerate(ids)}
    rejected = sorted((r for m in metas for r in m.rejected if r.get("id") in order),
                      key=lambda r: order[r["id"]])
    skipped = {r["id"] for r in rejected}
    missing = [utt for utt in ids if utt not in units and utt not in skipped]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise ValueError(f"cannot merge {path}: {len(missing)} utterance(s) are in none of "
                         f"{', '.join(map(str, srcs))}: {shown}")
    wanted = [utt for utt in ids if utt in units]
    given = {origin[utt] for utt in wanted}
    used = [str(p) for p in srcs if p in given]
    units = {utt: units[utt] for utt in wanted}
    if durations is not None:
        durations = {utt: durations[utt] for utt in wanted}
    write_units(path, units, meta.format, durations=durations, n_codes=meta.n_codes)
    frames = sum(int(d.sum()) for d in durations.values()) if durations is not None else sum(
        len(u) for u in units.values())
    counts = {"utterances": len(units), "frames": frames,
              "seconds": round(frames / meta.unit_rate, 3) if meta.unit_rate else None,
              "rejected": len(rejected)}
    merged = meta.for_other_file(shard=None, nshards=None, merged_from=used, counts=counts,
                                 rejected=rejected,
                                 ids=list(units) if meta.format == "km" else None)
    write_sidecar(path, merged)
    return merged
