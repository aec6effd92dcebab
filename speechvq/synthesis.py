"""Speaking from units: a trained VQ-VAE as audio -> units -> audio, and the listening pages.

- :class:`Synthesizer` wraps a trained VQ-VAE: audio -> units (:meth:`Synthesizer.encode`) and
  units -> audio in any of its speakers' voices (:meth:`Synthesizer.decode`: codebook vectors ->
  speaker-conditioned decoder -> that speaker's statistics undone -> Griffin-Lim for mel models).
- :func:`write_samples` speaks prior samples, :func:`write_resynthesis` reconstructs and converts
  manifest utterances; both write WAVs and return the rows of a listening page
  (:func:`speechvq.report.write_report`).
- :func:`sample` and :func:`resynthesize` are ``speechvq-sample`` and ``speechvq-resynth``: the
  WAVs, the listening page and TensorBoard, from a :class:`SampleJob` / :class:`ResynthJob`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from speechvq import quality
from speechvq.audio import AudioError, load_audio, save_audio
from speechvq.checkpoint import CheckpointError, VQVAEMeta
from speechvq.data.manifest import ManifestRow, read_manifest
from speechvq.features import FeatureStats, FrontEnd, UtteranceState, stats_for_rows
from speechvq.files import safe_name
from speechvq.nn.prior import Prior
from speechvq.prior import load_prior, sample_units
from speechvq.report import Clip, Row, log_to_tensorboard, write_report
from speechvq.runtime import resolve_device
from speechvq.units import write_units
from speechvq.vocoder import griffin_lim
from speechvq.vqvae import VQVAE, load_vqvae

log = logging.getLogger(__name__)


class Synthesizer:
    """A trained VQ-VAE with its checkpoint meta: audio -> units -> audio in a chosen voice.

    ``vocoder`` holds :func:`speechvq.vocoder.griffin_lim` keyword arguments (``n_iter``,
    ``momentum``) for mel models; wave models output audio directly.
    """

    def __init__(self, vqvae: VQVAE, meta: VQVAEMeta, vocoder: Mapping[str, Any] | None = None,
                 source: str = "the VQ-VAE checkpoint") -> None:
        self.vqvae = vqvae.eval()
        self.meta = meta
        self.source = source
        self.vocoder = dict(vocoder or {})
        self.speakers: list[str] = list(meta.speakers)
        self.features: dict[str, Any] = dict(meta.features or {})
        self.stats = FeatureStats.from_dict(meta.stats, path=source) if meta.stats else None
        self.front: FrontEnd | None = None
        if vqvae.kind == "mel":
            if not self.features:
                raise KeyError(f"{source}: meta lacks 'features' (the mel front-end config)")
            mode = self.features.get("normalize")
            if self.stats is None and mode != "none":
                raise KeyError(f"{source}: meta lacks 'stats' needed to undo {mode!r} "
                               "normalisation")
            self.front = FrontEnd(self.features, self.stats)
        self.sample_rate = int(meta.sample_rate)
        self.unit_rate = float(vqvae.unit_rate)
        self.n_codes = int(vqvae.n_codes)
        self.samples_per_unit = int(vqvae.samples_per_unit)

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
        # Cut to whole units first, as extraction (speechvq.extract.ModelInput) and the datasets
        # do: the utterance's level and statistics then match, and so do the units.
        wav = wav[: self.num_units(wav.numel()) * self.samples_per_unit].float()
        state = None
        if self.front is not None:
            state = self.front.measure(wav.cpu())
            if self.vqvae.pitch_range is not None:  # the melody, for decode()
                state.pitch = self.front.pitch(wav.cpu(), None, *self.vqvae.pitch_range)
            x = self.front(wav.cpu(), speaker, state).to(self.device).unsqueeze(0)
        else:
            x = wav.to(self.device).unsqueeze(0)
        units = self.vqvae.encode(x)[0]
        return units[: self.num_units(wav.numel())], state

    def units(self, audio: str | Path | Tensor | np.ndarray, speaker: str | None = None
              ) -> np.ndarray:
        """An audio file (any rate: resampled, downmixed) or a waveform ``(T,)`` at
        :attr:`sample_rate` -> its units ``(U,)`` int64, ``U = T // samples_per_unit``.

        ``speaker``: a speaker the model was trained on (or added with :meth:`add_speakers`) is
        normalised with its statistics; any other utterance with its own.
        """
        if isinstance(audio, (str, Path)):
            wav = load_audio(audio, self.sample_rate)
        else:
            wav = torch.as_tensor(np.asarray(audio, dtype=np.float32)).reshape(-1)
        return self.encode(wav, speaker).cpu().numpy()

    def speak(self, units: Sequence[int] | np.ndarray | Tensor, speaker: str | None = None,
              seed: int = 0) -> np.ndarray:
        """Units ``(U,)`` -> a float32 waveform ``(U * samples_per_unit,)`` at :attr:`sample_rate`,
        in the voice of ``speaker`` (default: the decoder's first speaker)."""
        voice = self.speakers[0] if speaker is None else str(speaker)
        ids = torch.as_tensor(np.asarray(units), dtype=torch.long).reshape(-1)
        return self.decode(ids, voice, seed=seed).numpy()

    @torch.no_grad()
    def decode(self, units: Tensor, speakers: str | Sequence[str], seed: int = 0,
               state: UtteranceState | None = None, pitch: Tensor | None = None) -> Tensor:
        """units: (B, U) or (U,) ids -> audio (B, U * samples_per_unit) or (T,), float32 on CPU.

        ``speakers``: one name for all, or one per sequence; the decoder is conditioned on it and
        (mel models) the features are denormalised with its statistics before the vocoder, or
        with the source utterance's own (``state`` from :meth:`encode_with_state`) when the
        front-end normalises per utterance (reconstruction).

        Models with a pitch condition: ``pitch`` ``(2, 2U)`` or ``(B, 2, 2U)`` (a source's
        :meth:`speechvq.features.FrontEnd.pitch`; its contour is rendered in each target voice's
        range), else ``state.pitch``, else the F0 the model predicts from the units.
        """
        single = units.dim() == 1
        units = units.reshape(1, -1) if single else units
        names = [speakers] * units.size(0) if isinstance(speakers, str) else list(speakers)
        if len(names) != units.size(0):
            raise ValueError(f"{len(names)} speakers for {units.size(0)} unit sequences")
        index = torch.tensor([self.speaker_index(s) for s in names], device=self.device)
        if pitch is None and state is not None:
            pitch = state.pitch
        if pitch is not None and self.vqvae.pitch_enabled:
            pitch = pitch.reshape(-1, *pitch.shape[-2:]).expand(units.size(0), -1, -1)
            pitch = pitch[..., : units.size(1) * self.vqvae.decoder.upsampling].to(self.device)
        else:
            pitch = None
        out = self.to_audio(self.vqvae.decode(units.to(self.device), index, pitch), names, seed,
                            state)
        return out[0] if single else out

    def to_audio(self, out: Tensor, speakers: Sequence[str], seed: int = 0,
                 state: UtteranceState | None = None) -> Tensor:
        """The decoder's output -> audio (B, T) float32 on CPU: normalised log-mels (B, n_mels, F)
        are denormalised as :meth:`decode` says and vocoded; a wave model's output passes."""
        if self.vqvae.kind == "mel":
            out = self.front.denormalize(out.float().cpu(), list(speakers), state)
            out = griffin_lim(out, self.features, seed=seed, **self.vocoder)
        return out.float().cpu()


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

def write_samples(synth: Synthesizer, prior: Prior, prior_speakers: Sequence[str],
                  out_dir: str | Path, n: int, seconds: float, speakers: Sequence[str],
                  prompt_units: Tensor | None = None, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0
                  ) -> list[Row]:
    """Sample ``n`` clips of ``seconds`` and write ``out_dir/sample_XXX.wav``; returns page rows.

    Clip i is spoken by ``speakers[i % len(speakers)]`` (decoder voice and statistics); the prior
    is conditioned on the same speaker's token when it knows that speaker, on BOS otherwise. A
    ``prompt_units`` (U,) sequence starts every clip. Same arguments and seed -> same files;
    clip i depends on (seed, i, its speaker), not on ``n``.
    """
    if prior.n_codes != synth.n_codes:
        raise ValueError(f"the prior models {prior.n_codes} units but {synth.source} has "
                         f"{synth.n_codes} codes: train the prior on this VQ-VAE's units")
    if not speakers:
        raise ValueError("no speaker to decode with")
    n_units = max(1, round(seconds * synth.unit_rate))
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
                      targets: Sequence[str], seed: int = 0, score: bool = True
                      ) -> tuple[list[Row], list[dict[str, Any]]]:
    """Reconstruction and voice conversion of manifest ``rows``; returns (page rows, scores).

    Writes ``out_dir/original/<id>.wav`` (the input at the model's rate),
    ``out_dir/reconstruction/<id>.wav`` (decoded with the utterance's own speaker when the
    checkpoint knows it, else with the first target or its first speaker; the page says which) and
    ``out_dir/converted/<target>/<id>.wav`` for every other target speaker. An unreadable file, or
    one shorter than a unit, is logged and skipped. With ``score``, each
    reconstruction is scored against its original (:func:`speechvq.quality.score`: STOI, MCD,
    narrow-band PESQ when ``pesq`` is installed): ``[{"id", "stoi", "mcd", ...}]``.
    """
    out_dir = Path(out_dir)
    synth.add_speakers(rows)  # unseen speakers: their own statistics, as extraction uses
    page, scores = [], []
    for row in tqdm(rows, desc="resynthesis", unit="utt", disable=len(rows) < 10):
        try:
            wav = load_audio(row.path, synth.sample_rate)
        except AudioError as err:  # one bad file does not stop the page
            log.warning("skipping %s", err)
            continue
        if synth.num_units(wav.numel()) == 0:
            log.warning("skipping %s: %d samples, shorter than one unit (%d samples)",
                        row.path, wav.numel(), synth.samples_per_unit)
            continue
        units, state = synth.encode_with_state(wav, row.speaker)
        name = safe_name(row.id) + ".wav"
        original = out_dir / "original" / name
        save_audio(original, wav[: len(units) * synth.samples_per_unit], synth.sample_rate)
        own = row.speaker in synth.speakers
        voice = row.speaker if own else (list(targets) or synth.speakers)[0]
        clips = [Clip(original, "original", None, f"speaker {row.speaker}")]
        recon = out_dir / "reconstruction" / name
        audio = synth.decode(units, voice, seed=seed, state=state)
        save_audio(recon, audio, synth.sample_rate)
        note = f"decoded as {voice}" + ("" if own else f" ({row.speaker} unknown to the model)")
        if score and synth.features:
            figures = quality.score(wav[: audio.numel()], audio, synth.features, pesq=True)
            scores.append({"id": row.id, **figures})
            note += "; " + quality.describe(figures)
        clips.append(Clip(recon, "reconstruction", units.cpu().numpy(), note))
        others = [t for t in targets if t != voice]
        if others:
            converted = synth.decode(units.expand(len(others), -1), others, seed=seed,
                                     pitch=state.pitch if state is not None else None)
            for target, audio in zip(others, converted, strict=True):
                path = out_dir / "converted" / safe_name(target) / name
                save_audio(path, audio, synth.sample_rate)
                clips.append(Clip(path, f"as {target}", None, "voice conversion"))
        page.append(Row(row.id, clips))
    return page, scores


