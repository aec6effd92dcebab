"""Rows -> units, exactly: the model's input for an utterance, the chunked encoder, batching.

- :class:`ModelInput`: a manifest row -> the model's input for the whole utterance, made as
  training makes it (the one front-end, :class:`speechvq.features.FrontEnd`);
- :class:`ChunkedEncoder`: whole utterances -> frame-level units in bounded memory, batched,
  with exactly the units of each utterance encoded whole and alone (:func:`plan_chunks`,
  :func:`receptive_field`);
- :func:`iter_units` / :func:`extract_units`: rows -> units, decoded by loader workers, longest
  first.

Ties: the nearest code is the lowest index among equal distances (``argmin``'s first minimum,
:func:`speechvq.nn.quantizer.nearest_codes`). A frame's distances are computed in fp32 through
one matmul, so CUDA and CPU (or two batchings) may disagree only on a frame whose two nearest
codes are within float rounding of each other; every other frame gets the same unit everywhere.

:mod:`speechvq.extract` turns these into unit files (jobs, shards, parts, sidecars).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.features import FeatureStats, FrontEnd
from speechvq.units import Units

log = logging.getLogger("speechvq.extract")


# --------------------------------------------------------------------------------------------
# extraction: whole utterances -> frame-level units, chunked and batched, yet exactly the units
# of each utterance encoded whole on its own.
#
# Why this is exact: a stack of convolutions (with per-frame norms and activations) makes output
# unit j depend only on inputs within its receptive field. An utterance is cut into windows of
# `chunk` units plus `context` units of input on each side, with context >= the receptive field
# in units; only each window's centre is kept, so the cut never reaches a kept unit. Batching pads
# windows on the right with zeros; that padding only reaches the last `context` units of a
# window, so a window that ends at the utterance's end keeps all but its last `context` units and
# those come from a "tail" window of exactly 2 * context units, batched only with windows of the
# same length (no padding at all).


def receptive_field(encoder: nn.Module) -> tuple[int, int]:
    """``(rf, stride)`` of a 1-D conv encoder, both in input frames (mel frames or samples).

    ``rf`` is an upper bound on how many consecutive input frames one output frame can see: the
    Conv1d / pooling layers are walked in registration order and their widths added (a residual
    branch adds its width, the identity path nothing). ``stride`` is the product of the strides:
    input frames per output unit. Raises ValueError for a layer that mixes the whole sequence
    (recurrent, attention, GroupNorm / InstanceNorm over time): chunked encoding cannot be exact.
    """
    rf, stride = 1, 1
    for module in encoder.modules():
        if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.GroupNorm, nn.InstanceNorm1d)):
            raise ValueError(
                f"encoder layer {type(module).__name__} sees the whole sequence: chunked "
                "extraction could change the units"
            )
        if isinstance(module, nn.Conv1d):
            k, s, d = module.kernel_size[0], module.stride[0], module.dilation[0]
        elif isinstance(module, (nn.AvgPool1d, nn.MaxPool1d)):
            k, s, d = _int(module.kernel_size), _int(module.stride), _int(
                getattr(module, "dilation", 1)
            )
        else:
            continue
        rf += (k - 1) * d * stride
        stride *= s
    return rf, stride


def measured_receptive_field(encoder: nn.Module, input_shape: Sequence[int], length: int) -> int:
    """The receptive field of the centre output frame, measured: the span of input frames with a
    non-zero gradient, for a random input ``(1, *input_shape, length)`` (input frames).

    A check on :func:`receptive_field`, which trusts that layers are registered in the order they
    run; the larger of the two is used.
    """
    gen = torch.Generator().manual_seed(0)
    param = next(encoder.parameters())
    x = torch.randn((1, *input_shape, length), generator=gen).to(param)
    x.requires_grad_(True)
    with torch.enable_grad():
        z = encoder(x)
        (grad,) = torch.autograd.grad(z[..., z.shape[-1] // 2].sum(), x)
    nonzero = torch.nonzero(grad.reshape(-1, length).abs().sum(0)).flatten()
    return int(nonzero[-1] - nonzero[0] + 1) if nonzero.numel() else 1


def _int(value: int | Sequence[int]) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def plan_chunks(
    n_units: int, chunk_units: int, context_units: int
) -> list[tuple[int, int, int, int, bool]]:
    """Windows that cover ``n_units`` units: ``(start, stop, keep_start, keep_stop, pad_ok)``.

    Window ``[start, stop)`` is encoded and units ``[keep_start, keep_stop)`` of it are kept; the
    kept ranges tile ``[0, n_units)`` in order. ``pad_ok``: the window may be right-padded inside a
    batch (its kept units are at least ``context_units`` from its end, or it ends nowhere near
    the utterance's end); other windows are batched only with windows of their exact length.
    """
    if chunk_units < 1 or context_units < 0:
        raise ValueError(f"bad chunking: chunk {chunk_units} units, context {context_units}")
    c = context_units
    plan = []
    for keep_start in range(0, n_units, chunk_units):
        keep_stop = min(n_units, keep_start + chunk_units)
        start = max(0, keep_start - c)
        if keep_stop + c < n_units:
            plan.append((start, keep_stop + c, keep_start, keep_stop, True))
            continue
        # the last window: it reaches the end, so it keeps everything up to the end
        stop = n_units
        if c == 0 or stop - start <= 2 * c:
            plan.append((start, stop, keep_start, stop, False))
        else:
            plan.append((start, stop, keep_start, stop - c, True))
            plan.append((stop - 2 * c, stop, stop - c, stop, False))
        break
    return plan


@dataclass(frozen=True)
class _Piece:
    item: int
    start: int
    stop: int
    keep_start: int
    keep_stop: int
    pad_ok: bool

    @property
    def length(self) -> int:
        return self.stop - self.start


def _batch_pieces(pieces: Sequence[_Piece], max_units: int) -> list[list[_Piece]]:
    """Length-sorted batches whose padded size (batch x longest) stays within ``max_units``."""
    batches: list[list[_Piece]] = []
    current: list[_Piece] = []
    for piece in sorted((p for p in pieces if p.pad_ok), key=lambda p: -p.length):
        if current and current[0].length * (len(current) + 1) > max_units:
            batches.append(current)
            current = []
        current.append(piece)
    if current:
        batches.append(current)
    same_length: dict[int, list[_Piece]] = {}
    for piece in pieces:
        if not piece.pad_ok:
            same_length.setdefault(piece.length, []).append(piece)
    for length, group in sorted(same_length.items()):
        per_batch = max(1, max_units // length)
        batches.extend(group[i : i + per_batch] for i in range(0, len(group), per_batch))
    return batches


class ChunkedEncoder:
    """Encode whole utterances to units in bounded memory, batched, with exact results.

    ``model`` has ``encoder`` (a conv stack), ``encode(x) -> (B, U)``, ``unit_rate`` and
    ``downsampling`` (input frames per unit), as :class:`speechvq.vqvae.VQVAE` does.
    Inputs are whole-utterance model inputs whose last axis is time: normalised log-mels
    ``(n_mels, F)`` (mel model) or waveforms ``(T,)`` (wave model), a whole number of units long.

    Args:
        chunk_seconds: units kept per window (bounds the encoder's activation memory).
        context_seconds: input context on each side of a window; ``None`` (default) derives it
            from the encoder's receptive field (``ceil(rf / downsampling) + 1`` units), which makes the
            units independent of the chunking. A smaller value is used as given, with a warning.
        max_batch_seconds: padded audio per encoder call.
        device: where the model runs (it is moved there).
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_seconds: float,
        context_seconds: float | None,
        max_batch_seconds: float,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.unit_rate = float(model.unit_rate)
        self.downsampling = int(model.downsampling)
        self.receptive_field, stride = receptive_field(model.encoder)
        if stride != self.downsampling:
            raise ValueError(f"the encoder's strides multiply to {stride}, but the model says "
                             f"{self.downsampling} input frames per unit")
        first = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv1d))
        shape = () if getattr(model, "kind", "mel") == "wave" else (first.in_channels,)
        d = self.downsampling
        length = max(4 * self.receptive_field, 64 * d) // d * d
        measured = measured_receptive_field(model.encoder, shape, length)
        self.receptive_field = max(self.receptive_field, measured)
        needed = math.ceil(self.receptive_field / d) + 1
        if context_seconds is None:
            self.context = needed
        else:
            self.context = math.ceil(context_seconds * self.unit_rate)
            if self.context < needed:
                log.warning(
                    "context %d units is less than the encoder's receptive field (%d units): "
                    "units near chunk borders may differ from whole-file encoding",
                    self.context,
                    needed,
                )
        self.chunk = max(1, round(chunk_seconds * self.unit_rate))
        self.max_units = max(round(max_batch_seconds * self.unit_rate), self.chunk + 2 * self.context)

    def n_units(self, x: torch.Tensor) -> int:
        """Units an input of this shape yields (``x.shape[-1] // downsampling``)."""
        return x.shape[-1] // self.downsampling

    @torch.no_grad()
    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
        """``inputs``: whole-utterance inputs -> their units, ``(U_i,)`` int16 each."""
        pieces = [
            _Piece(i, *window)
            for i, x in enumerate(inputs)
            for window in plan_chunks(self.n_units(x), self.chunk, self.context)
        ]
        outputs = [np.empty(self.n_units(x), dtype=np.int16) for x in inputs]
        for batch in _batch_pieces(pieces, self.max_units):
            longest = batch[0].length if batch[0].pad_ok else max(p.length for p in batch)
            first = inputs[batch[0].item]
            x = first.new_zeros((len(batch), *first.shape[:-1], longest * self.downsampling))
            for b, p in enumerate(batch):
                x[b, ..., : p.length * self.downsampling] = inputs[p.item][
                    ..., p.start * self.downsampling : p.stop * self.downsampling
                ]
            codes = self.model.encode(x.to(self.device, non_blocking=True)).cpu().numpy()
            for b, p in enumerate(batch):
                lo, hi = p.keep_start - p.start, p.keep_stop - p.start
                outputs[p.item][p.keep_start : p.keep_stop] = codes[b, lo:hi]
        return outputs


