"""Numerics per device: the precision training runs in, TF32 and cuDNN policies, and optimizer
steps that skip non-finite gradients without waiting for the device.

Precision (``trainer.precision``): ``auto`` is fp32 on the CPU; on a GPU, bf16 autocast where the
GPU computes bf16 natively (compute capability 8.0 and newer: A100, H100, RTX 30xx/40xx; and ROCm)
and fp16 with a GradScaler elsewhere (V100, T4, ...). ``torch.cuda.is_bf16_supported()`` alone
would say True on those older GPUs too, because it counts emulation, which is slow; this module
asks the device's compute capability.

TF32 (``trainer.tf32``): training may let fp32 matmuls and convolutions use TF32 tensor cores (10
mantissa bits, ~2x faster on Ampere and newer); :func:`exact_numerics` turns it off (IEEE fp32),
with deterministic cuDNN kernels, for whatever must not depend on the hardware's shortcuts (unit
extraction, comparisons of CUDA with the CPU). cuDNN's autotuner (``cudnn.benchmark``) is on for
training: its crops all have one shape, so the search runs once.

Skipping a step: an optimizer built by :func:`build_optimizer` is fused
(``torch.optim.AdamW(fused=True)``, on GPUs and, since torch 2.4, on the CPU), whose kernel takes
a ``found_inf`` tensor and skips the update by itself; :func:`optimizer_step` hands it one, so no
step waits for the device to say whether the gradients were finite. (Without a fused kernel the
check is a plain ``if``, which waits.) The CPU runs the same path as a GPU, so the tests that
count host synchronisations per step run on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA compute capability >= 8, or ROCm)."""
    if device.type != "cuda":
        return False
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``trainer.precision`` on ``device``, or None for fp32 (see the
    module docstring for ``auto``). Autocast is for CUDA only: anything else runs fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if device.type != "cuda":
        return None
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp16"
    return _DTYPES[precision]


def set_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and cuDNN convolutions, on or off (process-wide)."""
    mode = "tf32" if enabled else "ieee"
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        matmul.fp32_precision = mode
        conv.fp32_precision = mode
    else:  # torch < 2.9
        matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def tf32_enabled() -> bool:
    """Whether fp32 matmuls may use TF32 now."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        return matmul.fp32_precision == "tf32"
    return bool(matmul.allow_tf32)


def training_numerics(device: torch.device, tf32: bool) -> None:
    """What a training run on ``device`` sets: TF32 as configured and cuDNN's autotuner (its
    crops all have one shape) on a GPU; nothing on the CPU."""
    if device.type != "cuda":
        return
    set_tf32(tf32)
    torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def exact_numerics() -> Iterator[None]:
    """IEEE fp32 (no TF32), deterministic cuDNN kernels and no autotuning inside the block (the
    same units whatever the batching), the previous settings restored exactly after it."""
    cudnn = torch.backends.cudnn
    before = (_tf32_settings(), cudnn.deterministic, cudnn.benchmark)
    set_tf32(False)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        _restore_tf32(before[0])
        cudnn.deterministic, cudnn.benchmark = before[1], before[2]


def conv_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32 now."""
    conv = torch.backends.cudnn.conv
    if hasattr(conv, "fp32_precision"):
        return conv.fp32_precision == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)


def _tf32_settings() -> tuple:
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        return ("precision", matmul.fp32_precision, conv.fp32_precision)
    return ("allow", matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


def _restore_tf32(settings: tuple) -> None:
    kind, matmul, conv = settings
    if kind == "precision":
        torch.backends.cuda.matmul.fp32_precision = matmul
        torch.backends.cudnn.conv.fp32_precision = conv
    else:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = conv


def build_optimizer(model: nn.Module, name: str, lr: float, betas: tuple[float, float],
                    weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW over the trainable parameters (on ``device``), fused where torch has a fused
    kernel for that device (CUDA; the CPU since torch 2.4): one kernel per step, which skips a
    non-finite step on the device. Elsewhere torch's default implementation."""
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device in this torch
        return cls(params, lr=lr, betas=betas, weight_decay=weight_decay)


def optimizer_step(optimizer: torch.optim.Optimizer, finite: Tensor) -> None:
    """``optimizer.step()`` unless ``finite`` (a 0-d bool tensor) is False. A fused optimizer is
    told through ``found_inf`` and skips on the device (nothing waits); any other checks here."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale = None  # type: ignore[attr-defined]
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf  # type: ignore[attr-defined]
    elif bool(finite):
        optimizer.step()
