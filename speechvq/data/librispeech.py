"""LibriSpeech (OpenSLR 12) and mini LibriSpeech (OpenSLR 31): download, verify, extract, manifests.

``speechvq-prepare data=librispeech data.subsets=[dev-clean] out_dir=OUT`` calls :func:`prepare`:

1. for each subset, unless ``data.root`` points at an existing copy: download
   ``<base_url>/<resource>/<subset>.tar.gz`` into ``data.download_dir`` (resumable: HTTP Range onto a
   ``.part`` file; mirrors tried in turn), check its md5 against the publisher's value (the built-in
   table, or ``data.checksums``, an md5sum-format file), and extract it safely into
   ``<download_dir>/LibriSpeech/<subset>/`` (a ``.complete`` marker makes this a no-op next time);
2. one manifest per subset, ``OUT/<subset>.tsv`` (speaker = reader id, the first field of the
   utterance id; ``text`` = the transcript), and the unions ``OUT/manifest.tsv`` (every subset),
   ``OUT/train.tsv``, ``OUT/valid.tsv``, ``OUT/test.tsv`` (``data.splits``; by default the
   ``train-*``, ``dev-*`` and ``test-*`` subsets) so later stages read the same names for any corpus;
   files that cannot be read go to ``OUT/rejected.tsv`` (``path<TAB>reason``; a tab, newline or
   backslash in a path is written as ``\\t``, ``\\n``, ``\\\\``);
3. ``OUT/stats.json``: log-mel statistics, global over the train split and per speaker over every
   subset (normalising an unseen speaker by its own statistics needs no labels);
4. with ``data.alignments`` (a folder or ``.zip`` of MFA TextGrids, or ``.phn`` files), one
   ``OUT/alignments/<utt>.phn`` per utterance of the manifests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import soundfile as sf
from tqdm import tqdm

from speechvq.data.alignments import read_phn, read_textgrid
from speechvq.data.download import (
    fetch_archive,
    safe_extract,
)
from speechvq.data.folder import librispeech_candidates
from speechvq.data.manifest import ManifestRow, speakers_of
from speechvq.data.prepare import Corpus, finish
from speechvq.files import write_text

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Subset:
    """A downloadable part of the corpus: OpenSLR ``resource`` number, publisher's md5, size."""

    name: str
    resource: int
    md5: str
    num_bytes: int | None = None
    num_utterances: int | None = None

    @property
    def archive(self) -> str:
        return f"{self.name}.tar.gz"


# The publishers' md5sum.txt values (OpenSLR resources 12 and 31).
SUBSETS: dict[str, Subset] = {
    s.name: s
    for s in (
        Subset("dev-clean", 12, "42e2234ba48799c1f50f24a7926300a1", 337926286, 2703),
        Subset("dev-other", 12, "c8d0bcc9cca99d4f8b62fcc847357931", 314305928, 2864),
        Subset("test-clean", 12, "32fa31d27d2e1cad72775fee3f4849a9", 346663984, 2620),
        Subset("test-other", 12, "fb5a50374b501bb3bac4815ee91d3135", 328757843, 2939),
        Subset("train-clean-100", 12, "2a93770f6d5c6c964bc36631d331a522", 6387309499, 28539),
        Subset("train-clean-360", 12, "c0e676e450a7ff2f54aeade5171606fa", 23049477885, 104014),
        Subset("train-other-500", 12, "d1a0fd59409feb2c614ce4d30c387708", 30593501606, 148688),
        Subset("train-clean-5", 31, "5df7d4e78065366204ca6845bb08f490"),
        Subset("dev-clean-2", 31, "6d7ab67ac6a1d2c993d050e16d61080d"),
    )
}
COMPLETE_MARKER = ".complete"


class LibriSpeechError(ValueError):
    """A problem with the corpus a user can act on; the message names the file or URL."""


# --- subsets and checksums -------------------------------------------------------------------


