"""speechvq-sample: sample unit sequences from a trained prior and speak them with a VQ-VAE
(:func:`speechvq.synthesis.sample`).

    speechvq-sample vqvae=EXP/checkpoints/best.pt prior_checkpoint=PRIOR/checkpoints/best.pt \
        n=8 seconds=4 speaker=<name>|[a,b]|all out_dir=OUT [prompt=<utt id> data.manifest=M.tsv]

Unconditional sampling, or (``prompt=``) continuing the first ``prompt_seconds`` of an utterance's
units (obtained by encoding it with the VQ-VAE). Units -> codebook vectors -> decoder in the chosen
voice -> that speaker's statistics undone -> Griffin-Lim (mel models) -> OUT/sample_XXX.wav at
16 kHz, plus OUT/units.txt (gslm format), OUT/index.html and OUT/tb/. The same seed gives
identical audio.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from speechvq.cli._hydra import call, hydra_main
from speechvq.synthesis import SampleJob, SynthesisError, sample

log = logging.getLogger("speechvq.sample")


def job_of(cfg: DictConfig) -> SampleJob:
    """The config as plain data."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return SampleJob(
        vqvae=str(cfg.vqvae), prior_checkpoint=str(cfg.prior_checkpoint), n=int(cfg.n),
        seconds=float(cfg.seconds), speaker=plain["speaker"], prompt=cfg.prompt,
        prompt_seconds=float(cfg.prompt_seconds), manifest=cfg.data.manifest,
        temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p, seed=int(cfg.seed),
        device=str(cfg.device), vocoder=plain["vocoder"], tensorboard=bool(cfg.tensorboard),
        out_dir=str(cfg.out_dir))


def run(cfg: DictConfig) -> None:
    job = job_of(cfg)
    index = call(sample, job, errors=(SynthesisError,))
    print(f"wrote {job.n} samples of {job.seconds} s to {job.out_dir}; listen: {index}")


main = hydra_main("sample", run)

if __name__ == "__main__":
    main()
