"""Project-wide test settings and the fixtures several test files share.

Tests run tiny models on a 2-core machine: one torch thread per process avoids the oversubscription
that makes small convolutions ~100x slower when the cores are busy, and keeps CI times steady.
Subprocesses started by tests get OMP_NUM_THREADS=1 for the same reason.

Shared fixtures (factories where a test needs variants):

- ``features_cfg``: ``conf/features/logmel.yaml`` as a plain dict;
- ``trainer_cfg(**overrides)``: ``conf/trainer/default.yaml`` with overrides;
- ``compose_cfg(name, overrides)``: a primary config composed as its entry point composes it;
- ``tiny_vqvae_cfg(kind, n_codes, ...)``: the ``features``/``model``/``quantizer`` groups of
  ``conf/`` shrunk to a model that builds and runs in milliseconds;
- ``save_vqvae(path, model, cfg, speakers, stats)``: a VQ-VAE checkpoint in the contract's format
  (:class:`speechvq.checkpoint.VQVAEMeta`, the project's own checkpoint writer).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from speechvq.checkpoint import VQVAEMeta, save_checkpoint
from speechvq.cli._hydra import conf_dir
from speechvq.features import FeatureStats

os.environ.setdefault("OMP_NUM_THREADS", "1")

CONF = conf_dir()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def features_cfg() -> dict:
    """The log-mel front-end config of ``conf/features/logmel.yaml``."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "features" / "logmel.yaml"))


@pytest.fixture(scope="session")
def trainer_cfg() -> Callable[..., dict]:
    """``trainer_cfg(**overrides)``: ``conf/trainer/default.yaml`` with ``overrides``."""

    def make(**overrides: Any) -> dict:
        cfg = OmegaConf.to_container(OmegaConf.load(CONF / "trainer" / "default.yaml"))
        cfg.update(overrides)
        return cfg

    return make


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., Any]:
    """``compose_cfg(name, overrides, plain=False)``: ``conf/<name>.yaml`` composed by hydra."""
    from hydra import compose, initialize_config_dir

    def make(name: str, overrides: Sequence[str] = (), plain: bool = False) -> Any:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(name, overrides=list(overrides))
        return OmegaConf.to_container(cfg, resolve=True) if plain else cfg

    return make


@pytest.fixture(scope="session")
def tiny_vqvae_cfg() -> Callable[..., dict]:
    """``tiny_vqvae_cfg(kind="mel", n_codes=32, channels=16, dim=8)``: the features, model and
    quantizer groups of ``conf/`` (resolved, plain) for a tiny model of that kind."""

    def make(kind: str = "mel", n_codes: int = 32, channels: int = 16, dim: int = 8) -> dict:
        cfg = OmegaConf.create({
            "features": OmegaConf.load(CONF / "features" / "logmel.yaml"),
            "model": OmegaConf.load(CONF / "model" / f"{kind}.yaml"),
            "quantizer": OmegaConf.load(CONF / "quantizer" / "ema.yaml"),
        })
        if kind == "mel":
            cfg.model.encoder.channels = cfg.model.decoder.channels = channels
        else:
            wave_channels = max(1, channels // 4)
            cfg.model.encoder.channels = [wave_channels] * len(cfg.model.encoder.channels)
            cfg.model.decoder.channels = [wave_channels] * len(cfg.model.decoder.channels)
        cfg.model.encoder.out_channels = cfg.model.decoder.speaker_dim = dim
        cfg.quantizer.n_codes = n_codes
        return OmegaConf.to_container(cfg, resolve=True)

    return make


@pytest.fixture(scope="session")
def save_vqvae() -> Callable[..., Path]:
    """``save_vqvae(path, model, cfg, speakers, stats=None)``: ``model`` (built from ``cfg``, a
    :func:`tiny_vqvae_cfg` dict) saved as speechvq-train saves a checkpoint; returns ``path``."""

    def save(path: Path, model: torch.nn.Module, cfg: dict, speakers: Sequence[str],
             stats: FeatureStats | None = None) -> Path:
        meta = VQVAEMeta(kind=model.kind, speakers=list(speakers), features=cfg["features"],
                         stats=stats.to_dict() if stats is not None else None,
                         sample_rate=int(model.sample_rate), unit_rate=float(model.unit_rate),
                         n_codes=int(model.n_codes), samples_per_unit=int(model.samples_per_unit))
        save_checkpoint(path, {
            "kind": "vqvae",
            "model_config": {"model": cfg["model"], "quantizer": cfg["quantizer"],
                             "n_speakers": len(speakers)},
            "meta": meta.to_dict(),
            "model": model.state_dict(),
            "step": 0,
        })
        return path

    return save
