"""Masked prediction of cluster targets (``model.loss_weights.mpred``, :mod:`speechvq.targets`):
targets fitted once per run and reloaded, both iterations (MFCC, a checkpoint's latents), the loss
only on hidden frames, a short real training run."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speechvq.audio import load_audio
from speechvq.baseline import MfccUnitsFeatures
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.targets import TARGETS_FILE, build_targets
from speechvq.tasks import VQVAETask
from speechvq.training import fit

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MINI = REPO / "egs" / "mini" / "corpus" / "train"
TINY = ["model.encoder.channels=16", "model.encoder.out_channels=8", "model.decoder.channels=16",
        "model.decoder.speaker_dim=8", "quantizer.n_codes=16", "quantizer.kmeans_iters=2",
        "data.crop_seconds=0.64", "model.loss_weights.mpred=1.0", "model.targets.n_clusters=8",
        "model.targets.max_train_frames=300", "data.augment.mask=0.4"]


def _rows(per_speaker: int = 2) -> list[ManifestRow]:
    rows = []
    for spk_dir in sorted(MINI.iterdir())[:2]:
        for path in sorted(spk_dir.rglob("*.flac"))[:per_speaker]:
            rows.append(ManifestRow(path.stem, str(path), sf.info(path).frames, spk_dir.name))
    return rows


def _cfg(manifest: Path, *more: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["out_dir=unused", f"data.manifest={manifest}", *TINY,
                                          *more])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("targets")
    write_manifest(folder / "train.tsv", _rows())
    return folder


def test_batched_mfcc_matches_one_by_one(features_cfg):
    mfcc = MfccUnitsFeatures(features_cfg, 50.0, 13, "mean")
    wavs = torch.stack([load_audio(r.path)[:16000] for r in _rows(1)])
    batched = mfcc.batch(wavs)
    assert batched.shape == (2, 50, 39)
    for b in range(2):
        np.testing.assert_allclose(batched[b].numpy(), mfcc(wavs[b]), rtol=1e-4, atol=1e-4)
    stacked = MfccUnitsFeatures(features_cfg, 50.0, 13, "stack")
    np.testing.assert_allclose(stacked.batch(wavs)[1].numpy(), stacked(wavs[1]), rtol=1e-4,
                               atol=1e-4)


def test_mfcc_targets_are_fitted_once_per_run_and_label_crops(corpus, tmp_path):
    cfg = _cfg(corpus / "train.tsv")
    task = VQVAETask(cfg, out_dir=tmp_path, progress=False)
    assert (tmp_path / TARGETS_FILE).is_file() and task.targets.n_clusters == 8
    batch = task.collate([task.train_set[i] for i in range(4)])
    labels = task.targets(batch)
    assert labels.shape == batch["mask"].shape and 0 <= labels.min() and labels.max() < 8
    assert len(torch.unique(labels)) > 1
    # the same crop labelled from its own MFCCs, one by one, with the saved clusters
    with np.load(tmp_path / TARGETS_FILE) as saved:
        feats = MfccUnitsFeatures(task.features, 50.0, 13, "mean")(batch["wav"][0])
        z = (feats - saved["mean"]) / saved["std"]
        nearest = ((z[:, None] - saved["centroids"][None]) ** 2).sum(-1).argmin(1)
    assert (nearest == labels[0].numpy()).mean() > 0.95  # (float ties aside)
    again = VQVAETask(cfg, out_dir=tmp_path, progress=False)  # a resumed run: the same clusters
    assert torch.equal(again.targets.centroids, task.targets.centroids)
    wrong = copy.deepcopy(cfg)
    wrong["model"]["targets"]["n_clusters"] = 5
    with pytest.raises(ValueError, match="delete it to fit new ones"):
        VQVAETask(wrong, out_dir=tmp_path, progress=False)


def test_mpred_loss_is_on_hidden_frames_only(corpus, tmp_path):
    cfg = _cfg(corpus / "train.tsv")
    task = VQVAETask(cfg, out_dir=tmp_path, progress=False)
    model = task.model.train()
    batch = task.collate([task.train_set[i] for i in range(4)])
    batch["targets"] = task.targets(batch)
    z = torch.randn(4, 8, 32, requires_grad=True)
    hidden = torch.zeros(4, 64, dtype=torch.bool)
    hidden[:, 10:20] = True  # units 5..9 hidden whole
    loss = model._mpred(z, {**batch, "hidden": hidden}, torch.ones(4, 32, dtype=torch.bool))
    loss.backward()
    touched = z.grad.abs().sum(1) > 0
    assert touched[:, 5:10].all() and not touched[:, :5].any() and not touched[:, 10:].any()
    z.grad = None
    model._mpred(z, batch, torch.ones(4, 32, dtype=torch.bool)).backward()
    assert (z.grad.abs().sum(1) > 0).all()  # no masking: every valid frame
    with pytest.raises(KeyError, match="targets"):
        model._mpred(z, {}, torch.ones(4, 32, dtype=torch.bool))
    assert float(model.eval()._mpred(z, {}, torch.ones(4, 32, dtype=torch.bool))) == 0.0


def test_training_with_mfcc_then_checkpoint_targets(corpus, tmp_path, trainer_cfg):
    """Iteration 1 trains a few real steps with MFCC targets; iteration 2 labels crops with that
    model's encoder; the loss is logged and falls."""
    cfg = _cfg(corpus / "train.tsv")
    torch.manual_seed(0)
    first = tmp_path / "it1"
    task = VQVAETask(cfg, out_dir=first, progress=False)
    fit(task, trainer_cfg(max_steps=12, batch_size=4, log_every=4, lr=3e-3), first, seed=0,
        config=cfg)
    ckpt = first / "checkpoints" / "last.pt"
    assert ckpt.is_file()
    second = _cfg(corpus / "train.tsv", "model.targets.kind=checkpoint",
                  f"model.targets.checkpoint={ckpt}")
    task2 = VQVAETask(second, out_dir=tmp_path / "it2", progress=False)
    batch = task2.collate([task2.train_set[i] for i in range(4)])
    labels = task2.targets(batch)
    assert labels.shape == batch["mask"].shape and labels.max() < 8
    losses = []
    model = task2.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        o = task2.step(model, batch)
        opt.zero_grad()
        o["loss"].backward()
        opt.step()
        losses.append(float(o["mpred"].detach()))
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="needs model.targets.checkpoint"):
        build_targets({"kind": "checkpoint"}, [], task2.features, task2.front, 50.0, 320, 0)
