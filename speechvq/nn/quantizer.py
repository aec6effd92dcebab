"""Vector quantizer: a K x D codebook, nearest code by L2, straight-through gradient.

Two update rules share one class (``ema``):

- ``ema=False``: the VQ-VAE paper's loss. The codebook is a parameter trained by the codebook term
  ``||sg[z_e] - e||^2`` (returned as ``vq_codebook``); the encoder by the commitment term
  ``||z_e - sg[e]||^2`` (``vq_commit``; its weight beta lives in the model's ``loss_weights``).
- ``ema=True``: the codebook is a buffer moved towards the mean of its assigned frames by
  exponential moving averages of per-code sums and counts (Laplace-smoothed counts so no code
  divides by zero); ``vq_codebook`` is then a constant 0.

Both keep an EMA of per-code usage counts: codes whose count falls below ``dead_threshold`` are
restarted from random current encoder frames. The codebook is initialised by k-means on the first
training batch (the ``inited`` buffer records it, so a loaded checkpoint is never re-initialised).

Everything runs in fp32 (autocast is switched off inside) because distances and EMA sums in half
precision overflow or lose the small updates. The nearest code (training, extraction and k-means
alike) comes from :func:`nearest_codes`: ``argmin ||e||^2 - 2 x.e`` over blocks of rows that stay
in cache, never the full (N, K) distance matrix. Padded frames (``mask`` False) are left out of
every statistic: k-means, EMA sums and counts, restart candidates, losses, perplexity and usage.

Under ``torch.distributed`` (only when initialised, world size > 1): k-means runs on rank 0 over
frames gathered from every rank and is broadcast; EMA sums and counts are all-reduced; dead codes
are decided on rank 0 and refilled from its frames, broadcast, so replicas' codebooks stay
identical.

A training step never waits for the device: masks are weights, not boolean indexing; the EMA
update of a step without valid frames is a no-op by arithmetic, not by a branch; dead codes are
refilled with ``torch.where`` from one random valid frame per code (drawn with replacement), so
their number never reaches the host. Only the k-means initialisation (once per run: the
``inited`` buffer is read on the host until it is true, and again after a ``load_state_dict``)
synchronises.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- distributed helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _all_reduce_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.all_reduce(t)


def _broadcast_(*tensors: torch.Tensor) -> None:
    if _distributed():
        for t in tensors:
            dist.broadcast(t, src=0)


def _gather_frames(x: torch.Tensor) -> torch.Tensor:
    """All ranks' frames ``(N_r, D)`` concatenated (every rank gets the same tensor)."""
    if not _distributed():
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = F.pad(x, (0, 0, 0, longest - x.shape[0]))
    chunks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded.contiguous())
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes, strict=True)])


# --------------------------------------------------------------------------- codebook maths


