"""Phone alignments: read ``.phn``, Praat/MFA TextGrid and frame-TSV files; label frames.

Three on-disk formats are understood, one utterance per file (or per TSV row); a file's key is
its stem (see :func:`alignment_files`) and :func:`match_alignments` pairs keys with manifest rows:

``.phn``
    One interval per line, ``start end phone``, times in seconds, whitespace separated::

        0 0.164 sil
        0.164 0.255 hh

    Blank lines and lines starting with ``#`` are skipped. Intervals must be in order and must
    not overlap; gaps are allowed (they count as silence). This is what the mini corpus ships
    beside every FLAC (see :mod:`speechvq.data.synth`). TIMIT-style files of integer sample
    indices (``0 3050 h#``: every time an integer, the last end above 1000) are recognised and
    divided by the sample rate (16 kHz unless told otherwise). Suffixes match in any case.

TextGrid (``.TextGrid``)
    Praat's text format, long (the normal Montreal Forced Aligner output) or short. The tier
    named ``tier`` (default ``phones``; MFA's multi-speaker ``"<speaker> - phones"`` also matches)
    is read. ARPAbet stress digits are stripped (``AH0`` -> ``AH``) and empty intervals become
    ``sil``: they are *kept*, because dropping them would shift every later phone in time.
    UTF-8 and UTF-16 (with BOM, as Praat writes non-ASCII files) are accepted.

Frame TSV (any other suffix, e.g. ``.tsv``)
    One utterance per line, three tab-separated fields::

        id<TAB>frame_rate<TAB>label label label ...

    where the labels are space separated, one per frame, frame ``i`` centred at
    ``(i + 0.5) / frame_rate`` seconds. An optional header line ``id<TAB>frame_rate<TAB>labels``
    and ``#`` comment lines are skipped. Converting such a file back to frame labels at the same
    rate reproduces it exactly.

:func:`frame_labels` turns intervals into one label per frame at any frame rate; frame ``i`` is
centred at ``(i + 0.5) / frame_rate`` seconds (the convention of every unit sequence in speechvq)
and takes the label of the interval ``[start, end)`` containing that instant. Every reader raises
:class:`AlignmentError` (a ``ValueError``) naming the file and line of malformed input.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from speechvq.files import write_text

if TYPE_CHECKING:
    from speechvq.data.manifest import ManifestRow

__all__ = [
    "SAMPLE_INDEX_MIN",
    "SILENCE_LABELS",
    "AlignmentError",
    "Interval",
    "alignment_files",
    "frame_labels",
    "intervals_from_frames",
    "load_alignments",
    "match_alignments",
    "read_frame_tsv",
    "read_phn",
    "read_textgrid",
    "write_frame_tsv",
    "write_phn",
]

#: Labels that mean "no phone here"; :func:`frame_labels` maps all of them (any case) to silence.
SILENCE_LABELS = frozenset({"sil", "sp", "spn", "pau", ""})

# Ties between a frame centre and an interval boundary go to the later interval ([start, end));
# the tolerance absorbs float round-off in boundaries such as 0.015 s vs 1.5 / 100.
_EPS = 1e-9
_STRESS = re.compile(r"(?<=[A-Za-z])\d+$")
_TEXTGRID_SUFFIXES = (".textgrid",)
_ALIGNMENT_SUFFIXES = (".phn", *_TEXTGRID_SUFFIXES)

#: A ``.phn`` file of integers whose last end exceeds this holds sample indices, not seconds.
SAMPLE_INDEX_MIN = 1000


class AlignmentError(ValueError):
    """Malformed alignment input; ``str(err)`` reads ``path:line: problem``."""

    def __init__(self, path: str | os.PathLike, message: str, line: int | None = None):
        self.path = str(path)
        self.line = line
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Interval:
    """One labelled stretch of an utterance, times in seconds."""

    start: float
    end: float
    label: str


def _strip_stress(label: str) -> str:
    return _STRESS.sub("", label)


def _check_order(path: str | os.PathLike, intervals: list[Interval], lines: list[int]) -> None:
    for k, iv in enumerate(intervals):
        if not (math.isfinite(iv.start) and math.isfinite(iv.end)):
            raise AlignmentError(path, f"non-finite time in interval {iv}", lines[k])
        if iv.start < 0 or iv.end < iv.start:
            raise AlignmentError(
                path,
                f"bad interval: start {iv.start} end {iv.end} (need 0 <= start <= end)",
                lines[k],
            )
        if k and iv.start < intervals[k - 1].end - 1e-6:
            raise AlignmentError(
                path,
                f"interval starting at {iv.start} overlaps the previous one ending at "
                f"{intervals[k - 1].end}",
                lines[k],
            )


# --------------------------------------------------------------------------------------------
# .phn


def read_phn(
    path: str | os.PathLike, strip_stress: bool = True, sample_rate: int = 16000
) -> list[Interval]:
    """Read a ``start end phone`` file as intervals in seconds; stress digits are stripped
    unless told not to.

    Times are seconds, except in a TIMIT-style file of sample indices (every time an integer
    and the last end above :data:`SAMPLE_INDEX_MIN`, far longer than any utterance in seconds),
    whose times are divided by ``sample_rate``. Raises :class:`AlignmentError` naming
    ``path:line`` for a malformed line or unordered or overlapping intervals.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AlignmentError(path, f"cannot read alignment file: {err}") from err
    intervals: list[Interval] = []
    lines: list[int] = []
    all_integer = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 3:
            raise AlignmentError(
                path, f"expected 'start end phone' (3 fields), got {len(fields)}: {raw!r}", lineno
            )
        try:
            start, end = float(fields[0]), float(fields[1])
        except ValueError:
            raise AlignmentError(
                path, f"times must be numbers in seconds: {raw!r}", lineno
            ) from None
        all_integer = all_integer and fields[0].isdigit() and fields[1].isdigit()
        label = _strip_stress(fields[2]) if strip_stress else fields[2]
        intervals.append(Interval(start, end, label))
        lines.append(lineno)
    if intervals and all_integer and intervals[-1].end > SAMPLE_INDEX_MIN:
        if sample_rate <= 0:
            raise AlignmentError(path, f"sample_rate must be positive, got {sample_rate}")
        intervals = [
            Interval(iv.start / sample_rate, iv.end / sample_rate, iv.label) for iv in intervals
        ]
    _check_order(path, intervals, lines)
    return intervals


