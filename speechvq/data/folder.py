"""Any folder of audio -> manifest rows, a list of rejected files, and train/valid/test splits.

Ids are the file's path relative to the root without its suffix, with ``/`` (and whitespace)
replaced by ``_``. The speaker is the file's parent folder name by default (``grandparent`` for
``<speaker>/<chapter>/<utt>`` layouts, or a regular expression over the relative path).
Every file is fully decoded once (:func:`speechvq.audio.inspect_audio`) so that corrupt, empty,
truncated or NaN-bearing files are listed with a reason and left out instead of surfacing later.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from speechvq.audio import AudioError, inspect_audio
from speechvq.data.alignments import (
    AlignmentError,
    Interval,
    load_alignments,
    match_alignments,
    write_phn,
)
from speechvq.data.manifest import ManifestRow
from speechvq.data.prepare import SPLITS, Corpus, PrepareError, finish, write_rejected

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac")
ALIGNMENT_SUFFIXES = (".phn", ".textgrid")
SPEAKER_MODES = ("parent", "grandparent", "regex")
SPLIT_MODES = ("none", "speaker", "utterance")


@dataclass(frozen=True)
class Candidate:
    """An audio file found on disk, before its audio has been checked."""

    id: str
    path: str
    speaker: str
    text: str | None = None


def find_audio(root: str | os.PathLike, extensions: Sequence[str] = AUDIO_EXTENSIONS) -> list[Path]:
    """Audio files under ``root`` (recursively, following symlinks once), sorted."""
    root = Path(root)
    exts = tuple(e.lower() for e in extensions)
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop
            dirnames.clear()
            continue
        visited.add(real)
        found.extend(Path(dirpath, f) for f in filenames if f.lower().endswith(exts))
    return sorted(found)


def alignments_beside(
    audio_paths: Iterable[str | os.PathLike], suffixes: Sequence[str] = ALIGNMENT_SUFFIXES
) -> dict[str, Path]:
    """``{audio path: alignment file}`` for audio with a ``.phn``/``.TextGrid`` file beside it.

    The alignment is in the audio's folder with the same stem (TIMIT's ``SA1.WAV`` +
    ``SA1.PHN``, MFA's ``a.wav`` + ``a.TextGrid``); suffixes match in any case, the stem
    exactly if such a file exists, else ignoring case. With several, the first suffix in
    ``suffixes`` wins. Each folder is listed once.
    """
    wanted = tuple(s.lower() for s in suffixes)
    by_dir: dict[Path, list[Path]] = defaultdict(list)
    for p in audio_paths:
        by_dir[Path(p).parent].append(Path(p))
    found: dict[str, Path] = {}
    for folder, audios in by_dir.items():
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        index: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in wanted:
                index[stem.lower()].append((wanted.index(suffix.lower()), name))
        for audio in audios:
            # rank: exact stem first, then the suffix order, then the name (for determinism)
            hits = [
                (os.path.splitext(n)[0] != audio.stem, rank, n)
                for rank, n in index.get(audio.stem.lower(), [])
            ]
            if hits:
                found[str(audio)] = folder / min(hits)[2]
    return found


def _clean(name: str) -> str:
    """Ids and speakers end up in whitespace- and ``|``-separated formats (kaldi, gslm units):
    neither whitespace nor ``|``."""
    return re.sub(r"[\s|]", "_", name)


def utterance_id(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``root/spk/a b.wav`` -> ``spk_a_b``: relative path without suffix, ``/`` and spaces -> ``_``."""
    rel = Path(path).relative_to(root)
    return _clean(rel.with_suffix("").as_posix().replace("/", "_"))


def speaker_of(
    path: str | os.PathLike, root: str | os.PathLike, mode: str = "parent", regex: str | None = None
) -> str:
    """The speaker of ``path``: its ``parent`` or ``grandparent`` folder name, or the first group
    (else the whole match) of ``regex`` searched in the path relative to ``root``.

    Raises ValueError when the regex does not match.
    """
    path = Path(path)
    if mode == "parent":
        return _clean(path.parent.name)
    if mode == "grandparent":
        return _clean(path.parent.parent.name)
    if mode == "regex":
        if not regex:
            raise ValueError("speaker mode 'regex' needs a speaker_regex")
        rel = path.relative_to(root).as_posix()
        m = re.search(regex, rel)
        if not m or not (m.group(1) if m.groups() else m.group(0)):
            raise ValueError(f"speaker regex {regex!r} does not match {rel!r}")
        return _clean(m.group(1) if m.groups() else m.group(0))
    raise ValueError(f"unknown speaker mode {mode!r}; choose one of {SPEAKER_MODES}")


