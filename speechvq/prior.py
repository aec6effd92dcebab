"""The unit prior: build it, load it, sample from it; its training sequences and perplexities.

- :func:`build_prior` / :func:`load_prior` make a :class:`speechvq.nn.prior.Prior` from the
  ``prior`` config group or rebuild a trained one from its checkpoint alone;
- :func:`sample_units` draws unit sequences, unconditionally or continuing a prompt;
- :class:`UnitSequences` and :func:`collate_units` are its training / validation examples
  (:class:`speechvq.tasks.PriorTask` trains it with the shared fit loop);
- :func:`unit_perplexity` is its exact validation perplexity per unit, and
  :func:`ngram_perplexities` the unigram and bigram baselines it is reported against;
- :func:`prior_data` gathers what a prior is trained on: the units of a unit file (a held-out
  part, or a second file, for validation), each utterance's speaker, the speaker-token
  inventory and the codebook size.

Speakers: the prior's leading token is a speaker token when the utterance's speaker is known (from
a manifest), BOS otherwise; the token inventory is the VQ-VAE checkpoint's speaker list when known
(so prior and decoder agree on names), else the manifest's speakers. The prior's checkpoint meta
keeps its own ``speakers`` list; the decoder uses the VQ-VAE's; they are matched by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.checkpoint import CheckpointError, VQVAEMeta, load_checkpoint, load_model_state
from speechvq.data.manifest import read_manifest
from speechvq.metrics import prior_perplexity
from speechvq.nn.prior import IGNORE_INDEX, Prior
from speechvq.units import Sidecar, Units, read_sidecar, read_units
from speechvq.vqvae import load_vqvae

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------
# building and loading


def build_prior(prior_cfg: Mapping[str, Any], n_codes: int, n_speakers: int) -> Prior:
    """A prior from the ``prior`` config group plus the sizes taken from the data."""
    cfg = {str(k): prior_cfg[k] for k in prior_cfg}
    return Prior(n_codes=int(n_codes), n_speakers=int(n_speakers), **cfg)


def load_prior(path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Prior, dict[str, Any]]:
    """Rebuild a trained prior from its checkpoint; returns (prior in eval mode, meta).

    ``meta`` holds ``speakers`` (the names behind the speaker tokens), ``n_codes``, ``unit_rate``
    and where the units came from.
    """
    ckpt = load_checkpoint(path, kind="prior")
    try:
        prior = Prior(**ckpt["model_config"])
    except TypeError as err:
        raise CheckpointError(path, f"model_config does not fit Prior: {err}") from None
    load_model_state(prior, ckpt, path)
    return prior.to(map_location).eval(), dict(ckpt["meta"])


def prior_model_config(prior: Prior) -> dict[str, Any]:
    """What the checkpoint stores to rebuild ``prior``: ``Prior(**model_config)``."""
    return asdict(prior.config)


# ------------------------------------------------------------------------------------------------
# sampling


def sample_units(prior: Prior, n: int, n_units: int,
                 speaker: int | None | Sequence[int | None] = None,
                 prompt: Sequence[int] | Tensor | None = None, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0
                 ) -> Tensor:
    """Draw ``n`` unit sequences of ``n_units`` frames: (n, n_units) long, on the prior's device.

    ``speaker`` is the prior's speaker index (None: BOS, no speaker), or one per sequence. With a
    ``prompt`` (unit ids), every sequence starts with it and the prior continues it; a prompt
    longer than ``n_units`` is cut. The same arguments and seed give the same units, and sequence
    i does not depend on ``n``.
    """
    device = prior.lm_head.weight.device
    spk = list(speaker) if isinstance(speaker, Sequence) else [speaker] * n
    if len(spk) != n:
        raise ValueError(f"{len(spk)} speakers for {n} sequences")
    leads = torch.tensor([prior.speaker_token(s) for s in spk], device=device)
    prompt_t = torch.as_tensor(prompt if prompt is not None else [], dtype=torch.long)
    prompt_t = prompt_t.reshape(-1)[:n_units].to(device)
    if prompt_t.numel() and (prompt_t.min() < 0 or prompt_t.max() >= prior.n_codes):
        raise ValueError(f"prompt units must lie in [0, {prior.n_codes})")
    start = torch.cat([leads[:, None], prompt_t.expand(n, -1)], dim=1)
    # one stream per sequence: sequence i depends on (seed, i), not on n
    generator = [torch.Generator(device=device).manual_seed(int(seed) * 100_003 + i)
                 for i in range(n)]
    out = prior.generate(start, n_units - prompt_t.numel(), temperature=temperature,
                         top_k=top_k, top_p=top_p, generator=generator)
    return out[:, 1:]


# ------------------------------------------------------------------------------------------------
# training sequences and perplexities


def ngram_perplexities(train: Sequence[np.ndarray], valid: Sequence[np.ndarray], n_codes: int
                       ) -> dict[str, float]:
    """Per-unit perplexity of add-one smoothed unigram and bigram models on ``valid``.

    Both are estimated on ``train`` with Laplace (add-one) smoothing over the ``n_codes`` units;
    the bigram's first unit of an utterance is predicted from a start context (its own counts,
    also add-one smoothed). Returns ``{"unigram": ppl, "bigram": ppl, "units": count}``.
    """
    uni, big = _ngram_counts(train, n_codes)
    uni, big = uni + 1.0, big.reshape(n_codes + 1, n_codes) + 1.0  # row n_codes: utterance start
    log_uni = np.log(uni / uni.sum())
    log_big = np.log(big / big.sum(axis=1, keepdims=True))
    nll_uni = nll_big = 0.0
    count = 0
    for seq in valid:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size == 0:
            continue
        prev = np.concatenate([[n_codes], seq[:-1]])
        nll_uni -= log_uni[seq].sum()
        nll_big -= log_big[prev, seq].sum()
        count += seq.size
    if count == 0:
        raise ValueError("no validation units to compute perplexities on")
    return {"unigram": math.exp(nll_uni / count), "bigram": math.exp(nll_big / count),
            "units": count}


def _ngram_counts(seqs: Sequence[np.ndarray], n_codes: int, block: int = 1 << 22
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Unigram counts (n_codes,) and bigram counts ((n_codes + 1) * n_codes,), the previous unit
    of an utterance's first being ``n_codes``: one ``bincount`` per ``block`` units."""
    uni = np.zeros(n_codes, dtype=np.int64)
    big = np.zeros((n_codes + 1) * n_codes, dtype=np.int64)
    units: list[np.ndarray] = []
    size = 0

    def flush() -> None:
        cur = np.concatenate(units).astype(np.int64)
        starts = np.cumsum([0] + [len(u) for u in units[:-1]])
        prev = np.concatenate([[n_codes], cur[:-1]])
        prev[starts] = n_codes
        uni[:] += np.bincount(cur, minlength=n_codes)
        big[:] += np.bincount(prev * n_codes + cur, minlength=big.size)
        units.clear()

    for seq in seqs:
        if len(seq):
            units.append(np.asarray(seq))
            size += len(seq)
        if size >= block:
            flush()
            size = 0
    if units:
        flush()
    return uni, big