def _format_time(t: float) -> str:
    # 7 decimals hold any time on a 16 kHz sample grid exactly (1 / 16000 = 0.0000625 s)
    return f"{t:.7f}".rstrip("0").rstrip(".") or "0"


def write_phn(path: str | os.PathLike, intervals: Iterable[Interval]) -> None:
    """Write intervals as a ``.phn`` file (``start end phone`` lines, seconds), atomically."""
    lines = []
    for iv in intervals:
        if not iv.label or any(c.isspace() for c in iv.label):
            raise ValueError(f"{path}: label {iv.label!r} cannot be written to a .phn file")
        lines.append(f"{_format_time(iv.start)} {_format_time(iv.end)} {iv.label}\n")
    write_text(path, "".join(lines))


# --------------------------------------------------------------------------------------------
# TextGrid

# Praat's text TextGrid, long or short, is one stream of values; the long format only adds
# "key =" labels and "[n]" indices around them. Tokenising values and skipping everything else
# reads both with one parser.
_TG_TOKEN = re.compile(
    r'(?P<str>"(?:[^"]|"")*")'
    r"|(?P<flag><exists>|<absent>)"
    r"|(?P<key>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<skip>\[[^\]\n]*\]|[=:?]|!.*?$)"
    r"|(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"|(?P<space>\s+)"
    r"|(?P<other>.)",
    re.MULTILINE,
)
_TG_KEYS = frozenset(
    "file type object class xmin xmax tiers size item name intervals text points number time mark".split()
)


