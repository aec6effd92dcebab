"""speechvq-prepare: turn a corpus into manifests, a list of rejected files and feature statistics.

    speechvq-prepare data=folder data.root=DIR out_dir=OUT [data.split.by=utterance]
    speechvq-prepare data=mini out_dir=OUT
    speechvq-prepare data=librispeech ... out_dir=OUT

Writes OUT/manifest.tsv, OUT/{train,valid,test}.tsv (when split), OUT/rejected.tsv
(``path<TAB>reason``), OUT/stats.json, OUT/frontend_state.npz (each utterance's front-end state)
and, for corpora with alignments, OUT/alignments/; every
corpus ends the same way (:func:`speechvq.data.prepare.finish`).
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from speechvq.cli._hydra import StageError, call, hydra_main
from speechvq.data import librispeech
from speechvq.data.folder import prepare_folder
from speechvq.data.synth import prepare_mini

log = logging.getLogger("speechvq.prepare")

CORPORA = {"folder": prepare_folder, "mini": prepare_mini, "librispeech": librispeech.prepare}


def run(cfg: DictConfig) -> int:
    """Prepare the corpus ``data.name``; returns the exit status (0: done, rejected files
    included)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    features = OmegaConf.to_container(cfg.features, resolve=True)
    prepare = CORPORA.get(data.get("name"))
    if prepare is None:
        raise StageError(f"unknown data.name {data.get('name')!r}: use data=folder, data=mini or "
                         "data=librispeech")
    options = {"stats": bool(cfg.stats), "workers": int(cfg.num_workers),
               "progress": bool(cfg.progress),
               "state_unit": int(cfg.state_unit_frames) if cfg.frontend_state else None}
    # user errors: a bad folder or subset, a failed checksum, an unsafe archive
    call(partial(prepare, **options), data, Path(cfg.out_dir), features, errors=(ValueError,))
    return 0


def _main(cfg: DictConfig) -> int:
    # Work is spread over files (num_workers threads); torch's own intra-op threads on these short
    # clips only contend with them (several times slower on a busy machine).
    torch.set_num_threads(1)
    return run(cfg)


main = hydra_main("prepare", _main)

if __name__ == "__main__":
    main()