def split_ids(ids: Sequence[str], valid_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded held-out split of utterance ids: (train, valid), at least one of each."""
    ids = sorted(ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 utterances to hold some out, got {len(ids)}")
    n_valid = min(max(1, round(len(ids) * valid_fraction)), len(ids) - 1)
    order = np.random.default_rng(seed).permutation(len(ids))
    valid = sorted(ids[i] for i in order[:n_valid])
    held = set(valid)
    return [i for i in ids if i not in held], valid


def windows(seq: np.ndarray, length: int) -> list[np.ndarray]:
    """Cut ``seq`` into consecutive pieces of at most ``length`` units (validation chunks)."""
    return [seq[i : i + length] for i in range(0, len(seq), length)]


class UnitSequences(torch.utils.data.Dataset):
    """Training/validation examples for the prior: ``[lead] + units`` -> next tokens.

    Each item is one utterance (or, in ``crop`` mode, a random crop of ``max_units`` units whose
    position is a function of ``(seed, epoch, index)``, so resumed runs see the same crops; or, for
    validation, consecutive windows). Items: ``{"idx": (n,), "targets": (n,)}`` long for a piece of
    ``n`` units: the input is ``[lead, u_1 .. u_{n-1}]`` and the targets ``[u_1 .. u_n]``, so every
    unit of the piece, the first included, is predicted. ``max_units`` is at most
    ``block_size``.

    Memory: the units are ONE compact array (:attr:`units`) plus where each item starts, its
    length and lead. Sequences that are views into one flat array, as
    :func:`speechvq.units.read_units` returns them, are used in place (no copy at all); others
    are copied once into int16 (int32 when a value does not fit). Items become int64 tensors
    only when fetched.
    """

    def __init__(self, sequences: Sequence[np.ndarray], leads: Sequence[int], max_units: int,
                 crop: bool, seed: int = 0) -> None:
        self.max_units = int(max_units)
        self.crop = crop
        self.seed = int(seed)
        self.epoch = 0
        if len(leads) != len(sequences):
            raise ValueError(f"{len(sequences)} sequences but {len(leads)} leads")
        self.units, starts, lengths = flat_sequences(sequences)
        leads_a = np.asarray(leads, dtype=np.int64).reshape(-1)
        keep = lengths > 0
        starts, lengths, leads_a = starts[keep], lengths[keep], leads_a[keep]
        if not crop:  # consecutive windows of max_units
            pieces = -(-lengths // self.max_units)
            item = np.repeat(np.arange(len(lengths)), pieces)
            offset = (np.arange(item.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
                      ) * self.max_units
            starts, leads_a = starts[item] + offset, leads_a[item]
            lengths = np.minimum(lengths[item] - offset, self.max_units)
        self.starts, self.lengths, self.leads = starts, lengths, leads_a

    @property
    def nbytes(self) -> int:
        """Bytes this dataset holds: the units array (shared or not) and the item index."""
        return int(self.units.nbytes + self.starts.nbytes + self.lengths.nbytes +
                   self.leads.nbytes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        start, n = int(self.starts[index]), int(self.lengths[index])
        if self.crop and n > self.max_units:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            start += int(rng.integers(0, n - self.max_units + 1))
            n = self.max_units
        tokens = torch.empty(n + 1, dtype=torch.long)
        tokens[0] = int(self.leads[index])
        tokens[1:] = torch.from_numpy(self.units[start : start + n])
        return {"idx": tokens[:-1], "targets": tokens[1:]}


def flat_sequences(sequences: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(units, starts, lengths)``: one 1-D integer array holding every sequence, sequence ``i``
    being ``units[starts[i] : starts[i] + lengths[i]]``.

    When every non-empty sequence is a contiguous view into the same flat int16/int32 array (what
    :func:`speechvq.units.read_units` returns), that array is returned as it is: no copy. Otherwise
    the sequences are copied into a new int16 array (int32 when a value does not fit int16).
    """
    arrays = [np.asarray(s) for s in sequences]
    lengths = np.array([a.size for a in arrays], dtype=np.int64)
    bases = {id(a.base) for a in arrays if a.size}
    base = next((a.base for a in arrays if a.size), None)
    if (len(bases) == 1 and isinstance(base, np.ndarray) and base.ndim == 1
            and base.flags.c_contiguous and base.dtype in (np.int16, np.int32)
            and all(a.ndim == 1 and a.dtype == base.dtype and a.strides == base.strides
                    for a in arrays if a.size)):
        origin = base.__array_interface__["data"][0]
        starts = np.array([(a.__array_interface__["data"][0] - origin) // base.itemsize
                           if a.size else 0 for a in arrays], dtype=np.int64)
        if np.all((starts >= 0) & (starts + lengths <= base.size)):
            return base, starts, lengths
    lo = min((int(a.min()) for a in arrays if a.size), default=0)
    hi = max((int(a.max()) for a in arrays if a.size), default=0)
    small = np.iinfo(np.int16).min <= lo and hi <= np.iinfo(np.int16).max
    units = np.empty(int(lengths.sum()), dtype=np.int16 if small else np.int32)
    starts = np.cumsum(lengths) - lengths
    for a, start in zip(arrays, starts.tolist(), strict=True):
        units[start : start + a.size] = a.reshape(-1)
    return units, starts, lengths


def collate_units(items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Pad to the longest item: ``idx`` (B, L) (padded with 0, never attended to from a real
    position thanks to causality) and ``targets`` (B, L) (-1 where padded)."""
    length = max(item["idx"].numel() for item in items)
    idx = torch.zeros(len(items), length, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = item["idx"].numel()
        idx[row, :n] = item["idx"]
        targets[row, :n] = item["targets"]
    return {"idx": idx, "targets": targets}


@torch.no_grad()
def unit_perplexity(prior: Prior, data: UnitSequences, batch_size: int = 16) -> float:
    """Exact per-unit perplexity of ``prior`` on ``data``: exp(total NLL / number of units)."""
    was_training = prior.training
    prior.eval()
    device = prior.lm_head.weight.device
    nll, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = collate_units([data[i] for i in range(start, min(start + batch_size, len(data)))])
        logits, _ = prior(batch["idx"].to(device))
        targets = batch["targets"].to(device)
        losses = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum")
        nll += float(losses)
        count += int((targets != IGNORE_INDEX).sum())
    prior.train(was_training)
    if count == 0:
        raise ValueError("no units to compute a perplexity on")
    return prior_perplexity(nll, count)


# ------------------------------------------------------------------------------------------------
# what a prior is trained on


class PriorDataError(ValueError):
    """Training data for the prior that cannot be used; the message names the file."""


@dataclass
class PriorData:
    """Units, speakers and codebook size for :class:`speechvq.tasks.PriorTask`.

    ``speaker_of``: utterance id -> speaker where known; ``speakers``: the speaker-token inventory
    (the VQ-VAE's speakers, so prior and decoder agree on names, else the manifests' sorted);
    ``meta``: where the units came from, for the prior's checkpoint.
    """

    train: Units
    valid: Units
    speaker_of: dict[str, str]
    speakers: list[str]
    n_codes: int
    meta: dict[str, Any]


def prior_data(units: str, valid_units: str | None, valid_fraction: float, seed: int,
               manifest: str | None, vqvae: str | None, n_codes: int | None,
               speaker_tokens: bool) -> PriorData:
    """Read and resolve what a prior is trained on (``conf/train_prior.yaml`` keys).

    Validation: ``valid_units``, else a seeded ``valid_fraction`` of the utterances. Speakers:
    ``manifest``, else the manifests named in the unit files' sidecars; none at all means no
    speaker tokens. The VQ-VAE is ``vqvae`` or the checkpoint named in the sidecar (when it is
    still there). ``n_codes``: given, else the sidecar's, the VQ-VAE's, or the largest unit + 1.
    """
    train, sidecar = _read(units, n_codes)
    sidecars = [sidecar]
    if valid_units is not None:
        valid, valid_sidecar = _read(valid_units, n_codes)
        sidecars.append(valid_sidecar)
        if overlap := set(train) & set(valid):
            log.warning("%d utterance(s) are in both %s and %s", len(overlap), units, valid_units)
    else:
        try:
            train_ids, valid_ids = split_ids(list(train), valid_fraction, seed)
        except ValueError as err:
            raise PriorDataError(f"{units}: {err}") from None
        train, valid = {i: train[i] for i in train_ids}, {i: train[i] for i in valid_ids}
    vq_meta, vq_path = _vqvae_meta(vqvae, sidecar)
    speaker_of, speakers = ({}, []) if not speaker_tokens else _speakers(manifest, vq_meta,
                                                                          sidecars)
    meta = {"units": str(units), "valid_units": valid_units,
            "unit_rate": sidecar.unit_rate or (vq_meta.unit_rate if vq_meta else None),
            "checkpoint_hash": sidecar.checkpoint_hash, "vqvae": vq_path}
    codes = n_codes or sidecar.n_codes or (vq_meta.n_codes if vq_meta else None)
    if codes is None:
        codes = 1 + max(int(u.max()) for u in (*train.values(), *valid.values()) if len(u))
        log.warning("codebook size unknown (no n_codes=, sidecar or VQ-VAE): using %d, the "
                    "largest unit + 1", codes)
    return PriorData(train, valid, speaker_of, speakers, int(codes), meta)


def _read(path: str, n_codes: int | None) -> tuple[Units, Sidecar]:
    """Frame-level units (int16 when the codebook fits it: half the memory) and the sidecar."""
    try:
        sidecar = read_sidecar(path) or Sidecar()
        codes = n_codes or sidecar.n_codes
        dtype = np.int16 if codes and codes <= np.iinfo(np.int16).max + 1 else np.int32
        return read_units(path, expand=True, dtype=dtype), sidecar
    except (FileNotFoundError, ValueError) as err:
        raise PriorDataError(str(err)) from None


def _vqvae_meta(vqvae: str | None, sidecar: Sidecar) -> tuple[VQVAEMeta | None, str | None]:
    """(meta, path) of the VQ-VAE checkpoint behind the units, when one can be found."""
    path = vqvae or sidecar.checkpoint
    if path is None:
        return None, None
    if vqvae is None and not Path(path).is_file():
        log.info("the sidecar's checkpoint %s is not here; speaker list from the manifest", path)
        return None, None
    _, meta = load_vqvae(path)
    return meta, str(path)


def _speakers(manifest: str | None, vq_meta: VQVAEMeta | None, sidecars: Sequence[Sidecar]
              ) -> tuple[dict[str, str], list[str]]:
    """(id -> speaker, token inventory). With no speaker known for any utterance the inventory is
    empty: tokens never seen in training would otherwise be used at sampling time."""
    manifests = ([manifest] if manifest is not None else
                 [m for m in (sc.manifest for sc in sidecars) if m and Path(m).is_file()])
    speaker_of: dict[str, str] = {}
    for path in manifests:
        try:
            speaker_of.update({r.id: r.speaker for r in read_manifest(path)})
        except ValueError as err:
            raise PriorDataError(str(err)) from None
    if not speaker_of:
        log.warning("no manifest gives the utterances' speakers (data.manifest=...): "
                    "the prior is trained without speaker tokens")
        return {}, []
    if manifest is None:
        log.info("speakers from the units' manifest(s): %s", ", ".join(map(str, manifests)))
    inventory = list(vq_meta.speakers) if vq_meta is not None else []
    return speaker_of, inventory or sorted(set(speaker_of.values()))
