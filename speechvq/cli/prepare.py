"""speechvq-prepare: turn a corpus into manifests, a list of rejected files and feature statistics.

    speechvq-prepare data=folder data.root=DIR out_dir=OUT [data.split.by=utterance]
    speechvq-prepare data=mini out_dir=OUT
    speechvq-prepare data=librispeech ... out_dir=OUT

Writes OUT/manifest.tsv, OUT/{train,valid,test}.tsv (when split), OUT/rejected.tsv
(``path<TAB>reason``), OUT/stats.json and, for corpora with alignments, OUT/alignments/.
"""

from __future__ import annotations

import importlib
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.alignments import (
    AlignmentError,
    Interval,
    load_alignments,
    match_alignments,
    write_phn,
)
from speechvq.data.folder import (
    SPLITS,
    Candidate,
    alignments_beside,
    folder_candidates,
    inspect_candidates,
    librispeech_candidates,
    split_config,
    split_rows,
    write_rejected,
)
from speechvq.data.manifest import ManifestRow, speakers_of, write_manifest
from speechvq.features import compute_stats
from speechvq.files import write_text

log = logging.getLogger("speechvq.prepare")

MINI_CORPUS = Path(__file__).resolve().parents[2] / "egs" / "mini" / "corpus"


def _inspect(
    cfg: DictConfig, items: Sequence[Candidate]
) -> tuple[list[ManifestRow], list[tuple[str, str]], Counter]:
    return inspect_candidates(
        items,
        sample_rate=int(cfg.features.sample_rate),
        min_seconds=float(cfg.data.get("min_seconds", 0.0)),
        workers=int(cfg.num_workers),
        progress=bool(cfg.progress),
    )


def _write_outputs(
    cfg: DictConfig,
    out_dir: Path,
    rows: list[ManifestRow],
    splits: Mapping[str, list[ManifestRow]] | None,
    rejected: list[tuple[str, str]],
    notes: Counter,
    extra: Sequence[str] = (),
) -> None:
    """Stats, splits, rejected.tsv and, last (it marks the stage done), manifest.tsv; then a
    summary on stdout (``extra`` lines included)."""
    stats = None
    if cfg.stats:
        stats_rows = splits["train"] if splits is not None else rows
        try:
            stats = compute_stats(
                stats_rows, cfg.features, progress=bool(cfg.progress), workers=int(cfg.num_workers)
            )
        except ValueError as err:
            raise StageError(f"{out_dir / 'stats.json'}: {err}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split_path = out_dir / f"{name}.tsv"
        if splits is not None:
            write_manifest(split_path, splits[name])
        elif split_path.exists():  # from an earlier run with a split: would contradict manifest.tsv
            split_path.unlink()
            log.info("removed stale %s (no split this time)", split_path)
    write_rejected(out_dir / "rejected.tsv", rejected)
    if stats is not None:
        stats.save(out_dir / "stats.json")
    write_manifest(out_dir / "manifest.tsv", rows)

    seconds = sum(r.num_samples for r in rows) / int(cfg.features.sample_rate)
    lines = [
        f"{out_dir / 'manifest.tsv'}: {len(rows)} utterances, {len(speakers_of(rows))} speakers, "
        f"{seconds / 3600:.2f} h"
    ]
    if splits is not None:
        sizes = ", ".join(f"{k} {len(v)} ({len(speakers_of(v))} spk)" for k, v in splits.items())
        lines.append(f"splits: {sizes}")
    lines.extend(extra)
    if notes:
        lines.append("converted: " + ", ".join(f"{n} {what}" for what, n in sorted(notes.items())))
    where = f" (listed in {out_dir / 'rejected.tsv'})" if rejected else ""
    lines.append(f"{len(rejected)} rejected{where}")
    for path, reason in rejected[:5]:
        lines.append(f"  {path}: {reason}")
    if len(rejected) > 5:
        lines.append(f"  ... and {len(rejected) - 5} more")
    print("\n".join(lines), flush=True)


def _read_folder_alignments(
    data: DictConfig, rows: Sequence[ManifestRow], problems: list[AlignmentError]
) -> dict[str, list[Interval]]:
    """``{row id: intervals}`` from ``data.alignments`` (matched with ``match_alignments``) or,
    without it, from the ``.phn``/``.TextGrid`` file beside each audio file. Files that cannot
    be read are appended to ``problems`` and skipped; a missing ``data.alignments`` is an error."""
    tier = str(data.get("alignment_tier") or "phones")
    rate = int(data.get("alignment_sample_rate") or 16000)
    if data.get("alignments"):
        src = Path(str(data.alignments)).expanduser()
        if not src.exists():
            raise StageError(f"{src}: data.alignments does not exist")
        try:
            if src.is_dir():  # with on_error, only a layout problem raises: no files, a clash
                loaded = load_alignments(src, tier, rate, on_error=problems.append)
            else:
                loaded = load_alignments(src, tier, rate)
        except AlignmentError as err:
            if src.is_dir():
                raise StageError(f"data.alignments: {err}") from None
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


def _write_folder_alignments(data: DictConfig, out_dir: Path, rows: Sequence[ManifestRow]) -> str:
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
            "no alignment in %s matches an utterance id or audio file stem", data.alignments
        )
    return line


