"""speechvq-train: train a VQ-VAE on a manifest.

    speechvq-train data.manifest=OUT/train.tsv [data.valid_manifest=OUT/valid.tsv] model=mel|wave \
        out_dir=EXP [trainer.max_steps=N] [trainer=gpu] [resume=true]
    torchrun --nproc_per_node=N $(which speechvq-train) ...      # DDP, one process per GPU/core

Writes EXP/checkpoints/{last,best}.pt (self-describing: later stages need nothing else),
EXP/tb/ (TensorBoard), EXP/train.log, and EXP/stats.json when the manifest had none beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from speechvq.audio import AudioError
from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.tasks import VQVAETask
from speechvq.training import TrainingError, fit, seed_everything

log = logging.getLogger("speechvq.train")

EXIT_CODES = {"interrupt": 130, "sigterm": 143}  # the shell's codes for SIGINT / SIGTERM


def run(cfg: DictConfig) -> int | None:
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:  # one voice: the other ranks only report problems
        logging.getLogger().setLevel(logging.WARNING)
    config = OmegaConf.to_container(cfg, resolve=True)
    out_dir = Path(cfg.out_dir)
    seed_everything(int(cfg.seed))  # the same initial weights on every rank
    try:
        task = VQVAETask(config, out_dir=out_dir, progress=rank == 0)
    except (ValueError, AudioError) as err:
        raise StageError(str(err)) from None
    resume = cfg.resume if isinstance(cfg.resume, bool) else str(cfg.resume)
    try:
        result = fit(task, config["trainer"], out_dir, resume=resume, seed=int(cfg.seed),
                     device=str(cfg.device), config=config)
    except (TrainingError, CheckpointError) as err:
        raise StageError(str(err)) from None
    if rank == 0:
        best = Path(result["best_path"])
        what = "valid loss" if task.valid_set is not None else "train loss"
        print(f"stopped ({result['stopped']}) at step {result['step']}: {result['last']}")
        if best.exists():
            print(f"best {what} {result['best']:.5g}: {best}")
    return EXIT_CODES.get(result["stopped"])


main = hydra_main("train", run)

if __name__ == "__main__":
    main()
