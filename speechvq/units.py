"""Discrete units: unit files in every supported format, dedup + durations, shards, extraction.

In memory a corpus' units are a :data:`Units` dict ``{utterance id: int array (T,)}``; frame ``i``
of a frame-level sequence is centred at ``(i + 0.5) / frame_rate`` seconds.

File formats (``format=``), one utterance per line unless said otherwise:

``gslm``    ``id|u1 u2 u3`` in the order given (manifest order) -- fairseq / GSLM unit files.
``kaldi``   ``id u1 u2 u3``, lines sorted by id in byte order (``LC_ALL=C sort``), as Kaldi and
            ESPnet data dirs require.
``espnet``  ``id <chars>``: unit ``i`` written as the character ``chr(0x4E00 + i)`` (CJK Unified
            Ideographs, so at most 20992 units) and the characters of an utterance joined
            WITHOUT spaces, sorted like ``kaldi``. This is ESPnet's discrete-unit ASR practice:
            sentencepiece sees each utterance as one "word" of unit characters and learns BPE
            pieces spanning several units.
``npy``     ONE ``.npz`` file (numpy's zip of arrays) holding an ``int16`` array per id, in the order
            given. One file rather than a folder of ``<id>.npy``: it is written atomically with a
            single rename, shards and sidecars pair with it one to one, ids need not be valid file
            names, and a 280k-utterance corpus does not become 280k inodes. ``np.load(path)[id]``
            reads one utterance without reading the others.
``km``      HuBERT-style: bare ``u1 u2 u3`` lines in the order given, no ids, plus ``dict.km.txt``
            (``i 1`` for every unit) in the same folder, as fairseq's HuBERT pretraining reads.
            The ids are kept in the sidecar (``FILE.json``, key ``ids``) so the file reads back.

Deduplicated units (``dedup=True``) collapse runs of the same unit; the run lengths go to
``FILE.durations`` in the same line layout (``gslm``: ``id|d1 d2``; ``kaldi`` and ``espnet``:
``id d1 d2`` sorted; ``npy``: an ``.npz`` of ``int32`` arrays; ``km``: bare lines), so
``expand(values, durations)`` gives the frame-level units back exactly.

A sidecar ``FILE.json`` describes a unit file (frame rate, codebook size, checkpoint and its hash,
format, dedup, config, counts, rejected files). It is named after the unit file rather than a
fixed ``units.json`` so that several unit files (splits, shards) can share a folder.

Shards: ``FILE.shard-<i>-of-<n>`` (+ their sidecars) are what ``speechvq-extract shard=i
nshards=n`` writes; :func:`merge_shards` joins them into ``FILE``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from speechvq.audio import AudioError, load_audio
from speechvq.features import FeatureStats, FrontEnd
from speechvq.files import atomic_write, read_json, write_json

log = logging.getLogger(__name__)

Units = dict[str, np.ndarray]

FORMATS = ("gslm", "kaldi", "npy", "espnet", "km")
CJK_BASE = 0x4E00
CJK_LAST = 0x9FFF
MAX_CJK_UNITS = CJK_LAST - CJK_BASE + 1  # 20992 CJK Unified Ideographs
INT16_MAX = np.iinfo(np.int16).max
KM_DICT = "dict.km.txt"
_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")
# sidecar keys naming the exact files beside it (speechvq-extract writes them): not carried over
_FILE_HASHES = ("units_hash", "durations_hash")
_SUFFIX_FORMATS = {".npz": "npy", ".npy": "npy", ".km": "km", ".gslm": "gslm", ".kaldi": "kaldi"}


# --------------------------------------------------------------------------------------------
# dedup / expand


def dedup(seq: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Collapse runs of equal units: ``seq: (T,)`` -> ``(values (N,), durations (N,))``.

    ``durations`` are run lengths in frames (int32, all >= 1, summing to ``T``).
    """
    seq = np.asarray(seq)
    if seq.ndim != 1:
        raise ValueError(f"dedup expects a 1-D unit sequence, got shape {seq.shape}")
    if seq.size == 0:
        return seq.copy(), np.zeros(0, dtype=np.int32)
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    durations = np.diff(np.r_[starts, seq.size]).astype(np.int32)
    return seq[starts], durations


