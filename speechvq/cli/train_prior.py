"""speechvq-train-prior: train the Transformer unit prior on a unit file with the shared fit loop
(:func:`speechvq.tasks.train_prior`).

    speechvq-train-prior units=UNITS.txt data.manifest=M.tsv out_dir=PRIOR [prior=tiny] \
        [valid_units=VALID.txt | valid_fraction=0.05] [trainer.max_steps=...]

Validation: ``valid_units=`` or a seeded held-out fraction of the utterances. At the end the
validation perplexity per unit of the best checkpoint is printed beside add-one smoothed unigram
and bigram baselines estimated on the same training split, and saved to PRIOR/perplexity.json.
Speaker tokens name the VQ-VAE's speakers (``vqvae=``, or the checkpoint in the unit file's
sidecar); each utterance's speaker comes from ``data.manifest`` (or the units' manifests).
"""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig, OmegaConf

from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import call, hydra_main
from speechvq.cli.train import claim, resume_value
from speechvq.prior import PriorDataError
from speechvq.tasks import PriorJob, TaskError, train_prior
from speechvq.training import TrainingError

log = logging.getLogger("speechvq.train_prior")


def job_of(cfg: DictConfig) -> PriorJob:
    """The config as plain data."""
    return PriorJob(
        units=str(cfg.units), valid_units=cfg.valid_units,
        valid_fraction=float(cfg.valid_fraction), manifest=cfg.data.manifest, vqvae=cfg.vqvae,
        n_codes=cfg.n_codes, speaker_tokens=bool(cfg.speaker_tokens), max_units=cfg.max_units,
        prior=OmegaConf.to_container(cfg.prior, resolve=True),
        trainer=OmegaConf.to_container(cfg.trainer, resolve=True), out_dir=str(cfg.out_dir),
        resume=resume_value(cfg), seed=int(cfg.seed), device=str(cfg.device),
        config=OmegaConf.to_container(cfg, resolve=True))


def run(cfg: DictConfig) -> None:
    report = call(train_prior, job_of(cfg),
                  errors=(PriorDataError, TaskError, TrainingError, CheckpointError))
    if report is None:  # not rank 0
        return
    n_codes = report["n_codes"]
    print(f"validation perplexity per unit ({report['valid_units']} units, "
          f"{report['valid_utterances']} utterances; codebook {n_codes}, uniform = {n_codes}):")
    for name in ("prior", "bigram", "unigram"):
        print(f"  {name:<8} {report[name]:10.2f}   ({math.log2(report[name]):.2f} bits/unit)")


main = hydra_main("train_prior", run, claim=claim)

if __name__ == "__main__":
    main()
