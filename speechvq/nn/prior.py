"""A decoder-only Transformer over frame-level unit sequences (the "prior"), in one file.

Shaped after nanoGPT's ``model.py``: a config dataclass (saved in the checkpoint with
``dataclasses.asdict``), ``logits, loss = prior(idx, targets)`` and ``prior.generate(...)``.

Vocabulary (``vocab_size = n_codes + n_speakers + 1``)::

    [0, n_codes)                       unit ids, exactly the VQ-VAE's codebook indices
    [n_codes, n_codes + n_speakers)    one speaker token per speaker (``speaker_token(i)``)
    n_codes + n_speakers               BOS: "speaker unknown", leads unconditional sequences

Every sequence starts with one leading token (a speaker token or BOS) followed by units, so a
model trained with speaker tokens can still sample without one. Only units are ever *sampled*:
the speaker and BOS logits are masked out before sampling. Units are frame-level (50 Hz); there is
no deduplicated unit + duration stream.

Sequences longer than ``block_size`` are generated with a sliding window: when the context is full
it is restarted from the leading token plus the most recent ``block_size // 2`` units (learned
absolute positions cannot slide token by token), and the KV cache is refilled once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

IGNORE_INDEX = -1  # targets at padded positions


@dataclass
class PriorConfig:
    n_codes: int
    n_speakers: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = False

    @property
    def vocab_size(self) -> int:
        return self.n_codes + self.n_speakers + 1


class KVCache:
    """Preallocated keys/values of every layer: (n_layer, B, n_head, block_size, head_dim) each.

    ``length`` is a host-side int, so decoding never reads a device value back per token.
    """

    def __init__(self, config: PriorConfig, batch: int, device, dtype) -> None:
        shape = (config.n_layer, batch, config.n_head, config.block_size,
                 config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v: (B, nh, T, hs) at [length, length + T) and return all keys/values so far."""
        start, end = self.length, self.length + k.size(2)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        """x: (B, T, C) -> (B, T, C). With a cache, x holds the T tokens after the cached ones."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.update(layer, k, v)
        dropout = self.dropout if self.training else 0.0
        if T == 1:  # one new query sees every cached key: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        else:
            # is_causal aligns the mask top-left; queries here start at position `past`
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: PriorConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (B, V).

    top-p keeps the smallest set of most probable tokens whose probability reaches ``top_p``
    (always at least the most probable one). ``None`` (or k <= 0, p >= 1) disables a filter.
    """
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class Prior(nn.Module):
    """GPT over ``[leading token, u_1, u_2, ...]``; see the module docstring for the vocabulary.

    Constructor kwargs equal :class:`PriorConfig` fields (``Prior(**cfg.prior)`` plus the sizes
    taken from the data), and ``asdict(prior.config)`` rebuilds it.
    """

    def __init__(self, n_codes: int, n_speakers: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float = 0.0, bias: bool = False) -> None:
        super().__init__()
        config = PriorConfig(n_codes, n_speakers, block_size, n_layer, n_head, n_embd, dropout, bias)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, config.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # vocabulary helpers
    @property
    def n_codes(self) -> int:
        return self.config.n_codes

    @property
    def bos_token(self) -> int:
        return self.config.n_codes + self.config.n_speakers

    def speaker_token(self, speaker: int | None) -> int:
        """The leading token for speaker index ``speaker`` (None -> BOS)."""
        if speaker is None:
            return self.bos_token
        if not 0 <= speaker < self.config.n_speakers:
            raise ValueError(f"speaker index {speaker} outside [0, {self.config.n_speakers})")
        return self.config.n_codes + speaker

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) -> final hidden states (B, T, C); positions continue after the cache."""
        start = cache.length if cache is not None else 0
        T = idx.size(1)
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for layer, block in enumerate(self.blocks):
            x = block(x, cache, layer)
        if cache is not None:
            cache.length += T
        return self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None):
        """idx: (B, T) token ids; targets: (B, T) next tokens, -1 where ignored.

        Returns ``(logits (B, T, vocab_size), loss)``; loss is the mean cross-entropy (nats) over
        non-ignored targets, or None without targets.
        """
        logits = self.lm_head(self._hidden(idx, cache))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                   ignore_index=IGNORE_INDEX)
        return logits, loss

    def new_cache(self, batch: int) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch, p.device, p.dtype)

    def _unit_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the units only, (B, C) -> (B, n_codes): speaker and BOS tokens can never be
        sampled (and their rows of the output layer are not even computed)."""
        return F.linear(hidden, self.lm_head.weight[: self.config.n_codes])

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, n: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Sample ``n`` units after ``prompt`` (B, P) = [leading token, units...]; returns (B, P + n).

        ``temperature <= 0`` picks the most probable unit. Sampled ids are always in
        ``[0, n_codes)``. ``use_cache=False`` recomputes the whole context at every step
        (the reference path for tests and the benchmark). ``generator`` (on the prompt's device)
        drives the sampling; a list of B generators gives every sequence its own stream, so a
        sequence does not depend on the others in the batch.
        """
        if prompt.dim() != 2 or prompt.size(1) < 1:
            raise ValueError("prompt must be (B, P) with P >= 1 (leading token first)")
        out = torch.empty(prompt.size(0), prompt.size(1) + n, dtype=torch.long,
                          device=prompt.device)
        out[:, : prompt.size(1)] = prompt
        length = prompt.size(1)
        window_start = max(1, length - (self.config.block_size - 1))
        cache = None
        for _ in range(n):
            if length - window_start + 1 > self.config.block_size:
                window_start, cache = length - self.config.block_size // 2, None
            if use_cache and cache is not None:  # feed only the newest token
                hidden = self._hidden(out[:, length - 1 : length], cache)
            else:
                context = torch.cat([out[:, :1], out[:, window_start:length]], dim=1)
                if use_cache:
                    cache = self.new_cache(out.size(0))
                hidden = self._hidden(context, cache)
            logits = self._unit_logits(hidden[:, -1])
            out[:, length] = self._sample(logits, temperature, top_k, top_p, generator)
            length += 1
        return out

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int | None,
                top_p: float | None, generator) -> torch.Tensor:
        """Unit logits (B, n_codes) -> unit ids (B,)."""
        logits = logits.float()
        if temperature <= 0:
            return logits.argmax(dim=-1)
        logits = filter_logits(logits / temperature, top_k, top_p)
        probs = logits.softmax(dim=-1)
        if isinstance(generator, Sequence):
            return torch.cat([torch.multinomial(p, 1, generator=g)
                              for p, g in zip(probs, generator, strict=True)])
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)