def check_unique_ids(items: Iterable[Candidate]) -> None:
    """Raise ValueError listing every id that two or more files map to."""
    by_id: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_id[item.id].append(item.path)
    clashes = {k: v for k, v in by_id.items() if len(v) > 1}
    if clashes:
        shown = "; ".join(f"{k!r} <- {', '.join(v)}" for k, v in sorted(clashes.items())[:10])
        more = f" (and {len(clashes) - 10} more)" if len(clashes) > 10 else ""
        raise ValueError(
            f"{len(clashes)} utterance id clash(es): {shown}{more}. Ids are the relative path "
            "without suffix with '/' -> '_'; rename or remove one file of each pair"
        )


def folder_candidates(
    root: str | os.PathLike,
    speaker: str = "parent",
    speaker_regex: str | None = None,
    extensions: Sequence[str] = AUDIO_EXTENSIONS,
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Audio files under ``root`` as candidates, plus ``(path, reason)`` for unusable names."""
    if speaker not in SPEAKER_MODES:
        raise ValueError(f"unknown speaker mode {speaker!r}; choose one of {SPEAKER_MODES}")
    items, rejected = [], []
    for path in find_audio(root, extensions):
        if "\t" in str(path) or "\n" in str(path):
            rejected.append((str(path), "tab or newline in the file name"))
            continue
        try:
            spk = speaker_of(path, root, speaker, speaker_regex)
        except ValueError as err:
            rejected.append((str(path), str(err)))
            continue
        items.append(Candidate(utterance_id(path, root), str(path), spk))
    check_unique_ids(items)
    return items, rejected


def librispeech_candidates(
    root: str | os.PathLike,
) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """A LibriSpeech-layout tree ``<speaker>/<chapter>/<id>.flac`` with ``<speaker>-<chapter>.trans.txt``
    beside: ids are the file stems, speakers the reader folders, texts from the transcripts."""
    texts: dict[str, str] = {}
    for trans in sorted(Path(root).rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            utt, _, text = line.strip().partition(" ")
            if utt:
                texts[utt] = text.strip()
    items, rejected = [], []
    for path in find_audio(root, (".flac", ".wav")):
        utt = _clean(path.stem)
        if utt not in texts:
            log.warning("%s: no transcript line for %s", path, utt)
        items.append(Candidate(utt, str(path), _clean(path.parent.parent.name), texts.get(utt)))
    check_unique_ids(items)
    return items, rejected


def _inspect(item: Candidate, sample_rate: int, min_seconds: float):
    try:
        return inspect_audio(item.path, sample_rate, min_seconds), None
    except AudioError as err:
        return None, err.problem
    except Exception as err:  # noqa: BLE001 - one odd file must not stop a corpus scan
        return None, f"unexpected error: {err!r}"


def inspect_candidates(
    items: Sequence[Candidate],
    sample_rate: int,
    min_seconds: float = 0.0,
    workers: int = 2,
    progress: bool = True,
) -> tuple[list[ManifestRow], list[tuple[str, str]], Counter]:
    """Decode every candidate: good ones become rows; bad ones ``(path, reason)``.

    Also returns a count of conversion notes (downmixed / resampled). Decoding and resampling
    release the GIL, so a small thread pool is enough to use ``workers`` cores.
    """
    rows, rejected, notes = [], [], Counter()

    def work(item: Candidate):
        return _inspect(item, sample_rate, min_seconds)

    bar = tqdm(total=len(items), desc="inspecting audio", unit="file", disable=not progress)
    with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
        for item, (info, reason) in zip(items, pool.map(work, items), strict=True):
            bar.update()
            if info is None:
                rejected.append((item.path, reason))
                continue
            rows.append(ManifestRow(item.id, item.path, info.num_samples, item.speaker, item.text))
            for note in info.notes:
                notes[note.split(" ")[0]] += 1  # "downmixed" / "resampled"
    bar.close()
    return rows, rejected, notes


def _count(fraction: float, n: int) -> int:
    """How many of ``n`` go to a held-out split: at least one whenever the fraction is non-zero."""
    return 0 if fraction <= 0 else max(1, round(fraction * n))


def split_rows(
    rows: Sequence[ManifestRow],
    by: str,
    valid: float,
    test: float,
    seed: int = 0,
) -> dict[str, list[ManifestRow]]:
    """Split into ``train``/``valid``/``test``, reproducibly for a given ``seed``.

    ``by="speaker"``: each speaker goes to exactly one split (held-out speakers);
    ``by="utterance"``: stratified per speaker, so every speaker with at least three utterances is
    in every split. Each utterance lands in exactly one split; rows keep their input order.
    """
    if by not in ("speaker", "utterance"):
        raise ValueError(f"unknown split mode {by!r}; choose 'speaker' or 'utterance'")
    if valid < 0 or test < 0 or valid + test >= 1:
        raise ValueError(f"split fractions valid={valid}, test={test} must be >= 0 and sum below 1")
    by_speaker: dict[str, list[str]] = defaultdict(list)
    for r in sorted(rows, key=lambda r: r.id):  # independent of the input order
        by_speaker[r.speaker].append(r.id)
    assign: dict[str, str] = {}
    if by == "speaker":
        speakers = sorted(by_speaker)
        random.Random(seed).shuffle(speakers)
        n_test, n_valid = _count(test, len(speakers)), _count(valid, len(speakers))
        if n_test + n_valid >= len(speakers):
            raise ValueError(
                f"{len(speakers)} speaker(s) are too few to hold out {n_valid} for valid and "
                f"{n_test} for test; use split.by=utterance or smaller fractions"
            )
        for i, spk in enumerate(speakers):
            split = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
            assign.update((utt, split) for utt in by_speaker[spk])
    else:
        for spk, utts in sorted(by_speaker.items()):
            utts = list(utts)
            # seeding with a string is stable across runs and Python versions (sha512 of it)
            random.Random(f"{seed}/{spk}").shuffle(utts)
            n_test, n_valid = _count(test, len(utts)), _count(valid, len(utts))
            while n_test + n_valid >= len(utts) and n_test + n_valid > 0:
                if n_test >= n_valid:
                    n_test -= 1
                else:
                    n_valid -= 1
            if (test > 0 and n_test == 0) or (valid > 0 and n_valid == 0):
                log.warning(
                    "speaker %s has only %d utterance(s): not in every split", spk, len(utts)
                )
            for i, utt in enumerate(utts):
                split = "test" if i < n_test else "valid" if i < n_test + n_valid else "train"
                assign[utt] = split
    return {s: [r for r in rows if assign[r.id] == s] for s in SPLITS}


def split_config(split_cfg: Mapping | None) -> tuple[str, float, float, int]:
    """``(by, valid, test, seed)`` from a ``split`` config node (absent or ``by: none``: no split)."""
    if not split_cfg or str(split_cfg.get("by") or "none") == "none":
        return "none", 0.0, 0.0, 0
    by = str(split_cfg["by"])
    if by not in SPLIT_MODES:
        raise ValueError(f"unknown split.by {by!r}; choose one of {SPLIT_MODES}")
    missing = [k for k in ("valid", "test", "seed") if k not in split_cfg]
    if missing:
        raise ValueError(f"split config lacks {', '.join(missing)}")
    return by, float(split_cfg["valid"]), float(split_cfg["test"]), int(split_cfg["seed"])


# --- the data=folder prepare stage -----------------------------------------------------------


def prepare_folder(data: Mapping, out_dir: str | os.PathLike, features: Mapping, *,
                   stats: bool = True, state_unit: int | None = None, workers: int = 1,
                   progress: bool = True) -> None:
    """``data=folder``: every .wav/.flac under ``data["root"]``, with the alignments in
    ``data["alignments"]`` or beside the audio written to OUT/alignments/; then
    :func:`speechvq.data.prepare.finish`."""
    out_dir = Path(out_dir)
    if not data.get("root") or str(data["root"]) == "???":
        raise PrepareError("data.root is required: speechvq-prepare data=folder data.root=DIR ...")
    root = Path(data["root"]).expanduser()
    if not root.is_dir():
        raise PrepareError(f"{root}: data.root is not a folder")
    try:
        by, valid, test, seed = split_config(data.get("split"))
        items, rejected = folder_candidates(root, speaker=str(data["speaker"]),
                                            speaker_regex=data.get("speaker_regex"),
                                            extensions=list(data["extensions"]))
    except ValueError as err:
        raise PrepareError(f"{root}: {err}") from None
    if not items and not rejected:
        exts = "/".join(data["extensions"])
        raise PrepareError(f"{root}: no {exts} files found (searched recursively)")
    rows, bad, notes = inspect_candidates(items, int(features["sample_rate"]),
                                          float(data.get("min_seconds", 0.0)), workers, progress)
    rejected += bad
    if not rows:
        write_rejected(out_dir / "rejected.tsv", rejected)
        raise PrepareError(f"{root}: all {len(rejected)} audio files were rejected "
                           f"(see {out_dir / 'rejected.tsv'})")
    splits = None
    if by != "none":
        try:
            splits = split_rows(rows, by, valid, test, seed)
        except ValueError as err:
            raise PrepareError(f"{root}: {err}") from None
    extra = [_write_folder_alignments(data, out_dir, rows)]
    corpus = Corpus(rows, rejected, splits, notes=notes, extra=extra)
    finish(corpus, out_dir, features if stats else None, int(features["sample_rate"]),
           state_unit=state_unit, workers=workers, progress=progress)


def _read_folder_alignments(
    data: Mapping, rows: Sequence[ManifestRow], problems: list[AlignmentError]
) -> dict[str, list[Interval]]:
    """``{row id: intervals}`` from ``data.alignments`` (matched with ``match_alignments``) or,
    without it, from the ``.phn``/``.TextGrid`` file beside each audio file. Files that cannot
    be read are appended to ``problems`` and skipped; a missing ``data.alignments`` is an error."""
    tier = str(data.get("alignment_tier") or "phones")
    rate = int(data.get("alignment_sample_rate") or 16000)
    if data.get("alignments"):
        src = Path(str(data["alignments"])).expanduser()
        if not src.exists():
            raise PrepareError(f"{src}: data.alignments does not exist")
        try:
            if src.is_dir():  # with on_error, only a layout problem raises: no files, a clash
                loaded = load_alignments(src, tier, rate, on_error=problems.append)
            else:
                loaded = load_alignments(src, tier, rate)
        except AlignmentError as err:
            if src.is_dir():
                raise PrepareError(f"data.alignments: {err}") from None
            problems.append(err)  # one .phn/.TextGrid or a frame TSV that cannot be parsed
            return {}
        return match_alignments(loaded, rows)
    found: dict[str, list[Interval]] = {}
    beside = alignments_beside(r.path for r in rows)
    for row in rows:
        if row.path in beside:
            try:
                (found[row.id],) = load_alignments(beside[row.path], tier, rate).values()
            except AlignmentError as err:
                problems.append(err)
    return found


def _write_folder_alignments(data: Mapping, out_dir: Path, rows: Sequence[ManifestRow]) -> str:
    """Write OUT/alignments/<id>.phn (seconds) for every row with an alignment; the summary line.

    Unreadable or unwritable alignments are logged (file and reason) and skipped."""
    problems: list[AlignmentError] = []
    found = _read_folder_alignments(data, rows, problems)
    written = 0
    for row in rows:
        if row.id not in found:
            continue
        target = out_dir / "alignments" / f"{row.id}.phn"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_phn(target, found[row.id])
            written += 1
        except ValueError as err:
            problems.append(AlignmentError(target, str(err)))
    for err in problems:
        log.warning("skipping alignment %s", err)
    line = f"alignments: {written} of {len(rows)} utterances"
    if written:
        line += f" -> {out_dir / 'alignments'}"
    if problems:
        line += f" ({len(problems)} alignment file(s) could not be read, see the log)"
    if data.get("alignments") and not written:
        log.warning(
            "no alignment in %s matches an utterance id or audio file stem", data["alignments"]
        )
    return line
