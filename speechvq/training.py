"""One fit loop for every speechvq model: the VQ-VAE now, the unit prior later.

A model family plugs in through the small :class:`speechvq.tasks.Task` protocol; :func:`fit` does the rest:
AdamW/Adam with warmup + cosine (or constant) learning rate, gradient clipping, CUDA autocast
(bf16, or fp16 with a GradScaler), ``torchrun`` DDP (gloo on CPU, nccl on GPU), a tqdm bar,
TensorBoard scalars and media, validation, ``checkpoints/{last,best}.pt`` and exact resume.

Exact resume: the order of training batches is a pure function of (seed, epoch, rank), the
checkpoint stores the epoch and the batch offset inside it, every rank's RNG state, and the
optimizer / scheduler / scaler state; validation and media run with the RNG state saved and put
back, so when they happen cannot change the training run. A run of 2N steps and a run of N steps
resumed to 2N end with the same weights. The train/* interval being averaged at a save is saved
too, so a resumed run logs the TensorBoard points an uninterrupted one logs.

Speed: the end of a run logs ``trained N steps in M min: X steps/s (first window: Y steps/s)``,
and a run that falls below half the speed of its first window warns once (:class:`Throughput`).

One run per folder: :func:`fit` holds ``OUT/.lock`` (:func:`run_lock`) and a second run into the
same folder is refused at once; temp files of killed checkpoint writes are removed at the start.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from speechvq.checkpoint import (
    OutputLock,
    capture_rng,
    clean_stale_temps,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from speechvq.data.dataset import train_batches, valid_batches
from speechvq.files import write_error
from speechvq.runtime import (
    DistInfo,
    ReplicaDriftError,
    Throughput,
    init_distributed,
    resolve_device,
    seed_everything,
    verify_replicas,
)

if TYPE_CHECKING:  # tasks.py imports fit from here
    from speechvq.tasks import Task

log = logging.getLogger(__name__)

# best.pt keeps the lowest validation value of this key of a task's step output when it has one
# (the model's own objective, without auxiliary heads trained on detached inputs), else "loss".
CRITERION = "criterion"

LOCK_FILE = ".lock"  # in the run folder: one writer per run (see run_lock)


class TrainingError(Exception):
    """A training run that cannot start or go on; the message says what to change."""


@dataclass
class TrainerConfig:
    """``conf/trainer/*.yaml``: every key is required here, the defaults live in conf/."""

    max_steps: int
    max_minutes: float | None
    batch_size: int
    valid_batch_size: int | None  # None: batch_size
    num_workers: int
    optimizer: str  # adam | adamw
    lr: float
    betas: list
    weight_decay: float
    schedule: str  # constant | cosine
    warmup_steps: int
    decay_steps: int | None  # cosine length; None: max_steps
    min_lr_ratio: float
    grad_clip: float | None
    precision: str  # auto | fp32 | bf16 | fp16
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
        if tc.optimizer not in ("adam", "adamw"):
            raise TrainingError(f"trainer.optimizer must be adam or adamw, not {tc.optimizer!r}")
        if tc.schedule not in ("constant", "cosine"):
            raise TrainingError(f"trainer.schedule must be constant or cosine, not {tc.schedule!r}")
        if tc.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise TrainingError(
                f"trainer.precision must be auto/fp32/bf16/fp16, not {tc.precision!r}"
            )
        return tc


# --------------------------------------------------------------------------- batches


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------- optimisation


def build_optimizer(model: nn.Module, tc: TrainerConfig) -> torch.optim.Optimizer:
    cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
    params = [p for p in model.parameters() if p.requires_grad]
    return cls(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)


def lr_factor(step: int, tc: TrainerConfig) -> float:
    """Multiplier of ``trainer.lr`` at ``step``: linear warmup, then constant or cosine down to
    ``min_lr_ratio`` at ``decay_steps`` (default ``max_steps``)."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "constant":
        return 1.0
    total = tc.decay_steps or tc.max_steps
    progress = min(1.0, (step - tc.warmup_steps) / max(1, total - tc.warmup_steps))
    return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _precision(tc: TrainerConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32."""
    name = tc.precision
    if name == "auto":
        if device.type != "cuda":
            return None
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Run a block (validation, media) without moving the training RNG streams."""
    state = capture_rng()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        restore_rng(state)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _ignore_sigint(worker_id: int) -> None:
    # Ctrl-C reaches the whole process group: the main process stops cleanly after the
    # current step, so data workers must not die under it
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StopFlag:
    """SIGTERM / first Ctrl-C ask the loop to stop after the current step (and save);
    a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        with contextlib.suppress(ValueError):  # signals only work in the main thread
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.reason == "interrupt":
            raise KeyboardInterrupt
        self.reason = "interrupt" if signum == signal.SIGINT else "sigterm"
        log.warning("%s received: stopping after this step and saving last.pt",
                    signal.Signals(signum).name)


# --------------------------------------------------------------------------- the loop


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


def fit(
    task: Task,
    trainer_cfg: Mapping,
    out_dir: str | Path,
    resume: bool | str = False,
    *,
    seed: int = 0,
    device: str = "auto",
    config: Mapping | None = None,
) -> dict:
    """Train ``task.model`` until ``trainer.max_steps`` / ``trainer.max_minutes`` / a signal.

    Args:
        task: see :class:`Task`.
        trainer_cfg: ``conf/trainer/*.yaml`` as a mapping (every key of :class:`TrainerConfig`).
        out_dir: the run folder: ``checkpoints/{last,best}.pt`` and ``tb/`` go there.
        resume: ``False`` (refuses an out_dir that already has ``last.pt``), ``True`` (continue
            from ``checkpoints/last.pt``, which must exist), ``"auto"`` (continue if it exists),
            or the path of a checkpoint to continue from.
        seed: seeds the data order and this run's RNG streams (rank r uses ``seed + r``).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``.
        config: the resolved run config (plain data), saved in every checkpoint.
    Raises:
        TrainingError: a run that cannot start (see :func:`resume_path`) or go on.
        speechvq.checkpoint.OutputInUseError: another process is training into ``out_dir``.
        speechvq.files.WriteError: a file of the run cannot be written (full disk, ...).
    Returns:
        ``{"step", "stopped" ("max_steps" | "max_minutes" | "interrupt" | "sigterm"), "best",
        "valid_loss", "train_loss", "last", "best_path"}``.
    """
    tc = TrainerConfig.from_mapping(trainer_cfg)
    info = init_distributed(device)
    try:
        # rank 0 writes the run folder: it alone holds the lock (flock is per process)
        lock = run_lock(out_dir) if info.is_main else contextlib.nullcontext()
        with lock:
            loop = _Loop(task, tc, Path(out_dir), info, seed, device, dict(config or {}))
            return loop.run(resume)
    finally:
        if info.owned and dist.is_initialized():
            dist.destroy_process_group()


class _Loop:
    def __init__(
        self, task: Task, tc: TrainerConfig, out_dir: Path, info: DistInfo, seed: int,
        device: str, config: dict,
    ) -> None:
        self.task, self.tc, self.info, self.seed, self.config = task, tc, info, seed, config
        self.out_dir = out_dir
        self.ckpt_dir = out_dir / "checkpoints"
        self.device = resolve_device(device, info.local_rank)
        self.dtype = _precision(tc, self.device)
        self.raw = task.model.to(self.device)
        self.model: nn.Module = self.raw
        self.optimizer = build_optimizer(self.raw, tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc)
        )
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=self.dtype == torch.float16 and self.device.type == "cuda"
        )
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = math.inf
        self.valid_loss: float | None = None
        self.writer: SummaryWriter | None = None
        self._acc: dict[str, Tensor] = {}
        self._acc_n = 0
        self._interval_loss: list[float] = []  # train-loss fallback for best.pt without valid_set
        self._skipped = 0
        self._bad_in_a_row = 0
        self._last_saved = -1
        self._last_train_loss: float | None = None
        self._t_log, self._s_log = 0.0, 0  # time and step of the last train/* log
        self.speed = Throughput(0, 0.0)  # restarted when the run starts

    # ---- setup
    def _load(self, path: Path) -> dict:
        ckpt = load_checkpoint(path, kind=self.task.kind,
                               required=("optimizer", "scheduler", "rng"))
        if ckpt["model_config"] != self.task.model_config:
            raise TrainingError(
                f"{path}: its model_config differs from this run's "
                f"({_first_difference(ckpt['model_config'], self.task.model_config)}); "
                "resume with the same model/quantizer settings or start a new out_dir"
            )
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self._apply_config_hyperparameters()
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt.get("epoch", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self.best = float(ckpt.get("best", math.inf))
        self._last_saved = self.step
        if self.info.is_main:
            log.info("resuming from %s at step %d (epoch %d, batch %d)", path, self.step,
                     self.epoch, self.batch_in_epoch)
        return ckpt

    def _apply_config_hyperparameters(self) -> None:
        """The optimizer state carries the old run's lr/betas/weight decay: the config given now
        wins (identical values, so an unchanged config resumes bitwise)."""
        self.scheduler.base_lrs = [self.tc.lr for _ in self.optimizer.param_groups]
        lr = self.tc.lr * lr_factor(self.scheduler.last_epoch, self.tc)  # as LambdaLR computes it
        for group in self.optimizer.param_groups:
            group.update(initial_lr=self.tc.lr, lr=lr, betas=tuple(self.tc.betas),
                         weight_decay=self.tc.weight_decay)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _restore_rng(self, ckpt: dict) -> None:
        states = ckpt["rng"]["ranks"]
        if len(states) == self.info.world_size:
            restore_rng(states[self.info.rank])
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams are "
                        "reseeded, the run will not be bitwise identical", len(states),
                        self.info.world_size)
            restore_rng(states[0])
            torch.manual_seed(self.seed + self.info.rank + 7919 * self.step)

    def _log_state(self) -> dict:
        """This rank's part of the running train/* interval (what the next log averages)."""
        return {"acc": {k: torch.as_tensor(v).detach().cpu() for k, v in self._acc.items()},
                "n": self._acc_n}

    def _restore_log_state(self, ckpt: dict) -> None:
        """Put back the interval being accumulated when the checkpoint was saved, so the first
        train/* point after a resume is the one an uninterrupted run logs."""
        state = ckpt.get("train_log")
        if not state:  # a checkpoint from before train_log was saved
            return
        ranks = state["ranks"]
        if len(ranks) == self.info.world_size:
            mine = ranks[self.info.rank]
            self._acc = {k: v.to(self.device) for k, v in mine["acc"].items()}
            self._acc_n = int(mine["n"])
        self._interval_loss = [float(v) for v in state["interval_loss"]]
        self._skipped = int(state["skipped"])
        self._bad_in_a_row = int(state["bad_in_a_row"])

    def _wrap_ddp(self) -> None:
        if not self.info.enabled:
            return
        ddp = nn.parallel.DistributedDataParallel
        # torch >= 2.12 renamed broadcast_buffers (buffers are synced at init either way)
        params = inspect.signature(ddp).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        self.model = ddp(
            self.raw,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.tc.find_unused_parameters,
            **{sync: self.tc.broadcast_buffers},
        )

    # ---- the run
    def run(self, resume: bool | str) -> dict:
        start_time = time.monotonic()
        self._start(resume_path(self.out_dir, resume))
        stopped = "max_steps" if self.step >= self.tc.max_steps else None
        bar = tqdm(total=self.tc.max_steps, initial=self.step, unit="step",
                   disable=not self.info.is_main, dynamic_ncols=True)
        with _StopFlag() as flag, logging_redirect_tqdm(), bar:
            self._t_log, self._s_log = time.monotonic(), self.step
            self.speed = Throughput(self.step, self._t_log)
            while stopped is None:
                stopped = self._run_epoch(flag, bar, start_time)
            if self._last_saved != self.step:
                with self.speed.pause():
                    self._save(final=True)
            if self.info.is_main and self.step > self.speed.start_step:
                log.info("%s", self.speed.summary(time.monotonic()))
        if self.writer is not None:
            self.writer.close()
        if self.info.enabled:
            dist.barrier()
        if self.info.is_main:
            log.info("stopped (%s) at step %d; best %s %.5g", stopped, self.step,
                     "valid loss" if self.task.valid_set is not None else "train loss", self.best)
        return {
            "step": self.step, "stopped": stopped, "best": self.best,
            "valid_loss": self.valid_loss, "train_loss": self._last_train_loss,
            "last": str(self.ckpt_dir / "last.pt"), "best_path": str(self.ckpt_dir / "best.pt"),
        }

    def _start(self, path: Path | None) -> None:
        """Load ``path`` (or seed a fresh run), check the training set, open TensorBoard."""
        ckpt = self._load(path) if path is not None else None
        self._wrap_ddp()
        if ckpt is not None:
            self._restore_rng(ckpt)
            self._restore_log_state(ckpt)
            del ckpt
        else:
            seed_everything(self.seed + self.info.rank)
        n_train = len(self.task.train_set)  # type: ignore[arg-type]
        per_epoch = len(train_batches(n_train, self.tc.batch_size, self.seed, 0, 0,
                                      self.info.world_size))
        if per_epoch == 0:
            raise TrainingError(
                f"the training set has {n_train} items, fewer than batch_size "
                f"({self.tc.batch_size}) x ranks ({self.info.world_size}): lower trainer.batch_size"
            )
        if not self.info.is_main:
            return
        for stale in clean_stale_temps(self.ckpt_dir):  # under the run lock: no live writer
            log.info("removed %s, left by a checkpoint write that was killed", stale)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # events after the checkpoint's step were logged by the run that is being continued
            # (and are logged again now); those at its step were logged before it was saved
            self.writer = SummaryWriter(str(self.out_dir / "tb"),
                                        purge_step=self.step + 1 if path is not None else None)
        except OSError as err:
            raise write_error(err, err.filename or self.out_dir / "tb") from None
        log.info("training %s on %s (%s, %d rank(s)): %d items, %d steps per epoch",
                 self.task.kind, self.device, self.dtype or "fp32", self.info.world_size,
                 n_train, per_epoch)
        if self.task.valid_set is None:
            log.info("no validation set: best.pt keeps the lowest training loss per interval")

    def _run_epoch(self, flag: _StopFlag, bar: tqdm, start_time: float) -> str | None:
        """Train through the rest of this epoch; the stop reason, or None at the epoch's end."""
        for batch in self._epoch_loader():
            if batch is None:  # every item unreadable (collate dropped them all)
                self.batch_in_epoch += 1
                continue
            self._train_step(batch)
            bar.update(1)
            slow = self.speed.update(self.step, time.monotonic())
            if slow and self.info.is_main:
                log.warning("%s", slow)
            stopped = self._stop_reason(flag, start_time)
            if self.step % self.tc.log_every == 0 or stopped == "max_steps":
                now = time.monotonic()
                self._log_train(bar, (self.step - self._s_log) / max(now - self._t_log, 1e-9))
                self._t_log, self._s_log = now, self.step
            elif stopped:  # the interval goes on after a resume: it is saved, not logged
                self._last_train_loss = self._reduce_means(
                    {k: v / self._acc_n for k, v in self._acc.items()})["loss"]
            with self.speed.pause():  # validation, media, checkpoints: not training speed
                self._after_step(final=stopped is not None)
            if stopped:
                return stopped
        self.epoch += 1
        self.batch_in_epoch = 0
        return None

    def _epoch_loader(self) -> DataLoader:
        n_items = len(self.task.train_set)  # type: ignore[arg-type]
        batches = train_batches(n_items, self.tc.batch_size, self.seed, self.epoch,
                                self.info.rank, self.info.world_size)
        if hasattr(self.task.train_set, "set_epoch"):
            self.task.train_set.set_epoch(self.epoch)
        return DataLoader(
            self.task.train_set,
            batch_sampler=batches[self.batch_in_epoch :],
            collate_fn=self.task.collate,
            num_workers=self.tc.num_workers,
            pin_memory=self.device.type == "cuda",
            # its own generator: creating the iterator must not draw from the global RNG
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            worker_init_fn=_ignore_sigint,
        )

    def _train_step(self, batch: dict) -> None:
        self.model.train()
        batch = _to_device(batch, self.device)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            out = self.task.step(self.model, batch)
        loss = out["loss"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.tc.grad_clip if self.tc.grad_clip else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
        elif torch.isfinite(grad_norm):  # gradients are all-reduced: every rank agrees
            self.optimizer.step()
            self._bad_in_a_row = 0
        else:
            self._skipped += 1
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= 20:
                raise TrainingError(f"loss/gradients not finite for 20 steps in a row at step "
                                    f"{self.step}: lower trainer.lr or use trainer.precision=fp32")
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.batch_in_epoch += 1
        stats = {k: torch.as_tensor(v).detach().float().mean() for k, v in out.items()}
        stats["grad_norm"] = grad_norm.detach().float()
        for key, value in stats.items():
            self._acc[key] = self._acc.get(key, 0.0) + value
        self._acc_n += 1

    def _log_train(self, bar: tqdm, steps_per_sec: float) -> None:
        means = self._reduce_means({k: v / self._acc_n for k, v in self._acc.items()})
        self._acc, self._acc_n = {}, 0
        self._last_train_loss = means["loss"]
        self._interval_loss.append(means.get(CRITERION, means["loss"]))
        if self.writer is None:
            return
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        self.writer.add_scalar("train/steps_per_sec", steps_per_sec, self.step)
        self.writer.add_scalar("train/epoch", self.epoch, self.step)
        if self._skipped:
            self.writer.add_scalar("train/skipped_steps", self._skipped, self.step)
        if self.scaler.is_enabled():
            self.writer.add_scalar("train/grad_scale", self.scaler.get_scale(), self.step)
        bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)

    def _reduce_means(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Average per-rank means across ranks; returns Python floats."""
        keys = sorted(values)
        stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float32,
                                               device=self.device) for k in keys])
        if self.info.enabled:
            dist.all_reduce(stacked)
            stacked /= self.info.world_size
        return dict(zip(keys, stacked.tolist(), strict=True))

    def _stop_reason(self, flag: _StopFlag, start_time: float) -> str | None:
        if self.step >= self.tc.max_steps:
            return "max_steps"  # the same step on every rank: no need to agree
        reasons = ["interrupt", "sigterm", "max_minutes"]
        code = reasons.index(flag.reason) + 1 if flag.reason else 0
        if not code and self.tc.max_minutes is not None:
            if time.monotonic() - start_time >= 60 * self.tc.max_minutes:
                code = 3
        if self.info.enabled:  # ranks see signals and clocks at different moments: agree
            t = torch.tensor([code], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return reasons[code - 1] if code else None

    def _after_step(self, final: bool) -> None:
        tc, s = self.tc, self.step
        improved = False
        if (tc.valid_every and s % tc.valid_every == 0) or (final and s >= tc.max_steps):
            improved = self._validate()
        if tc.media_every and s % tc.media_every == 0 and self.writer is not None:
            with _rng_preserved(self.device), torch.no_grad():
                self.raw.eval()
                self.task.log_media(self.raw, self.writer, s)
                self.raw.train()
        if improved:
            self._save(best=True)
        if s % tc.save_every == 0 or final:
            self._save(final=final)

    @torch.no_grad()
    def _validate(self) -> bool:
        """Validation loss (all ranks); True when it is the best so far."""
        if self.task.valid_set is None:
            if not self._interval_loss:
                return False
            value = sum(self._interval_loss) / len(self._interval_loss)
            self._interval_loss = []
        else:
            value = self._valid_loss()
        if value < self.best:
            self.best = value
            return True
        return False

    def _valid_loss(self) -> float:
        bs = self.tc.valid_batch_size or self.tc.batch_size
        batches = valid_batches(len(self.task.valid_set), bs,  # type: ignore[arg-type]
                                self.info.rank, self.info.world_size)
        if self.tc.valid_batches:
            batches = batches[: self.tc.valid_batches]
        loader = DataLoader(self.task.valid_set, batch_sampler=batches,  # type: ignore[arg-type]
                            collate_fn=self.task.collate, num_workers=self.tc.num_workers,
                            generator=torch.Generator().manual_seed(0),
                            worker_init_fn=_ignore_sigint)
        sums: dict[str, Tensor] = {}
        count = 0
        with _rng_preserved(self.device):
            self.raw.eval()
            for indices, batch in zip(batches, loader, strict=True):
                if batch is None:  # every utterance of the batch unreadable
                    continue
                batch = _to_device(batch, self.device)
                n = len(indices)
                with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                                    enabled=self.dtype is not None):
                    out = self.task.step(self.raw, batch)
                for key, value in out.items():
                    value = torch.as_tensor(value).detach().float().mean()
                    sums[key] = sums.get(key, 0.0) + value * n
                count += n
            self.raw.train()
        means = self._reduce_means({k: v / max(count, 1) for k, v in sums.items()})
        self.valid_loss = means["loss"]
        if self.writer is not None:
            for key, value in means.items():
                self.writer.add_scalar(f"valid/{key}", value, self.step)
            value = means.get(CRITERION, means["loss"])
            extra = f", {CRITERION} {value:.5g}" if value != means["loss"] else ""
            log.info("step %d: valid loss %.5g%s (best %.5g)", self.step, means["loss"], extra,
                     min(self.best, value))
        return means.get(CRITERION, means["loss"])

    def _save(self, best: bool = False, final: bool = False) -> None:
        """Write last.pt (or best.pt): collective under DDP (replica check, RNG gather)."""
        try:
            replicas = verify_replicas(self.raw, self.info)
        except ReplicaDriftError as err:
            raise TrainingError(str(err)) from None
        mine = {"rng": capture_rng(), "log": self._log_state()}
        if self.info.enabled:
            ranks: list[Any] = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        else:
            ranks = [mine]
        if not self.info.is_main:
            self._last_saved = self.step if not best else self._last_saved
            return
        state = {
            "kind": self.task.kind,
            "model_config": self.task.model_config,
            "meta": self.task.meta,
            "model": self.raw.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"world_size": self.info.world_size, "ranks": [r["rng"] for r in ranks]},
            "train_log": {"ranks": [r["log"] for r in ranks], "interval_loss": self._interval_loss,
                          "skipped": self._skipped, "bad_in_a_row": self._bad_in_a_row},
            "best": self.best,
            "valid_loss": self.valid_loss,
            "replicas": replicas,
            "trainer": dict(vars(self.tc)),
            "config": self.config,
        }
        name = "best.pt" if best else "last.pt"
        save_checkpoint(self.ckpt_dir / name, state)
        if not best:
            self._last_saved = self.step
        if self.writer is not None:
            self.writer.flush()
        log.debug("saved %s at step %d", self.ckpt_dir / name, self.step)


def _first_difference(a: Any, b: Any, where: str = "model_config") -> str:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key} is only in one of them"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{where}.{key}")
    return f"{where}: {a!r} != {b!r}"