def expand(values: Sequence[int] | np.ndarray, durations: Sequence[int] | np.ndarray) -> np.ndarray:
    """Inverse of :func:`dedup`: ``values (N,)``, ``durations (N,)`` -> frame-level ``(sum(d),)``."""
    values, durations = np.asarray(values), np.asarray(durations)
    if values.shape != durations.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and durations {durations.shape} differ")
    if durations.size and durations.min() < 1:
        raise ValueError("durations must all be >= 1")
    return np.repeat(values, durations)


def dedup_units(units: Mapping[str, np.ndarray]) -> tuple[Units, Units]:
    """:func:`dedup` every utterance: returns ``(values, durations)`` dicts with the same ids."""
    values: Units = {}
    durations: Units = {}
    for utt, seq in units.items():
        values[utt], durations[utt] = dedup(seq)
    return values, durations


def expand_units(values: Mapping[str, np.ndarray], durations: Mapping[str, np.ndarray]) -> Units:
    """:func:`expand` every utterance; both dicts must hold the same ids."""
    if set(values) != set(durations):
        missing = sorted(set(values) ^ set(durations))[:5]
        raise ValueError(f"units and durations hold different ids (e.g. {missing})")
    return {utt: expand(values[utt], durations[utt]) for utt in values}


# --------------------------------------------------------------------------------------------
# paths


def durations_path(path: str | os.PathLike) -> Path:
    """``FILE.durations``: where the run lengths of a deduplicated unit file live."""
    path = Path(path)
    return path.with_name(path.name + ".durations")


