"""speechvq.features: the log-mel front-end conventions, its single home, and normalisation stats."""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speechvq.cli._hydra import conf_dir
from speechvq.data.manifest import ManifestRow
from speechvq.features import (
    FRONTEND_VERSION,
    STD_FLOOR,
    Z_MAX,
    FeatureStats,
    FrontEnd,
    LogMel,
    Moments,
    build_logmel,
    compute_stats,
)

REPO = Path(__file__).resolve().parents[1]


def _features_cfg() -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("prepare", overrides=["out_dir=unused"])
    return OmegaConf.to_container(cfg.features, resolve=True)


@pytest.fixture(scope="module")
def features_cfg() -> dict:
    return _features_cfg()


def test_logmel_is_built_from_the_yaml_and_only_there(features_cfg):
    yaml_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/features/logmel.yaml"))
    assert yaml_cfg == features_cfg
    # every LogMel parameter is set in the yaml, and the yaml sets nothing LogMel ignores
    params = [p for p in inspect.signature(LogMel.__init__).parameters if p != "self"]
    assert sorted(params) == sorted(set(yaml_cfg) - {"normalize", "level", "dynamic_range_db"})
    logmel = build_logmel(features_cfg)
    for key in params:
        assert getattr(logmel, key) == yaml_cfg[key], key
    mel = logmel.mel
    assert (mel.n_fft, mel.win_length, mel.hop_length, mel.power) == (
        yaml_cfg["n_fft"],
        yaml_cfg["win_length"],
        yaml_cfg["hop_length"],
        yaml_cfg["power"],
    )
    assert mel.mel_scale.n_mels == yaml_cfg["n_mels"] and mel.mel_scale.f_min == yaml_cfg["f_min"]
    assert logmel.frame_rate == yaml_cfg["sample_rate"] / yaml_cfg["hop_length"]


def test_no_second_mel_front_end_in_the_library():
    """Mel parameters live in conf/features/logmel.yaml; nothing else may build a mel front-end."""
    offenders = []
    for path in sorted((REPO / "speechvq").rglob("*.py")):
        if path.relative_to(REPO).as_posix() in ("speechvq/features.py", "speechvq/nn/logmel.py"):
            continue  # the front-end and the spectrogram it builds (build_logmel)
        text = path.read_text()
        if re.search(r"\bMelSpectrogram\b|(?<!Inverse)\bMelScale\(|\bmelscale_fbanks\(", text):
            offenders.append(f"{path.relative_to(REPO)}: builds its own mel spectrogram")
        for call in re.findall(r"\bLogMel\(([^)]*)\)", text):
            if call.strip() and not call.strip().startswith("**"):
                offenders.append(f"{path.relative_to(REPO)}: LogMel({call}) spells out parameters")
    assert not offenders, "\n".join(offenders)


def test_build_logmel_needs_every_key(features_cfg):
    cfg = dict(features_cfg)
    del cfg["hop_length"]
    with pytest.raises(ValueError, match="hop_length"):
        build_logmel(cfg)