def prepare_folder(cfg: DictConfig, out_dir: Path) -> None:
    """``data=folder``: every .wav/.flac under ``data.root``, with the alignments in
    ``data.alignments`` or beside the audio written to OUT/alignments/."""
    if OmegaConf.is_missing(cfg.data, "root") or not cfg.data.root:
        raise StageError("data.root is required: speechvq-prepare data=folder data.root=DIR ...")
    root = Path(cfg.data.root).expanduser()
    if not root.is_dir():
        raise StageError(f"{root}: data.root is not a folder")
    try:
        by, valid, test, seed = split_config(cfg.data.get("split"))
        items, rejected = folder_candidates(
            root,
            speaker=str(cfg.data.speaker),
            speaker_regex=cfg.data.get("speaker_regex"),
            extensions=list(cfg.data.extensions),
        )
    except ValueError as err:
        raise StageError(f"{root}: {err}") from None
    if not items and not rejected:
        exts = "/".join(cfg.data.extensions)
        raise StageError(f"{root}: no {exts} files found (searched recursively)")
    rows, bad, notes = _inspect(cfg, items)
    rejected += bad
    if not rows:
        write_rejected(out_dir / "rejected.tsv", rejected)
        raise StageError(
            f"{root}: all {len(rejected)} audio files were rejected (see {out_dir / 'rejected.tsv'})"
        )
    splits = None
    if by != "none":
        try:
            splits = split_rows(rows, by, valid, test, seed)
        except ValueError as err:
            raise StageError(f"{root}: {err}") from None
    extra = _write_folder_alignments(cfg.data, out_dir, rows)
    _write_outputs(cfg, out_dir, rows, splits, rejected, notes, extra=[extra])


def _mini_root(cfg: DictConfig, out_dir: Path) -> Path:
    if cfg.data.get("regenerate"):
        try:
            synth = importlib.import_module("speechvq.data.synth")
        except ModuleNotFoundError as err:
            if err.name != "speechvq.data.synth":
                raise
            raise StageError(
                "data.regenerate=true needs speechvq.data.synth, which is missing"
            ) from None
        root = out_dir / "corpus"
        log.info("synthesising the mini corpus into %s", root)
        kwargs = OmegaConf.to_container(cfg.data.get("synth") or {}, resolve=True)
        synth.generate_corpus(root, overwrite=True, progress=bool(cfg.progress), **kwargs)
        return root
    return Path(cfg.data.root).expanduser() if cfg.data.get("root") else MINI_CORPUS


def prepare_mini(cfg: DictConfig, out_dir: Path) -> None:
    """``data=mini``: the shipped corpus, its own train/valid/test split and .phn alignments."""
    root = _mini_root(cfg, out_dir)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise StageError(
            f"{root}: not a mini corpus (no {'/'.join(missing)} folder); "
            "regenerate it with data.regenerate=true"
        )
    splits: dict[str, list[ManifestRow]] = {}
    rejected: list[tuple[str, str]] = []
    notes: Counter = Counter()
    for name in SPLITS:
        try:
            items, bad = librispeech_candidates(root / name)
        except ValueError as err:
            raise StageError(f"{root / name}: {err}") from None
        splits[name], bad_audio, split_notes = _inspect(cfg, items)
        rejected += bad + bad_audio
        notes.update(split_notes)
    rows = [r for name in SPLITS for r in splits[name]]
    if not splits["train"]:
        raise StageError(f"{root / 'train'}: no usable utterances")
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise StageError(f"{root}: utterance id(s) in more than one split: {dup[:10]}")
    n_missing = 0
    for row in rows:
        phn = Path(row.path).with_suffix(".phn")
        if phn.is_file():
            write_text(out_dir / "alignments" / f"{row.id}.phn", phn.read_text())
        else:
            n_missing += 1
    if n_missing:
        log.warning("%d utterance(s) have no .phn alignment beside their audio", n_missing)
    _write_outputs(cfg, out_dir, rows, splits, rejected, notes)


def run(cfg: DictConfig) -> int:
    """Dispatch on ``data.name``; returns the exit status (0: done, rejected files included)."""
    out_dir = Path(cfg.out_dir)
    name = cfg.data.get("name")
    if name == "librispeech":
        from speechvq.data import librispeech

        try:
            features = cfg.features if cfg.stats else None
            librispeech.prepare(cfg.data, out_dir, features, progress=bool(cfg.progress))
        except ValueError as err:  # bad subset, failed checksum, unsafe archive: one clear line
            raise StageError(str(err)) from None
    elif name == "folder":
        prepare_folder(cfg, out_dir)
    elif name == "mini":
        prepare_mini(cfg, out_dir)
    else:
        raise StageError(
            f"unknown data.name {name!r}: use data=folder, data=mini or data=librispeech"
        )
    return 0


def _main(cfg: DictConfig) -> int:
    # Work is spread over files (num_workers threads); torch's own intra-op threads on these short
    # clips only contend with them (several times slower on a busy machine).
    torch.set_num_threads(1)
    return run(cfg)


main = hydra_main("prepare", _main)

if __name__ == "__main__":
    main()