def sidecar_path(path: str | os.PathLike) -> Path:
    """``FILE.json``: the sidecar describing a unit file (frame rate, checkpoint, counts...)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def shard_path(path: str | os.PathLike, shard: int, nshards: int) -> Path:
    """``FILE.shard-<shard>-of-<nshards>``: the output of one job of an array job."""
    if not 0 <= shard < nshards:
        raise ValueError(f"shard {shard} is not in [0, nshards={nshards})")
    path = Path(path)
    return path.with_name(f"{path.name}.shard-{shard}-of-{nshards}")


def _base_name(path: Path) -> str:
    """The file name without ``.durations`` / ``.shard-i-of-n`` decorations."""
    name = path.name.removesuffix(".durations")
    return _SHARD_RE.sub("", name)


# --------------------------------------------------------------------------------------------
# format inference


def infer_format(path: str | os.PathLike) -> str:
    """The format of a unit file, from its suffix (``.npz``/``.npy`` -> npy, ``.km``, ``.gslm``,
    ``.kaldi``) or else its content: a zip archive is ``npy``; a ``|`` after the id is ``gslm``;
    integer tokens after the id are ``kaldi``; CJK characters after the id are ``espnet``.

    ``.durations`` and ``.shard-i-of-n`` decorations are ignored. Raises ValueError naming the file
    when the content is ambiguous (e.g. only empty utterances): pass ``format=`` then.
    """
    path = Path(path)
    suffix = Path(_base_name(path)).suffix.lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such unit file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "npy"
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if "|" in line:
                return "gslm"
            parts = line.split(maxsplit=1)
            if len(parts) < 2:
                continue  # an utterance without units says nothing about the format
            rest = parts[1].strip()
            if all(tok.isdigit() for tok in rest.split()):
                return "kaldi"
            if all(CJK_BASE <= ord(c) <= CJK_LAST for c in rest if not c.isspace()):
                return "espnet"
            raise ValueError(f"{path}:{lineno}: not a unit file of any known format: {line[:80]!r}")
    raise ValueError(f"{path}: cannot infer the unit file format from its content; pass format=")


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"unknown unit format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


# --------------------------------------------------------------------------------------------
# writing


def _sorted_ids(ids: Iterable[str]) -> list[str]:
    """Byte order of the UTF-8 ids: what ``LC_ALL=C sort`` gives."""
    return sorted(ids, key=lambda s: s.encode("utf-8"))


def _check_ids(path: Path, ids: Iterable[str], fmt: str) -> None:
    for utt in ids:
        if not utt or any(c.isspace() for c in utt):
            raise ValueError(f"{path}: utterance id {utt!r} is empty or contains whitespace")
        if fmt == "gslm" and "|" in utt:
            raise ValueError(f"{path}: utterance id {utt!r} contains '|' (the gslm separator)")


def to_cjk(seq: Sequence[int] | np.ndarray) -> str:
    """Units as CJK characters, joined without spaces: unit ``i`` -> ``chr(0x4E00 + i)``."""
    seq = np.asarray(seq)
    if seq.size and (seq.min() < 0 or seq.max() >= MAX_CJK_UNITS):
        raise ValueError(f"espnet format holds units 0..{MAX_CJK_UNITS - 1}, got {seq.max()}")
    return "".join(chr(CJK_BASE + int(u)) for u in seq)


def from_cjk(text: str) -> np.ndarray:
    """Inverse of :func:`to_cjk` (whitespace between characters is ignored): ``(T,)`` int32."""
    codes = [ord(c) - CJK_BASE for c in text if not c.isspace()]
    if any(not 0 <= c < MAX_CJK_UNITS for c in codes):
        raise ValueError(f"not a CJK unit string: {text[:40]!r}")
    return np.asarray(codes, dtype=np.int32)


def _line_body(seq: np.ndarray, fmt: str) -> str:
    if fmt == "espnet":
        return to_cjk(seq)
    return " ".join(map(str, np.asarray(seq).tolist()))


def _write_lines(path: Path, seqs: Mapping[str, np.ndarray], fmt: str, spaced: bool) -> None:
    """Text layouts. ``spaced``: write integers even for espnet (its durations file)."""
    body_fmt = "kaldi" if (spaced and fmt == "espnet") else fmt
    ids = _sorted_ids(seqs) if fmt in ("kaldi", "espnet") else list(seqs)

    def write(f: Any) -> None:
        for utt in ids:
            body = _line_body(seqs[utt], body_fmt)
            if fmt == "gslm":
                f.write(f"{utt}|{body}\n")
            elif fmt == "km":
                f.write(f"{body}\n")
            else:
                f.write(f"{utt} {body}\n" if body else f"{utt}\n")

    atomic_write(path, write)


def _write_npz(path: Path, seqs: Mapping[str, np.ndarray], dtype: type) -> None:
    info = np.iinfo(dtype)
    arrays = {}
    for utt, seq in seqs.items():
        seq = np.asarray(seq)
        if seq.size and (seq.min() < info.min or seq.max() > info.max):
            raise ValueError(f"{path}: {utt}: values out of {np.dtype(dtype).name} range")
        arrays[utt] = seq.astype(dtype)
    # A file object, not a name: np.savez would append ".npz" to a name lacking it.
    atomic_write(path, lambda f: np.savez(f, **arrays), mode="wb")


def _write_km_dict(path: Path, n_codes: int) -> None:
    target = path.parent / KM_DICT
    atomic_write(target, lambda f: f.write("".join(f"{i} 1\n" for i in range(n_codes))))


def write_units(
    path: str | os.PathLike,
    units: Mapping[str, np.ndarray],
    format: str,
    dedup: bool = False,
    durations: Mapping[str, np.ndarray] | None = None,
    n_codes: int | None = None,
) -> None:
    """Write ``units`` (``{id: (T,) ints}``) to ``path`` in ``format``, atomically.

    ``dedup=True`` writes the deduplicated units and their run lengths to ``FILE.durations``;
    ``durations=`` writes already deduplicated ``units`` with the given run lengths. Otherwise a
    stale ``FILE.durations`` from an earlier run is removed. ``n_codes`` sizes ``dict.km.txt``
    (``km`` format; default: largest unit + 1). Ids may not contain whitespace (nor ``|`` for gslm).

    A unit file never sits beside durations written for other units, even when the process is
    killed half-way: when durations are written or removed, the old unit file goes first, the
    durations come next and the new unit file last.
    """
    path = Path(path)
    fmt = _check_format(format)
    if dedup and durations is not None:
        raise ValueError("pass dedup=True (frame-level units) or durations= (deduplicated), not both")
    if dedup:
        units, durations = dedup_units(units)
    if durations is not None and set(durations) != set(units):
        raise ValueError(f"{path}: units and durations hold different ids")
    _check_ids(path, units, fmt)
    dpath = durations_path(path)
    if durations is not None or dpath.exists():
        path.unlink(missing_ok=True)
        dpath.unlink(missing_ok=True)
    if durations is not None:
        ordered = {utt: durations[utt] for utt in units}
        if fmt == "npy":
            _write_npz(dpath, ordered, np.int32)
        else:
            _write_lines(dpath, ordered, fmt, spaced=True)
    if fmt == "km":
        top = max((int(np.max(s)) for s in units.values() if len(s)), default=-1) + 1
        _write_km_dict(path, max(n_codes or 0, top))
    if fmt == "npy":
        _write_npz(path, units, np.int16)
    else:
        _write_lines(path, units, fmt, spaced=False)


# --------------------------------------------------------------------------------------------
# reading


def _read_npz(path: Path) -> Units:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key].astype(np.int32) for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz unit file ({err})") from None


def _parse_ints(path: Path, lineno: int, text: str) -> np.ndarray:
    try:
        return np.asarray([int(tok) for tok in text.split()], dtype=np.int32)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: expected integer units, got {text[:80]!r}") from None


def _read_lines(path: Path, fmt: str, spaced: bool, ids: Sequence[str] | None) -> Units:
    out: Units = {}
    km_lines = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if fmt == "km":
                km_lines.append((lineno, line))
                continue
            if not line.strip():
                continue
            if fmt == "gslm":
                utt, sep, body = line.partition("|")
                if not sep:
                    raise ValueError(f"{path}:{lineno}: expected 'id|u1 u2 ...', got {line[:80]!r}")
            else:
                parts = line.split(maxsplit=1)
                utt, body = parts[0], (parts[1] if len(parts) > 1 else "")
            utt = utt.strip()
            if not utt:
                raise ValueError(f"{path}:{lineno}: empty utterance id")
            if utt in out:
                raise ValueError(f"{path}:{lineno}: duplicate utterance id {utt!r}")
            if fmt == "espnet" and not spaced:
                try:
                    out[utt] = from_cjk(body)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: not CJK unit characters") from None
            else:
                out[utt] = _parse_ints(path, lineno, body)
    if fmt != "km":
        return out
    if ids is None:
        raise ValueError(f"{path}: a .km file has no ids; pass ids= (its sidecar has none)")
    if len(ids) != len(km_lines):
        raise ValueError(f"{path}: {len(km_lines)} lines but {len(ids)} ids")
    return {utt: _parse_ints(path, n, line) for utt, (n, line) in zip(ids, km_lines, strict=True)}


def _km_ids(path: Path, ids: Sequence[str] | None) -> Sequence[str] | None:
    if ids is not None:
        return ids
    meta = read_sidecar(path)
    return meta.get("ids") if meta else None


def read_units(
    path: str | os.PathLike,
    format: str | None = None,
    expand: bool = False,
    ids: Sequence[str] | None = None,
) -> Units:
    """Read a unit file: ``{id: (T,) int32}`` in file order (sorted for kaldi/espnet).

    ``format=None`` infers it (:func:`infer_format`). ``expand=True`` returns frame-level units
    when the file is deduplicated (its ``FILE.durations`` is applied; a dedup file whose durations
    are missing is an error). ``ids``: the utterance ids of a ``km`` file, in line order (default:
    those in its sidecar). Errors name ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such unit file")
    fmt = _check_format(format or infer_format(path))
    if fmt == "npy":
        units = _read_npz(path)
    else:
        units = _read_lines(path, fmt, spaced=False, ids=_km_ids(path, ids) if fmt == "km" else None)
    if not expand:
        return units
    durations = read_durations(path, fmt, ids=ids)
    if durations is None:
        meta = read_sidecar(path)
        if meta and meta.get("dedup"):
            raise FileNotFoundError(
                f"{durations_path(path)}: missing; {path} holds deduplicated units and cannot be "
                "expanded to frames without it"
            )
        return units
    try:
        return expand_units(units, durations)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def read_durations(
    path: str | os.PathLike, format: str | None = None, ids: Sequence[str] | None = None
) -> Units | None:
    """The run lengths beside a deduplicated unit file (``FILE.durations``), or None if absent."""
    path = Path(path)
    dpath = durations_path(path)
    if not dpath.exists():
        return None
    fmt = _check_format(format or infer_format(path))
    if fmt == "npy":
        return _read_npz(dpath)
    return _read_lines(dpath, fmt, spaced=True, ids=_km_ids(path, ids) if fmt == "km" else None)