class _Tokens:
    def __init__(self, path: str | os.PathLike, text: str):
        self.path = path
        self.items: list[tuple[str, str, int]] = []  # (kind, value, line)
        line = 1
        for m in _TG_TOKEN.finditer(text):
            kind, value = m.lastgroup, m.group()
            if kind == "other" or (kind == "key" and value.lower() not in _TG_KEYS):
                raise AlignmentError(path, f"unexpected {value!r} in TextGrid", line)
            if kind in ("str", "flag", "num"):
                if kind == "str":
                    value = value[1:-1].replace('""', '"')
                self.items.append((kind, value, line))
            line += value.count("\n") if kind != "str" else m.group().count("\n")
        self.pos = 0

    def _next(self, what: str) -> tuple[str, str, int]:
        if self.pos >= len(self.items):
            last = self.items[-1][2] if self.items else 1
            raise AlignmentError(self.path, f"TextGrid ends early: expected {what}", last)
        item = self.items[self.pos]
        self.pos += 1
        return item

    def string(self, what: str) -> str:
        kind, value, line = self._next(what)
        if kind != "str":
            raise AlignmentError(
                self.path, f"expected {what} (a quoted string), got {value!r}", line
            )
        return value

    def number(self, what: str) -> tuple[float, int]:
        kind, value, line = self._next(what)
        if kind != "num":
            raise AlignmentError(self.path, f"expected {what} (a number), got {value!r}", line)
        return float(value), line

    def count(self, what: str) -> int:
        value, line = self.number(what)
        if value != int(value) or value < 0:
            raise AlignmentError(self.path, f"expected {what} (a count), got {value:g}", line)
        return int(value)


def _read_textgrid_text(path: str | os.PathLike) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise AlignmentError(path, f"cannot read TextGrid: {err}") from err
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AlignmentError(path, f"TextGrid is neither UTF-8 nor UTF-16: {err}") from err


def _tier_matches(name: str, wanted: str) -> bool:
    name, wanted = name.strip().lower(), wanted.strip().lower()
    return name == wanted or name.endswith(f" - {wanted}")


def textgrid_text(tiers: Mapping[str, Sequence[Interval]]) -> str:
    """Interval tiers ``{name: intervals}`` as a Praat TextGrid (long text format), from 0 to the
    last interval's end; ``"`` in a label is doubled, as Praat writes it."""
    xmax = max((iv.end for ivs in tiers.values() for iv in ivs), default=0.0)
    lines = ['File type = "ooTextFile"', 'Object class = "TextGrid"', "", "xmin = 0",
             f"xmax = {xmax:g}", "tiers? <exists>", f"size = {len(tiers)}", "item []:"]
    for n, (name, ivs) in enumerate(tiers.items(), start=1):
        lines += [f"    item [{n}]:", '        class = "IntervalTier"', f'        name = "{name}"',
                  "        xmin = 0", f"        xmax = {xmax:g}", f"        intervals: size = {len(ivs)}"]
        for k, iv in enumerate(ivs, start=1):
            label = iv.label.replace('"', '""')
            lines += [f"        intervals [{k}]:", f"            xmin = {iv.start:g}",
                      f"            xmax = {iv.end:g}", f'            text = "{label}"']
    return "\n".join(lines) + "\n"


def write_textgrid(path: str | os.PathLike, tiers: Mapping[str, Sequence[Interval]]) -> None:
    """Write :func:`textgrid_text` to ``path``, atomically."""
    write_text(path, textgrid_text(tiers))


