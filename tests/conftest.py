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
  (:class:`speechvq.checkpoint.VQVAEMeta`, the project's own checkpoint writer);
- ``command_stubs(folder, *names, env=None)``: logging stand-ins for commands (recipes' tests).
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


@pytest.fixture
def mel_model_cfg() -> tuple[Any, dict]:
    """``(model config, quantizer config)`` of the default mel model (``conf/model/mel.yaml``,
    ``conf/quantizer/ema.yaml``) for 80 mels at 16 kHz, ready for ``build_vqvae``."""
    model_cfg = OmegaConf.load(CONF / "model" / "mel.yaml")
    model_cfg.sample_rate, model_cfg.mel_hop = 16000, 160
    model_cfg.encoder.in_channels = model_cfg.decoder.out_channels = 80
    model_cfg.decoder.in_channels = model_cfg.encoder.out_channels
    quantizer = {**OmegaConf.to_container(OmegaConf.load(CONF / "quantizer" / "ema.yaml")),
                 "dim": model_cfg.encoder.out_channels}
    return model_cfg, quantizer


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


# ------------------------------------------------------------ synthesis and prior test fixtures

SPEAKERS = ("alice", "bob")
TINY_PRIOR = dict(block_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)


@pytest.fixture(scope="session")
def tiny_vqvae(tiny_vqvae_cfg, save_vqvae) -> Callable[..., Path]:
    """``tiny_vqvae(path, speakers=("alice", "bob"), n_codes=32, pitch=False)``: a randomly
    initialised mel VQ-VAE (codebook spread so encoding uses several codes, speech-like statistics
    per speaker; ``pitch``: with the F0 condition) saved as a checkpoint; returns ``path``."""
    from speechvq.features import Moments
    from speechvq.vqvae import build_vqvae

    def make(path: Path, speakers: Sequence[str] = SPEAKERS, n_codes: int = 32,
             pitch: bool = False) -> Path:
        cfg = tiny_vqvae_cfg("mel", n_codes=n_codes)
        cfg["model"]["pitch"]["enabled"] = pitch
        torch.manual_seed(0)
        model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=len(speakers))
        with torch.no_grad():
            model.quantizer.codebook.normal_()
        n_mels = cfg["features"]["n_mels"]
        level = torch.linspace(-3.0, -9.0, n_mels)  # a speech-like spectral tilt, in log power
        stats = FeatureStats(cfg["features"], Moments(level, torch.full((n_mels,), 1.5), 1000), {
            s: Moments(level + i, torch.full((n_mels,), 1.0 + i), 500)
            for i, s in enumerate(speakers)})
        return save_vqvae(path, model, cfg, speakers, stats)

    return make


@pytest.fixture(scope="session")
def tiny_prior() -> Callable[..., Path]:
    """``tiny_prior(path, n_codes=32, speakers=("alice", "bob"))``: an untrained prior checkpoint."""
    from speechvq.prior import build_prior, prior_model_config

    def make(path: Path, n_codes: int = 32, speakers: Sequence[str] = SPEAKERS) -> Path:
        torch.manual_seed(1)
        prior = build_prior(TINY_PRIOR, n_codes, len(speakers))
        save_checkpoint(path, {
            "kind": "prior", "model_config": prior_model_config(prior),
            "meta": {"speakers": list(speakers), "n_codes": n_codes},
            "model": prior.state_dict(), "step": 0,
        })
        return path

    return make


@pytest.fixture(scope="session")
def tone_corpus() -> Callable[..., Path]:
    """``tone_corpus(folder, n=4, seconds=1.0)``: harmonic tones + noise, alternating speakers
    alice and bob, as WAVs and ``folder/manifest.tsv``; returns the manifest."""
    import numpy as np

    from speechvq.audio import save_audio
    from speechvq.data.manifest import ManifestRow, write_manifest

    def make(folder: Path, n: int = 4, seconds: float = 1.0) -> Path:
        rows = []
        rng = np.random.default_rng(0)
        t = np.arange(int(16000 * seconds)) / 16000
        for i in range(n):
            f0 = 100 + 40 * i
            wav = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.1
            wav = (wav + 0.01 * rng.standard_normal(t.size)).astype(np.float32)
            path = folder / "audio" / f"utt{i}.wav"
            save_audio(path, wav, 16000)
            rows.append(ManifestRow(f"utt{i}", str(path), t.size, SPEAKERS[i % 2]))
        write_manifest(folder / "manifest.tsv", rows)
        return folder / "manifest.tsv"

    return make


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., Any]:
    """``run_cli(args, cwd)``: a console script in a subprocess (one thread); it must succeed."""
    import subprocess

    def run(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    return run


@pytest.fixture(scope="session")
def command_stubs() -> Callable[..., tuple[dict[str, str], Path]]:
    """``make(folder, *names, env=None) -> (env, log)``: executables ``names`` in ``folder`` that
    append one line per call (the name and its arguments) to ``log``; ``env`` (default
    ``os.environ``) with ``folder`` and this Python's bin first on PATH."""
    import sys

    def make(folder: Path, *names: str, env: dict[str, str] | None = None
             ) -> tuple[dict[str, str], Path]:
        folder.mkdir(parents=True, exist_ok=True)
        log = folder / "calls.log"
        for name in names:
            stub = folder / name
            stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "{log}"\n')
            stub.chmod(0o755)
        env = dict(os.environ if env is None else env)
        env["PATH"] = os.pathsep.join([str(folder), str(Path(sys.executable).parent),
                                       env.get("PATH", "")])
        return env, log

    return make