# --------------------------------------------------------------------------------------------
# sidecars, conversion, shards


def read_sidecar(path: str | os.PathLike) -> dict | None:
    """The sidecar ``FILE.json`` of a unit file as a dict, or None when there is none."""
    spath = sidecar_path(path)
    if not spath.exists():
        return None
    return read_json(spath)


def write_sidecar(path: str | os.PathLike, meta: Mapping[str, Any]) -> None:
    """Write the sidecar ``FILE.json`` of the unit file ``path``, atomically."""
    write_json(sidecar_path(path), meta)


def convert_units(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str,
    src_format: str | None = None,
    ids: Sequence[str] | None = None,
) -> None:
    """Rewrite the unit file ``src`` as ``dst`` in ``format``, keeping durations and the sidecar.

    A deduplicated file stays deduplicated (its durations are converted too). ``ids``: the ids of
    a ``km`` source without a sidecar.
    """
    src, dst = Path(src), Path(dst)
    fmt = src_format or infer_format(src)
    units = read_units(src, fmt, ids=ids)
    durations = read_durations(src, fmt, ids=ids)
    meta = dict(read_sidecar(src) or {})
    write_units(dst, units, format, durations=durations, n_codes=meta.get("n_codes"))
    if meta or format == "km":
        meta.update(format=format, dedup=durations is not None)
        for key in ("ids", *_FILE_HASHES):  # the source's files, not these
            meta.pop(key, None)
        if format == "km":
            meta["ids"] = list(units)
        write_sidecar(dst, meta)


