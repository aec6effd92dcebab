"""speechvq-resynth: audio -> units -> audio, as the speaker (reconstruction) and as others
(voice conversion), with a listening page (:func:`speechvq.synthesis.resynthesize`).

    speechvq-resynth checkpoint=EXP/checkpoints/best.pt data.manifest=M.tsv speaker=all n=4 \
        out_dir=OUT [ids=[utt1,utt2]] [seed=0]

Reconstruction decodes with the utterance's own speaker when the checkpoint knows it; ``speaker=``
(a name, a list or ``all``) adds one converted version per other speaker, decoded with that
speaker's embedding and statistics. Writes OUT/original/<id>.wav, OUT/reconstruction/<id>.wav,
OUT/converted/<speaker>/<id>.wav, OUT/index.html (+ img/) and OUT/tb/; with ``score=true`` (the
default) every reconstruction is scored against its original (STOI, mel-cepstral distortion, and
narrow-band PESQ when the ``pesq`` package is installed): OUT/quality.tsv, OUT/quality.json, the
page and the last line printed.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from speechvq.cli._hydra import call, hydra_main
from speechvq.quality import describe
from speechvq.synthesis import ResynthJob, SynthesisError, resynthesize

log = logging.getLogger("speechvq.resynth")


def job_of(cfg: DictConfig) -> ResynthJob:
    """The config as plain data."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    return ResynthJob(
        checkpoint=str(cfg.checkpoint), manifest=str(cfg.data.manifest), speaker=plain["speaker"],
        n=cfg.n, ids=plain["ids"], seed=int(cfg.seed), device=str(cfg.device),
        vocoder=plain["vocoder"], tensorboard=bool(cfg.tensorboard), out_dir=str(cfg.out_dir),
        score=bool(cfg.score))


def run(cfg: DictConfig) -> None:
    job = job_of(cfg)
    n, index, means = call(resynthesize, job, errors=(SynthesisError,))
    print(f"resynthesised {n} utterance(s) into {job.out_dir}; listen: {index}")
    if means:
        print(f"reconstructions against their originals (mean): {describe(means)}")


main = hydra_main("resynth", run)

if __name__ == "__main__":
    main()
