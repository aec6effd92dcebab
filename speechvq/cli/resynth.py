"""speechvq-resynth: audio -> units -> audio, as the speaker (reconstruction) and as others
(voice conversion), with a listening page.

    speechvq-resynth checkpoint=EXP/checkpoints/best.pt data.manifest=M.tsv speaker=all n=4 \
        out_dir=OUT [ids=[utt1,utt2]] [seed=0]

Reconstruction decodes with the utterance's own speaker when the checkpoint knows it; ``speaker=``
(a name, a list or ``all``) adds one converted version per other speaker, decoded with that
speaker's embedding and statistics. Writes OUT/original/<id>.wav, OUT/reconstruction/<id>.wav,
OUT/converted/<speaker>/<id>.wav, OUT/index.html (+ img/) and OUT/tb/.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from speechvq.audio import AudioError
from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.data.manifest import read_manifest
from speechvq.report import log_to_tensorboard, write_report
from speechvq.runtime import resolve_device
from speechvq.synthesis import Synthesizer, resolve_speakers, write_resynthesis

log = logging.getLogger("speechvq.resynth")


def _choose(rows: list, cfg: DictConfig) -> list:
    """The utterances to resynthesise: ``ids`` if given, else a seeded choice of ``n``."""
    if cfg.ids is not None:
        wanted = [str(i) for i in cfg.ids]
        by_id = {r.id: r for r in rows}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise StageError(f"{cfg.data.manifest}: no utterance(s) {', '.join(missing)}")
        return [by_id[i] for i in wanted]
    if cfg.n is None or int(cfg.n) >= len(rows):
        return rows
    keep = np.random.default_rng(int(cfg.seed)).choice(len(rows), int(cfg.n), replace=False)
    return [rows[i] for i in sorted(keep)]


def run(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocoder = OmegaConf.to_container(cfg.vocoder, resolve=True)
    try:
        rows = _choose(read_manifest(cfg.data.manifest), cfg)
        synth = Synthesizer.from_checkpoint(cfg.checkpoint, vocoder, device=resolve_device(cfg.device))
        spec = OmegaConf.to_container(cfg.speaker) if OmegaConf.is_list(cfg.speaker) else cfg.speaker
        targets = resolve_speakers(spec, synth.speakers, str(cfg.checkpoint))
        page = write_resynthesis(synth, rows, out_dir, targets, seed=int(cfg.seed))
    except (CheckpointError, AudioError, KeyError, ValueError) as err:
        raise StageError(str(err).strip('"')) from None
    intro = (f"{len(rows)} utterance(s) from {cfg.data.manifest} through {cfg.checkpoint}: "
             f"original, reconstruction, and {len(targets)} target voice(s)")
    index = write_report(out_dir, page, "speechvq resynthesis", synth.features or None, intro)
    if cfg.tensorboard:
        log_to_tensorboard(out_dir / "tb", page, sample_rate=synth.sample_rate)
    print(f"resynthesised {len(rows)} utterance(s) into {out_dir}; listen: {index}")


main = hydra_main("resynth", run)

if __name__ == "__main__":
    main()
