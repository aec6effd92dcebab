"""Discrete units: unit files in every supported format, dedup + durations, shards, extraction.

In memory a corpus' units are a :data:`Units` dict ``{utterance id: int array (T,)}``; frame ``i``
of a frame-level sequence is centred at ``(i + 0.5) / unit_rate`` seconds.

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

A sidecar ``FILE.json`` describes a unit file (unit rate, codebook size, checkpoint and its hash,
format, dedup, config, counts, rejected files): :class:`Sidecar`, the one definition of its keys,
read with :func:`read_sidecar` and written with :func:`write_sidecar`. It is named after the unit
file rather than a fixed ``units.json`` so that several unit files (splits, shards) can share a
folder.

Shards: ``FILE.shard-<i>-of-<n>`` (+ their sidecars) are what ``speechvq-extract shard=i
nshards=n`` writes; :func:`merge_shards` joins them into ``FILE``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from speechvq.files import atomic_write, read_json, write_json

Units = dict[str, np.ndarray]

FORMATS = ("gslm", "kaldi", "npy", "espnet", "km")
CJK_BASE = 0x4E00
CJK_LAST = 0x9FFF
MAX_CJK_UNITS = CJK_LAST - CJK_BASE + 1  # 20992 CJK Unified Ideographs
INT16_MAX = np.iinfo(np.int16).max
KM_DICT = "dict.km.txt"
_SHARD_RE = re.compile(r"\.shard-(\d+)-of-(\d+)$")
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
    return meta.ids if meta else None


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
        if meta and meta.dedup:
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


@dataclass
class Sidecar:
    """The sidecar ``FILE.json`` of a unit file: what the units are and where they came from.

    ``speechvq-extract`` fills every field; a converted or merged file keeps its source's. Keys
    this version does not know are kept in ``extra`` and written back unchanged.
    """

    format: str | None = None  # gslm | kaldi | npy | espnet | km
    dedup: bool = False
    unit_rate: float | None = None  # units per second: frame i is centred at (i + 0.5) / it
    n_codes: int | None = None  # codebook size
    model_kind: str | None = None  # "mel" | "wave"
    checkpoint: str | None = None  # the VQ-VAE checkpoint (absolute path) and its file hash
    checkpoint_hash: str | None = None
    manifest: str | None = None  # the manifest (absolute path) and its file hash
    manifest_hash: str | None = None
    shard: int | None = None  # this file's shard of nshards (None: merged or whole)
    nshards: int | None = None
    signature: dict | None = None  # what makes a re-run "already done" (speechvq.extract)
    features: dict | None = None  # the front-end config the units were made with
    normalization: dict | None = None  # where the normalisation statistics came from
    chunking: dict | None = None
    counts: dict = field(default_factory=dict)  # utterances, frames, seconds, rejected
    rejected: list = field(default_factory=list)  # {"id", "path", "reason"} per skipped file
    device: str | None = None
    wall_seconds: float | None = None
    realtime_factor: float | None = None
    created: str | None = None
    config: dict | None = None  # the full resolved config of the run
    units_hash: str | None = None  # the files beside this sidecar (None: not recorded)
    durations_hash: str | None = None
    ids: list | None = None  # km format: the utterance ids in line order
    merged_from: list | None = None  # merged shards' file names
    extra: dict = field(default_factory=dict)

    #: fields that describe the exact files beside a sidecar: never carried over to another file
    FILE_FIELDS = ("units_hash", "durations_hash", "ids")

    def to_dict(self) -> dict:
        """Plain JSON data; ``ids`` and ``merged_from`` only when set, unknown keys kept."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("ids", "merged_from"):
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | os.PathLike = "sidecar") -> Sidecar:
        """The sidecar in ``data``; ValueError naming ``path`` when it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: not a unit-file sidecar (a JSON object)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "frame_rate" in data and "unit_rate" not in data:  # its former name
            data = {("unit_rate" if k == "frame_rate" else k): v for k, v in data.items()}
        given = {k: v for k, v in data.items() if k in known}
        return cls(**given, extra={k: v for k, v in data.items() if k not in known})

    def for_other_file(self, **changes: Any) -> Sidecar:
        """A copy for another file made from the same units (converted, merged): without the
        fields that describe this file's bytes, with ``changes`` applied."""
        clear = dict.fromkeys(self.FILE_FIELDS)
        return dataclasses.replace(self, **{**clear, **changes}, extra=dict(self.extra))


def read_sidecar(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar ``FILE.json`` of the unit file ``path``, or None when there is none."""
    spath = sidecar_path(path)
    if not spath.exists():
        return None
    return Sidecar.from_dict(read_json(spath), spath)


def write_sidecar(path: str | os.PathLike, sidecar: Sidecar | Mapping[str, Any]) -> None:
    """Write the sidecar ``FILE.json`` of the unit file ``path``, atomically."""
    if not isinstance(sidecar, Sidecar):
        sidecar = Sidecar.from_dict(sidecar, sidecar_path(path))
    write_json(sidecar_path(path), sidecar.to_dict())


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
    meta = read_sidecar(src)
    write_units(dst, units, format, durations=durations, n_codes=meta.n_codes if meta else None)
    if meta is not None or format == "km":
        meta = (meta or Sidecar(format)).for_other_file(
            format=format, dedup=durations is not None,
            ids=list(units) if format == "km" else None)
        write_sidecar(dst, meta)


def merge_shards(path: str | os.PathLike, nshards: int, remove: bool = False) -> Sidecar:
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
    metas = [read_sidecar(p) for p in shards]
    keys = ("format", "dedup", "checkpoint_hash", "unit_rate", "n_codes", "manifest_hash")
    for p, meta in zip(shards[1:], metas[1:], strict=True):
        for key in keys:
            if getattr(meta, key) != getattr(metas[0], key):
                raise ValueError(
                    f"cannot merge {path}: {sidecar_path(p)} has {key}={getattr(meta, key)!r} "
                    f"but {sidecar_path(shards[0])} has {getattr(metas[0], key)!r}"
                )
    fmt = metas[0].format
    units: Units = {}
    durations: Units | None = {} if metas[0].dedup else None
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