def get_subset(name: str) -> Subset:
    """The :class:`Subset` called ``name``; ValueError listing the known names otherwise."""
    try:
        return SUBSETS[name]
    except KeyError:
        raise ValueError(
            f"unknown LibriSpeech subset {name!r}; choose from {', '.join(SUBSETS)}"
        ) from None


def subset_url(subset: Subset, base_url: str) -> str:
    """``<base_url>/<resource>/<subset>.tar.gz``; ``base_url`` is the root of OpenSLR's resources."""
    return f"{base_url.rstrip('/')}/{subset.resource}/{subset.archive}"


def read_checksums(path: str | os.PathLike) -> dict[str, str]:
    """Read an md5sum-format file (``<md5>  <name>.tar.gz``, as OpenSLR publishes) -> {file name: md5}.

    Lines may use one or two spaces, a ``*`` binary marker and a path (only its last part counts).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: checksums file not found") from None
    table: dict[str, str] = {}
    for lineno, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{32})\s+\*?(\S.*)", line)
        if not m:
            raise ValueError(f"{path}:{lineno}: expected '<md5>  <file name>', got {line!r}")
        table[PurePosixPath(m.group(2).strip()).name] = m.group(1).lower()
    return table


def expected_md5(subset: Subset, checksums: Mapping[str, str] | None, source: str) -> str:
    """The md5 to check ``subset``'s archive against: from ``checksums`` when given, else built in."""
    if checksums is None:
        return subset.md5
    try:
        return checksums[subset.archive]
    except KeyError:
        raise ValueError(f"{source}: no md5 for {subset.archive}") from None