def sq_distances(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``||x||^2 - 2 x e^T + ||e||^2`` with one matmul.

    x: (N, D), codebook: (K, D) -> (N, K). Memory is O(N K), never the O(N K D) of broadcasting.
    For the nearest code use :func:`nearest_codes`, which never builds this matrix.
    """
    x2 = x.pow(2).sum(1, keepdim=True)
    e2 = codebook.pow(2).sum(1)
    return torch.addmm(e2 + x2, x, codebook.t(), alpha=-2.0)


#: CPU: rows per block so that the (rows, K) fp32 block stays in the last-level cache (8 MiB)
#: while each GEMM is large enough to keep the threads busy; fewer blocks also mean fewer
#: thread-pool barriers, which cost most when other processes hold the cores.
_CPU_BLOCK_ELEMENTS = 1 << 21
#: accelerators: blocks only bound the temporary memory (256 MiB of fp32).
_DEVICE_BLOCK_ELEMENTS = 1 << 26
#: CPU argmin over a row goes through chunks of this many codes (see ``_argmin_rows_``).
_ARGMIN_CHUNK = 64


def default_block_rows(n_codes: int, device: torch.device) -> int:
    """Rows per block of :func:`nearest_codes` for a codebook of ``n_codes`` on ``device``."""
    budget = _CPU_BLOCK_ELEMENTS if device.type == "cpu" else _DEVICE_BLOCK_ELEMENTS
    return max(64, budget // max(n_codes, 1))


def _argmin_rows_(scores: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = scores[i].argmin()`` for scores (R, K), out (R,) long.

    ATen's CPU argmin walks (value, index) pairs one element at a time, while ``amin`` is
    vectorised and ~10x faster. So on CPU, when K splits into chunks of ``_ARGMIN_CHUNK`` codes:
    the minimum of every chunk (vectorised), the first chunk holding the row's minimum (argmin over
    K / 64 values), then the first minimum inside that chunk (argmin over 64 values). This is
    exactly ``argmin``: the first index of the minimum, NaN counting as the minimum (``amin``
    propagates NaN, and argmin picks the first NaN chunk, then the first NaN in it).
    """
    rows, k = scores.shape
    chunk = _ARGMIN_CHUNK
    if scores.device.type != "cpu" or k % chunk or k < 4 * chunk:
        torch.argmin(scores, 1, out=out)
        return
    chunks = scores.view(rows, k // chunk, chunk)
    best_chunk = torch.amin(chunks, 2).argmin(1)  # (R,)
    inside = chunks[torch.arange(rows, device=scores.device), best_chunk].argmin(1)  # (R,)
    torch.add(inside, best_chunk, alpha=chunk, out=out)


@torch.no_grad()
def nearest_codes(
    x: torch.Tensor,
    codebook: torch.Tensor,
    codebook_sq_norms: torch.Tensor | None = None,
    block_rows: int | None = None,
) -> torch.Tensor:
    """Index of the nearest code by squared L2 distance: x (N, D), codebook (K, D) -> (N,) long.

    ``argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x.e_k)``: the ``||x||^2`` term is the same
    for every code of a row, so it is never added, and rows go through blocks of ``block_rows``
    (default :func:`default_block_rows`): one ``addmm`` into a reused (block_rows, K) buffer, then
    the row argmin, so the (N, K) matrix is never written (on CPU a block stays in cache). Ties go
    to the lowest index, as ``argmin``.

    ``codebook_sq_norms`` (K,): ``||e_k||^2`` when the caller has it. The maths is fp32 whatever
    the autocast state (half-precision inputs are upcast; fp64 stays fp64). N = 0 gives an empty
    result; x and codebook must be on the same device (CPU or an accelerator).

    Against the old ``sq_distances(x, codebook).argmin(1)``: the same index on every frame we
    compared (real encoder outputs of trained checkpoints, random data, cosine mode), but float
    equality cannot be promised at near-ties, two codes whose distances differ by about the fp32
    rounding of ``||x||^2 + ||e||^2`` (6e-8 of it): neither formula resolves those, and as this
    one does not add ``||x||^2`` it is the one closer to the exact (fp64) answer.
    """
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"x (N, D) and codebook (K, D) expected, got {tuple(x.shape)} and "
                         f"{tuple(codebook.shape)}")
    n, k = x.shape[0], codebook.shape[0]
    out = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return out
    if k == 0:
        raise ValueError("nearest_codes needs a codebook with at least one code")
    dtype = torch.promote_types(torch.promote_types(x.dtype, codebook.dtype), torch.float32)
    codebook = codebook.to(dtype)
    if codebook_sq_norms is None:
        codebook_sq_norms = codebook.pow(2).sum(1)
    codebook_sq_norms = codebook_sq_norms.to(dtype)
    rows = block_rows if block_rows is not None else default_block_rows(k, x.device)
    if rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {rows}")
    rows = min(rows, n)
    buffer = torch.empty(rows, k, dtype=dtype, device=x.device)
    codebook_t = codebook.t()
    with torch.autocast(device_type=x.device.type, enabled=False):
        for start in range(0, n, rows):
            block = x[start : start + rows].to(dtype)
            scores = buffer[: block.shape[0]]
            torch.addmm(codebook_sq_norms, block, codebook_t, alpha=-2.0, out=scores)
            _argmin_rows_(scores, out[start : start + rows])
    return out


def kmeans_plusplus(x: torch.Tensor, n_clusters: int) -> torch.Tensor:
    """k-means++ seeding: each new centre is a frame drawn with probability proportional to its
    squared distance to the nearest centre so far. x: (N, D) -> (K, D)."""
    centres = x.new_empty(n_clusters, x.shape[1])
    centres[0] = x[torch.randint(0, x.shape[0], (1,), device=x.device)]
    d2 = (x - centres[0]).pow(2).sum(1)
    for i in range(1, n_clusters):
        # the tiny floor keeps the draw defined when there are fewer distinct frames than codes
        pick = torch.multinomial(d2.clamp(min=0) + 1e-20, 1)
        centres[i] = x[pick]
        d2 = torch.minimum(d2, (x - centres[i]).pow(2).sum(1))
    return centres


def kmeans(x: torch.Tensor, n_clusters: int, n_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means++ seeding then Lloyd iterations. x: (N, D) -> (means (K, D), counts (K,) float).

    A cluster left empty keeps its previous mean (a later dead-code restart refills it).
    """
    means = kmeans_plusplus(x, n_clusters)
    counts = torch.zeros(n_clusters, device=x.device)
    for _ in range(n_iters):
        assign = nearest_codes(x, means)
        counts = torch.bincount(assign, minlength=n_clusters).to(x.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, x)
        filled = counts > 0
        means = torch.where(filled[:, None], sums / counts.clamp(min=1)[:, None], means)
    return means, counts


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code distribution given per-code counts (K,)."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * p.clamp(min=1e-10).log()).sum())


# --------------------------------------------------------------------------- the module


def _forget_inited(module: nn.Module, incompatible_keys: object) -> None:
    """After ``load_state_dict`` the ``inited`` buffer may say otherwise: read it again."""
    module._inited_seen = False


class VectorQuantizer(nn.Module):
    """Nearest-code quantizer with EMA or loss-trained codebook; see the module docstring.

    Args:
        n_codes: codebook size K.
        dim: code dimension D (the encoder's output channels).
        ema: update the codebook by EMA (True) or by the codebook loss (False).
        decay: EMA decay of code sums and usage counts.
        epsilon: Laplace smoothing of the EMA counts.
        kmeans_init: initialise by k-means on the first training batch (else random uniform).
        kmeans_iters: Lloyd iterations of that k-means.
        dead_threshold: restart codes whose EMA usage count (frames per step, summed over ranks)
            is below this; 0 disables restarts.
        normalize: l2-normalise the latents and the codes (cosine-similarity lookup, as in
            ViT-VQGAN / DAC's factorised codes): the code says which direction, not how loud, and
            a low-dimensional unit sphere keeps most codes in use.
    """

    def __init__(
        self,
        n_codes: int,
        dim: int,
        ema: bool = True,
        decay: float = 0.99,
        epsilon: float = 1e-5,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        dead_threshold: float = 1.0,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        self.n_codes, self.dim, self.ema = n_codes, dim, ema
        self.normalize = normalize
        self.decay, self.epsilon = decay, epsilon
        self.kmeans_iters, self.dead_threshold = kmeans_iters, dead_threshold
        codebook = torch.empty(n_codes, dim).uniform_(-1.0 / n_codes, 1.0 / n_codes)
        if ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("cluster_size", torch.ones(n_codes))
        self.register_buffer("inited", torch.tensor(not kmeans_init))
        self._inited_seen = False  # ``inited`` read true on the host: no need to read it again
        self.register_load_state_dict_post_hook(_forget_inited)

    # ---- lookup

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The latents as the codebook sees them: l2-normalised when ``normalize``."""
        return F.normalize(x, dim=-1) if self.normalize else x

    def _codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1) if self.normalize else self.codebook

    def decode_codes(self) -> torch.Tensor:
        """The codebook as the lookup uses it: (K, D) (unit rows when ``normalize``)."""
        return self._codes().detach()

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) (already through ``_prepare``) -> nearest code index (N,) long."""
        return nearest_codes(x.detach(), self._codes().detach())

    def dequantize(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (...) long -> codes (..., D) fp32 (unit-norm when ``normalize``)."""
        return F.embedding(indices, self._codes())

    @torch.no_grad()
    def encode(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, D, T) -> indices (B, T) long. Indices at padded frames are computed anyway
        (``mask`` is accepted for symmetry with ``forward`` and does not change the result)."""
        with torch.autocast(device_type=z.device.type, enabled=False):
            x = self._prepare(z.float().transpose(1, 2).reshape(-1, self.dim))
            return self.quantize(x).view(z.shape[0], z.shape[2])

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """indices: (B, T) long -> z_q: (B, D, T) fp32."""
        return self.dequantize(indices).transpose(1, 2)

    # ---- codebook maintenance (training only; in place, hence the trailing underscore)

    @torch.no_grad()
    def init_codebook_(self, x: torch.Tensor) -> None:
        """k-means over the valid frames x (N, D) of every rank, computed on rank 0, broadcast."""
        frames = _gather_frames(x)
        if frames.shape[0] == 0:  # every rank agrees: the gathered set is the same everywhere
            return
        if _is_rank0():
            means, counts = kmeans(frames, self.n_codes, self.kmeans_iters)
            self.codebook.copy_(means)
            self.cluster_size.copy_(counts)
        _broadcast_(self.codebook.data, self.cluster_size)
        if self.ema:
            self.embed_sum.copy_(self.codebook * self.cluster_size[:, None])
        self.inited.fill_(True)
        self._inited_seen = True

    @torch.no_grad()
    def update_codebook_(self, x: torch.Tensor, indices: torch.Tensor,
                         weights: torch.Tensor | None = None) -> torch.Tensor:
        """EMA of usage counts (and, under ``ema``, of code sums -> new codebook).

        x: (N, D) frames, indices: (N,) their codes, weights: (N,) 1 for valid frames, 0 for
        padding (default all valid). Returns this step's counts (K,), summed over ranks. A step
        with no valid frame on any rank changes nothing.
        """
        if weights is None:
            weights = x.new_ones(x.shape[0])
        weights = weights.to(x.dtype)
        counts = torch.zeros(self.n_codes, dtype=x.dtype, device=x.device)
        counts.index_add_(0, indices, weights)
        sums = None
        if self.ema:
            frames = torch.where(weights[:, None] > 0, x, torch.zeros_like(x))
            sums = torch.zeros_like(self.codebook).index_add_(0, indices, frames)
        _all_reduce_(counts, *([sums] if self.ema else []))
        learned = counts.sum() > 0
        rate = torch.where(learned, 1.0 - self.decay, 0.0).to(x.dtype)
        self.cluster_size.lerp_(counts, rate)
        if self.ema:
            self.embed_sum.lerp_(sums, rate)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.epsilon) / (n + self.n_codes * self.epsilon) * n
            self.codebook.copy_(torch.where(learned, self.embed_sum / smoothed[:, None],
                                            self.codebook))
        return counts

    @torch.no_grad()
    def expire_codes_(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Restart codes whose EMA usage is below ``dead_threshold`` from random frames x (N, D)
        (``weights`` (N,): 1 for valid frames, 0 for padding; default all valid).

        Rank 0 decides and draws one valid frame per code (with replacement); the result is
        broadcast. A restarted code starts with usage ``dead_threshold``: it has the next step to
        attract frames (a code that gets none is restarted again, from other frames). Nothing
        is restarted when there is no valid frame. Returns the number of dead codes found (a
        0-d float tensor), without waiting for it.
        """
        if self.dead_threshold <= 0:
            return self._dead()
        dead = (self.cluster_size < self.dead_threshold).to(torch.uint8)  # gloo has no bool
        _broadcast_(dead)
        dead = dead.bool()
        if weights is None:
            weights = x.new_ones(x.shape[0])
        valid = (weights > 0).to(torch.long)
        n_valid = valid.sum()
        if x.shape[0] > 0:
            # the k-th valid frame for k uniform in [0, n_valid): no boolean indexing, no sync
            k = (torch.rand(self.n_codes, device=x.device) * n_valid).long()
            pick = torch.searchsorted(valid.cumsum(0), k + 1).clamp(max=x.shape[0] - 1)
            refill = dead & (n_valid > 0)
            thr = torch.full_like(self.cluster_size, self.dead_threshold)
            self.codebook.data.copy_(torch.where(refill[:, None], x[pick], self.codebook.data))
            self.cluster_size.copy_(torch.where(refill, thr, self.cluster_size))
            if self.ema:
                self.embed_sum.copy_(torch.where(refill[:, None], self.codebook * thr[:, None],
                                                 self.embed_sum))
        _broadcast_(self.codebook.data, self.cluster_size, *([self.embed_sum] if self.ema else []))
        return dead.sum().float()

    # ---- forward

    def forward(
        self, z: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """z: (B, D, T), mask: (B, T) bool (True = valid) or None.

        Returns z_q (B, D, T) fp32 with the straight-through gradient (d loss/d z = d loss/d z_q),
        indices (B, T) long, and losses ``vq_codebook``, ``vq_commit`` (unweighted, masked means)
        plus detached stats ``perplexity``, ``usage`` (fraction of codes used in the batch) and
        ``dead_codes`` (codes below the restart threshold before this step's restart).
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            B, D, T = z.shape
            x = self._prepare(z.float().transpose(1, 2).reshape(B * T, D))
            valid = torch.ones(B * T, dtype=torch.bool, device=z.device)
            if mask is not None:
                valid = mask.reshape(B * T).to(torch.bool)
            weights = valid.to(x.dtype)
            if self.training and not self._is_inited():
                self.init_codebook_(x.detach()[valid])  # once per run: may wait for the device

            indices = self.quantize(x)
            q = self.dequantize(indices)
            losses = self._losses(x, q, valid)

            if self.training:
                counts = self.update_codebook_(x.detach(), indices, weights)
                dead = self.expire_codes_(x.detach(), weights)
            else:
                counts = torch.zeros(self.n_codes, device=x.device).index_add_(0, indices, weights)
                dead = self._dead()
            losses.update(
                perplexity=perplexity(counts),
                usage=(counts > 0).float().mean(),
                dead_codes=dead,
            )
            # straight-through: forward value exactly the code (``x + (q - x).detach()`` would
            # round), backward the identity to x
            z_q = q.detach() + (x - x.detach())
            z_q = z_q.view(B, T, D).transpose(1, 2)
        return z_q, indices.view(B, T), losses

    def _is_inited(self) -> bool:
        """Whether the codebook was initialised (reads the buffer until it is true)."""
        if not self._inited_seen:
            self._inited_seen = bool(self.inited)
        return self._inited_seen

    def _dead(self) -> torch.Tensor:
        return (self.cluster_size < self.dead_threshold).sum().float()

    def _losses(
        self, x: torch.Tensor, q: torch.Tensor, valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Masked mean squared errors over valid frames and dimensions."""
        w = valid.to(x.dtype)
        denom = w.sum().clamp(min=1) * self.dim
        commit = ((x - q.detach()).pow(2).sum(1) * w).sum() / denom
        if self.ema:
            codebook = x.new_zeros(())
        else:
            codebook = ((x.detach() - q).pow(2).sum(1) * w).sum() / denom
        return {"vq_codebook": codebook, "vq_commit": commit}
