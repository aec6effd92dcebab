"""Phone alignments: read ``.phn``, Praat/MFA TextGrid and frame-TSV files; label frames.

Three on-disk formats are understood, one utterance id per file stem (or per TSV row):

``.phn``
    One interval per line, ``start end phone``, times in seconds, whitespace separated::

        0 0.164 sil
        0.164 0.255 hh

    Blank lines and lines starting with ``#`` are skipped. Intervals must be in order and must
    not overlap; gaps are allowed (they count as silence). This is what the mini corpus ships
    beside every FLAC (see :mod:`speechvq.data.synth`). TIMIT-style files holding sample indices
    are refused with a hint rather than read as hours-long utterances.

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
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SILENCE_LABELS",
    "AlignmentError",
    "Interval",
    "frame_labels",
    "intervals_from_frames",
    "load_alignments",
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


def read_phn(path: str | os.PathLike, strip_stress: bool = True) -> list[Interval]:
    """Read a ``start end phone`` file (seconds). Stress digits are stripped unless told not to.

    Raises :class:`AlignmentError` naming ``path:line`` for a malformed line, unordered or
    overlapping intervals, or a file that looks like TIMIT sample indices.
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
    if intervals and all_integer and intervals[-1].end > 3600:
        raise AlignmentError(
            path,
            f"times look like sample indices (last end {intervals[-1].end:g}), as in TIMIT .PHN "
            "files; .phn files here hold seconds: divide by the sample rate first",
        )
    _check_order(path, intervals, lines)
    return intervals


def _format_time(t: float) -> str:
    # 7 decimals hold any time on a 16 kHz sample grid exactly (1 / 16000 = 0.0000625 s)
    return f"{t:.7f}".rstrip("0").rstrip(".") or "0"


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_phn(path: str | os.PathLike, intervals: Iterable[Interval]) -> None:
    """Write intervals as a ``.phn`` file (``start end phone`` lines, seconds), atomically."""
    lines = []
    for iv in intervals:
        if not iv.label or any(c.isspace() for c in iv.label):
            raise ValueError(f"{path}: label {iv.label!r} cannot be written to a .phn file")
        lines.append(f"{_format_time(iv.start)} {_format_time(iv.end)} {iv.label}\n")
    _atomic_write_text(path, "".join(lines))


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
    _atomic_write_text(path, "".join(lines))


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


def _read_one(path: Path, tier: str) -> list[Interval]:
    if path.suffix.lower() in _TEXTGRID_SUFFIXES:
        return read_textgrid(path, tier=tier)
    return read_phn(path)


def load_alignments(path: str | os.PathLike, tier: str = "phones") -> dict[str, list[Interval]]:
    """Alignments by utterance id from a folder, one ``.phn``/``.TextGrid`` file, or a frame TSV.

    A folder is searched recursively for ``*.phn`` and ``*.TextGrid`` files; the utterance id is
    the file stem. Two files with the same stem are an error naming both.
    """
    path = Path(path)
    if path.is_dir():
        found: dict[str, list[Interval]] = {}
        origin: dict[str, Path] = {}
        for f in sorted(path.rglob("*")):
            if not f.is_file() or f.suffix.lower() not in (".phn", *_TEXTGRID_SUFFIXES):
                continue
            if f.stem in origin:
                raise AlignmentError(f, f"utterance id {f.stem!r} also aligned in {origin[f.stem]}")
            origin[f.stem] = f
            found[f.stem] = _read_one(f, tier)
        if not found:
            raise AlignmentError(path, "no .phn or .TextGrid files found in this folder")
        return found
    if not path.exists():
        raise AlignmentError(path, "alignment path does not exist")
    if path.suffix.lower() in (".phn", *_TEXTGRID_SUFFIXES):
        return {path.stem: _read_one(path, tier)}
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
