"""Speaking from units: the prior's data and training task, sampling, and resynthesis.

- :class:`PriorTask` trains :class:`speechvq.nn.prior.Prior` with the shared loop
  (:func:`speechvq.training.fit`) on a unit file; :func:`ngram_perplexities` gives the unigram and
  bigram baselines its validation perplexity is reported against.
- :func:`load_prior` rebuilds a trained prior from its checkpoint alone.
- :class:`Synthesizer` wraps a trained VQ-VAE: audio -> units (:meth:`Synthesizer.encode`) and
  units -> audio in any of its speakers' voices (:meth:`Synthesizer.decode`: codebook vectors ->
  speaker-conditioned decoder -> that speaker's statistics undone -> Griffin-Lim for mel models).
- :func:`sample_units` draws unit sequences from the prior, unconditionally or continuing a prompt.

Speakers: the prior's leading token is a speaker token when the utterance's speaker is known (from
a manifest), BOS otherwise; the token inventory is the VQ-VAE checkpoint's speaker list when known
(so prior and decoder agree on names), else the manifest's speakers. The prior's checkpoint meta
keeps its own ``speakers`` list; the decoder uses the VQ-VAE's; they are matched by name.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from speechvq.checkpoint import CheckpointError, load_checkpoint, load_model_state
from speechvq.features import FeatureStats, FrontEnd, UtteranceState, stats_for_rows
from speechvq.metrics import prior_perplexity
from speechvq.nn.prior import IGNORE_INDEX, Prior
from speechvq.vocoder import griffin_lim
from speechvq.vqvae import load_vqvae

log = logging.getLogger(__name__)

Units = dict[str, np.ndarray]


# ------------------------------------------------------------------------------------------------
# building and loading the prior


def build_prior(prior_cfg: Mapping[str, Any], n_codes: int, n_speakers: int) -> Prior:
    """A prior from the ``prior`` config group plus the sizes taken from the data."""
    cfg = {str(k): prior_cfg[k] for k in prior_cfg}
    return Prior(n_codes=int(n_codes), n_speakers=int(n_speakers), **cfg)


def load_prior(path: str | Path, map_location: str | torch.device = "cpu"
               ) -> tuple[Prior, dict[str, Any]]:
    """Rebuild a trained prior from its checkpoint; returns (prior in eval mode, meta).

    ``meta`` holds ``speakers`` (the names behind the speaker tokens), ``n_codes``, ``frame_rate``
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
# units <-> audio through a trained VQ-VAE