def read_textgrid(
    path: str | os.PathLike, tier: str = "phones", strip_stress: bool = True
) -> list[Interval]:
    """Read one interval tier of a Praat text TextGrid (long or short format).

    Labels are stripped of surrounding spaces and of ARPAbet stress digits; empty labels become
    ``"sil"`` (never dropped). Raises :class:`AlignmentError` naming the file (and line) when the
    file is malformed, binary, or has no interval tier called ``tier``.
    """
    text = _read_textgrid_text(path)
    if "ooBinaryFile" in text[:64]:
        raise AlignmentError(path, "binary TextGrid is not supported: save it as text in Praat")
    toks = _Tokens(path, text)
    if toks.string('file type ("ooTextFile")') != "ooTextFile":
        raise AlignmentError(path, 'not a Praat text file (no File type = "ooTextFile")', 1)
    if toks.string('object class ("TextGrid")') != "TextGrid":
        raise AlignmentError(path, 'not a TextGrid (Object class is not "TextGrid")', 2)
    toks.number("xmin")
    toks.number("xmax")
    kind, value, line = toks._next("tiers? <exists>")
    if value == "<absent>":
        raise AlignmentError(path, "TextGrid has no tiers", line)
    if value != "<exists>":
        raise AlignmentError(path, f"expected <exists> or <absent>, got {value!r}", line)
    n_tiers = toks.count("number of tiers")
    names = []
    for _ in range(n_tiers):
        tier_class = toks.string("tier class")
        name = toks.string("tier name")
        names.append(name)
        toks.number("tier xmin")
        toks.number("tier xmax")
        n_items = toks.count("number of intervals")
        wanted = _tier_matches(name, tier)
        if wanted and tier_class != "IntervalTier":
            raise AlignmentError(path, f"tier {name!r} is a {tier_class}, not an IntervalTier")
        intervals: list[Interval] = []
        lines: list[int] = []
        for _ in range(n_items):
            if tier_class == "IntervalTier":
                start, line = toks.number("interval xmin")
                end, _line = toks.number("interval xmax")
                label = toks.string("interval text").strip()
                if wanted:
                    label = _strip_stress(label) if strip_stress else label
                    intervals.append(Interval(start, end, label or "sil"))
                    lines.append(line)
            else:  # TextTier (points): time, mark
                toks.number("point time")
                toks.string("point mark")
        if wanted:
            _check_order(path, intervals, lines)
            return intervals
    raise AlignmentError(path, f"no interval tier named {tier!r} (tiers: {names})")


# --------------------------------------------------------------------------------------------
# frame TSV