def extract_subset(
    archive: str | os.PathLike, subset: Subset, corpus_dir: str | os.PathLike, progress: bool = True
) -> Path:
    """Extract ``subset``'s archive into ``corpus_dir/LibriSpeech/<subset>`` and mark it complete.

    Extraction goes to a scratch folder first, so a refused or broken archive leaves nothing behind.
    Returns the subset folder.
    """
    archive, corpus_dir = Path(archive), Path(corpus_dir)
    scratch = corpus_dir / f".extract-{subset.name}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        safe_extract(archive, scratch, progress=progress,
                     link_root=f"LibriSpeech/{subset.name}")
        extracted = scratch / "LibriSpeech" / subset.name
        if not extracted.is_dir():
            raise ValueError(f"{archive}: holds no LibriSpeech/{subset.name}/ folder")
        librispeech = corpus_dir / "LibriSpeech"
        librispeech.mkdir(parents=True, exist_ok=True)
        for doc in (scratch / "LibriSpeech").iterdir():  # BOOKS.TXT, SPEAKERS.TXT, ... (shared)
            if doc.is_file():
                os.replace(doc, librispeech / doc.name)
        target = librispeech / subset.name
        if target.exists():  # an earlier extraction that did not finish
            shutil.rmtree(target)
        os.replace(extracted, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _marker(subset_dir: Path) -> Path:
    return subset_dir / COMPLETE_MARKER


def read_marker(subset_dir: Path) -> dict | None:
    """The completion record of an extracted subset, or None when it is missing or unreadable."""
    try:
        return json.loads(_marker(subset_dir).read_text())
    except (OSError, ValueError):
        return None


def obtain_subset(
    subset: Subset,
    download_dir: str | os.PathLike,
    urls: Sequence[str],
    md5: str,
    md5_source: str = "the built-in table",
    keep_archive: bool = True,
    **download_kwargs,
) -> Path:
    """Download, verify and extract ``subset`` unless its completion marker says it is done.

    The marker (``LibriSpeech/<subset>/.complete``) records the archive's md5: a different expected
    md5 (another checksums file) fetches it again. Returns ``download_dir/LibriSpeech/<subset>``.
    """
    download_dir = Path(download_dir)
    subset_dir = download_dir / "LibriSpeech" / subset.name
    done = read_marker(subset_dir)
    if done and done.get("md5") == md5.lower():
        log.info("%s: already downloaded and extracted (%s)", subset.name, _marker(subset_dir))
        return subset_dir
    if done:
        log.warning("%s: extracted from an archive with md5 %s, expected %s: fetching again",
                    subset_dir, done.get("md5"), md5)  # fmt: skip
        stale = download_dir / subset.archive
        if stale.exists():
            stale.unlink()
    _check_space(subset, download_dir)
    archive = fetch_archive(subset.archive, download_dir, urls, md5, md5_source,
                            **download_kwargs)
    extract_subset(archive, subset, download_dir, progress=download_kwargs.get("progress", True))
    record = {"subset": subset.name, "archive": archive.name, "md5": md5.lower()}
    write_text(_marker(subset_dir), json.dumps(record) + "\n")
    if not keep_archive:
        archive.unlink()
    log.info("%s: ready in %s", subset.name, subset_dir)
    return subset_dir


def _check_space(subset: Subset, download_dir: Path) -> None:
    """Warn before a download that the disk cannot hold (archive + its extraction, about 2x)."""
    if not subset.num_bytes:
        return
    have = sum(p.stat().st_size for p in download_dir.glob(f"{subset.archive}*") if p.is_file())
    needed = 2 * subset.num_bytes - have
    download_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(download_dir).free
    if free < needed:
        log.warning("%s: %.1f GB free, but %s needs about %.1f GB more (archive + extracted files)",
                    download_dir, free / 1e9, subset.name, needed / 1e9)  # fmt: skip


def find_subset_dir(root: str | os.PathLike, subset: str) -> Path:
    """``<root>/LibriSpeech/<subset>`` or ``<root>/<subset>`` (``root`` is LibriSpeech/ itself)."""
    root = Path(root)
    for candidate in (root / "LibriSpeech" / subset, root / subset):
        if candidate.is_dir():
            return candidate
    raise ValueError(
        f"{root}: no LibriSpeech/{subset}/ or {subset}/ folder (data.root must be the folder holding "
        "LibriSpeech/ or LibriSpeech/ itself)"
    )


# --- manifests --------------------------------------------------------------------------------


def scan_subset(
    subset_dir: str | os.PathLike, min_seconds: float = 0.0, progress: bool = True
) -> tuple[list[ManifestRow], list[tuple[str, str]]]:
    """Manifest rows for ``<subset>/<speaker>/<chapter>/*.flac`` and ``(path, reason)`` rejections.

    Speaker is the reader id (the ``<speaker>`` folder, the first field of the utterance id); text
    comes from the chapter's ``trans.txt``. Only headers are read (soundfile.info): the archives'
    md5 vouches for the audio, and a full decode of the 960 h set would take hours.
    """
    subset_dir = Path(subset_dir)
    items, rejected = librispeech_candidates(subset_dir)
    rows: list[ManifestRow] = []
    for item in tqdm(items, desc=f"scan {subset_dir.name}", unit=" files", disable=not progress):
        try:
            info = sf.info(item.path)
        except (RuntimeError, sf.LibsndfileError) as err:
            rejected.append((item.path, f"unreadable: {err}"))
            continue
        # counts are at the corpus rate (LibriSpeech is 16 kHz; loaders resample anything else)
        num_samples = round(info.frames * SAMPLE_RATE / info.samplerate)
        if num_samples <= 0 or num_samples < min_seconds * SAMPLE_RATE:
            rejected.append((item.path, f"shorter than {min_seconds} s ({info.frames} samples)"))
            continue
        rows.append(ManifestRow(item.id, item.path, num_samples, item.speaker, item.text))
    if not rows:
        raise LibriSpeechError(f"{subset_dir}: no readable <speaker>/<chapter>/*.flac files")
    rows.sort(key=lambda r: r.id)
    return rows, rejected


def choose_splits(subsets: Sequence[str], chosen: Mapping | None = None) -> dict[str, list[str]]:
    """Subsets per split: ``chosen[split]`` where given, else by name (train-*, dev-*, test-*).

    With no train-* subset the train split is every subset (a quick look at dev-clean alone).
    """
    splits = {
        "train": [s for s in subsets if s.startswith("train")] or list(subsets),
        "valid": [s for s in subsets if s.startswith("dev")],
        "test": [s for s in subsets if s.startswith("test")],
    }
    for split, names in dict(chosen or {}).items():
        if split not in splits:
            raise ValueError(f"data.splits.{split}: unknown split (train, valid or test)")
        if names is None:
            continue
        names = [names] if isinstance(names, str) else list(names)
        unknown = sorted(set(names) - set(subsets))
        if unknown:
            raise ValueError(f"data.splits.{split} names {unknown}, which are not in data.subsets")
        splits[split] = names
    return splits


# --- alignments -------------------------------------------------------------------------------


def _alignment_files(src: Path, scratch: Path) -> dict[str, Path]:
    """{utterance id: .TextGrid/.phn file} under a folder or inside a zip (unpacked to ``scratch``)."""
    suffixes = (".textgrid", ".phn")
    if src.is_file() and zipfile.is_zipfile(src):
        found = {}
        with zipfile.ZipFile(src) as zf:
            for info in zf.infolist():
                name = PurePosixPath(info.filename)
                if info.is_dir() or name.suffix.lower() not in suffixes:
                    continue
                out = scratch / name.name  # flattened: no path from the zip reaches the disk
                out.write_bytes(zf.read(info))
                found[name.stem] = out
        return found
    if not src.is_dir():
        raise ValueError(f"{src}: alignments must be a folder or a .zip of TextGrid/.phn files")
    return {p.stem: p for p in sorted(src.rglob("*")) if p.suffix.lower() in suffixes}


def import_alignments(
    src: str | os.PathLike, utt_ids: Sequence[str], out_dir: str | os.PathLike
) -> int:
    """Write ``out_dir/<id>.phn`` (``start end phone`` lines, seconds) for each id found in ``src``.

    TextGrids are read with :func:`speechvq.data.alignments.read_textgrid` (phones tier; stress
    digits stripped; empty intervals become ``sil`` so later frames do not shift). Returns the count.
    """
    src, out_dir = Path(src), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = set(utt_ids)
    written = 0
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as scratch:
        files = _alignment_files(src, Path(scratch))
        for utt_id in sorted(wanted & files.keys()):
            f = files[utt_id]
            try:
                intervals = read_phn(f) if f.suffix.lower() == ".phn" else read_textgrid(f)
            except (ValueError, OSError) as err:
                log.warning("skipping alignment %s: %s", f, err)
                continue
            lines = [f"{i.start:.4f} {i.end:.4f} {i.label}" for i in intervals]
            write_text(out_dir / f"{utt_id}.phn", "\n".join(lines) + "\n")
            written += 1
    if not written:
        raise ValueError(f"{src}: no alignment matches any of the {len(wanted)} utterances")
    log.info("alignments: %d of %d utterances from %s -> %s", written, len(wanted), src, out_dir)
    return written


# --- the prepare stage ------------------------------------------------------------------------


def _get(cfg: Mapping, key: str, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if value is None else value


def download_subsets(data_cfg: Mapping, progress: bool = True) -> dict[str, Path]:
    """Make every subset of ``data_cfg.subsets`` available; {subset: its folder}.

    ``data.root`` (an existing copy) is used as is; otherwise each subset is fetched into
    ``data.download_dir`` from ``data.base_url`` then ``data.mirrors``.
    """
    names = _get(data_cfg, "subsets", [])
    names = names.replace(",", " ").split() if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("data.subsets is empty: name at least one LibriSpeech subset")
    subsets = [get_subset(n) for n in names]
    root = _get(data_cfg, "root")
    if root:
        return {s.name: find_subset_dir(root, s.name) for s in subsets}
    download_dir = _get(data_cfg, "download_dir")
    if not download_dir:
        raise ValueError(
            "set data.download_dir (where to download) or data.root (an existing copy)"
        )
    checksums_file = _get(data_cfg, "checksums")
    checksums = read_checksums(checksums_file) if checksums_file else None
    source = str(checksums_file) if checksums_file else "the built-in table"
    bases = [_get(data_cfg, "base_url"), *list(_get(data_cfg, "mirrors", []))]
    bases = [b for b in bases if b]
    if not bases:
        raise ValueError("data.base_url is empty and there are no data.mirrors")
    kwargs = {
        "retries": int(_get(data_cfg, "retries", 5)),
        "timeout": float(_get(data_cfg, "timeout", 60.0)),
        "retry_wait": float(_get(data_cfg, "retry_wait", 2.0)),
        "progress": progress,
    }
    dirs = {}
    for s in subsets:
        md5 = expected_md5(s, checksums, source)
        urls = [subset_url(s, b) for b in bases]
        keep = bool(_get(data_cfg, "keep_archives", True))
        dirs[s.name] = obtain_subset(s, download_dir, urls, md5, source, keep, **kwargs)
    return dirs


def prepare(
    data_cfg: Mapping,
    out_dir: str | os.PathLike,
    features_cfg: Mapping | None = None,
    progress: bool = True,
    *,
    stats: bool = True,
    state_unit: int | None = None,
    workers: int = 1,
) -> dict:
    """The whole ``data=librispeech`` prepare stage (see the module docstring); returns a summary.

    ``data.download_only=true`` stops after the subsets are downloaded and extracted. No
    ``stats.json`` (nor ``frontend_state.npz``) without ``features_cfg`` or with ``stats=False``;
    ``state_unit``: see :func:`speechvq.data.prepare.finish`. It ends as every corpus does
    (:func:`speechvq.data.prepare.finish`).
    """
    out_dir = Path(out_dir)
    dirs = download_subsets(data_cfg, progress=progress)
    summary: dict = {"subsets": {name: str(d) for name, d in dirs.items()}}
    if _get(data_cfg, "download_only", False):
        return summary
    min_seconds = float(_get(data_cfg, "min_seconds", 0.0))
    corpus = Corpus([], [])
    for name, subset_dir in dirs.items():
        rows, bad = scan_subset(subset_dir, min_seconds, progress=progress)
        published = SUBSETS[name].num_utterances
        if published and len(rows) + len(bad) != published:  # e.g. an incomplete data.root copy
            log.warning("%s: %d utterances found, the published subset has %d",
                        subset_dir, len(rows) + len(bad), published)  # fmt: skip
        corpus.subsets[name], corpus.rejected = rows, corpus.rejected + bad
    corpus.rows = [r for rows in corpus.subsets.values() for r in rows]
    splits = choose_splits(list(corpus.subsets), _get(data_cfg, "splits", {}))
    corpus.splits = {k: [r for s in v for r in corpus.subsets[s]] for k, v in splits.items() if v}
    corpus.stats_rows = [r for s in splits["train"] for r in corpus.subsets[s]]
    summary.update(utterances={name: len(rows) for name, rows in corpus.subsets.items()},
                   splits=splits, rejected=len(corpus.rejected))
    alignments = _get(data_cfg, "alignments")
    if alignments:
        ids = [r.id for r in corpus.rows]
        summary["alignments"] = import_alignments(alignments, ids, out_dir / "alignments")
    corpus.extra = _summary_lines(out_dir, corpus.subsets, splits)
    features = features_cfg if stats else None
    finish(corpus, out_dir, features, SAMPLE_RATE, all_speakers=True, workers=workers,
           per_speaker=_get(data_cfg, "stats_utterances_per_speaker"), state_unit=state_unit,
           progress=progress)
    if features is not None:
        summary["stats"] = str(out_dir / "stats.json")
    return summary


def _summary_lines(out_dir: Path, by_subset: Mapping[str, Sequence[ManifestRow]],
                   splits: Mapping[str, Sequence[str]]) -> list[str]:
    lines = []
    for name, rows in by_subset.items():
        hours = sum(r.num_samples for r in rows) / SAMPLE_RATE / 3600
        lines.append(f"{out_dir / f'{name}.tsv'}: {len(rows)} utterances, "
                     f"{len(speakers_of(rows))} speakers, {hours:.2f} h")
    lines.append("split manifests: " + ", ".join(f"{k}.tsv = {' + '.join(v)}"
                                                 for k, v in splits.items() if v))
    return lines