class ModelInput:
    """Manifest row -> the model's input for the whole utterance, as training prepared it.

    The waveform is cut to whole units (``T // samples_per_unit`` units, as
    :class:`speechvq.data.dataset.UtteranceDataset` does). Mel model: the one front-end,
    :class:`speechvq.features.FrontEnd` with ``stats``, ``(n_mels, F)``; wave model:
    ``(samples_per_unit * U,)``.
    Raises :class:`speechvq.audio.AudioError` for unreadable audio or audio shorter than a unit.
    Picklable, so DataLoader workers can run it.
    """

    def __init__(
        self,
        kind: str,
        samples_per_unit: int,
        sample_rate: int,
        features_cfg: Mapping | None = None,
        stats: FeatureStats | None = None,
        chunk_seconds: float = 30.0,
    ) -> None:
        self.kind = kind
        self.samples_per_unit = int(samples_per_unit)
        self.sample_rate = int(sample_rate)
        self.front: FrontEnd | None = None
        if kind == "mel":
            if features_cfg is None:
                raise ValueError("the mel model needs its features config")
            self.front = FrontEnd(features_cfg, stats, chunk_seconds=chunk_seconds)

    def __call__(self, path: str, speaker: str) -> torch.Tensor:
        wav = load_audio(path, self.sample_rate)
        n = wav.numel() // self.samples_per_unit * self.samples_per_unit
        if n == 0:
            raise AudioError(path, f"shorter than one unit ({self.samples_per_unit} samples)")
        wav = wav[:n]
        if self.front is None:
            return wav.clone()
        return self.front(wav, speaker)


