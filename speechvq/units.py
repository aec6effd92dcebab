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
format, dedup, config, counts, rejected files): :class:`Sidecar` (:mod:`speechvq.sidecar`,
re-exported here), read with :func:`read_sidecar` and written with :func:`write_sidecar`.

Reading is vectorised (numpy parses each line's integers in C) and a whole file's units land in
ONE flat array: the dict's values are views into it, so a corpus of 173 M units is one
allocation of 346 MB (``dtype=np.int16``) or 692 MB (int32), not 280k small arrays.

Joining: ``FILE.shard-<i>-of-<n>`` (+ their sidecars) are what ``speechvq-extract shard=i
nshards=n`` writes; :func:`merge_shards` joins them into ``FILE``. :func:`merge_units` builds the
unit file of a list of utterances (a split) from unit files that hold them (its subsets).
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speechvq.files import atomic_write
from speechvq.sidecar import (  # noqa: F401 (re-exported: the unit-file API)
    Sidecar,
    read_sidecar,
    sidecar_path,
    write_sidecar,
)

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
    """:func:`expand` every utterance; both dicts must hold the same ids. The frame-level
    sequences are views into one flat array of the values' dtype."""
    if set(values) != set(durations):
        missing = sorted(set(values) ^ set(durations))[:5]
        raise ValueError(f"units and durations hold different ids (e.g. {missing})")
    lengths = [int(np.sum(durations[utt])) for utt in values]
    dtype = np.result_type(*(np.asarray(v).dtype for v in values.values())) if values else np.int32
    flat = np.empty(sum(lengths), dtype=dtype)
    out: Units = {}
    pos = 0
    for utt, n in zip(values, lengths, strict=True):
        out[utt] = flat[pos : pos + n]
        out[utt][:] = expand(values[utt], durations[utt])
        pos += n
    return out


# --------------------------------------------------------------------------------------------
# paths


def durations_path(path: str | os.PathLike) -> Path:
    """``FILE.durations``: where the run lengths of a deduplicated unit file live."""
    path = Path(path)
    return path.with_name(path.name + ".durations")


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
    return (seq.astype("<u4") + CJK_BASE).tobytes().decode("utf-32-le")


def from_cjk(text: str) -> np.ndarray:
    """Inverse of :func:`to_cjk` (whitespace between characters is ignored): ``(T,)`` int32."""
    chars = "".join(text.split())
    codes = np.frombuffer(chars.encode("utf-32-le"), dtype="<u4").astype(np.int64) - CJK_BASE
    if codes.size and (codes.min() < 0 or codes.max() >= MAX_CJK_UNITS):
        raise ValueError(f"not a CJK unit string: {text[:40]!r}")
    return codes.astype(np.int32)


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


_WHITESPACE = b" \t\n\r\x0b\x0c"


def _flat_views(path: Path, arrays: Mapping[str, np.ndarray], dtype: type) -> Units:
    """``arrays`` copied into one flat array of ``dtype``: ``{id: view}``."""
    flat = np.empty(sum(a.size for a in arrays.values()), dtype=dtype)
    info, out, pos = np.iinfo(dtype), {}, 0
    for key, a in arrays.items():
        if a.ndim != 1:
            raise ValueError(f"{path}: {key}: expected a 1-D array of units, got shape {a.shape}")
        if a.size and not np.can_cast(a.dtype, dtype) and (a.min() < info.min or a.max() > info.max):
            raise ValueError(f"{path}: {key}: values out of {np.dtype(dtype).name} range")
        out[key] = flat[pos : pos + a.size]
        out[key][:] = a
        pos += a.size
    return out


def _read_npz(path: Path, dtype: type) -> Units:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz unit file ({err})") from None
    return _flat_views(path, arrays, dtype)


def _unit_bound(path: Path, cjk: bool) -> int:
    """At least the number of units in a text unit file, found at C speed: units are separated
    by whitespace (or, for espnet, are 3-byte UTF-8 characters)."""
    if cjk:
        return path.stat().st_size // 3 + 1
    n = 1
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            n += len(block) - len(block.translate(None, _WHITESPACE))
    return n


class _FlatFill:
    """Parsed lines -> one flat array of ``dtype``. Lines are staged as int64 and range-checked a
    block at a time (one min/max per 262144 units, not per line), so a value that does not fit
    ``dtype`` is an error naming its line, never a silent wrap-around."""

    def __init__(self, path: Path, size: int, dtype: type) -> None:
        self.path, self.flat, self.info = path, np.empty(size, dtype=dtype), np.iinfo(dtype)
        self.stage = np.empty(1 << 18, dtype=np.int64)
        self.staged: list[tuple[int, int, int]] = []  # (line number, start in stage, length)
        self.used = self.pos = 0

    def add(self, lineno: int, values: np.ndarray) -> tuple[int, int]:
        """Stage a line's ``values``; returns where they will be in the flat array."""
        n = values.size
        if self.used + n > self.stage.size:
            self.flush()
            self.stage = self.stage if n <= self.stage.size else np.empty(n, dtype=np.int64)
        self.stage[self.used : self.used + n] = values
        self.staged.append((lineno, self.used, n))
        self.used += n
        self.pos += n
        return self.pos - n, self.pos

    def flush(self) -> np.ndarray:
        block, lo, hi = self.stage[: self.used], self.info.min, self.info.max
        if self.used and (block.min() < lo or block.max() > hi):
            for lineno, start, n in self.staged:
                bad = block[start : start + n][(block[start : start + n] < lo) |
                                               (block[start : start + n] > hi)]
                if bad.size:
                    raise ValueError(f"{self.path}:{lineno}: unit {int(bad[0])} does not fit "
                                     f"{self.flat.dtype.name}")
        if self.pos > self.flat.size:
            raise ValueError(f"{self.path}: changed while it was being read")
        self.flat[self.pos - self.used : self.pos] = block
        self.used = 0
        self.staged.clear()
        return self.flat


def _parse_body(path: Path, lineno: int, body: str, cjk: bool) -> np.ndarray:
    if cjk:
        try:
            return from_cjk(body)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not CJK unit characters") from None
    if not body or body.isspace():  # numpy reads " " as [0]
        return np.zeros(0, dtype=np.int64)
    try:  # C-speed parsing; an unparsable token raises (a DeprecationWarning before numpy 2)
        return np.fromstring(body, dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        raise ValueError(f"{path}:{lineno}: expected integer units, got {body[:80]!r}") from None


def _read_lines(path: Path, fmt: str, spaced: bool, ids: Sequence[str] | None,
                dtype: type) -> Units:
    cjk = fmt == "espnet" and not spaced
    fill = _FlatFill(path, _unit_bound(path, cjk), dtype)
    spans: dict[str, tuple[int, int]] = {}
    km_spans = []
    with open(path, encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if fmt == "km":
                km_spans.append(fill.add(lineno, _parse_body(path, lineno, line, cjk)))
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
            if utt in spans:
                raise ValueError(f"{path}:{lineno}: duplicate utterance id {utt!r}")
            spans[utt] = fill.add(lineno, _parse_body(path, lineno, body, cjk))
    flat = fill.flush()
    if fmt == "km":
        if ids is None:
            raise ValueError(f"{path}: a .km file has no ids; pass ids= (its sidecar has none)")
        if len(ids) != len(km_spans):
            raise ValueError(f"{path}: {len(km_spans)} lines but {len(ids)} ids")
        spans = dict(zip(ids, km_spans, strict=True))
    return {utt: flat[a:b] for utt, (a, b) in spans.items()}


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
    dtype: type = np.int32,
) -> Units:
    """Read a unit file: ``{id: (T,) int32}`` in file order (sorted for kaldi/espnet).

    ``format=None`` infers it (:func:`infer_format`). ``expand=True`` returns frame-level units
    when the file is deduplicated (its ``FILE.durations`` is applied; a dedup file whose durations
    are missing is an error). ``ids``: the utterance ids of a ``km`` file, in line order (default:
    those in its sidecar). ``dtype``: ``np.int32``, or ``np.int16`` for half the memory (a unit
    that does not fit is an error). The arrays are views into one flat array holding the whole
    file. Errors name ``file:line``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such unit file")
    fmt = _check_format(format or infer_format(path))
    if fmt == "npy":
        units = _read_npz(path, dtype)
    else:
        km_ids = _km_ids(path, ids) if fmt == "km" else None
        units = _read_lines(path, fmt, spaced=False, ids=km_ids, dtype=dtype)
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
    """The run lengths beside a deduplicated unit file (``FILE.durations``), or None if absent:
    ``{id: (N,) int32}``, views into one flat array."""
    path = Path(path)
    dpath = durations_path(path)
    if not dpath.exists():
        return None
    fmt = _check_format(format or infer_format(path))
    if fmt == "npy":
        return _read_npz(dpath, np.int32)
    km_ids = _km_ids(path, ids) if fmt == "km" else None
    return _read_lines(dpath, fmt, spaced=True, ids=km_ids, dtype=np.int32)


# --------------------------------------------------------------------------------------------
# conversion (joining unit files: speechvq.unit_merge)


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

