"""One fit loop for every speechvq model: the VQ-VAE and the unit prior.

A model family plugs in through the small :class:`speechvq.trainer.Task` protocol (with the
trainer config and the run folder's rules, in :mod:`speechvq.trainer`); :func:`fit` does the rest:
AdamW/Adam with warmup + cosine (or constant) learning rate, gradient clipping, CUDA autocast
(bf16 where the GPU has it natively, else fp16 with a GradScaler: :mod:`speechvq.numerics`),
``torchrun`` DDP (gloo on CPU, nccl on GPU, one node or many), a tqdm bar, TensorBoard scalars and
media, validation, ``checkpoints/{last,best}.pt`` and exact resume.

Data: one DataLoader for the whole run (:class:`speechvq.data.loader.TrainLoader`): its workers
start once and stay up across epochs with batches in flight; validation batches are read once and
replayed (:class:`speechvq.data.loader.ValidBatches`).

The hot loop never waits for the GPU: losses and statistics are summed on the device and read
every ``log_every`` steps (the only host-device synchronisation, with validation and saves);
non-finite gradients skip the optimizer step on the device (:func:`speechvq.numerics.optimizer_step`)
and are counted there; under DDP the ranks agree on a stop (signal, time limit) at log steps.

Learning rate and ranks: ``trainer.batch_size`` is per rank, so N ranks train on N times the
batch; ``trainer.lr`` is the rate for ``lr_base_batch`` (default: one rank's batch) and is scaled
by ``(global batch / lr_base_batch) ** 0.5`` (``lr_scaling: sqrt``, the square-root rule for
Adam-family optimizers; ``linear`` and ``none`` are there too).

Exact resume: the order of training batches is a pure function of (seed, epoch, rank), the
checkpoint stores the epoch and the batch offset inside it, every rank's RNG state, and the
optimizer / scheduler / scaler state; validation and media run with the RNG state saved and put
back, so when they happen cannot change the training run. On the CPU a run of 2N steps and a run
of N steps resumed to 2N end with bitwise the same weights. On a GPU they start from bitwise the
same state (weights, optimizer, RNG of the device in use, data order), but kernels that sum with
atomics (cuDNN's backward convolutions, ``index_add_``) round in a different order on every run,
so two GPU runs, resumed or not, drift apart at float precision: resume is exact in what it
restores, not in the floats that follow. The train/* interval being averaged at a save is saved
too, so a resumed run logs the TensorBoard points an uninterrupted one logs.

Speed: the end of a run logs ``trained N steps in M min: X steps/s (first window: Y steps/s)``
and what validation cost; a run that falls below half the speed of its first window warns once
(:class:`speechvq.runtime.Throughput`).

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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from speechvq.checkpoint import (
    capture_rng,
    clean_stale_temps,
    first_difference,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from speechvq.data.loader import TrainLoader, ValidBatches
from speechvq.files import write_error
from speechvq.numerics import autocast_dtype, build_optimizer, optimizer_step, training_numerics
from speechvq.runtime import (
    DistInfo,
    ReplicaDriftError,
    Throughput,
    init_distributed,
    resolve_device,
    seed_everything,
    verify_replicas,
)
from speechvq.trainer import LOCK_FILE as LOCK_FILE  # noqa: F401 (re-exported)
from speechvq.trainer import Task, TrainerConfig, TrainingError, lr_factor, resume_path, run_lock

log = logging.getLogger(__name__)

# best.pt keeps the lowest validation value of this key of a task's step output when it has one
# (the model's own objective, without auxiliary heads trained on detached inputs), else "loss".
CRITERION = "criterion"

BAD_STEPS = 20  # non-finite steps in a row that stop a run


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


@contextlib.contextmanager
def _rng_preserved(device: torch.device) -> Iterator[None]:
    """Run a block (validation, media) without moving the training RNG streams."""
    state = capture_rng(device)
    try:
        yield
    finally:
        restore_rng(state, device)


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


class _Meter:
    """Per-step scalars summed on the device, read (and averaged over ranks) when logged."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.n = 0

    def add(self, values: Mapping[str, Tensor]) -> None:
        for key, value in values.items():
            value = torch.as_tensor(value).detach().float().mean()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.n += 1

    def pop(self) -> dict[str, Tensor]:
        means = {k: v / self.n for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return means

    def state(self) -> dict:
        return {"acc": {k: v.detach().cpu() for k, v in self.sums.items()}, "n": self.n}

    def load(self, state: Mapping, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["acc"].items()}
        self.n = int(state["n"])


# --------------------------------------------------------------------------- the loop


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
    def __init__(self, task: Task, tc: TrainerConfig, out_dir: Path, info: DistInfo, seed: int,
                 device: str, config: dict) -> None:
        self.task, self.tc, self.info, self.seed, self.config = task, tc, info, seed, config
        self.out_dir, self.ckpt_dir = out_dir, out_dir / "checkpoints"
        self.device = resolve_device(device, info.local_rank)
        self.dtype = autocast_dtype(tc.precision, self.device)
        training_numerics(self.device, tc.tf32)
        self.raw = task.model.to(self.device)
        self.model: nn.Module = self.raw
        self.lr = tc.scaled_lr(info.world_size)
        self.optimizer = build_optimizer(self.raw, tc.optimizer, self.lr, tuple(tc.betas),
                                         tc.weight_decay, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, tc))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best = math.inf
        self.valid_loss: float | None = None
        self.writer: SummaryWriter | None = None
        self.meter = _Meter()
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        # non-finite steps, counted on the device: total, current run, longest run since a log
        self.bad = {"skipped": zero.clone(), "run": zero.clone(), "worst": zero.clone()}
        self._interval_loss: list[float] = []  # train-loss fallback for best.pt without valid_set
        self._last_saved = -1
        self._last_train_loss: float | None = None
        self._t_log, self._s_log = 0.0, 0  # time and step of the last train/* log
        self._valid: ValidBatches | None = None
        self._valid_seconds = 0.0
        self.speed = Throughput(0, 0.0)  # restarted when the run starts

    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    # ---- setup
    def _load(self, path: Path) -> dict:
        ckpt = load_checkpoint(path, kind=self.task.kind, required=("optimizer", "scheduler", "rng"))
        if ckpt["model_config"] != self.task.model_config:
            raise TrainingError(
                f"{path}: its model_config differs from this run's "
                f"({first_difference(ckpt['model_config'], self.task.model_config)}); "
                "resume with the same model/quantizer settings or start a new out_dir")
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        # the optimizer state carries the old run's lr/betas/weight decay: the config given now
        # wins (identical values, so an unchanged config resumes bitwise)
        self.scheduler.base_lrs = [self.lr for _ in self.optimizer.param_groups]
        lr = self.lr * lr_factor(self.scheduler.last_epoch, self.tc)  # as LambdaLR computes it
        for group in self.optimizer.param_groups:
            group.update(initial_lr=self.lr, lr=lr, betas=tuple(self.tc.betas),
                         weight_decay=self.tc.weight_decay)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best = int(ckpt["step"]), float(ckpt.get("best", math.inf))
        self.epoch = int(ckpt.get("epoch", 0))
        self.batch_in_epoch = int(ckpt.get("batch_in_epoch", 0))
        self._last_saved = self.step
        if self.info.is_main:
            log.info("resuming from %s at step %d (epoch %d, batch %d)", path, self.step,
                     self.epoch, self.batch_in_epoch)
        return ckpt

    def _restore(self, ckpt: dict) -> None:
        """This rank's RNG streams and the train/* interval being accumulated at the save, so the
        first point logged after a resume is the one an uninterrupted run logs."""
        states = ckpt["rng"]["ranks"]
        if len(states) == self.info.world_size:
            restore_rng(states[self.info.rank], self.device)
        else:
            log.warning("checkpoint was written by %d ranks, this run has %d: RNG streams are "
                        "reseeded, the run will not be bitwise identical", len(states),
                        self.info.world_size)
            restore_rng(states[0], self.device)
            torch.manual_seed(self.seed + self.info.rank + 7919 * self.step)
        state = ckpt.get("train_log")
        if not state:  # a checkpoint from before train_log was saved
            return
        if len(state["ranks"]) == self.info.world_size:
            self.meter.load(state["ranks"][self.info.rank], self.device)
        self._interval_loss = [float(v) for v in state["interval_loss"]]
        self.bad["skipped"].fill_(int(state["skipped"]))
        self.bad["run"].fill_(int(state["bad_in_a_row"]))

    def _wrap_ddp(self) -> None:
        if not self.info.enabled:
            return
        ddp = nn.parallel.DistributedDataParallel
        # torch >= 2.12 renamed broadcast_buffers (buffers are synced at init either way)
        params = inspect.signature(ddp).parameters
        sync = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
        self.model = ddp(self.raw, find_unused_parameters=self.tc.find_unused_parameters,
                         device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         **{sync: self.tc.broadcast_buffers})

    def _start(self, path: Path | None) -> TrainLoader:
        """Load ``path`` (or seed a fresh run), check the training set, open TensorBoard; the
        loader of the rest of the run."""
        ckpt = self._load(path) if path is not None else None
        self._wrap_ddp()
        if ckpt is not None:
            self._restore(ckpt)
            del ckpt
        else:
            seed_everything(self.seed + self.info.rank)
        tc = self.tc
        loader = TrainLoader(self.task.train_set, self.task.collate, tc.batch_size, self.seed,
                             self.info.rank, self.info.world_size, self.epoch,
                             self.batch_in_epoch, tc.num_workers, tc.prefetch_factor,
                             pin_memory=self.device.type == "cuda")
        n_train = len(self.task.train_set)  # type: ignore[arg-type]
        if loader.per_epoch == 0:
            raise TrainingError(
                f"the training set has {n_train} items, fewer than batch_size "
                f"({tc.batch_size}) x ranks ({self.info.world_size}): lower trainer.batch_size")
        if not self.info.is_main:
            return loader
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
        log.info("training %s on %s (%s, %d rank(s)): %d items, %d steps per epoch, batch %d x "
                 "%d, lr %.3g", self.task.kind, self.device, self.dtype or "fp32",
                 self.info.world_size, n_train, loader.per_epoch, tc.batch_size,
                 self.info.world_size, self.lr)
        if self.task.valid_set is None:
            log.info("no validation set: best.pt keeps the lowest training loss per interval")
        return loader

    # ---- the run
    def run(self, resume: bool | str) -> dict:
        start_time = time.monotonic()
        loader = self._start(resume_path(self.out_dir, resume))
        stopped = "max_steps" if self.step >= self.tc.max_steps else None
        bar = tqdm(total=self.tc.max_steps, initial=self.step, unit="step",
                   disable=not self.info.is_main, dynamic_ncols=True)
        with _StopFlag() as flag, logging_redirect_tqdm(), bar:
            self._t_log, self._s_log = time.monotonic(), self.step
            self.speed = Throughput(self.step, self._t_log)
            if stopped is None:
                stopped = self._train(loader, flag, bar, start_time)
            if self._last_saved != self.step:
                with self.speed.pause():
                    self._save(final=True)
            if self.info.is_main and self.step > self.speed.start_step:
                log.info("%s", self.speed.summary(time.monotonic()))
                spent = time.monotonic() - start_time
                log.info("validation took %.1f s, %.1f%% of the run", self._valid_seconds,
                         100 * self._valid_seconds / max(spent, 1e-9))
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

    def _train(self, loader: TrainLoader, flag: _StopFlag, bar: tqdm, start_time: float) -> str:
        """Train until a stop; returns its reason."""
        for epoch, position, batch in loader:
            self.epoch, self.batch_in_epoch = epoch, position
            if batch is not None:  # None: every item unreadable (collate dropped them all)
                self._train_step(batch)
                bar.update(1)
            self.batch_in_epoch += 1
            if self.batch_in_epoch == loader.per_epoch:
                self.epoch, self.batch_in_epoch = epoch + 1, 0
            if batch is None:
                continue
            slow = self.speed.update(self.step, time.monotonic())
            if slow and self.info.is_main:
                log.warning("%s", slow)
            stopped = self._stop_reason(flag, start_time)
            if self.step % self.tc.log_every == 0 or stopped == "max_steps":
                now = time.monotonic()
                self._log_train(bar, (self.step - self._s_log) / max(now - self._t_log, 1e-9))
                self._t_log, self._s_log = now, self.step
            elif stopped:  # the interval goes on after a resume: it is saved, not logged
                means = {k: v / self.meter.n for k, v in self.meter.sums.items()}
                self._last_train_loss = self._reduce_means(means)["loss"]
            with self.speed.pause():  # validation, media, checkpoints: not training speed
                self._after_step(final=stopped is not None, stopped=stopped)
            if stopped:
                return stopped
        raise AssertionError("the training loader ended")  # it never does: it walks the epochs

    def _train_step(self, batch: dict) -> None:
        self.model.train()
        batch = _to_device(batch, self.device)
        with self._autocast():
            out = self.task.step(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out["loss"]).backward()
        self.scaler.unscale_(self.optimizer)
        clip = self.tc.grad_clip if self.tc.grad_clip else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.raw.parameters(), clip)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips the update itself on inf/NaN gradients
        else:
            finite = torch.isfinite(grad_norm)  # gradients are all-reduced: every rank agrees
            optimizer_step(self.optimizer, finite)
            bad = self.bad
            bad["skipped"] += ~finite
            bad["run"] = (bad["run"] + 1) * ~finite
            bad["worst"] = torch.maximum(bad["worst"], bad["run"])
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        self.meter.add({**out, "grad_norm": grad_norm})

    def _log_train(self, bar: tqdm, steps_per_sec: float) -> None:
        means = self._reduce_means(self.meter.pop())
        self._last_train_loss = means["loss"]
        self._interval_loss.append(means.get(CRITERION, means["loss"]))
        skipped, worst = int(self.bad["skipped"]), int(self.bad["worst"])
        self.bad["worst"].zero_()
        if worst >= BAD_STEPS:
            raise TrainingError(f"loss/gradients not finite for {worst} steps in a row before "
                                f"step {self.step}: lower trainer.lr or use "
                                "trainer.precision=fp32")
        if self.writer is None:
            return
        for key, value in means.items():
            self.writer.add_scalar(f"train/{key}", value, self.step)
        self.writer.add_scalar("train/lr", self.scheduler.get_last_lr()[0], self.step)
        self.writer.add_scalar("train/steps_per_sec", steps_per_sec, self.step)
        self.writer.add_scalar("train/epoch", self.epoch, self.step)
        if skipped:
            self.writer.add_scalar("train/skipped_steps", skipped, self.step)
        if self.scaler.is_enabled():
            self.writer.add_scalar("train/grad_scale", self.scaler.get_scale(), self.step)
        bar.set_postfix(loss=f"{means['loss']:.4g}", refresh=False)

    def _reduce_means(self, values: dict[str, Tensor]) -> dict[str, float]:
        """Average per-rank means across ranks; returns Python floats (waits for the device)."""
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
        if self.info.enabled:  # ranks see signals and clocks at different moments: they agree
            if self.step % self.tc.log_every:  # at log steps only, not at every step
                return None
            t = torch.tensor([code], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return reasons[code - 1] if code else None

    def _after_step(self, final: bool, stopped: str | None = None) -> None:
        tc, s = self.tc, self.step
        improved = False
        # a run that reaches its end (max_steps or its time budget) is validated at its last step,
        # so best.pt can be the model it ends with (not one up to valid_every steps older); a
        # signal stops it without (the machine wants it gone)
        if (tc.valid_every and s % tc.valid_every == 0) or (
                final and (s >= tc.max_steps or stopped == "max_minutes")):
            t0 = time.monotonic()
            improved = self._validate()
            self._valid_seconds += time.monotonic() - t0
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
        if self._valid is None:
            self._valid = ValidBatches(
                self.task.valid_set, self.task.collate,  # type: ignore[arg-type]
                self.tc.valid_batch_size or self.tc.batch_size, self.info.rank,
                self.info.world_size, self.tc.valid_batches, self.tc.num_workers,
                pin_memory=self.device.type == "cuda")
        sums: dict[str, Tensor] = {}
        count = 0
        benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False  # whole utterances: a new shape every batch
        with _rng_preserved(self.device):
            self.raw.eval()
            for n, batch in self._valid:
                if batch is None:  # every utterance of the batch unreadable
                    continue
                with self._autocast():
                    out = self.task.step(self.raw, _to_device(batch, self.device))
                for key, value in out.items():
                    value = torch.as_tensor(value).detach().float().mean() * n
                    sums[key] = sums[key] + value if key in sums else value
                count += n
            self.raw.train()
        torch.backends.cudnn.benchmark = benchmark
        means = self._reduce_means({k: v / max(count, 1) for k, v in sums.items()})
        self.valid_loss = means["loss"]
        value = means.get(CRITERION, means["loss"])
        if self.writer is not None:
            for key, mean in means.items():
                self.writer.add_scalar(f"valid/{key}", mean, self.step)
            extra = f", {CRITERION} {value:.5g}" if value != means["loss"] else ""
            log.info("step %d: valid loss %.5g%s (best %.5g)", self.step, means["loss"], extra,
                     min(self.best, value))
        return value

    def _save(self, best: bool = False, final: bool = False) -> None:
        """Write last.pt (or best.pt): collective under DDP (replica check, RNG gather)."""
        try:
            replicas = verify_replicas(self.raw, self.info)
        except ReplicaDriftError as err:
            raise TrainingError(str(err)) from None
        mine = {"rng": capture_rng(self.device), "log": self.meter.state()}
        ranks: list[Any] = [mine]
        if self.info.enabled:
            ranks = [None] * self.info.world_size
            dist.all_gather_object(ranks, mine)
        if not self.info.is_main:
            self._last_saved = self.step if not best else self._last_saved
            return
        state = {
            "kind": self.task.kind, "model_config": self.task.model_config,
            "meta": self.task.meta, "model": self.raw.state_dict(), "step": self.step,
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"world_size": self.info.world_size, "ranks": [r["rng"] for r in ranks]},
            "train_log": {"ranks": [r["log"] for r in ranks], "interval_loss": self._interval_loss,
                          "skipped": int(self.bad["skipped"]), "bad_in_a_row": int(self.bad["run"])},
            "best": self.best, "valid_loss": self.valid_loss, "replicas": replicas,
            "trainer": dict(vars(self.tc)), "config": self.config,
        }
        name = "best.pt" if best else "last.pt"
        save_checkpoint(self.ckpt_dir / name, state)
        if not best:
            self._last_saved = self.step
        if self.writer is not None:
            self.writer.flush()
        log.debug("saved %s at step %d", self.ckpt_dir / name, self.step)