def _read_frame_rows(path: str | os.PathLike) -> dict[str, tuple[float, list[str]]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise AlignmentError(path, f"cannot read frame TSV: {err}") from err
    rows: dict[str, tuple[float, list[str]]] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.startswith("#"):
            continue
        fields = raw.rstrip("\r\n").split("\t")
        if lineno == 1 and fields[:2] == ["id", "frame_rate"]:
            continue
        if len(fields) != 3:
            raise AlignmentError(
                path, f"expected id<TAB>frame_rate<TAB>labels (3 fields), got {len(fields)}", lineno
            )
        utt, rate_text, labels = fields
        try:
            rate = float(rate_text)
        except ValueError:
            rate = float("nan")
        if not (math.isfinite(rate) and rate > 0):
            raise AlignmentError(
                path, f"frame_rate must be a positive number, got {rate_text!r}", lineno
            )
        if not utt:
            raise AlignmentError(path, "empty utterance id", lineno)
        if utt in rows:
            raise AlignmentError(path, f"duplicate utterance id {utt!r}", lineno)
        rows[utt] = (rate, labels.split())
    return rows


def read_frame_tsv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a frame TSV (``id<TAB>frame_rate<TAB>l1 l2 ...``) as ``{id: labels}``."""
    return {utt: labels for utt, (_rate, labels) in _read_frame_rows(path).items()}


def write_frame_tsv(
    path: str | os.PathLike, labels: Mapping[str, Sequence[str]], frame_rate: float
) -> None:
    """Write ``{id: per-frame labels}`` as a frame TSV (with header), atomically, ids sorted."""
    lines = ["id\tframe_rate\tlabels\n"]
    for utt in sorted(labels):
        seq = labels[utt]
        if any(not lab or any(c.isspace() for c in lab) for lab in seq):
            raise ValueError(f"{path}: {utt}: labels must be non-empty and contain no whitespace")
        lines.append(f"{utt}\t{frame_rate:g}\t{' '.join(seq)}\n")
    write_text(path, "".join(lines))


def intervals_from_frames(labels: Sequence[str], frame_rate: float) -> list[Interval]:
    """Runs of equal frame labels as intervals; frame ``i`` spans ``[i, i + 1) / frame_rate``."""
    out: list[Interval] = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            out.append(Interval(start / frame_rate, i / frame_rate, labels[start]))
            start = i
    return out


# --------------------------------------------------------------------------------------------
# loading a corpus' alignments and labelling frames


def _read_one(path: Path, tier: str, sample_rate: int = 16000) -> list[Interval]:
    if path.suffix.lower() in _TEXTGRID_SUFFIXES:
        return read_textgrid(path, tier=tier)
    return read_phn(path, sample_rate=sample_rate)


def alignment_files(folder: str | os.PathLike) -> dict[str, Path]:
    """Every ``.phn``/``.TextGrid`` file under ``folder`` (recursively, suffix in any case) by key.

    A file's key is its stem when no other file's stem equals it (ignoring case), else its path
    relative to ``folder`` without suffix (``dr1/fcjf0/sa1``), as TIMIT's layout needs. Two
    files with the same key (``u1.phn`` beside ``u1.TextGrid``) raise :class:`AlignmentError`.
    """
    folder = Path(folder)
    files = sorted(
        f for f in folder.rglob("*") if f.suffix.lower() in _ALIGNMENT_SUFFIXES and f.is_file()
    )
    stems = Counter(f.stem.lower() for f in files)
    found: dict[str, Path] = {}
    for f in files:
        rel = f.relative_to(folder).with_suffix("").as_posix()
        key = f.stem if stems[f.stem.lower()] == 1 else rel
        if key in found:
            raise AlignmentError(f, f"utterance id {key!r} also aligned in {found[key]}")
        found[key] = f
    return found


def load_alignments(
    path: str | os.PathLike,
    tier: str = "phones",
    sample_rate: int = 16000,
    on_error: Callable[[AlignmentError], None] | None = None,
) -> dict[str, list[Interval]]:
    """Alignments by key from a folder, one ``.phn``/``.TextGrid`` file, or a frame TSV.

    A folder is searched recursively and keyed as :func:`alignment_files` keys it: by file stem,
    or by relative path without suffix where stems repeat (match keys to manifest rows with
    :func:`match_alignments`). ``sample_rate`` converts ``.phn`` files of sample indices (see
    :func:`read_phn`). A file that cannot be read raises :class:`AlignmentError`, unless
    ``on_error`` is given: then it is called with the error and the file is skipped.
    """
    path = Path(path)
    if path.is_dir():
        files = alignment_files(path)
        if not files:
            raise AlignmentError(path, "no .phn or .TextGrid files found in this folder")
        found: dict[str, list[Interval]] = {}
        for key, f in files.items():
            try:
                found[key] = _read_one(f, tier, sample_rate)
            except AlignmentError as err:
                if on_error is None:
                    raise
                on_error(err)
        return found
    if not path.exists():
        raise AlignmentError(path, "alignment path does not exist")
    if path.suffix.lower() in _ALIGNMENT_SUFFIXES:
        return {path.stem: _read_one(path, tier, sample_rate)}
    return {
        utt: intervals_from_frames(labels, rate)
        for utt, (rate, labels) in _read_frame_rows(path).items()
    }


def frame_labels(
    intervals: Sequence[Interval],
    frame_rate: float,
    n_frames: int | None = None,
    silence: str = "sil",
) -> list[str]:
    """One label per frame; frame ``i`` is centred at ``(i + 0.5) / frame_rate`` seconds.

    A frame takes the label of the interval ``[start, end)`` containing its centre (a centre on a
    boundary belongs to the later interval). Centres in gaps, past the last interval, or in an
    interval labelled with one of :data:`SILENCE_LABELS` get ``silence``. ``n_frames`` defaults to
    ``floor(last_end * frame_rate)``, the frame count of the feature extractors
    (``num_samples // hop``); pass the real count to match a unit sequence exactly.
    """
    if frame_rate <= 0:
        raise ValueError(f"frame_rate must be positive, got {frame_rate}")
    ivs = sorted(intervals, key=lambda iv: (iv.start, iv.end))
    for a, b in zip(ivs, ivs[1:], strict=False):
        if b.start < a.end - 1e-6:
            raise ValueError(f"overlapping intervals {a} and {b}")
    if n_frames is None:
        n_frames = math.floor(ivs[-1].end * frame_rate + 1e-6) if ivs else 0
    ends = [iv.end for iv in ivs]
    out = []
    for i in range(n_frames):
        t = (i + 0.5) / frame_rate
        k = bisect.bisect_right(ends, t + _EPS)  # first interval ending after t
        if k < len(ivs) and ivs[k].start <= t + _EPS and ivs[k].label.lower() not in SILENCE_LABELS:
            out.append(ivs[k].label)
        else:
            out.append(silence)
    return out


# --------------------------------------------------------------------------------------------
# matching alignments to manifest rows


def _parts(text: str) -> tuple[str, ...]:
    return tuple(p.lower() for p in PurePosixPath(text.replace("\\", "/")).parts)


def _by_path(path: str, keys: Sequence[str]) -> str | None:
    """The one key of two or more parts (``dr1/fcjf0/sa1``) that is the tail of ``path`` minus
    its suffix, compared case-insensitively; the longest such key wins, a tie matches nothing."""
    tail = _parts(Path(path).with_suffix("").as_posix())
    hits = [k for k in keys if len(p := _parts(k)) > 1 and tail[-len(p):] == p]
    if not hits:
        return None
    longest = max(len(_parts(k)) for k in hits)
    best = [k for k in hits if len(_parts(k)) == longest]
    return best[0] if len(best) == 1 else None


def _by_speaker(row: ManifestRow, keys: Mapping[str, list[str]]) -> str | None:
    """``<speaker>_<stem>`` and the id without its ``<speaker>_`` prefix, if one key matches."""
    prefix = f"{row.speaker}_"
    wanted = {f"{prefix}{Path(row.path).stem}".lower()}
    if row.speaker and row.id.startswith(prefix) and len(row.id) > len(prefix):
        wanted.add(row.id[len(prefix):].lower())
    found = {k for w in wanted for k in keys.get(w, [])}
    return found.pop() if len(found) == 1 else None


def match_alignments(
    alignments: Mapping[str, list[Interval]], rows: Sequence[ManifestRow]
) -> dict[str, list[Interval]]:
    """Each manifest row's alignment, keyed by row id; rows with no match are left out.

    ``alignments`` is keyed as :func:`load_alignments` keys it: utterance ids, file stems or
    relative paths without extension (``dr1/fcjf0/sa1``). A row (``.id``, ``.path``,
    ``.speaker``) is matched, first rule that applies:

    1. by its exact utterance id;
    2. by the stem of its audio file (``Path(row.path).stem``) against the last part of each
       key, exact else case-insensitive, when exactly one key and one row (of those not matched
       by id; case ignored) have that stem. Otherwise the stem is ambiguous (TIMIT: every
       speaker has ``sa1``) and a key of several parts that is the tail of the audio path
       (minus suffix, case-insensitive) matches, the longest one if several do;
    3. by ``<speaker>_<stem>``, or by the id stripped of its ``<speaker>_`` prefix, against the
       keys (case-insensitive; ``/`` in keys read as ``_``), when exactly one key matches.
    """
    chosen: dict[str, str] = {r.id: r.id for r in rows if r.id in alignments}
    pending = [r for r in rows if r.id not in chosen]
    by_stem: dict[str, list[str]] = defaultdict(list)
    by_stem_ci: dict[str, list[str]] = defaultdict(list)
    by_flat: dict[str, list[str]] = defaultdict(list)
    for key in alignments:
        leaf = PurePosixPath(key.replace("\\", "/")).name
        by_stem[leaf].append(key)
        by_stem_ci[leaf.lower()].append(key)
        by_flat[key.replace("\\", "/").replace("/", "_").lower()].append(key)
    stems = Counter(Path(r.path).stem.lower() for r in pending)
    for row in pending:
        stem = Path(row.path).stem
        exact, keys = by_stem.get(stem, []), by_stem_ci.get(stem.lower(), [])
        key = None
        if stems[stem.lower()] == 1 and len(exact) == 1:
            key = exact[0]
        elif stems[stem.lower()] == 1 and len(keys) == 1:
            key = keys[0]
        elif keys:
            key = _by_path(row.path, keys)
        key = key or _by_speaker(row, by_flat)
        if key is not None:
            chosen[row.id] = key
    return {r.id: list(alignments[chosen[r.id]]) for r in rows if r.id in chosen}
