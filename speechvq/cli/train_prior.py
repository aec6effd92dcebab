"""speechvq-train-prior: train the Transformer unit prior on a unit file with the shared fit loop.

    speechvq-train-prior units=UNITS.txt data.manifest=M.tsv out_dir=PRIOR [prior=tiny] \
        [valid_units=VALID.txt | valid_fraction=0.05] [trainer.max_steps=...]

Validation: ``valid_units=`` or a seeded held-out fraction of the utterances. At the end the
validation perplexity per unit of the best checkpoint is printed beside add-one smoothed unigram
and bigram baselines estimated on the same training split, and saved to PRIOR/perplexity.json.

Speaker tokens: each utterance's speaker comes from ``data.manifest`` (id -> speaker). The token
inventory is the speaker list of the VQ-VAE checkpoint (``vqvae=``, or the one named in the unit
file's sidecar ``FILE.json``) so that prior and decoder agree on names; without one it is the
manifest's sorted speakers. Utterances whose speaker is unknown or not in the inventory start with
BOS instead.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from speechvq.checkpoint import CheckpointError
from speechvq.cli._hydra import StageError, hydra_main
from speechvq.cli.train import claim
from speechvq.data.manifest import read_manifest
from speechvq.files import write_json
from speechvq.prior import load_prior, split_ids, unit_perplexity
from speechvq.runtime import is_main_process
from speechvq.tasks import PriorTask
from speechvq.training import TrainingError, fit
from speechvq.units import read_sidecar, read_units
from speechvq.vqvae import load_vqvae

log = logging.getLogger("speechvq.train_prior")


def _read(path: str) -> tuple[dict, dict]:
    try:
        sidecar = read_sidecar(path)
        return read_units(path, expand=True), sidecar.to_dict() if sidecar else {}
    except (FileNotFoundError, ValueError) as err:
        raise StageError(str(err)) from None


def _vqvae_meta(cfg: DictConfig, sidecar: dict) -> tuple[dict, str | None]:
    """(meta, path) of the VQ-VAE checkpoint behind the units, when one can be found."""
    path = cfg.vqvae or sidecar.get("checkpoint")
    if path is None:
        return {}, None
    if cfg.vqvae is None and not Path(path).is_file():
        log.info("the sidecar's checkpoint %s is not here; speaker list from the manifest", path)
        return {}, None
    try:
        _, meta = load_vqvae(path)
    except CheckpointError as err:
        raise StageError(str(err)) from None
    return meta.to_dict(), str(path)


def _speakers(cfg: DictConfig, vq_meta: dict,
              sidecars: list[dict]) -> tuple[dict[str, str], list[str]]:
    """(id -> speaker, token inventory). Speakers come from ``data.manifest``, else from the
    manifests the unit files were extracted from (their sidecars name them). With no speaker known
    for any utterance the inventory is empty: tokens never seen in training would otherwise be
    used at sampling time."""
    if not cfg.speaker_tokens:
        return {}, []
    manifests = ([cfg.data.manifest] if cfg.data.manifest is not None else
                 [m for m in (sc.get("manifest") for sc in sidecars) if m and Path(m).is_file()])
    speaker_of: dict[str, str] = {}
    for manifest in manifests:
        try:
            speaker_of.update({r.id: r.speaker for r in read_manifest(manifest)})
        except ValueError as err:
            raise StageError(str(err)) from None
    if not speaker_of:
        log.warning("no manifest gives the utterances' speakers (data.manifest=...): "
                    "the prior is trained without speaker tokens")
        return {}, []
    if cfg.data.manifest is None:
        log.info("speakers from the units' manifest(s): %s", ", ".join(map(str, manifests)))
    inventory = [str(s) for s in vq_meta.get("speakers", [])]
    if not inventory:
        inventory = sorted(set(speaker_of.values()))
    return speaker_of, inventory


def _n_codes(cfg: DictConfig, sidecar: dict, vq_meta: dict, units: dict) -> int:
    n_codes = cfg.n_codes or sidecar.get("n_codes") or vq_meta.get("n_codes")
    if n_codes is None:
        n_codes = 1 + max(int(u.max()) for u in units.values() if len(u))
        log.warning("codebook size unknown (no n_codes=, sidecar or VQ-VAE): using %d, the "
                    "largest unit + 1", n_codes)
    return int(n_codes)


def run(cfg: DictConfig) -> None:
    out_dir = Path(cfg.out_dir)
    units, sidecar = _read(cfg.units)
    sidecars = [sidecar]
    if cfg.valid_units is not None:
        valid, valid_sidecar = _read(cfg.valid_units)
        sidecars.append(valid_sidecar)
        train = units
        if overlap := set(train) & set(valid):
            log.warning("%d utterance(s) are in both %s and %s", len(overlap), cfg.units,
                        cfg.valid_units)
    else:
        try:
            train_ids, valid_ids = split_ids(list(units), float(cfg.valid_fraction), int(cfg.seed))
        except ValueError as err:
            raise StageError(f"{cfg.units}: {err}") from None
        train = {i: units[i] for i in train_ids}
        valid = {i: units[i] for i in valid_ids}
    vq_meta, vq_path = _vqvae_meta(cfg, sidecar)
    speaker_of, inventory = _speakers(cfg, vq_meta, sidecars)
    n_codes = _n_codes(cfg, sidecar, vq_meta, {**train, **valid})
    meta: dict[str, Any] = {
        "units": str(cfg.units), "valid_units": cfg.valid_units,
        "frame_rate": sidecar.get("frame_rate") or vq_meta.get("frame_rate"),
        "checkpoint_hash": sidecar.get("checkpoint_hash"), "vqvae": vq_path,
    }
    torch.manual_seed(int(cfg.seed))  # the prior's initial weights
    try:
        task = PriorTask(train, valid, speaker_of, inventory, cfg.prior, n_codes,
                         max_units=cfg.max_units, meta=meta, seed=int(cfg.seed))
    except ValueError as err:
        raise StageError(f"{cfg.units}: {err}") from None
    resume = cfg.resume if isinstance(cfg.resume, bool) else str(cfg.resume)
    try:
        result = fit(task, cfg.trainer, out_dir, resume=resume, seed=int(cfg.seed),
                     device=str(cfg.device), config=OmegaConf.to_container(cfg, resolve=True))
    except TrainingError as err:
        raise StageError(str(err)) from None
    if not is_main_process():
        return
    best = Path(result["best_path"])
    prior, _ = load_prior(best if best.exists() else result["last"])
    ppl = unit_perplexity(prior, task.valid_set)
    report = {"prior": ppl, "bigram": task.baselines["bigram"],
              "unigram": task.baselines["unigram"], "valid_units": task.baselines["units"],
              "valid_utterances": len(valid), "checkpoint": str(best), "step": result["step"],
              "smoothing": "add-one (Laplace) over the codebook; bigram start context"}
    write_json(out_dir / "perplexity.json", report)
    print(f"validation perplexity per unit ({task.baselines['units']} units, {len(valid)} "
          f"utterances; codebook {n_codes}, uniform = {n_codes}):")
    for name in ("prior", "bigram", "unigram"):
        print(f"  {name:<8} {report[name]:10.2f}   ({math.log2(report[name]):.2f} bits/unit)")


main = hydra_main("train_prior", run, claim=claim)

if __name__ == "__main__":
    main()
