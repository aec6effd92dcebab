"""The measuring parts of the benchmark scripts (``benchmarks/``): the references they place
speechvq among must compute what their docstrings say."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.data.manifest import read_manifest
from speechvq.synthesis import Synthesizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_resynth import MelKmeans  # noqa: E402
from bench_unit_references import (  # noqa: E402
    duration_penalised,
    speaker_normalised,
    stack_context,
)


def _brute_force(dist: np.ndarray, penalty: float) -> float:
    best = np.inf
    for path in itertools.product(range(dist.shape[1]), repeat=dist.shape[0]):
        cost = dist[np.arange(len(path)), path].sum() + penalty * np.sum(np.diff(path) != 0)
        best = min(best, cost)
    return best


@pytest.mark.parametrize("penalty", [0.0, 0.3, 1.0, 5.0])
def test_duration_penalised_is_the_exact_minimum(penalty):
    rng = np.random.default_rng(int(penalty * 10))
    for _ in range(5):
        dist = rng.random((6, 3))
        path = duration_penalised(torch.from_numpy(dist), penalty)
        cost = dist[np.arange(6), path].sum() + penalty * np.sum(np.diff(path) != 0)
        assert cost == pytest.approx(_brute_force(dist, penalty))
    if penalty == 0.0:
        np.testing.assert_array_equal(path, dist.argmin(1))


def test_duration_penalised_hand_case():
    # frame costs favour 0, 1, 0; one switch back and forth costs 2 x penalty
    dist = torch.tensor([[0.0, 1.0], [0.5, 0.0], [0.0, 1.0]])
    assert duration_penalised(dist, 0.2).tolist() == [0, 1, 0]  # 0.4 < 0.5
    assert duration_penalised(dist, 0.3).tolist() == [0, 0, 0]  # 0.6 > 0.5
    assert duration_penalised(torch.zeros(0, 4), 1.0).shape == (0,)


def test_stack_context_repeats_edges():
    x = {"a": np.arange(4, dtype=np.float32)[:, None]}
    out = stack_context(x, 1)["a"]
    np.testing.assert_array_equal(out, [[0, 0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 3]])
    assert stack_context(x, 0) is x


def test_speaker_normalised_uses_train_statistics():
    rng = np.random.default_rng(0)
    feats = {"a1": rng.normal(5, 2, (50, 3)), "a2": rng.normal(5, 2, (40, 3)),
             "b1": rng.normal(-3, 1, (30, 3))}
    speakers = {"a1": "a", "a2": "a", "b1": "b"}
    out = speaker_normalised(feats, speakers, train_ids={"a1"})
    np.testing.assert_allclose(out["a1"].mean(0), 0, atol=1e-6)  # a's train statistics
    np.testing.assert_allclose(out["a1"].std(0), 1, atol=1e-3)
    mu, sd = feats["a1"].mean(0), feats["a1"].std(0) + 1e-5
    np.testing.assert_allclose(out["a2"], (feats["a2"] - mu) / sd)  # not its own
    np.testing.assert_allclose(out["b1"].mean(0), 0, atol=1e-6)  # b has no train utterance


def test_bench_resynth_mel_kmeans_reference(tmp_path, tiny_vqvae, tone_corpus):
    """The benchmark's k-means reference: spans of `stride` frames, each replaced by its nearest
    centroid (the spans themselves as centroids give the mels back; one centroid, near their mean,
    replaces every span; more centroids fit closer)."""
    synth = Synthesizer.from_checkpoint(tiny_vqvae(tmp_path / "m.pt"))
    stride = synth.samples_per_unit // synth.front.logmel.hop_length
    rows = read_manifest(tone_corpus(tmp_path / "c", n=1, seconds=0.5))
    mels = synth.front(torch.from_numpy(sf.read(rows[0].path, dtype="float32")[0]),
                       rows[0].speaker)
    mels = mels[:, : mels.shape[1] // stride * stride]
    n_spans = mels.shape[1] // stride
    exact = MelKmeans(n_spans, stride)
    exact.centroids = exact.spans(mels)[::-1].copy()
    assert exact.centroids.shape == (n_spans, stride * synth.front.n_mels)
    torch.testing.assert_close(exact.quantize(mels), mels, atol=1e-5, rtol=0)
    one = MelKmeans(1, stride).fit(synth, rows[:1]).quantize(mels)
    mean = mels.reshape(mels.shape[0], n_spans, stride).mean(1)  # (n_mels, stride)
    torch.testing.assert_close(one, one[:, :stride].repeat(1, n_spans))
    torch.testing.assert_close(one[:, :stride], mean, atol=0.25, rtol=0)  # mini-batch k-means
    eight = MelKmeans(8, stride).fit(synth, rows[:1]).quantize(mels)
    assert ((eight - mels) ** 2).mean() < 0.8 * ((one - mels) ** 2).mean()
    with pytest.raises(RuntimeError, match="fit"):
        MelKmeans(4, stride).quantize(mels)