def test_frame_count_and_shapes(features_cfg):
    logmel = build_logmel(features_cfg)
    hop, n_mels = features_cfg["hop_length"], features_cfg["n_mels"]
    for t in (hop, 16000, 16000 + hop - 1, 12345):
        assert logmel(torch.randn(t)).shape == (n_mels, t // hop) == (n_mels, logmel.num_frames(t))
    assert logmel(torch.randn(3, 4800)).shape == (3, n_mels, 4800 // hop)
    assert logmel(torch.randn(hop - 1)).shape == (n_mels, 0)
    batch = torch.randn(2, 3200)
    assert torch.allclose(logmel(batch)[1], logmel(batch[1]), atol=1e-5)


def test_frame_k_is_centred_at_k_plus_half_hop(features_cfg):
    hop = features_cfg["hop_length"]
    # without pre-emphasis (which smears a click one sample to the right) exactly symmetric
    for cfg in (features_cfg, {**features_cfg, "preemphasis": 0.0}):
        logmel = build_logmel(cfg)
        for k in (5, 37, 60):
            wav = torch.zeros(100 * hop)
            wav[int((k + 0.5) * hop)] = 1.0  # a click exactly at frame k's centre
            energy = logmel(wav).exp().sum(dim=0)
            assert int(energy.argmax()) == k
            if not cfg["preemphasis"]:
                assert torch.isclose(energy[k - 1], energy[k + 1], rtol=1e-3)


def test_log_floor(features_cfg):
    feats = build_logmel(features_cfg)(torch.zeros(1600))
    assert torch.allclose(feats, torch.full_like(feats, np.log(features_cfg["log_floor"])))


def _stats(n_mels=4) -> FeatureStats:
    g = Moments(torch.zeros(n_mels), torch.ones(n_mels), 10)
    a = Moments(torch.full((n_mels,), 2.0), torch.full((n_mels,), 0.5), 5)
    b = Moments(torch.full((n_mels,), -1.0), torch.full((n_mels,), 3.0), 5)
    return FeatureStats({"n_mels": n_mels}, g, {"a": a, "b": b})


def test_normalize_modes_and_inverse(caplog):
    stats = _stats()
    x = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) + 1
    torch.testing.assert_close(stats.normalize(x, "a", "speaker"), (x - 2.0) / 0.5)
    # far-out values are clamped: a normalised value never exceeds Z_MAX in magnitude
    assert stats.normalize(x + 100, "a", "speaker").max() == Z_MAX
    torch.testing.assert_close(stats.normalize(x, "a", "global"), x)
    torch.testing.assert_close(stats.normalize(x, "a", "none"), x)
    u = stats.normalize(3 * x, "a", "utterance")  # spread above STD_FLOOR
    torch.testing.assert_close(u.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(u.std(-1, unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    for mode in ("speaker", "global", "none"):
        back = stats.denormalize(stats.normalize(x, "b", mode), "b", mode)
        torch.testing.assert_close(back, x)
    batch = torch.stack([x, x])
    y = stats.normalize(batch, ["a", "b"], "speaker")
    torch.testing.assert_close(y[0], (x - 2.0) / 0.5)
    torch.testing.assert_close(y[1], (x + 1.0) / 3.0)
    torch.testing.assert_close(stats.denormalize(y, ["a", "b"], "speaker"), batch)
    with caplog.at_level(logging.WARNING):
        torch.testing.assert_close(stats.normalize(x, "stranger", "speaker"), x)
    assert "stranger" in caplog.text
    with pytest.raises(ValueError, match="mode"):
        stats.normalize(x, "a", "bogus")


def test_stats_save_load_and_config_check(tmp_path, features_cfg):
    stats = _stats()
    stats.features = dict(features_cfg)
    stats.save(tmp_path / "stats.json")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
    loaded = FeatureStats.load(tmp_path / "stats.json")
    assert loaded.to_dict() == stats.to_dict()
    loaded.check_features({**features_cfg, "normalize": "global"})  # normalize is not compared
    with pytest.raises(ValueError, match=r"stats.json.*n_mels"):
        loaded.check_features({**features_cfg, "n_mels": 40})
    (tmp_path / "bad.json").write_text('{"global": 1}')
    with pytest.raises(ValueError, match="bad.json"):
        FeatureStats.load(tmp_path / "bad.json")


def test_compute_stats_per_speaker_and_skips_bad_files(tmp_path, features_cfg, caplog):
    rng = np.random.default_rng(0)
    rows = []
    for spk, amp in (("loud", 0.5), ("quiet", 0.01)):
        for i in range(2):
            path = tmp_path / f"{spk}{i}.wav"
            sf.write(path, (amp * rng.standard_normal(4000)).astype(np.float32), 16000, "FLOAT")
            rows.append(ManifestRow(f"{spk}{i}", str(path), 4000, spk))
    (tmp_path / "broken.wav").write_bytes(b"RIFF garbage")
    rows.append(ManifestRow("broken", str(tmp_path / "broken.wav"), 4000, "loud"))
    with caplog.at_level(logging.WARNING):
        stats = compute_stats(rows, features_cfg, progress=False)
    assert "broken.wav" in caplog.text
    assert sorted(stats.speakers) == ["loud", "quiet"]
    assert stats.global_.frames == 4 * 4000 // features_cfg["hop_length"]
    front = FrontEnd(features_cfg, analysis_only=True)  # statistics of the model's own input
    loud = torch.cat(
        [front.features_of(torch.from_numpy(sf.read(r.path, dtype="float32")[0]))
         for r in rows[:2]], 1
    )
    torch.testing.assert_close(stats.speakers["loud"].mean, loud.mean(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        stats.speakers["loud"].std, loud.std(1, unbiased=False).clamp_min(STD_FLOOR), atol=1e-3,
        rtol=1e-3,
    )
    # white noise at -34 dB relative to the loud speaker: the same features at any level
    diff = stats.speakers["loud"].mean - stats.speakers["quiet"].mean
    assert diff.abs().max() < 0.6
    absolute = compute_stats(rows[:4], {**features_cfg, "level": "absolute"}, progress=False)
    assert (absolute.speakers["loud"].mean > absolute.speakers["quiet"].mean + 3).all()
    assert stats.features == features_cfg


def test_statistics_of_another_front_end_version_are_refused(features_cfg):
    stats = _stats()
    d = stats.to_dict()
    assert d["frontend_version"] == FRONTEND_VERSION
    old = FeatureStats.from_dict({k: v for k, v in d.items() if k != "frontend_version"},
                                 path="old/stats.json")
    with pytest.raises(ValueError, match="old/stats.json: made by front-end version 1.*re-run"):
        old.check_features(features_cfg)
