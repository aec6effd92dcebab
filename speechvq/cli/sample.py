"""speechvq-sample: sample unit sequences from a trained prior and speak them with a VQ-VAE.

    speechvq-sample vqvae=EXP/checkpoints/best.pt prior=PRIOR/checkpoints/best.pt n=8 seconds=4 \
        speaker=<name>|[a,b]|all out_dir=OUT [prompt=<utt id> data.manifest=M.tsv] [seed=0]

Unconditional sampling, or (``prompt=``) continuing the first ``prompt_seconds`` of an utterance's
units (obtained by encoding it with the VQ-VAE). Units -> codebook vectors -> decoder in the chosen
voice -> that speaker's statistics undone -> Griffin-Lim (mel models) -> OUT/sample_XXX.wav at
16 kHz, plus OUT/units.txt (gslm format), OUT/index.html and OUT/tb/. The same seed gives
identical audio.

``prior=PATH`` is accepted on the command line and stored as ``prior_checkpoint`` (hydra would
otherwise read it as a choice from the ``conf/prior/`` config group).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from speechvq.audio import AudioError, load_audio, save_audio
from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.manifest import read_manifest
from speechvq.files import safe_name
from speechvq.prior import load_prior
from speechvq.report import Clip, Row, log_to_tensorboard, write_report
from speechvq.runtime import resolve_device
from speechvq.synthesis import Synthesizer, resolve_speakers, write_samples
from speechvq.units import write_units

log = logging.getLogger("speechvq.sample")



def _prompt(cfg: DictConfig, synth: Synthesizer, out_dir: Path):
    """(units (U,), speaker, page row) of the prompt utterance, or (None, None, None)."""
    if cfg.prompt is None:
        return None, None, None
    if cfg.data.manifest is None:
        raise StageError("prompt= names an utterance: give the manifest that lists it "
                         "with data.manifest=...")
    try:
        rows = {r.id: r for r in read_manifest(cfg.data.manifest)}
    except ValueError as err:
        raise StageError(str(err)) from None
    row = rows.get(str(cfg.prompt))
    if row is None:
        raise StageError(f"{cfg.data.manifest}: no utterance with id {cfg.prompt!r}")
    # the prompt speaker's statistics as extraction would use them (all its utterances listed)
    synth.add_speakers([r for r in rows.values() if r.speaker == row.speaker])
    wav = load_audio(row.path, synth.sample_rate)
    units = synth.encode(wav, row.speaker)
    units = units[: max(1, round(float(cfg.prompt_seconds) * synth.frame_rate))]
    path = out_dir / "prompt" / (safe_name(row.id) + ".wav")
    save_audio(path, wav[: units.numel() * synth.samples_per_unit], synth.sample_rate)
    page = Row(f"prompt {row.id}", [Clip(path, "prompt (original audio)", units.cpu().numpy(),
                                         f"speaker {row.speaker}")])
    return units.cpu(), row.speaker, page


def run(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    vocoder = OmegaConf.to_container(cfg.vocoder, resolve=True)
    try:
        synth = Synthesizer.from_checkpoint(cfg.vqvae, vocoder, device=device)
        prior, prior_meta = load_prior(cfg.prior_checkpoint, map_location=device)
        prompt_units, prompt_speaker, prompt_row = _prompt(cfg, synth, out_dir)
        spec = OmegaConf.to_container(cfg.speaker) if OmegaConf.is_list(cfg.speaker) else cfg.speaker
        speakers = resolve_speakers(spec, synth.speakers, str(cfg.vqvae))
        if not speakers:
            speakers = [prompt_speaker if prompt_speaker in synth.speakers else synth.speakers[0]]
        rows = write_samples(
            synth, prior, prior_meta.get("speakers", []), out_dir, n=int(cfg.n),
            seconds=float(cfg.seconds), speakers=speakers, prompt_units=prompt_units,
            temperature=float(cfg.temperature), top_k=cfg.top_k, top_p=cfg.top_p,
            seed=int(cfg.seed))
    except (CheckpointError, AudioError, KeyError, ValueError) as err:
        raise StageError(str(err).strip('"')) from None
    units = {Path(r.clips[0].wav).stem: r.clips[0].units for r in rows}
    write_units(out_dir / "units.txt", units, format="gslm")
    if prompt_row is not None:
        rows.insert(0, prompt_row)
    settings = (f"{cfg.n} samples of {cfg.seconds} s, temperature {cfg.temperature}, "
                f"top_k {cfg.top_k}, top_p {cfg.top_p}, seed {cfg.seed}; "
                f"VQ-VAE {cfg.vqvae}; prior {cfg.prior_checkpoint}")
    index = write_report(out_dir, rows, "speechvq samples", synth.features or None, settings)
    if cfg.tensorboard:
        log_to_tensorboard(out_dir / "tb", rows, sample_rate=synth.sample_rate)
    print(f"wrote {cfg.n} samples of {cfg.seconds} s to {out_dir}; listen: {index}")


_entry = hydra_main("sample", run, aliases={"prior_checkpoint": "prior"})


def main() -> None:
    sys.argv = ["prior_checkpoint=" + a.removeprefix("prior=") if a.startswith("prior=") else a
                for a in sys.argv]
    _entry()


if __name__ == "__main__":
    main()