class _Inputs(torch.utils.data.Dataset):
    """Row index -> ``(index, input or None, error or None)``: a bad file is a result, not a crash."""

    def __init__(self, rows: Sequence[Any], make_input: Callable[[str, str], torch.Tensor]) -> None:
        self.rows = rows
        self.make_input = make_input

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        row = self.rows[index]
        try:
            return index, self.make_input(row.path, row.speaker), None
        except AudioError as err:
            return index, None, err.problem


@dataclass
class Extraction:
    """What :func:`extract_units` produced: frame-level ``units`` in row order, the ``rejected``
    rows (``{"id", "path", "reason"}``), seconds of audio encoded and wall-clock seconds."""

    units: Units
    rejected: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def realtime_factor(self) -> float:
        """Seconds of audio per second of wall-clock time."""
        return self.seconds / max(self.wall_seconds, 1e-9)


def iter_units(
    rows: Sequence[Any],
    make_input: Callable[[str, str], torch.Tensor],
    encoder: ChunkedEncoder,
    num_workers: int = 0,
    group_seconds: float | None = None,
    progress: bool = True,
) -> Iterator[tuple[int, np.ndarray | None, str | None]]:
    """Yield ``(row index, units (U,) int16 or None, error or None)`` for every row, longest first.

    Rows (``.path``, ``.speaker``, ``.num_samples``) are loaded by ``num_workers`` DataLoader
    workers in order of decreasing length and encoded in groups of about ``group_seconds`` of
    audio (default: four batches' worth), so padding stays small and memory bounded.
    """
    order = sorted(range(len(rows)), key=lambda i: (-rows[i].num_samples, i))
    loader = torch.utils.data.DataLoader(
        _Inputs(rows, make_input),
        batch_size=None,
        sampler=order,
        num_workers=num_workers,
        prefetch_factor=2 if num_workers else None,  # hour-long inputs: keep few in flight
    )
    group_units = (group_seconds * encoder.unit_rate) if group_seconds else 4 * encoder.max_units
    bar = tqdm(total=len(rows), unit="utt", desc="extract", disable=not progress, file=sys.stderr)
    group: list[tuple[int, torch.Tensor]] = []
    size = 0

    def flush() -> Iterator[tuple[int, np.ndarray, None]]:
        outputs = encoder([x for _, x in group])
        for (index, _), units in zip(group, outputs, strict=True):
            bar.update()
            yield index, units, None

    try:
        for index, x, error in loader:
            if error is not None:
                bar.update()
                yield index, None, error
                continue
            group.append((index, x))
            size += encoder.n_units(x)
            if size >= group_units:
                yield from flush()
                group, size = [], 0
        if group:
            yield from flush()
    finally:
        bar.close()


def extract_units(
    rows: Sequence[Any],
    make_input: Callable[[str, str], torch.Tensor],
    encoder: ChunkedEncoder,
    num_workers: int = 0,
    progress: bool = True,
) -> Extraction:
    """Units for every row (``.id``, ``.path``, ``.speaker``, ``.num_samples``; manifest rows).

    Unreadable files are logged, listed in ``rejected`` and skipped. Returns units in row order.
    """
    start = time.perf_counter()
    found: dict[int, np.ndarray] = {}
    rejected = []
    for index, units, error in iter_units(rows, make_input, encoder, num_workers, progress=progress):
        if units is None:
            row = rows[index]
            log.warning("skipping %s: %s", row.path, error)
            rejected.append({"id": row.id, "path": str(row.path), "reason": error})
        else:
            found[index] = units
    ordered = {rows[i].id: found[i] for i in sorted(found)}
    frames = sum(len(u) for u in ordered.values())
    return Extraction(ordered, rejected, frames / encoder.unit_rate, time.perf_counter() - start)
