"""speechvq-evaluate: phone purity, cluster purity, PNMI, ABX, bitrate and codebook use of a unit
file, beside the same metrics for MFCC + k-means units with as many clusters
(:func:`speechvq.baseline.evaluate`).

    speechvq-evaluate units=U.txt alignments=ALIGN_DIR data.manifest=test.tsv \
        baseline.train_manifest=train.tsv [out=metrics.json] [baseline.enabled=false] \
        [codebook=EXP/checkpoints/best.pt]

Prints a table and writes the metrics as JSON (default ``<units>.metrics.json``). ``data.manifest``
gives the evaluated utterances' speakers (ABX) and audio (baseline); without it, only the
frame-level metrics of the units are computed. ABX is reported over one-hot units and, as
ZeroSpeech 2019 scored it, over each frame's code vector (``abx_*_codevec``).
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from speechvq.baseline import EvalJob, EvaluationError, evaluate, report_table
from speechvq.cli._hydra import call, hydra_main

log = logging.getLogger("speechvq.evaluate")


def job_of(cfg: DictConfig) -> EvalJob:
    """The config as plain data."""
    abx = cfg.abx
    return EvalJob(
        units=str(cfg.units), format=cfg.format, alignments=str(cfg.alignments),
        tier=str(cfg.tier), out=cfg.out, unit_rate=cfg.unit_rate, n_codes=cfg.n_codes,
        codebook=cfg.codebook, manifest=cfg.data.manifest,
        metrics={"include_silence": bool(cfg.metrics.include_silence),
                 "silence": [str(s) for s in cfg.metrics.silence],
                 "abx_max_per_cell": int(abx.max_per_cell),
                 "abx_max_x_speakers": int(abx.max_x_speakers), "abx_seed": int(abx.seed),
                 "abx_modes": list(abx.modes) if abx.enabled else []},
        baseline=OmegaConf.to_container(cfg.baseline, resolve=True),
        features=OmegaConf.to_container(cfg.features, resolve=True),
        progress=bool(cfg.progress), config=OmegaConf.to_container(cfg, resolve=True))


def run(cfg: DictConfig) -> int:
    job = job_of(cfg)
    report = call(evaluate, job, errors=(EvaluationError,))
    print(report_table(report))
    print(f"wrote {job.out_path} ({report['seconds']} s)")
    return 0


main = hydra_main("evaluate", run)

if __name__ == "__main__":
    main()
