"""What a training run is given: the trainer config, the model family, the run folder.

- :class:`TrainerConfig`: ``conf/trainer/*.yaml`` as a checked dataclass, with the learning-rate
  rules (:func:`lr_factor`: warmup then cosine or constant; :meth:`TrainerConfig.scaled_lr`:
  how the rate follows the number of ranks);
- :class:`Task`: the protocol through which a model family (:mod:`speechvq.tasks`) plugs into
  :func:`speechvq.training.fit`;
- the run folder: :func:`run_lock` (one run per folder) and :func:`resume_path` (which checkpoint
  a run continues from).

Nothing here imports the fit loop, so :mod:`speechvq.tasks` and :mod:`speechvq.training` both
import this module and neither imports the other back.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.tensorboard import SummaryWriter

from speechvq.checkpoint import OutputLock

LOCK_FILE = ".lock"  # in the run folder: one writer per run (see run_lock)


class TrainingError(Exception):
    """A training run that cannot start or go on; the message says what to change."""


@runtime_checkable
class Task(Protocol):
    """What :func:`fit` needs from a model family (:mod:`speechvq.tasks`: VQ-VAE, prior).

    Attributes:
        kind: the checkpoint kind, ``"vqvae"`` or ``"prior"``.
        model: the ``nn.Module`` to train, built on CPU; ``fit`` moves it to the device.
        model_config: the builder's kwargs as plain data: rebuilds ``model`` from the checkpoint.
        meta: plain data saved in every checkpoint (speakers, stats, frame rate, ...).
        train_set: map-style dataset; if it has ``set_epoch(epoch)`` it is called before every
            item (workers live across epochs). Items must be a pure function of (index, epoch).
        valid_set: map-style dataset or ``None`` (then ``best.pt`` tracks the training loss).
    """

    kind: str
    model: nn.Module
    model_config: dict
    meta: dict
    train_set: Dataset
    valid_set: Dataset | None

    def collate(self, items: list) -> dict | None:
        """Items of ``train_set`` / ``valid_set`` -> one batch (a dict of tensors and lists);
        ``None`` skips the batch (e.g. every file unreadable; under DDP only in validation)."""
        ...

    def step(self, model: nn.Module, batch: dict) -> dict[str, Tensor]:
        """One forward pass on a batch already on the device (under autocast).

        ``model`` is the task's model, wrapped in DDP under ``torchrun``; ``model.training`` says
        whether this is a training or a validation step (validation runs under ``no_grad``).
        Returns scalars: ``"loss"`` (what is minimised) plus any losses and stats to log. It must
        not wait for the device (no ``.item()``, ``bool(tensor)``, boolean-mask indexing).
        """
        ...

    def log_media(self, model: nn.Module, writer: SummaryWriter, step: int) -> None:
        """Write images / audio to TensorBoard (rank 0, eval mode, no_grad)."""
        ...


@dataclass
class TrainerConfig:
    """``conf/trainer/*.yaml``: every key is required here, the defaults live in conf/."""

    max_steps: int
    max_minutes: float | None
    batch_size: int
    valid_batch_size: int | None  # None: batch_size
    num_workers: int
    prefetch_factor: int
    optimizer: str  # adam | adamw
    lr: float
    lr_scaling: str  # none | sqrt | linear: lr * (global batch / lr_base_batch) ** (0 | .5 | 1)
    lr_base_batch: int | None  # None: batch_size (one rank)
    betas: list
    weight_decay: float
    schedule: str  # constant | cosine
    warmup_steps: int
    decay_steps: int | None  # cosine length; None: max_steps
    min_lr_ratio: float
    grad_clip: float | None
    precision: str  # auto | fp32 | bf16 | fp16
    tf32: bool
    log_every: int
    valid_every: int | None
    valid_batches: int | None  # per rank; None: the whole validation set
    media_every: int | None
    save_every: int
    broadcast_buffers: bool
    find_unused_parameters: bool

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> TrainerConfig:
        given = dict(cfg)
        names = {f.name for f in fields(cls)}
        if unknown := sorted(set(given) - names):
            raise TrainingError(f"trainer config: unknown key(s) {unknown}")
        if missing := sorted(names - set(given)):
            raise TrainingError(f"trainer config: missing key(s) {missing}")
        tc = cls(**given)
        tc.betas = list(tc.betas)
        choices = {"optimizer": ("adam", "adamw"), "schedule": ("constant", "cosine"),
                   "precision": ("auto", "fp32", "bf16", "fp16"),
                   "lr_scaling": ("none", "sqrt", "linear")}
        for key, allowed in choices.items():
            if getattr(tc, key) not in allowed:
                raise TrainingError(f"trainer.{key} must be one of {'/'.join(allowed)}, not "
                                    f"{getattr(tc, key)!r}")
        if tc.log_every < 1 or tc.prefetch_factor < 1:
            raise TrainingError("trainer.log_every and trainer.prefetch_factor must be >= 1")
        return tc

    def scaled_lr(self, world_size: int) -> float:
        """``lr`` for ``world_size`` ranks of ``batch_size`` each (see the module docstring)."""
        power = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}[self.lr_scaling]
        base = self.lr_base_batch or self.batch_size
        return self.lr * (self.batch_size * world_size / base) ** power


def lr_factor(step: int, tc: TrainerConfig) -> float:
    """Multiplier of the learning rate at ``step``: linear warmup, then constant or cosine down to
    ``min_lr_ratio`` at ``decay_steps`` (default ``max_steps``)."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    total = tc.decay_steps or tc.max_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def run_lock(out_dir: str | Path, program: str | None = None) -> OutputLock:
    """The lock that keeps a second run out of ``out_dir`` (``OUT/.lock``; see
    :class:`speechvq.checkpoint.OutputLock`): :func:`fit` holds it, so do the CLIs from before
    anything of the run folder is written."""
    return OutputLock(Path(out_dir) / LOCK_FILE, out_dir, program)


def resume_path(out_dir: str | Path, resume: bool | str | None) -> Path | None:
    """The checkpoint a run into ``out_dir`` continues from (None: a fresh run), or the
    :class:`TrainingError` refusing it: ``resume=False`` with a ``last.pt`` there, ``resume=True``
    without one. Reads only: the CLIs call it before anything of the run is written."""
    last = Path(out_dir) / "checkpoints" / "last.pt"
    if isinstance(resume, str) and resume.lower() in ("true", "false", "auto"):
        resume = {"true": True, "false": False, "auto": "auto"}[resume.lower()]
    if resume is False or resume is None:
        if last.exists():
            raise TrainingError(
                f"{last} already exists: pass resume=true to continue that run, or choose "
                "another out_dir"
            )
        return None
    if resume == "auto":
        return last if last.exists() else None
    if resume is True:
        if not last.exists():
            raise TrainingError(f"{last}: no checkpoint to resume from (resume=true)")
        return last
    return Path(resume)