def merge_shards(path: str | os.PathLike, nshards: int, remove: bool = False) -> dict:
    """Join ``FILE.shard-<i>-of-<nshards>`` (i = 0..n-1) into ``FILE`` (+ durations, sidecar).

    Shards hold consecutive blocks of the manifest, so joining them in shard order gives manifest
    order back (kaldi/espnet are re-sorted). Every shard must exist and their sidecars must agree
    on format, dedup, checkpoint hash, frame rate and codebook size. ``remove=True`` deletes the
    shard files afterwards. Returns the merged sidecar.
    """
    path = Path(path)
    shards = [shard_path(path, i, nshards) for i in range(nshards)]
    missing = [str(p) for p in shards if not p.exists() or not sidecar_path(p).exists()]
    if missing:
        raise FileNotFoundError(f"cannot merge {path}: missing shard(s) {', '.join(missing)}")
    metas = [read_sidecar(p) or {} for p in shards]
    keys = ("format", "dedup", "checkpoint_hash", "frame_rate", "n_codes", "manifest_hash")
    for p, meta in zip(shards[1:], metas[1:], strict=True):
        for key in keys:
            if meta.get(key) != metas[0].get(key):
                raise ValueError(
                    f"cannot merge {path}: {sidecar_path(p)} has {key}={meta.get(key)!r} but "
                    f"{sidecar_path(shards[0])} has {metas[0].get(key)!r}"
                )
    fmt = metas[0]["format"]
    units: Units = {}
    durations: Units | None = {} if metas[0].get("dedup") else None
    for p in shards:
        part = read_units(p, fmt)
        clash = set(part) & set(units)
        if clash:
            raise ValueError(f"cannot merge {path}: id {sorted(clash)[0]!r} is in two shards")
        units.update(part)
        if durations is not None:
            part_d = read_durations(p, fmt)
            if part_d is None:
                raise FileNotFoundError(f"{durations_path(p)}: missing")
            durations.update(part_d)
    write_units(path, units, fmt, durations=durations, n_codes=metas[0].get("n_codes"))
    merged = dict(metas[0])
    merged.update(shard=None, nshards=nshards, merged_from=[p.name for p in shards])
    merged["rejected"] = [r for m in metas for r in m.get("rejected", [])]
    counts: dict[str, float] = {}
    for m in metas:
        for key, value in (m.get("counts") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                counts[key] = counts.get(key, 0) + value
    merged["counts"] = counts
    for key in ("ids", *_FILE_HASHES):  # shard 0's files, not the merged ones
        merged.pop(key, None)
    if fmt == "km":
        merged["ids"] = list(units)
    write_sidecar(path, merged)
    if remove:
        for p in shards:
            for f in (p, durations_path(p), sidecar_path(p)):
                f.unlink(missing_ok=True)
    return merged


# --------------------------------------------------------------------------------------------
# extraction: whole utterances -> frame-level units, chunked and batched, yet exactly the units
# of each utterance encoded whole on its own.
#
# Why this is exact: a stack of convolutions (with per-frame norms and activations) makes output
# unit j depend only on inputs within its receptive field. An utterance is cut into windows of
# `chunk` units plus `context` units of input on each side, with context >= the receptive field
# in units; only each window's centre is kept, so the cut never reaches a kept unit. Batching pads
# windows on the right with zeros; that padding only reaches the last `context` units of a
# window, so a window that ends at the utterance's end keeps all but its last `context` units and
# those come from a "tail" window of exactly 2 * context units, batched only with windows of the
# same length (no padding at all).


def receptive_field(encoder: nn.Module) -> tuple[int, int]:
    """``(rf, stride)`` of a 1-D conv encoder, both in input frames (mel frames or samples).

    ``rf`` is an upper bound on how many consecutive input frames one output frame can see: the
    Conv1d / pooling layers are walked in registration order and their widths added (a residual
    branch adds its width, the identity path nothing). ``stride`` is the product of the strides:
    input frames per output unit. Raises ValueError for a layer that mixes the whole sequence
    (recurrent, attention, GroupNorm / InstanceNorm over time): chunked encoding cannot be exact.
    """
    rf, stride = 1, 1
    for module in encoder.modules():
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.GroupNorm, nn.InstanceNorm1d)):
            raise ValueError(
                f"encoder layer {type(module).__name__} sees the whole sequence: chunked "
                "extraction could change the units"
            )
        if isinstance(module, nn.Conv1d):
            k, s, d = module.kernel_size[0], module.stride[0], module.dilation[0]
        elif isinstance(module, (nn.AvgPool1d, nn.MaxPool1d)):
            k, s, d = _int(module.kernel_size), _int(module.stride), _int(
                getattr(module, "dilation", 1)
            )
        else:
            continue
        rf += (k - 1) * d * stride
        stride *= s
    return rf, stride


