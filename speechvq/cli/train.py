"""speechvq-train: train a VQ-VAE on a manifest (:func:`speechvq.tasks.train_vqvae`).

    speechvq-train data.manifest=OUT/train.tsv [data.valid_manifest=OUT/valid.tsv] model=mel|wave \
        out_dir=EXP [trainer.max_steps=N] [trainer=gpu] [resume=true]
    torchrun --nproc_per_node=N $(which speechvq-train) ...      # DDP, one process per GPU/core

Writes EXP/checkpoints/{last,best}.pt (self-describing: later stages need nothing else),
EXP/tb/ (TensorBoard), EXP/train.log, and EXP/stats.json when the manifest had none beside it.
One run at a time: EXP/.lock is held for the whole run, and a run that is refused (EXP in use,
or a finished run there without resume=true) is refused before anything in EXP is written.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import StageError, call, hydra_main
from speechvq.runtime import is_main_process
from speechvq.tasks import TaskError, train_vqvae
from speechvq.training import TrainingError, resume_path, run_lock

log = logging.getLogger("speechvq.train")

EXIT_CODES = {"interrupt": 130, "sigterm": 143}  # the shell's codes for SIGINT / SIGTERM


def resume_value(cfg: DictConfig) -> bool | str:
    """``resume=``: a bool, ``auto``, or a checkpoint path."""
    return cfg.resume if isinstance(cfg.resume, bool) else str(cfg.resume)


def _check_refusal(cfg: DictConfig) -> None:
    """What ``fit`` would refuse (a finished run without resume=true, ...), reading only."""
    try:
        resume_path(Path(cfg.out_dir), resume_value(cfg))
    except TrainingError as err:
        raise StageError(str(err)) from None


@contextlib.contextmanager
def claim(cfg: DictConfig) -> Iterator[None]:
    """Before hydra writes EXP/.hydra and EXP/train.log: refuse a run that ``fit`` would refuse,
    and hold EXP's lock (rank 0 of a torchrun job) until the process ends."""
    _check_refusal(cfg)
    if not is_main_process():
        yield
        return
    with run_lock(Path(cfg.out_dir), "speechvq-train"):
        _check_refusal(cfg)  # again, under the lock: a run may have ended in between
        yield


def run(cfg: DictConfig) -> int | None:
    if not is_main_process():  # one voice: the other ranks only report problems
        logging.getLogger().setLevel(logging.WARNING)
    config = OmegaConf.to_container(cfg, resolve=True)
    task, result = call(train_vqvae, config, Path(cfg.out_dir), resume_value(cfg),
                        errors=(TaskError, TrainingError, CheckpointError))
    if is_main_process():
        best = Path(result["best_path"])
        what = "valid loss" if task.valid_set is not None else "train loss"
        print(f"stopped ({result['stopped']}) at step {result['step']}: {result['last']}")
        if best.exists():
            print(f"best {what} {result['best']:.5g}: {best}")
    return EXIT_CODES.get(result["stopped"])


main = hydra_main("train", run, claim=claim)

if __name__ == "__main__":
    main()