class Synthesizer:
    """A trained VQ-VAE with its checkpoint meta: audio -> units -> audio in a chosen voice.

    ``vocoder`` holds :func:`speechvq.vocoder.griffin_lim` keyword arguments (``n_iter``,
    ``momentum``) for mel models; wave models output audio directly.
    """

    def __init__(self, vqvae: torch.nn.Module, meta: Mapping[str, Any],
                 vocoder: Mapping[str, Any] | None = None, source: str = "the VQ-VAE checkpoint"
                 ) -> None:
        self.vqvae = vqvae.eval()
        self.meta = dict(meta)
        self.source = source
        self.vocoder = dict(vocoder or {})
        self.speakers: list[str] = [str(s) for s in self.meta.get("speakers", [])]
        self.features: dict[str, Any] = dict(self.meta.get("features") or {})
        self.normalize: str = str(self.features.get("normalize", "speaker"))
        stats = self.meta.get("stats")
        self.stats = FeatureStats.from_dict(stats, path=source) if stats else None
        if vqvae.kind == "mel":
            if not self.features:
                raise KeyError(f"{source}: meta lacks 'features' (the mel front-end config)")
            if self.stats is None and self.normalize != "none":
                raise KeyError(f"{source}: meta lacks 'stats' needed to undo "
                               f"{self.normalize!r} normalisation")
        self.sample_rate = int(self.features.get("sample_rate", getattr(vqvae, "sample_rate",
                                                                         16000)))
        self.frame_rate = float(vqvae.frame_rate)
        self.n_codes = int(vqvae.n_codes)
        self.samples_per_unit = int(vqvae.samples_per_unit)
        self.front = FrontEnd(self.features, self.stats) if vqvae.kind == "mel" else None

    def add_speakers(self, rows: Sequence[Any], stats_json: str | Path | None = None,
                     progress: bool = False) -> None:
        """Statistics for the speakers of manifest ``rows`` that the checkpoint lacks, by the one
        policy (:func:`speechvq.features.stats_for_rows`, as extraction does), so resynthesis and
        prompts encode an unseen speaker exactly as ``speechvq-extract`` does."""
        if self.front is None or self.stats is None:
            return
        stats, _ = stats_for_rows(self.features, self.stats, rows, rows, stats_json, progress)
        if stats is not None:
            merged = {**stats.speakers, **self.stats.speakers}
            self.stats = FeatureStats(self.features, self.stats.global_, merged, self.source)
            self.front = FrontEnd(self.features, self.stats)

    @classmethod
    def from_checkpoint(cls, path: str | Path, vocoder: Mapping[str, Any] | None = None,
                        device: str | torch.device = "cpu") -> Synthesizer:
        vqvae, meta = load_vqvae(path, map_location=device)
        return cls(vqvae, meta, vocoder, source=str(path))

    @property
    def device(self) -> torch.device:
        return next(self.vqvae.parameters()).device

    def speaker_index(self, speaker: str) -> int:
        """The decoder's index of ``speaker``; ValueError listing the known ones otherwise."""
        try:
            return self.speakers.index(str(speaker))
        except ValueError:
            known = ", ".join(self.speakers[:20]) + (" ..." if len(self.speakers) > 20 else "")
            raise ValueError(f"{self.source}: unknown speaker {speaker!r} "
                             f"(the decoder knows: {known})") from None

    def num_units(self, num_samples: int) -> int:
        return int(num_samples) // self.samples_per_unit

    @torch.no_grad()
    def encode(self, wav: Tensor, speaker: str | None = None) -> Tensor:
        """wav: (T,) at ``sample_rate`` -> unit ids (U,) long, U = T // samples_per_unit.

        The one front-end (:class:`speechvq.features.FrontEnd`) with the checkpoint's statistics
        (plus those of :meth:`add_speakers`): the same units as ``speechvq-extract``.
        """
        return self.encode_with_state(wav, speaker)[0]

    @torch.no_grad()
    def encode_with_state(self, wav: Tensor, speaker: str | None = None
                          ) -> tuple[Tensor, UtteranceState | None]:
        """:meth:`encode`, also returning the utterance's front-end state (for :meth:`decode`)."""
        # Cut to whole units first, as extraction (speechvq.units.ModelInput) and the datasets
        # do: the utterance's level and statistics then match, and so do the units.
        wav = wav[: self.num_units(wav.numel()) * self.samples_per_unit].float()
        state = None
        if self.front is not None:
            state = self.front.measure(wav.cpu())
            x = self.front(wav.cpu(), speaker, state).to(self.device).unsqueeze(0)
        else:
            x = wav.to(self.device).unsqueeze(0)
        units = self.vqvae.encode(x)[0]
        return units[: self.num_units(wav.numel())], state

    @torch.no_grad()
    def decode(self, units: Tensor, speakers: str | Sequence[str], seed: int = 0,
               state: UtteranceState | None = None) -> Tensor:
        """units: (B, U) or (U,) ids -> audio (B, U * samples_per_unit) or (T,), float32 on CPU.

        ``speakers``: one name for all, or one per sequence; the decoder is conditioned on it and
        (mel models) the features are denormalised with its statistics before the vocoder, or
        with the source utterance's own (``state`` from :meth:`encode_with_state`) when the
        front-end normalises per utterance (reconstruction).
        """
        single = units.dim() == 1
        units = units.reshape(1, -1) if single else units
        names = [speakers] * units.size(0) if isinstance(speakers, str) else list(speakers)
        if len(names) != units.size(0):
            raise ValueError(f"{len(names)} speakers for {units.size(0)} unit sequences")
        index = torch.tensor([self.speaker_index(s) for s in names], device=self.device)
        out = self.vqvae.decode(units.to(self.device), index)
        if self.vqvae.kind == "mel":
            out = self.front.denormalize(out.float().cpu(), names, state)
            out = griffin_lim(out, self.features, seed=seed, **self.vocoder)
        out = out.float().cpu()
        return out[0] if single else out