# ------------------------------------------------------------------------------------------------
# the sample and resynthesis stages


class SynthesisError(ValueError):
    """A sample or resynthesis run that cannot go on; the message names the file or speaker."""


_USER_ERRORS = (CheckpointError, AudioError, KeyError, ValueError)


@dataclass(frozen=True)
class SampleJob:
    """One ``speechvq-sample`` run as plain data (the keys of ``conf/sample.yaml``;
    ``manifest`` is ``data.manifest``, ``vocoder`` the group)."""

    vqvae: str
    prior_checkpoint: str
    n: int
    seconds: float
    speaker: str | list[str] | None
    prompt: str | None
    prompt_seconds: float
    manifest: str | None
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    device: str
    vocoder: dict
    tensorboard: bool
    out_dir: str


def sample(job: SampleJob) -> Path:
    """Sample ``job.n`` clips from the prior and speak them with the VQ-VAE: ``OUT/sample_*.wav``,
    ``OUT/units.txt`` (gslm), ``OUT/index.html`` (returned) and ``OUT/tb/``."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(job.device)
    try:
        synth = Synthesizer.from_checkpoint(job.vqvae, job.vocoder, device=device)
        prior, prior_meta = load_prior(job.prior_checkpoint, map_location=device)
        prompt_units, prompt_speaker, prompt_row = _prompt(job, synth, out_dir)
        speakers = resolve_speakers(job.speaker, synth.speakers, str(job.vqvae))
        if not speakers:
            speakers = [prompt_speaker if prompt_speaker in synth.speakers else synth.speakers[0]]
        rows = write_samples(
            synth, prior, prior_meta.get("speakers", []), out_dir, n=job.n, seconds=job.seconds,
            speakers=speakers, prompt_units=prompt_units, temperature=job.temperature,
            top_k=job.top_k, top_p=job.top_p, seed=job.seed)
    except _USER_ERRORS as err:
        raise SynthesisError(str(err).strip('"')) from None
    write_units(out_dir / "units.txt", {Path(r.clips[0].wav).stem: r.clips[0].units for r in rows},
                format="gslm")
    if prompt_row is not None:
        rows.insert(0, prompt_row)
    settings = (f"{job.n} samples of {job.seconds} s, temperature {job.temperature}, "
                f"top_k {job.top_k}, top_p {job.top_p}, seed {job.seed}; "
                f"VQ-VAE {job.vqvae}; prior {job.prior_checkpoint}")
    index = write_report(out_dir, rows, "speechvq samples", synth.features or None, settings)
    if job.tensorboard:
        log_to_tensorboard(out_dir / "tb", rows, sample_rate=synth.sample_rate)
    return index


def _prompt(job: SampleJob, synth: Synthesizer, out_dir: Path
            ) -> tuple[Tensor | None, str | None, Row | None]:
    """(units (U,), speaker, page row) of the prompt utterance, or (None, None, None)."""
    if job.prompt is None:
        return None, None, None
    if job.manifest is None:
        raise SynthesisError("prompt= names an utterance: give the manifest that lists it with "
                             "data.manifest=...")
    rows = {r.id: r for r in read_manifest(job.manifest)}
    row = rows.get(str(job.prompt))
    if row is None:
        raise SynthesisError(f"{job.manifest}: no utterance with id {job.prompt!r}")
    # the prompt speaker's statistics as extraction would use them (all its utterances listed)
    synth.add_speakers([r for r in rows.values() if r.speaker == row.speaker])
    wav = load_audio(row.path, synth.sample_rate)
    units = synth.encode(wav, row.speaker)
    units = units[: max(1, round(job.prompt_seconds * synth.unit_rate))]
    path = out_dir / "prompt" / (safe_name(row.id) + ".wav")
    save_audio(path, wav[: units.numel() * synth.samples_per_unit], synth.sample_rate)
    page = Row(f"prompt {row.id}", [Clip(path, "prompt (original audio)", units.cpu().numpy(),
                                         f"speaker {row.speaker}")])
    return units.cpu(), row.speaker, page


@dataclass(frozen=True)
class ResynthJob:
    """One ``speechvq-resynth`` run as plain data (the keys of ``conf/resynth.yaml``)."""

    checkpoint: str
    manifest: str
    speaker: str | list[str] | None
    n: int | None
    ids: list[str] | None
    seed: int
    device: str
    vocoder: dict
    tensorboard: bool
    out_dir: str
    score: bool = True


def resynthesize(job: ResynthJob) -> tuple[int, Path, dict[str, float]]:
    """Reconstruction and voice conversion of the chosen utterances (:func:`write_resynthesis`),
    with ``OUT/index.html``, ``OUT/tb/`` and, with ``job.score``, ``OUT/quality.tsv`` (one line
    per reconstruction) and ``OUT/quality.json`` (the means); returns (utterances made, the page, the
    means)."""
    out_dir = Path(job.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        rows = choose_rows(read_manifest(job.manifest), job.ids, job.n, job.seed, job.manifest)
        synth = Synthesizer.from_checkpoint(job.checkpoint, job.vocoder,
                                            device=resolve_device(job.device))
        targets = resolve_speakers(job.speaker, synth.speakers, str(job.checkpoint))
        page, scores = write_resynthesis(synth, rows, out_dir, targets, seed=job.seed,
                                         score=job.score)
    except _USER_ERRORS as err:
        raise SynthesisError(str(err).strip('"')) from None
    if not page:
        raise SynthesisError(f"{job.manifest}: none of the {len(rows)} chosen utterance(s) could "
                             "be resynthesised (unreadable or shorter than one unit; see above)")
    means = quality.means(scores)
    if scores:
        quality.write_scores(out_dir, scores, means)
    skipped = f" ({len(rows) - len(page)} skipped: see the log)" if len(page) < len(rows) else ""
    intro = (f"{len(page)} utterance(s){skipped} from {job.manifest} through {job.checkpoint}: "
             f"original, reconstruction, and {len(targets)} target voice(s)")
    if means:
        intro += (f". Reconstructions against their originals (mean of {len(scores)}): "
                  f"{quality.describe(means)}")
    index = write_report(out_dir, page, "speechvq resynthesis", synth.features or None, intro)
    if job.tensorboard:
        log_to_tensorboard(out_dir / "tb", page, sample_rate=synth.sample_rate)
    return len(page), index, means


def choose_rows(rows: list[ManifestRow], ids: Sequence[str] | None, n: int | None, seed: int,
                source: str = "the manifest") -> list[ManifestRow]:
    """The utterances to resynthesise: ``ids`` if given, else a seeded choice of ``n`` (in
    manifest order; all of them when ``n`` is None or at least their number)."""
    if ids is not None:
        by_id = {r.id: r for r in rows}
        missing = [str(i) for i in ids if str(i) not in by_id]
        if missing:
            raise SynthesisError(f"{source}: no utterance(s) {', '.join(missing)}")
        return [by_id[str(i)] for i in ids]
    if n is None or int(n) >= len(rows):
        return rows
    keep = np.random.default_rng(int(seed)).choice(len(rows), int(n), replace=False)
    return [rows[i] for i in sorted(keep)]