def measured_receptive_field(encoder: nn.Module, input_shape: Sequence[int], length: int) -> int:
    """The receptive field of the centre output frame, measured: the span of input frames with a
    non-zero gradient, for a random input ``(1, *input_shape, length)`` (input frames).

    A check on :func:`receptive_field`, which trusts that layers are registered in the order they
    run; the larger of the two is used.
    """
    gen = torch.Generator().manual_seed(0)
    param = next(encoder.parameters())
    x = torch.randn((1, *input_shape, length), generator=gen).to(param)
    x.requires_grad_(True)
    with torch.enable_grad():
        z = encoder(x)
        (grad,) = torch.autograd.grad(z[..., z.shape[-1] // 2].sum(), x)
    nonzero = torch.nonzero(grad.reshape(-1, length).abs().sum(0)).flatten()
    return int(nonzero[-1] - nonzero[0] + 1) if nonzero.numel() else 1


def _int(value: int | Sequence[int]) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def plan_chunks(
    n_units: int, chunk_units: int, context_units: int
) -> list[tuple[int, int, int, int, bool]]:
    """Windows that cover ``n_units`` units: ``(start, stop, keep_start, keep_stop, pad_ok)``.

    Window ``[start, stop)`` is encoded and units ``[keep_start, keep_stop)`` of it are kept; the
    kept ranges tile ``[0, n_units)`` in order. ``pad_ok``: the window may be right-padded inside a
    batch (its kept units are at least ``context_units`` from its end, or it ends nowhere near
    the utterance's end); other windows are batched only with windows of their exact length.
    """
    if chunk_units < 1 or context_units < 0:
        raise ValueError(f"bad chunking: chunk {chunk_units} units, context {context_units}")
    c = context_units
    plan = []
    for keep_start in range(0, n_units, chunk_units):
        keep_stop = min(n_units, keep_start + chunk_units)
        start = max(0, keep_start - c)
        if keep_stop + c < n_units:
            plan.append((start, keep_stop + c, keep_start, keep_stop, True))
            continue
        # the last window: it reaches the end, so it keeps everything up to the end
        stop = n_units
        if c == 0 or stop - start <= 2 * c:
            plan.append((start, stop, keep_start, stop, False))
        else:
            plan.append((start, stop, keep_start, stop - c, True))
            plan.append((stop - 2 * c, stop, stop - c, stop, False))
        break
    return plan


@dataclass(frozen=True)
class _Piece:
    item: int
    start: int
    stop: int
    keep_start: int
    keep_stop: int
    pad_ok: bool

    @property
    def length(self) -> int:
        return self.stop - self.start


def _batch_pieces(pieces: Sequence[_Piece], max_units: int) -> list[list[_Piece]]:
    """Length-sorted batches whose padded size (batch x longest) stays within ``max_units``."""
    batches: list[list[_Piece]] = []
    current: list[_Piece] = []
    for piece in sorted((p for p in pieces if p.pad_ok), key=lambda p: -p.length):
        if current and current[0].length * (len(current) + 1) > max_units:
            batches.append(current)
            current = []
        current.append(piece)
    if current:
        batches.append(current)
    same_length: dict[int, list[_Piece]] = {}
    for piece in pieces:
        if not piece.pad_ok:
            same_length.setdefault(piece.length, []).append(piece)
    for length, group in sorted(same_length.items()):
        per_batch = max(1, max_units // length)
        batches.extend(group[i : i + per_batch] for i in range(0, len(group), per_batch))
    return batches


class ChunkedEncoder:
    """Encode whole utterances to units in bounded memory, batched, with exact results.

    ``model`` has ``encoder`` (a conv stack), ``encode(x) -> (B, U)`` and ``frame_rate``.
    Inputs are whole-utterance model inputs whose last axis is time: normalised log-mels
    ``(n_mels, F)`` (mel model) or waveforms ``(T,)`` (wave model), a whole number of units long.

    Args:
        chunk_seconds: units kept per window (bounds the encoder's activation memory).
        context_seconds: input context on each side of a window; ``None`` (default) derives it
            from the encoder's receptive field (``ceil(rf / stride) + 1`` units), which makes the
            units independent of the chunking. A smaller value is used as given, with a warning.
        max_batch_seconds: padded audio per encoder call.
        device: where the model runs (it is moved there).
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_seconds: float = 30.0,
        context_seconds: float | None = None,
        max_batch_seconds: float = 60.0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.frame_rate = float(model.frame_rate)
        self.receptive_field, self.stride = receptive_field(model.encoder)
        first = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv1d))
        shape = () if getattr(model, "kind", "mel") == "wave" else (first.in_channels,)
        length = max(4 * self.receptive_field, 64 * self.stride) // self.stride * self.stride
        measured = measured_receptive_field(model.encoder, shape, length)
        self.receptive_field = max(self.receptive_field, measured)
        needed = math.ceil(self.receptive_field / self.stride) + 1
        if context_seconds is None:
            self.context = needed
        else:
            self.context = math.ceil(context_seconds * self.frame_rate)
            if self.context < needed:
                log.warning(
                    "context %d units is less than the encoder's receptive field (%d units): "
                    "units near chunk borders may differ from whole-file encoding",
                    self.context,
                    needed,
                )
        self.chunk = max(1, round(chunk_seconds * self.frame_rate))
        self.max_units = max(round(max_batch_seconds * self.frame_rate), self.chunk + 2 * self.context)

    def n_units(self, x: torch.Tensor) -> int:
        """Units an input of this shape yields (``x.shape[-1] // stride``)."""
        return x.shape[-1] // self.stride

    @torch.no_grad()
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """``inputs``: whole-utterance inputs -> their units, ``(U_i,)`` int16 each."""
        pieces = [
            _Piece(i, *window)
            for i, x in enumerate(inputs)
            for window in plan_chunks(self.n_units(x), self.chunk, self.context)
        ]
        outputs = [np.empty(self.n_units(x), dtype=np.int16) for x in inputs]
        for batch in _batch_pieces(pieces, self.max_units):
            longest = batch[0].length if batch[0].pad_ok else max(p.length for p in batch)
            first = inputs[batch[0].item]
            x = first.new_zeros((len(batch), *first.shape[:-1], longest * self.stride))
            for b, p in enumerate(batch):
                x[b, ..., : p.length * self.stride] = inputs[p.item][
                    ..., p.start * self.stride : p.stop * self.stride
                ]
            codes = self.model.encode(x.to(self.device, non_blocking=True)).cpu().numpy()
            for b, p in enumerate(batch):
                lo, hi = p.keep_start - p.start, p.keep_stop - p.start
                outputs[p.item][p.keep_start : p.keep_stop] = codes[b, lo:hi]
        return outputs


class ModelInput:
    """Manifest row -> the model's input for the whole utterance, as training prepared it.

    The waveform is cut to whole units (``T // samples_per_unit`` units, as
    :class:`speechvq.data.dataset.UtteranceDataset` does). Mel model: the one front-end,
    :class:`speechvq.features.FrontEnd` with ``stats``, ``(n_mels, 2U)``; wave model: ``(320 U,)``.
    Raises :class:`speechvq.audio.AudioError` for unreadable audio or audio shorter than a unit.
    Picklable, so DataLoader workers can run it.
    """

    def __init__(
        self,
        kind: str,
        samples_per_unit: int,
        sample_rate: int,
        features_cfg: Mapping | None = None,
        stats: FeatureStats | None = None,
        chunk_seconds: float = 30.0,
    ) -> None:
        self.kind = kind
        self.samples_per_unit = int(samples_per_unit)
        self.sample_rate = int(sample_rate)
        self.front: FrontEnd | None = None
        if kind == "mel":
            if features_cfg is None:
                raise ValueError("the mel model needs its features config")
            self.front = FrontEnd(features_cfg, stats, chunk_seconds=chunk_seconds)

    def __call__(self, path: str, speaker: str) -> torch.Tensor:
        wav = load_audio(path, self.sample_rate)
        n = wav.numel() // self.samples_per_unit * self.samples_per_unit
        if n == 0:
            raise AudioError(path, f"shorter than one unit ({self.samples_per_unit} samples)")
        wav = wav[:n]
        if self.front is None:
            return wav.clone()
        return self.front(wav, speaker)


class _Inputs(torch.utils.data.Dataset):
    """Row index -> ``(index, input or None, error or None)``: a bad file is a result, not a crash."""

    def __init__(self, rows: Sequence[Any], make_input: Callable[[str, str], torch.Tensor]) -> None:
        self.rows = rows
        self.make_input = make_input

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        row = self.rows[index]
        try:
            return index, self.make_input(row.path, row.speaker), None
        except AudioError as err:
            return index, None, err.problem


@dataclass
class Extraction:
    """What :func:`extract_units` produced: frame-level ``units`` in row order, the ``rejected``
    rows (``{"id", "path", "reason"}``), seconds of audio encoded and wall-clock seconds."""

    units: Units
    rejected: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio per second of wall-clock time."""
        return self.seconds / max(self.wall_seconds, 1e-9)


def iter_units(
    rows: Sequence[Any],
    make_input: Callable[[str, str], torch.Tensor],
    encoder: ChunkedEncoder,
    num_workers: int = 0,
    group_seconds: float | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield ``(row index, units (U,) int16 or None, error or None)`` for every row, longest first.

    Rows (``.path``, ``.speaker``, ``.num_samples``) are loaded by ``num_workers`` DataLoader
    workers in order of decreasing length and encoded in groups of about ``group_seconds`` of
    audio (default: four batches' worth), so padding stays small and memory bounded.
    """
    from tqdm import tqdm

    order = sorted(range(len(rows)), key=lambda i: (-rows[i].num_samples, i))
    loader = torch.utils.data.DataLoader(
        _Inputs(rows, make_input),
        batch_size=None,
        sampler=order,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,  # hour-long inputs: keep few in flight
    )
    group_units = (group_seconds * encoder.frame_rate) if group_seconds else 4 * encoder.max_units
    bar = tqdm(total=len(rows), unit="utt", desc="extract", disable=not progress, file=sys.stderr)
    group: list[tuple[int, torch.Tensor]] = []
    size = 0

    def flush() -> Iterator[tuple[int, np.ndarray, None]]:
        outputs = encoder([x for _, x in group])
        for (index, _), units in zip(group, outputs, strict=True):
            bar.update()
            yield index, units, None

    try:
        for index, x, error in loader:
            if error is not None:
                bar.update()
                yield index, None, error
                continue
            group.append((index, x))
            size += encoder.n_units(x)
            if size >= group_units:
                yield from flush()
                group, size = [], 0
        if group:
            yield from flush()
    finally:
        bar.close()


def extract_units(
    rows: Sequence[Any],
    make_input: Callable[[str, str], torch.Tensor],
    encoder: ChunkedEncoder,
    num_workers: int = 0,
    progress: bool = True,
) -> Extraction:
    """Units for every row (``.id``, ``.path``, ``.speaker``, ``.num_samples``; manifest rows).

    Unreadable files are logged, listed in ``rejected`` and skipped. Returns units in row order.
    """
    start = time.perf_counter()
    found: dict[int, np.ndarray] = {}
    rejected = []
    for index, units, error in iter_units(rows, make_input, encoder, num_workers, progress=progress):
        if units is None:
            row = rows[index]
            log.warning("skipping %s: %s", row.path, error)
            rejected.append({"id": row.id, "path": str(row.path), "reason": error})
        else:
            found[index] = units
    ordered = {rows[i].id: found[i] for i in sorted(found)}
    frames = sum(len(u) for u in ordered.values())
    return Extraction(ordered, rejected, frames / encoder.frame_rate, time.perf_counter() - start)
