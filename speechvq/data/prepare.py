"""How every corpus ends: manifests, rejected files, feature statistics, one summary.

Each corpus (:func:`speechvq.data.folder.prepare_folder`, :func:`speechvq.data.synth.prepare_mini`,
:func:`speechvq.data.librispeech.prepare`) finds its utterances its own way and describes them as a
:class:`Corpus`; :func:`finish` writes what later stages read, the same way for all of them:

- ``OUT/stats.json``: log-mel statistics (:func:`corpus_stats`), computed first so that a corpus
  whose audio cannot be analysed leaves no manifest behind;
- ``OUT/frontend_state.npz``: every utterance's front-end state (DC, level, own moments), measured
  once here so that a training crop decodes only its window
  (:func:`speechvq.features.measure_states`);
- ``OUT/<subset>.tsv`` for a corpus made of subsets, ``OUT/{train,valid,test}.tsv`` for the splits
  it has (a split manifest left by an earlier run that no longer applies is removed);
- ``OUT/rejected.tsv``: ``path<TAB>reason`` for every file that could not be used;
- ``OUT/manifest.tsv`` last: every utterance; its presence marks the stage done;
- a summary on stdout (utterances, speakers, hours, splits, conversions, rejected files).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from speechvq.data.manifest import ManifestRow, speakers_of, write_manifest
from speechvq.features import STATE_FILE, FeatureStats, compute_stats, measure_states
from speechvq.files import write_text

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


class PrepareError(ValueError):
    """A corpus that cannot be prepared as asked; the message names the folder or file."""


@dataclass
class Corpus:
    """What a corpus found, before anything is written.

    Attributes:
        rows: every usable utterance, in manifest order.
        rejected: ``(path, reason)`` of every file left out.
        splits: ``{"train": rows, ...}`` for the splits the corpus has (None: no split).
        subsets: ``{name: rows}`` written as ``OUT/<name>.tsv`` (LibriSpeech's subsets).
        stats_rows: what the global statistics come from (default: the train split, else all).
        notes: counts of conversions (``downmixed``, ``resampled``).
        extra: more summary lines (alignments, subsets).
    """

    rows: list[ManifestRow]
    rejected: list[tuple[str, str]]
    splits: dict[str, list[ManifestRow]] | None = None
    subsets: dict[str, list[ManifestRow]] = field(default_factory=dict)
    stats_rows: list[ManifestRow] | None = None
    notes: Counter = field(default_factory=Counter)
    extra: list[str] = field(default_factory=list)


def finish(corpus: Corpus, out_dir: str | os.PathLike, features: Mapping | None,
           sample_rate: int, *, per_speaker: int | None = None, all_speakers: bool = False,
           state_unit: int | None = None, workers: int = 1,
           progress: bool = True) -> FeatureStats | None:
    """Write the corpus (see the module docstring); ``features`` None: no ``stats.json``.

    ``per_speaker`` and ``all_speakers`` are passed to :func:`corpus_stats`. ``state_unit``: mel
    frames per unit of the models the front-end states serve (``state_unit_frames``: 2 for 50 Hz
    units; None: no ``frontend_state.npz``). Returns the statistics written, if any.
    """
    out_dir = Path(out_dir)
    stats = None
    if features is not None:
        train = corpus.stats_rows
        if train is None:
            train = corpus.splits["train"] if corpus.splits else corpus.rows
        try:
            stats = corpus_stats(train, corpus.rows if all_speakers else (), features,
                                 per_speaker, workers, progress)
        except ValueError as err:
            raise PrepareError(f"{out_dir / 'stats.json'}: {err}") from None
    states = None
    if features is not None and state_unit:
        states = measure_states(corpus.rows, features, int(features["hop_length"]) * state_unit,
                                workers=workers, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in corpus.subsets.items():
        write_manifest(out_dir / f"{name}.tsv", rows)
    for name in SPLITS:
        path = out_dir / f"{name}.tsv"
        if corpus.splits is not None and name in corpus.splits:
            write_manifest(path, corpus.splits[name])
        elif path.exists():  # from an earlier run with another split: would contradict manifest.tsv
            path.unlink()
            log.info("removed stale %s (no %s split this time)", path, name)
    write_rejected(out_dir / "rejected.tsv", corpus.rejected)
    if stats is not None:
        stats.save(out_dir / "stats.json")
    if states is not None:
        states.save(out_dir / STATE_FILE)
    elif (out_dir / STATE_FILE).exists():  # from an earlier run: would not match this corpus
        (out_dir / STATE_FILE).unlink()
    write_manifest(out_dir / "manifest.tsv", corpus.rows)
    print("\n".join(summary(corpus, out_dir, sample_rate)), flush=True)
    return stats


def summary(corpus: Corpus, out_dir: Path, sample_rate: int) -> list[str]:
    """The lines :func:`finish` prints."""
    rows, splits, rejected = corpus.rows, corpus.splits, corpus.rejected
    seconds = sum(r.num_samples for r in rows) / sample_rate
    lines = [f"{out_dir / 'manifest.tsv'}: {len(rows)} utterances, {len(speakers_of(rows))} "
             f"speakers, {seconds / 3600:.2f} h"]
    if splits is not None:
        sizes = ", ".join(f"{k} {len(v)} ({len(speakers_of(v))} spk)" for k, v in splits.items())
        lines.append(f"splits: {sizes}")
    lines.extend(corpus.extra)
    if corpus.notes:
        lines.append("converted: " + ", ".join(f"{n} {what}"
                                               for what, n in sorted(corpus.notes.items())))
    where = f" (listed in {out_dir / 'rejected.tsv'})" if rejected else ""
    lines.append(f"{len(rejected)} rejected{where}")
    lines.extend(f"  {path}: {reason}" for path, reason in rejected[:5])
    if len(rejected) > 5:
        lines.append(f"  ... and {len(rejected) - 5} more")
    return lines


def corpus_stats(train_rows: Sequence[ManifestRow], other_rows: Sequence[ManifestRow],
                 features: Mapping, per_speaker: int | None = None, workers: int = 1,
                 progress: bool = True) -> FeatureStats:
    """Log-mel statistics: global and per-speaker moments from ``train_rows``, and per-speaker
    moments of the speakers of ``other_rows`` that are not in them (held-out speakers are then
    normalised by their own statistics; this needs no labels). ``per_speaker``: at most this many
    utterances per speaker, evenly spread over them."""
    stats = compute_stats(_per_speaker(train_rows, per_speaker), features, progress, workers)
    train_ids = {r.id for r in train_rows}
    others = [r for r in other_rows if r.id not in train_ids and r.speaker not in stats.speakers]
    if others:
        extra = compute_stats(_per_speaker(others, per_speaker), features, progress, workers)
        stats = FeatureStats(stats.features, stats.global_, {**extra.speakers, **stats.speakers})
    return stats


def _per_speaker(rows: Sequence[ManifestRow], limit: int | None) -> list[ManifestRow]:
    """At most ``limit`` utterances per speaker (evenly spread over their utterances)."""
    if not limit:
        return list(rows)
    by_speaker: dict[str, list[ManifestRow]] = {}
    for r in rows:
        by_speaker.setdefault(r.speaker, []).append(r)
    picked = []
    for utts in by_speaker.values():
        step = max(1, len(utts) // limit)
        picked.extend(utts[::step][:limit])
    return picked


def write_rejected(path: str | os.PathLike, rejected: Sequence[tuple[str, str]]) -> None:
    r"""``path<TAB>reason`` per rejected file, with a header, atomically (header only if none).

    A backslash, tab, newline or carriage return in a file name is written as ``\\``, ``\t``,
    ``\n``, ``\r`` (as in Python string literals and PostgreSQL's text format), so every file is
    one line of exactly two fields; names without those characters are written as they are.
    Whitespace runs in a reason become one space.
    """
    lines = ["path\treason"] + [f"{_escape(p)}\t{_clean_reason(r)}" for p, r in rejected]
    write_text(path, "\n".join(lines) + "\n")


def _escape(name: str) -> str:
    return re.sub(r"[\\\t\n\r]", lambda m: _ESCAPES[m.group(0)], name)


def _clean_reason(reason: str) -> str:
    return re.sub(r"[\t\r\n]+", " ", reason)