# ------------------------------------------------------------------------------------------------
# the prior's training data


def ngram_perplexities(train: Sequence[np.ndarray], valid: Sequence[np.ndarray], n_codes: int
                       ) -> dict[str, float]:
    """Per-unit perplexity of add-one smoothed unigram and bigram models on ``valid``.

    Both are estimated on ``train`` with Laplace (add-one) smoothing over the ``n_codes`` units;
    the bigram's first unit of an utterance is predicted from a start context (its own counts,
    also add-one smoothed). Returns ``{"unigram": ppl, "bigram": ppl, "units": count}``.
    """
    uni = np.ones(n_codes, dtype=np.float64)
    big = np.ones((n_codes + 1, n_codes), dtype=np.float64)  # row n_codes: utterance start
    for seq in train:
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size == 0:
            continue
        uni += np.bincount(seq, minlength=n_codes)
        prev = np.concatenate([[n_codes], seq[:-1]])
        np.add.at(big, (prev, seq), 1.0)
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
    """

    def __init__(self, sequences: Sequence[np.ndarray], leads: Sequence[int], max_units: int,
                 crop: bool, seed: int = 0) -> None:
        self.max_units = int(max_units)
        self.crop = crop
        self.seed = int(seed)
        self.epoch = 0
        self.items: list[tuple[np.ndarray, int]] = []
        for seq, lead in zip(sequences, leads, strict=True):
            seq = np.asarray(seq, dtype=np.int64)
            if seq.size == 0:
                continue
            pieces = [seq] if crop else windows(seq, self.max_units)
            self.items.extend((piece, int(lead)) for piece in pieces)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        seq, lead = self.items[index]
        if self.crop and len(seq) > self.max_units:
            rng = np.random.default_rng((self.seed, self.epoch, index))
            start = int(rng.integers(0, len(seq) - self.max_units + 1))
            seq = seq[start : start + self.max_units]
        tokens = torch.from_numpy(np.concatenate([[lead], seq]))
        return {"idx": tokens[:-1], "targets": tokens[1:]}


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


class PriorTask:
    """The prior as a :class:`speechvq.training.Task` for :func:`speechvq.training.fit`.

    Args:
        train, valid: id -> frame-level units (int arrays) of each split.
        speaker_of: id -> speaker name for utterances whose speaker is known (others get BOS).
        speakers: the speaker names behind the speaker tokens (saved in the checkpoint meta).
        prior_cfg: the ``prior`` config group (Prior kwargs minus n_codes / n_speakers).
        n_codes: codebook size of the VQ-VAE the units came from.
        max_units: units per training crop / validation window (at most ``block_size``).
        meta: extra plain data for the checkpoint (units file, frame rate, VQ-VAE hash...).
        seed: crops' seed.
    """

    kind = "prior"

    def __init__(self, train: Units, valid: Units, speaker_of: Mapping[str, str],
                 speakers: Sequence[str], prior_cfg: Mapping[str, Any], n_codes: int,
                 max_units: int | None = None, meta: Mapping[str, Any] | None = None,
                 seed: int = 0) -> None:
        self.speakers = [str(s) for s in speakers]
        self.model = build_prior(prior_cfg, n_codes, len(self.speakers))
        self.model_config = prior_model_config(self.model)
        block = self.model.config.block_size
        self.max_units = min(int(max_units or block), block)
        for split, units in (("train", train), ("valid", valid)):
            bad = [i for i, u in units.items() if len(u) and (u.min() < 0 or u.max() >= n_codes)]
            if bad:
                raise ValueError(f"{split} utterance {bad[0]!r} has units outside [0, {n_codes})"
                                 f" ({len(bad)} such utterances)")
        index = {s: i for i, s in enumerate(self.speakers)}

        def leads(ids: Sequence[str]) -> list[int]:
            spk = (index.get(speaker_of.get(i)) for i in ids)  # type: ignore[arg-type]
            return [self.model.speaker_token(s) for s in spk]

        train_ids, valid_ids = sorted(train), sorted(valid)
        self.train_set = UnitSequences([train[i] for i in train_ids], leads(train_ids),
                                       self.max_units, crop=True, seed=seed)
        self.valid_set = UnitSequences([valid[i] for i in valid_ids], leads(valid_ids),
                                       self.max_units, crop=False)
        self.baselines = ngram_perplexities([train[i] for i in train_ids],
                                            [valid[i] for i in valid_ids], n_codes)
        self.meta = {**dict(meta or {}), "speakers": self.speakers, "n_codes": int(n_codes),
                     "baselines": dict(self.baselines),
                     "split": {"train": len(train_ids), "valid": len(valid_ids)}}
        known = sum(1 for i in train_ids if speaker_of.get(i) in index)
        log.info("prior data: %d train / %d valid utterances, %d train units, %d speakers "
                 "(%d train utterances with a speaker token)", len(train_ids), len(valid_ids),
                 sum(len(train[i]) for i in train_ids), len(self.speakers), known)

    def collate(self, items: list) -> dict:
        return collate_units(items)

    def step(self, model: torch.nn.Module, batch: dict) -> dict[str, Tensor]:
        _, loss = model(batch["idx"], batch["targets"])
        return {"loss": loss}

    def log_media(self, model: torch.nn.Module, writer: Any, step: int) -> None:
        """Exact validation perplexity per unit beside the n-gram baselines, and a short sample."""
        ppl = unit_perplexity(model, self.valid_set)
        writer.add_scalar("valid/perplexity", ppl, step)
        writer.add_scalar("valid/unigram_perplexity", self.baselines["unigram"], step)
        writer.add_scalar("valid/bigram_perplexity", self.baselines["bigram"], step)
        units = sample_units(model, 1, min(100, self.max_units), seed=step)[0].tolist()
        writer.add_text("prior/sample_units", " ".join(map(str, units)), step)


# ------------------------------------------------------------------------------------------------
# the sample and resynthesis pipelines (files + listening-page rows)


def resolve_speakers(spec: str | int | Sequence[str] | None, known: Sequence[str], source: str
                     ) -> list[str]:
    """``None`` -> [], ``"all"`` -> every known speaker, a name or a list -> those (checked)."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        names = [str(s) for s in spec]
    else:  # hydra reads `speaker=1001` as an int
        names = list(known) if spec == "all" else [str(spec)]
    unknown = [s for s in names if s not in known]
    if unknown:
        shown = ", ".join(list(known)[:20]) + (" ..." if len(known) > 20 else "")
        raise ValueError(f"{source}: unknown speaker(s) {', '.join(unknown)} (known: {shown})")
    return names


