"""Manifests: the TSV list of utterances every stage after ``prepare`` reads.

Format: a header ``id<TAB>path<TAB>num_samples<TAB>speaker`` (optionally ``<TAB>text``), then one
row per utterance. Ids are unique and hold no whitespace and no ``|`` (the unit files written
from a manifest cannot carry them); ``num_samples`` counts samples at the corpus sample rate;
relative paths are resolved against the manifest's folder (written manifests hold absolute ones).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from speechvq.files import write_text

COLUMNS = ("id", "path", "num_samples", "speaker")
TEXT_COLUMN = "text"


@dataclass(frozen=True)
class ManifestRow:
    """One utterance: unique ``id``, audio ``path``, ``num_samples`` at the corpus rate, ``speaker``."""

    id: str
    path: str
    num_samples: int
    speaker: str
    text: str | None = None


def id_problem(utt_id: str) -> str | None:
    """Why ``utt_id`` cannot be an utterance id (unit files separate ids from units with
    whitespace or ``|``), or None."""
    bad = sorted({c for c in utt_id if c.isspace() or c == "|"})
    if not bad:
        return None
    return (f"id {utt_id!r} contains {' and '.join(map(repr, bad))}: unit files cannot hold "
            "whitespace or '|' in an id; rename the utterance")


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest; raises ValueError naming ``file:line`` for a bad header/row, an id that
    unit files cannot hold (whitespace, ``|``) or a duplicate id."""
    path = Path(path)
    base = path.parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: manifest not found") from None
    if not lines:
        raise ValueError(f"{path}:1: empty manifest (expected a header {' '.join(COLUMNS)})")
    header = tuple(lines[0].split("\t"))
    if header not in (COLUMNS, (*COLUMNS, TEXT_COLUMN)):
        raise ValueError(
            f"{path}:1: bad header {lines[0]!r}; expected the tab-separated columns "
            f"{' '.join(COLUMNS)} [{TEXT_COLUMN}]"
        )
    has_text = len(header) == len(COLUMNS) + 1
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if has_text and len(fields) == len(COLUMNS):
            fields.append("")  # an empty trailing text column may have lost its tab
        if len(fields) != len(header):
            raise ValueError(
                f"{path}:{lineno}: expected {len(header)} tab-separated fields, got {len(fields)}"
            )
        utt_id, audio, num_samples, speaker = fields[:4]
        if not utt_id or not audio or not speaker:
            raise ValueError(f"{path}:{lineno}: empty id, path or speaker")
        if problem := id_problem(utt_id):
            raise ValueError(f"{path}:{lineno}: {problem}")
        try:
            n = int(num_samples)
        except ValueError:
            n = -1
        if n < 0:
            raise ValueError(f"{path}:{lineno}: num_samples {num_samples!r} is not a count")
        if utt_id in seen:
            raise ValueError(
                f"{path}:{lineno}: duplicate id {utt_id!r} (first on line {seen[utt_id]})"
            )
        seen[utt_id] = lineno
        audio_path = Path(audio)
        if not audio_path.is_absolute():
            audio_path = base / audio_path
        text = fields[4] if has_text and fields[4] else None
        rows.append(ManifestRow(utt_id, str(audio_path), n, speaker, text))
    return rows


def _check_field(value: str, what: str, utt_id: str) -> None:
    if "\t" in value or "\n" in value or "\r" in value:
        raise ValueError(f"manifest row {utt_id!r}: {what} contains a tab or newline")


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow]) -> None:
    """Write ``rows`` (absolute paths; a ``text`` column when any row has text), atomically."""
    path = Path(path)
    rows = list(rows)
    has_text = any(r.text is not None for r in rows)
    seen: set[str] = set()
    lines = ["\t".join((*COLUMNS, TEXT_COLUMN) if has_text else COLUMNS)]
    for r in rows:
        if r.id in seen:
            raise ValueError(f"{path}: duplicate id {r.id!r}")
        seen.add(r.id)
        audio = os.path.abspath(r.path)
        fields = [r.id, audio, str(int(r.num_samples)), r.speaker]
        if has_text:
            fields.append(r.text or "")
        for what, value in zip((*COLUMNS, TEXT_COLUMN), fields, strict=False):
            _check_field(value, what, r.id)
        lines.append("\t".join(fields))
    write_text(path, "\n".join(lines) + "\n")


def speakers_of(rows: Sequence[ManifestRow]) -> list[str]:
    """Sorted unique speakers of ``rows`` (the index of a speaker in this list is its id)."""
    return sorted({r.speaker for r in rows})
