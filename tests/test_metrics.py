"""Unit metrics against values computed by hand on tiny cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from speechvq.data.alignments import Interval
from speechvq.metrics import (
    AbxItem,
    abx,
    abx_items,
    angular_distances,
    bitrate,
    codebook_stats,
    dtw_onehot,
    dtw_units,
    labelled_frames,
    purity_pnmi,
    unit_metrics,
)

# ------------------------------------------------------------------------------- purity / PNMI


def test_one_to_one_mapping_is_perfect():
    labels = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    units = np.array([7, 7, 3, 3, 9, 9, 9, 7])
    m = purity_pnmi(units, labels)
    assert m["phone_purity"] == pytest.approx(1.0)
    assert m["cluster_purity"] == pytest.approx(1.0)
    assert m["pnmi"] == pytest.approx(1.0)


def test_constant_unit_has_zero_pnmi():
    labels = np.array([0, 0, 0, 1, 2, 2])
    m = purity_pnmi(np.zeros(6, int), labels)
    assert m["pnmi"] == pytest.approx(0.0)
    assert m["phone_purity"] == pytest.approx(3 / 6)  # the one unit's most frequent phone
    assert m["cluster_purity"] == pytest.approx(1.0)  # every phone's best unit is the only one


def test_pnmi_and_purities_by_hand():
    # p(a,0) = 1/2, p(b,0) = 1/4, p(b,1) = 1/4
    m = purity_pnmi(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]))
    mutual = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    assert m["pnmi"] == pytest.approx(mutual / math.log(2))
    assert m["phone_purity"] == pytest.approx(0.75)
    assert m["cluster_purity"] == pytest.approx(0.75)
    # splitting a phone over several units keeps phone purity at 1 but lowers cluster purity
    m = purity_pnmi(np.array([0, 1, 2, 3]), np.array([0, 0, 1, 1]))
    assert m["phone_purity"] == pytest.approx(1.0)
    assert m["cluster_purity"] == pytest.approx(0.5)
    assert m["pnmi"] == pytest.approx(1.0)


def test_frames_are_labelled_at_their_centres_and_silence_is_dropped():
    ali = {"u": [Interval(0.0, 0.04, "sil"), Interval(0.04, 0.1, "a"), Interval(0.1, 0.13, "b")]}
    units = {"u": np.array([5, 5, 1, 1, 1, 2, 2, 2]), "other": np.array([1])}
    z, y, names = labelled_frames(units, ali, frame_rate=50)
    # centres .01 .03 | .05 .07 .09 | .11 | .13 (past the end: silence) .15
    assert z.tolist() == [1, 1, 1, 2]
    assert [names[i] for i in y] == ["a", "a", "a", "b"]
    z, y, names = labelled_frames(units, ali, frame_rate=50, include_silence=True)
    assert len(z) == 8 and names[y[0]] == "sil"


# ------------------------------------------------------------------------------- bitrate, usage


def test_bitrate_by_hand():
    # dedup: [1 2 1] and [3]: 4 symbols over (6 + 2) / 2 Hz = 4 s; H(1/2, 1/4, 1/4) = 1.5 bits
    units = {"a": np.array([1, 1, 2, 2, 2, 1]), "b": np.array([3, 3])}
    assert bitrate(units, frame_rate=2.0) == pytest.approx(1.5)


def test_codebook_usage_and_perplexity():
    stats = codebook_stats({"a": np.array([0, 0, 1, 1]), "b": np.array([2, 3, 2, 3])}, n_codes=8)
    assert stats["used"] == 4
    assert stats["usage"] == pytest.approx(0.5)
    assert stats["perplexity"] == pytest.approx(4.0)  # uniform over 4 units


# ------------------------------------------------------------------------------- DTW


@pytest.mark.parametrize(
    "x,y,expected",
    [
        ([1, 1, 2], [1, 2, 2], 0.0),  # a warp aligns them perfectly
        ([1, 2], [3], 0.5),  # every frame differs: angle pi/2 -> 0.5
        ([1], [1, 2], 0.25),  # cost 0.5 over a path of 2
        ([1, 2, 1], [1, 1], 0.5 / 3),  # libri-light's backtracking: path of 3 (diagonal first)
        ([4, 4, 4, 4], [4], 0.0),
    ],
)
def test_dtw_by_hand(x, y, expected):
    assert dtw_onehot([np.array(x)], [np.array(y)])[0] == pytest.approx(expected)


def test_dtw_batches_agree_with_single_pairs():
    rng = np.random.default_rng(0)
    xs = [rng.integers(0, 3, rng.integers(1, 9)) for _ in range(200)]
    ys = [rng.integers(0, 3, rng.integers(1, 9)) for _ in range(200)]
    batched = dtw_onehot(xs, ys, max_cells=500)
    single = np.array([dtw_onehot([x], [y])[0] for x, y in zip(xs, ys, strict=True)])
    assert np.array_equal(batched, single)


# ------------------------------------------------------------------------------- ABX


def _item(utt, phone, spk, ctx="sil+sil"):
    return AbxItem(utt, 0, 2, phone, ctx, spk)


def test_abx_by_hand():
    """Speaker s1 says a three times ([1 1], [2 2], [1 2]) and b once ([2 2]); s2 says a once.

    Within (a, b): 6 (A, X) ordered pairs; errors: X=[1 1]: A=[2 2] tie .5, A=[1 2] 0;
    X=[2 2]: 1, 1; X=[1 2]: .5, .5 -> 3.5 / 6. (b, a) has a single b: no triplet.
    Across (a, b) with X = s2's [1 1]: A=[1 1] 0, A=[2 2] tie .5, A=[1 2] 0 -> 1/6.
    """
    units = {"a1": np.array([1, 1]), "a2": np.array([2, 2]), "a3": np.array([1, 2]),
             "b1": np.array([2, 2]), "x1": np.array([1, 1])}
    items = [_item("a1", "a", "s1"), _item("a2", "a", "s1"), _item("a3", "a", "s1"),
             _item("b1", "b", "s1"), _item("x1", "a", "s2")]
    scores = abx(units, items)
    assert scores["abx_within"] == pytest.approx(3.5 / 6)
    assert scores["abx_across"] == pytest.approx(1 / 6)


def test_abx_perfect_and_chance():
    units = {f"{p}{i}": np.array([v, v, v]) for p, v in (("a", 1), ("b", 2)) for i in range(3)}
    items = [_item(u, u[0], "s1") for u in units] + [_item(u, u[0], "s2") for u in units]
    scores = abx(units, items)
    assert scores["abx_within"] == 0.0 and scores["abx_across"] == 0.0
    same = {u: np.array([0, 0, 0]) for u in units}  # one unit for everything: all ties
    scores = abx(same, items)
    assert scores["abx_within"] == 0.5 and scores["abx_across"] == 0.5


def test_abx_averages_contexts_then_speakers_then_pairs():
    # s1: context c1 gives error 0, context c2 gives 1 -> s1 mean 0.5; s2 (c1 only): 0
    # -> pair (a, b) = mean(0.5, 0) = 0.25, not the triplet mean 1/3
    units = {"a": np.array([1, 1]), "a'": np.array([1, 1]), "b": np.array([2, 2]),
             "p": np.array([1, 1]), "p'": np.array([2, 2]), "q": np.array([1, 1])}
    items = []
    for spk in ("s1", "s2"):
        items += [AbxItem("a", 0, 2, "a", "c1", spk), AbxItem("a'", 0, 2, "a", "c1", spk),
                  AbxItem("b", 0, 2, "b", "c1", spk)]
    items += [AbxItem("p", 0, 2, "a", "c2", "s1"), AbxItem("p'", 0, 2, "a", "c2", "s1"),
              AbxItem("q", 0, 2, "b", "c2", "s1")]
    scores = abx(units, items, modes=("within",))
    # c2: X=p: A=p' (.5) vs B=q (0) -> 1; X=p': A=p (.5) vs B=q (.5) -> .5; so c2 = 0.75
    assert scores["abx_within"] == pytest.approx(((0 + 0.75) / 2 + 0) / 2)


def test_abx_cells_are_capped_reproducibly():
    rng = np.random.default_rng(1)
    units = {f"u{i}": rng.integers(0, 3, 4) for i in range(60)}
    items = [AbxItem(f"u{i}", 0, 4, "ab"[i % 2], "c", f"s{i % 3}") for i in range(60)]
    capped = abx(units, items, max_per_cell=3, seed=5)
    assert capped == abx(units, items, max_per_cell=3, seed=5)
    assert capped != abx(units, items, max_per_cell=30)


# ------------------------------------------------------------------------------- code vectors

# 2-D code vectors: c0 = (1, 0), c1 = (1, 1), c2 = (0, 1); angles / pi: c0-c1 .25, c1-c2 .25,
# c0-c2 .5
CODES = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])


def test_angular_distances_by_hand():
    d = angular_distances(CODES)
    assert d == pytest.approx(np.array([[0, 0.25, 0.5], [0.25, 0, 0.25], [0.5, 0.25, 0]]))
    assert (np.diag(angular_distances(np.random.default_rng(0).normal(size=(9, 4)))) == 0).all()
    # a zero code is orthogonal to every other code; scale does not matter
    assert angular_distances(np.array([[0.0, 0.0], [3.0, 4.0]]))[0, 1] == pytest.approx(0.5)
    assert angular_distances(7 * CODES) == pytest.approx(angular_distances(CODES))
    # parallel codes are exactly at distance 0: their frames tie
    parallel = angular_distances(np.array([[1.0, 2.0], [3.0, 6.0], [0.3, 0.6]]))
    assert dtw_units([np.array([0, 1])], [np.array([2, 2])], parallel)[0] == 0.0


def test_dtw_over_code_vectors_by_hand():
    # frame distances, x = [c0 c1 c2] down, y = [c0 c2] across:  0  .5 / .25 .25 / .5 0
    # costs: 0 .5 / .25 .25 / .75 .25; backtracking from the end: diagonal (tie with up, diagonal
    # wins) to (1, 0), then up: path of 3 -> .25 / 3
    d = angular_distances(CODES)
    assert dtw_units([np.array([0, 1, 2])], [np.array([0, 2])], d)[0] == pytest.approx(1 / 12)
    assert dtw_units([np.array([0, 0])], [np.array([2, 2])], d)[0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="outside the distance table"):
        dtw_units([np.array([0, 3])], [np.array([0])], d)


def test_codevec_abx_by_hand():
    """s1 says a as [c0 c0] and [c1 c1], b as [c2 c2]; s2 says a as [c2 c1].

    Equal-length pairs of 2 frames take the diagonal: d = mean of the two frame angles.
    Within (a, b): X=[c0 c0]: d(A=[c1 c1]) .25 < d(B) .5 -> 0; X=[c1 c1]: d(A=[c0 c0]) .25 =
    d(B=[c2 c2]) .25 -> tie .5; error .5 / 2 = .25 (one-hot: all ties, .5).
    Across (a, b), X = s2's [c2 c1]: A=[c0 c0]: (.5 + .25) / 2 = .375 > d(B) = (0 + .25) / 2
    = .125 -> 1; A=[c1 c1]: (.25 + 0) / 2 = .125 = d(B) -> .5; error 1.5 / 2 = .75.
    """
    units = {"a1": np.array([0, 0]), "a2": np.array([1, 1]), "b1": np.array([2, 2]),
             "x1": np.array([2, 1])}
    items = [_item("a1", "a", "s1"), _item("a2", "a", "s1"), _item("b1", "b", "s1"),
             _item("x1", "a", "s2")]
    scores = abx(units, items, distances=angular_distances(CODES))
    assert scores["abx_within"] == 0.25
    assert scores["abx_across"] == 0.75
    assert abx(units, items)["abx_within"] == 0.5  # one-hot: every pair of items differs fully


def test_identity_embeddings_reproduce_onehot_abx_exactly():
    rng = np.random.default_rng(3)
    units = {f"u{i}": rng.integers(0, 6, rng.integers(1, 9)) for i in range(150)}
    items = [AbxItem(f"u{i}", 0, len(units[f"u{i}"]), "abc"[i % 3], f"c{i % 4}", f"s{i % 5}")
             for i in range(150)]
    onehot = abx(units, items, max_per_cell=4, max_x_speakers=2, seed=1)
    for emb in (np.eye(6), 2.5 * np.eye(6)):
        assert abx(units, items, max_per_cell=4, max_x_speakers=2, seed=1,
                   distances=angular_distances(emb)) == onehot
    xs = [units[f"u{i}"] for i in range(0, 150, 2)]
    ys = [units[f"u{i}"] for i in range(1, 150, 2)]
    assert np.array_equal(dtw_units(xs, ys, angular_distances(np.eye(6))), dtw_onehot(xs, ys))


def test_unit_metrics_adds_codevec_abx_beside_onehot():
    ali, units, speakers = {}, {}, {}
    for n in range(8):  # two speakers say "a" and "b" twice each, each token its own unit
        utt, phone = f"s{n % 2}_{n}", "ab"[(n // 2) % 2]
        ali[utt] = [Interval(0, 0.1, "sil"), Interval(0.1, 0.3, phone), Interval(0.3, 0.4, "sil")]
        units[utt] = np.array([0] * 5 + [1 + n] * 10 + [0] * 5)
        speakers[utt] = f"s{n % 2}"
    # units 1..8: the "a" tokens' code vectors point one way, the "b" tokens' another
    emb = np.array([[0.0, 0.0, 1.0]] + [[1.0, 0.1 * n, 0.0] if (n // 2) % 2 == 0
                                        else [0.1 * n, 1.0, 0.0] for n in range(8)])
    m = unit_metrics(units, ali, 50.0, speakers=speakers, embeddings=emb)
    assert m["abx_within"] == 0.5 and m["abx_across"] == 0.5  # one-hot: every token differs
    assert m["abx_within_codevec"] == 0.0 and m["abx_across_codevec"] == 0.0
    assert "abx_within_codevec" not in unit_metrics(units, ali, 50.0, speakers=speakers)


def test_abx_items_from_alignments():
    ali = {"u": [Interval(0.0, 0.1, "sil"), Interval(0.1, 0.2, "a"), Interval(0.2, 0.26, "b"),
                 Interval(0.26, 0.3, "SIL")],
           "no_speaker": [Interval(0.0, 0.1, "sil"), Interval(0.1, 0.2, "a"),
                          Interval(0.2, 0.3, "sil")]}
    items = abx_items(ali, 50.0, {"u": 15, "no_speaker": 15}, {"u": "s1"})
    # libri-light frames: ceil(50 * on - .5) .. floor(50 * off - .5), end excluded
    assert items == [AbxItem("u", 5, 9, "a", "sil+b", "s1"), AbxItem("u", 10, 12, "b", "a+sil", "s1")]


def test_unit_metrics_end_to_end_small():
    # two speakers say "a" and "b" (same context: silence) twice each; units map phones 1:1
    ali, units, speakers = {}, {}, {}
    for n in range(8):
        utt, phone = f"s{n % 2}_{n}", "ab"[(n // 2) % 2]
        ali[utt] = [Interval(0, 0.1, "sil"), Interval(0.1, 0.3, phone), Interval(0.3, 0.4, "sil")]
        units[utt] = np.array([0] * 5 + [1 if phone == "a" else 2] * 10 + [0] * 5)
        speakers[utt] = f"s{n % 2}"
    m = unit_metrics(units, ali, 50.0, n_codes=4, speakers=speakers)
    assert m["pnmi"] == pytest.approx(1.0) and m["phone_purity"] == pytest.approx(1.0)
    assert m["abx_within"] == 0.0 and m["abx_across"] == 0.0
    assert m["used"] == 3 and m["usage"] == pytest.approx(0.75)
    assert m["utterances"] == 8 and m["abx_items"] == 8