def safe_name(text: str) -> str:
    """A file name made from an utterance id or speaker name (no separators or odd characters)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip(".")
    return name or "_"


def write_samples(synth: Synthesizer, prior: Prior, prior_speakers: Sequence[str],
                  out_dir: str | Path, n: int, seconds: float, speakers: Sequence[str],
                  prompt_units: Tensor | None = None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0
                  ) -> list[Any]:
    """Sample ``n`` clips of ``seconds`` and write ``out_dir/sample_XXX.wav``; returns page rows.

    Clip i is spoken by ``speakers[i % len(speakers)]`` (decoder voice and statistics); the prior
    is conditioned on the same speaker's token when it knows that speaker, on BOS otherwise. A
    ``prompt_units`` (U,) sequence starts every clip. Same arguments and seed -> same files;
    clip i depends on (seed, i, its speaker), not on ``n``.
    """
    from speechvq.audio import save_audio
    from speechvq.report import Clip, Row

    if prior.n_codes != synth.n_codes:
        raise ValueError(f"the prior models {prior.n_codes} units but {synth.source} has "
                         f"{synth.n_codes} codes: train the prior on this VQ-VAE's units")
    if not speakers:
        raise ValueError("no speaker to decode with")
    n_units = max(1, round(seconds * synth.frame_rate))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [str(speakers[i % len(speakers)]) for i in range(n)]
    tokens = [list(prior_speakers).index(s) if s in prior_speakers else None for s in names]
    units = sample_units(prior, n, n_units, speaker=tokens, prompt=prompt_units,
                         temperature=temperature, top_k=top_k, top_p=top_p, seed=seed).cpu()
    page = []
    for i in range(n):
        path = out_dir / f"sample_{i:03d}.wav"
        # decoded one by one so clip i's vocoder phases depend on (seed, i) only
        save_audio(path, synth.decode(units[i], names[i], seed=seed + i), synth.sample_rate)
        note = f"speaker {names[i]}" + ("" if names[i] in prior_speakers else
                                        " (prior: no speaker token)")
        page.append(Row(f"sample {i}", [Clip(path, f"sample {i}", units[i].numpy(), note)]))
    return page


def write_resynthesis(synth: Synthesizer, rows: Sequence[Any], out_dir: str | Path,
                      targets: Sequence[str], seed: int = 0) -> list[Any]:
    """Reconstruction and voice conversion of manifest ``rows``; returns page rows.

    Writes ``out_dir/original/<id>.wav`` (the input at the model's rate),
    ``out_dir/reconstruction/<id>.wav`` (decoded with the utterance's own speaker when the
    checkpoint knows it, else with the first target or its first speaker; the page says which) and
    ``out_dir/converted/<target>/<id>.wav`` for every other target speaker.
    """
    from speechvq.audio import load_audio, save_audio
    from speechvq.report import Clip, Row

    out_dir = Path(out_dir)
    synth.add_speakers(rows)  # unseen speakers: their own statistics, as extraction uses
    page = []
    for row in rows:
        wav = load_audio(row.path, synth.sample_rate)
        units, state = synth.encode_with_state(wav, row.speaker)
        name = safe_name(row.id) + ".wav"
        original = out_dir / "original" / name
        save_audio(original, wav[: len(units) * synth.samples_per_unit], synth.sample_rate)
        own = row.speaker in synth.speakers
        voice = row.speaker if own else (list(targets) or synth.speakers)[0]
        clips = [Clip(original, "original", None, f"speaker {row.speaker}")]
        recon = out_dir / "reconstruction" / name
        save_audio(recon, synth.decode(units, voice, seed=seed, state=state), synth.sample_rate)
        note = f"decoded as {voice}" + ("" if own else f" ({row.speaker} unknown to the model)")
        clips.append(Clip(recon, "reconstruction", units.cpu().numpy(), note))
        others = [t for t in targets if t != voice]
        if others:
            converted = synth.decode(units.expand(len(others), -1), others, seed=seed)
            for target, audio in zip(others, converted, strict=True):
                path = out_dir / "converted" / safe_name(target) / name
                save_audio(path, audio, synth.sample_rate)
                clips.append(Clip(path, f"as {target}", None, "voice conversion"))
        page.append(Row(row.id, clips))
    return page
