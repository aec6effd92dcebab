"""speechvq-extract: frame-level units for every utterance of a manifest (:mod:`speechvq.extract`).

    speechvq-extract checkpoint=EXP/checkpoints/best.pt data.manifest=M.tsv out=units.txt \
        format=gslm|kaldi|npy|espnet|km [dedup=true] [shard=I nshards=N] [device=auto]
    speechvq-extract out=units.txt nshards=N merge=true
    speechvq-extract data.manifest=SPLIT.tsv out=split.txt from_units=[a.txt,b.txt] \
        [checkpoint=...] [format=... dedup=...]

Writes OUT (``OUT.shard-I-of-N`` when ``nshards > 1``), its sidecar ``OUT.json`` and, with
``dedup=true``, ``OUT.durations``, in parts of ``part_seconds`` of audio that a re-run after a
crash keeps. A re-run whose output and sidecar match the checkpoint hash and config says "already
done" and exits 0; ``force=true`` re-extracts. ``.OUT.lock`` beside OUT keeps a second run into
the same OUT out. ``from_units``: OUT for the manifest's utterances, taken from unit files that
hold them (a split from its subsets), without encoding anything.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from speechvq.cli._hydra import StageError, call, hydra_main
from speechvq.extract import (
    ExtractError,
    ExtractJob,
    check_shards,
    extract,
    merge,
    merge_from_units,
)

log = logging.getLogger("speechvq.extract")


def job_of(cfg: DictConfig) -> ExtractJob:
    """The config as plain data."""
    from_units = tuple(str(p) for p in (cfg.from_units or ()))
    if not cfg.data.manifest or not (cfg.checkpoint or from_units):
        raise StageError("checkpoint=... and data.manifest=... are required (data.manifest=... "
                         "with from_units=[...]; neither with merge=true)")
    return ExtractJob(
        checkpoint=str(cfg.checkpoint) if cfg.checkpoint else "", manifest=str(cfg.data.manifest),
        out=str(cfg.out), format=str(cfg.format), dedup=bool(cfg.dedup), shard=int(cfg.shard),
        nshards=int(cfg.nshards), force=bool(cfg.force), device=str(cfg.device),
        chunk_seconds=float(cfg.chunk_seconds), context_seconds=cfg.context_seconds,
        max_batch_seconds=float(cfg.max_batch_seconds), num_workers=int(cfg.num_workers),
        threads=cfg.threads, progress=bool(cfg.progress),
        config=OmegaConf.to_container(cfg, resolve=True),
        part_seconds=float(cfg.part_seconds) if cfg.part_seconds else None, from_units=from_units)


def run(cfg: DictConfig) -> int:
    call(check_shards, str(cfg.format), int(cfg.shard), int(cfg.nshards), errors=(ExtractError,))
    if cfg.merge:
        meta = call(merge, cfg.out, int(cfg.nshards), bool(cfg.remove_shards),
                    errors=(ExtractError,))
        print(f"merged {cfg.nshards} shards into {cfg.out}: "
              f"{int(meta.counts.get('utterances', 0))} utterances, {len(meta.rejected)} rejected")
        return 0
    job = job_of(cfg)
    if job.from_units:
        meta = call(merge_from_units, job, errors=(ExtractError,))
        if meta is None:
            print(f"{job.target}: already done")
        else:
            print(f"merged {len(meta.merged_from or [])} unit file(s) into {job.target}: "
                  f"{meta.counts['utterances']} utterances, {len(meta.rejected)} rejected")
        return 0
    meta = call(extract, job, errors=(ExtractError,))
    if meta is None:
        print(f"{job.target}: already done")
        return 0
    rejected = f" (see {job.target}.json)" if meta.rejected else ""
    resumed = f", {meta.parts['resumed']} of {meta.parts['parts']} parts resumed" if (
        meta.parts and meta.parts["resumed"]) else ""
    print(f"wrote {job.target}: {meta.counts['utterances']} utterances, "
          f"{meta.counts['seconds']:.1f} s of audio, {meta.realtime_factor:.0f}x real time on "
          f"{meta.device}{resumed}; {len(meta.rejected)} rejected{rejected}")
    return 0


main = hydra_main("extract", run)

if __name__ == "__main__":
    main()
