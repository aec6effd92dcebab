"""How phonetic are the units: purities, PNMI, ABX, bitrate, codebook usage; prior perplexity.

Definitions (see ``reference.md``):

- frames are labelled with the aligned phone whose interval contains the frame's centre
  ``(i + 0.5) / frame_rate`` (:func:`speechvq.data.alignments.frame_labels`); silence frames are
  left out unless asked for;
- phone purity ``sum_z max_y p(y, z)``, cluster purity ``sum_y max_z p(y, z)``,
  PNMI ``I(y; z) / H(y)`` (HuBERT);
- ABX as libri-light computes it: items are aligned phones with a previous and a next phone
  (the context); an item's frames are libri-light's ``ceil(r * onset - 0.5)`` up to (excluding)
  ``floor(r * offset - 0.5)`` at frame rate ``r``; one-hot frames
  compared by their angle ``acos(cos) / pi`` (0 for equal units, 0.5 otherwise); DTW cost averaged
  over the path (libri-light's path-length rule); error ``P(d(A, X) > d(B, X)) + 0.5 P(=)`` for
  A, X of phone a and B of phone b in the same context; averaged over contexts, then speakers,
  then (a, b) pairs. Within-speaker: A, B, X from one speaker (A != X). Across: A, B from one
  speaker, X from another (up to ``max_x_speakers`` of them, like libri-light's ``max_x_across``);
  each (context, phone, speaker) cell is capped at ``max_per_cell`` items by a seeded sampler
  (libri-light's ``max_size_group``), which bounds the DTW work;
- bitrate (ZeroSpeech 2019): symbols per second times the entropy (bits) of the symbol
  distribution, on units deduplicated per utterance (a run of one unit is one symbol), over the
  utterances' total duration;
- codebook usage (distinct units used / codebook size) and perplexity ``exp(H)`` of the
  frame-level unit distribution.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from speechvq.data.alignments import SILENCE_LABELS, Interval, frame_labels

SILENCE = "sil"


def _is_silence(label: str, silence: Iterable[str]) -> bool:
    return label.lower() in {s.lower() for s in silence}


# --------------------------------------------------------------------------------------------
# frame-level: purity, PNMI, usage, bitrate


def labelled_frames(
    units: Mapping[str, np.ndarray],
    alignments: Mapping[str, Sequence[Interval]],
    frame_rate: float,
    include_silence: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Units and phone labels of every frame of the utterances in both dicts.

    Returns ``(units (N,), labels (N,) int indices into names, names)``; silence frames (labels in
    :data:`SILENCE_LABELS`, gaps, frames past the alignment) are dropped unless
    ``include_silence``.
    """
    all_units, all_labels = [], []
    names: dict[str, int] = {}
    for utt in units:
        if utt not in alignments:
            continue
        seq = np.asarray(units[utt])
        labels = frame_labels(alignments[utt], frame_rate, n_frames=len(seq), silence=SILENCE)
        keep = np.array([include_silence or lab != SILENCE for lab in labels], dtype=bool)
        ids = np.array([names.setdefault(lab, len(names)) for lab in labels], dtype=np.int64)
        all_units.append(seq[keep])
        all_labels.append(ids[keep] if len(ids) else ids)
    if not all_units:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    return np.concatenate(all_units).astype(np.int64), np.concatenate(all_labels), list(names)


def _entropy(p: np.ndarray, base: float = math.e) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(base))


def purity_pnmi(units: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Phone purity, cluster purity and PNMI of frame-aligned ``units (N,)`` and ``labels (N,)``.

    Returns ``{"phone_purity", "cluster_purity", "pnmi", "frames"}``. PNMI is 0 when the labels
    have no entropy (a single phone) and NaN when there are no frames.
    """
    units, labels = np.asarray(units), np.asarray(labels)
    if units.shape != labels.shape:
        raise ValueError(f"units {units.shape} and labels {labels.shape} differ")
    if units.size == 0:
        nan = float("nan")
        return {"phone_purity": nan, "cluster_purity": nan, "pnmi": nan, "frames": 0}
    _, z = np.unique(units, return_inverse=True)
    _, y = np.unique(labels, return_inverse=True)
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0)
    joint /= joint.sum()
    p_y, p_z = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(p_y, p_z)[nz])).sum())
    h_y = _entropy(p_y)
    return {
        "phone_purity": float(joint.max(axis=0).sum()),
        "cluster_purity": float(joint.max(axis=1).sum()),
        "pnmi": max(0.0, mutual / h_y) if h_y > 0 else 0.0,
        "frames": int(units.size),
    }


def codebook_stats(units: Mapping[str, np.ndarray], n_codes: int | None = None) -> dict[str, float]:
    """Frame-level codebook use: ``{"used", "usage" (used / n_codes), "perplexity" (exp H)}``."""
    seqs = [np.asarray(s) for s in units.values() if len(s)]
    if not seqs:
        return {"used": 0, "usage": 0.0, "perplexity": float("nan")}
    _, counts = np.unique(np.concatenate(seqs), return_counts=True)
    used = int(len(counts))
    return {
        "used": used,
        "usage": used / n_codes if n_codes else float("nan"),
        "perplexity": math.exp(_entropy(counts / counts.sum())),
    }


def bitrate(units: Mapping[str, np.ndarray], frame_rate: float) -> float:
    """ZeroSpeech 2019 bitrate in bits/s: ``N / D * H`` over deduplicated units.

    ``N``: symbols after collapsing runs within each utterance; ``D``: total duration in seconds
    (frames / ``frame_rate``); ``H``: entropy in bits of the deduplicated symbol distribution.
    """
    symbols, frames = [], 0
    for seq in units.values():
        seq = np.asarray(seq)
        frames += len(seq)
        if len(seq):
            symbols.append(seq[np.r_[True, seq[1:] != seq[:-1]]])
    if not frames:
        return float("nan")
    allsym = np.concatenate(symbols)
    _, counts = np.unique(allsym, return_counts=True)
    entropy_bits = _entropy(counts / counts.sum(), base=2.0)
    return len(allsym) / (frames / frame_rate) * entropy_bits


def prior_perplexity(total_nll: float, n_tokens: int) -> float:
    """Perplexity ``exp(total negative log-likelihood (nats) / tokens)`` of a unit prior."""
    return math.exp(total_nll / n_tokens) if n_tokens else float("nan")


# --------------------------------------------------------------------------------------------
# DTW over one-hot unit sequences


def dtw_onehot(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], max_cells: int = 1 << 22) -> np.ndarray:
    """libri-light's path-normalised DTW between unit sequences ``xs[k]`` and ``ys[k]``: ``(K,)``.

    Frames are one-hot vectors, so the angular frame distance ``acos(cos) / pi`` is 0 where the
    units are equal and 0.5 elsewhere. The DTW cost (steps: down, right, diagonal) is divided by
    the length of the path found by libri-light's backtracking (diagonal preferred, then left).
    Vectorised over pairs: each row of the cost matrix is one min-plus prefix scan.
    """
    k = len(xs)
    out = np.zeros(k, dtype=np.float64)
    if k == 0:
        return out
    nx = np.array([len(x) for x in xs])
    ny = np.array([len(y) for y in ys])
    if (nx == 0).any() or (ny == 0).any():
        raise ValueError("DTW needs non-empty sequences")
    order = np.lexsort((ny, nx))
    start = 0
    while start < k:
        n_max, m_max = nx[order[start]], ny[order[start]]
        stop = start
        # grow the batch while the padded cost tensor stays small
        while stop < k:
            n2, m2 = max(n_max, nx[order[stop]]), max(m_max, ny[order[stop]])
            if stop > start and (stop - start + 1) * n2 * m2 > max_cells:
                break
            n_max, m_max, stop = n2, m2, stop + 1
        idx = order[start:stop]
        out[idx] = _dtw_batch([xs[i] for i in idx], [ys[i] for i in idx], n_max, m_max)
        start = stop
    return out


def _dtw_batch(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], n: int, m: int) -> np.ndarray:
    b = len(xs)
    x = np.full((b, n), -1, dtype=np.int64)
    y = np.full((b, m), -2, dtype=np.int64)
    for i, (u, v) in enumerate(zip(xs, ys, strict=True)):
        x[i, : len(u)], y[i, : len(v)] = u, v
    # mismatch counts: distance 0.5 per mismatch is applied at the end (exact integers here)
    d = (x[:, :, None] != y[:, None, :]).astype(np.int64)
    cost = np.empty_like(d)
    cost[:, 0] = np.cumsum(d[:, 0], axis=1)
    big = np.iinfo(np.int64).max // 4
    for i in range(1, n):
        prev = cost[:, i - 1]
        best_prev = prev.copy()  # min(up, diagonal); column 0 only has "up"
        best_prev[:, 1:] = np.minimum(prev[:, 1:], prev[:, :-1])
        # cost[i, j] = d[i, j] + min(best_prev[j], cost[i, j-1])
        #            = S[j] + min_{k<=j} (best_prev[k] - S[k-1]),  S = prefix sums of d[i]
        s = np.cumsum(d[:, i], axis=1)
        s_before = np.concatenate([np.zeros((b, 1), np.int64), s[:, :-1]], axis=1)
        cost[:, i] = s + np.minimum.accumulate(np.minimum(best_prev - s_before, big), axis=1)
    lx = np.array([len(u) for u in xs])
    ly = np.array([len(v) for v in ys])
    rows = np.arange(b)
    final = cost[rows, lx - 1, ly - 1]
    i, j = lx - 1, ly - 1
    path = np.ones(b, dtype=np.int64)
    active = (i > 0) & (j > 0)
    while active.any():
        r = rows[active]
        ia, ja = i[active], j[active]
        up, left, diag = cost[r, ia - 1, ja], cost[r, ia, ja - 1], cost[r, ia - 1, ja - 1]
        go_diag = (diag <= left) & (diag <= up)
        go_left = ~go_diag & (left <= up)
        go_up = ~go_diag & ~go_left
        i[active] = ia - (go_diag | go_up)
        j[active] = ja - (go_diag | go_left)
        path[active] += 1
        active = (i > 0) & (j > 0)
    path += i + j  # the rest of the path runs along the first row or column
    return 0.5 * final / path


# --------------------------------------------------------------------------------------------
# ABX


@dataclass(frozen=True)
class AbxItem:
    """One phone occurrence: frames ``[start, stop)`` of utterance ``utt``."""

    utt: str
    start: int
    stop: int
    phone: str
    context: str
    speaker: str


def abx_items(
    alignments: Mapping[str, Sequence[Interval]],
    frame_rate: float,
    n_frames: Mapping[str, int],
    speakers: Mapping[str, str],
    silence: Iterable[str] = SILENCE_LABELS,
) -> list[AbxItem]:
    """ABX items: every non-silence phone with a phone (or silence) on each side.

    Context is ``prev+next`` (silence labels and gaps read as ``sil``). Frames are libri-light's:
    ``ceil(r * onset - 0.5)`` up to, excluding, ``floor(r * offset - 0.5)`` (``r`` the frame
    rate; frame ``i`` is centred at ``(i + 0.5) / r``); phones left with no frame are skipped.
    Only utterances in ``n_frames`` (their unit count) and ``speakers`` are used.
    """
    silence = {s.lower() for s in silence}
    items = []
    for utt, ivs in alignments.items():
        if utt not in n_frames or utt not in speakers:
            continue
        ivs = sorted(ivs, key=lambda iv: iv.start)
        labels = [SILENCE if iv.label.lower() in silence else iv.label for iv in ivs]
        for k in range(1, len(ivs) - 1):
            if labels[k] == SILENCE:
                continue
            gap_before = ivs[k].start - ivs[k - 1].end > 1e-6
            gap_after = ivs[k + 1].start - ivs[k].end > 1e-6
            prev = SILENCE if gap_before else labels[k - 1]
            nxt = SILENCE if gap_after else labels[k + 1]
            start = max(0, math.ceil(frame_rate * ivs[k].start - 0.5 - 1e-9))
            stop = min(n_frames[utt], math.floor(frame_rate * ivs[k].end - 0.5 + 1e-9))
            if start >= n_frames[utt] or stop <= start:
                continue
            items.append(AbxItem(utt, start, stop, labels[k], f"{prev}+{nxt}", speakers[utt]))
    return items


def _abx_error(d_ax: np.ndarray, d_bx: np.ndarray, exclude_diagonal: bool) -> float:
    """Error over triplets from ``d_ax (Na, Nx)`` and ``d_bx (Nb, Nx)``: P(d_ax > d_bx) + P(=)/2.

    ``exclude_diagonal``: A and X come from the same items (within-speaker), A != X.
    """
    a = d_ax[:, None, :]  # (Na, 1, Nx)
    b = d_bx[None, :, :]  # (1, Nb, Nx)
    worse = (a > b).astype(np.float64) + 0.5 * (a == b)
    if exclude_diagonal:
        n = d_ax.shape[0]
        valid = ~np.eye(n, dtype=bool)[:, None, :]  # (Na, 1, Nx=Na)
        return float((worse * valid).sum() / (n * (n - 1) * d_bx.shape[0]))
    return float(worse.mean())


def abx(
    units: Mapping[str, np.ndarray],
    items: Sequence[AbxItem],
    max_per_cell: int = 10,
    max_x_speakers: int = 5,
    seed: int = 0,
    modes: Sequence[str] = ("within", "across"),
) -> dict[str, float]:
    """Within- and across-speaker ABX error (fractions in [0, 1]; NaN when no triplet exists).

    ``units``: frame-level units by utterance; ``items``: from :func:`abx_items`. Each
    (context, phone, speaker) cell keeps at most ``max_per_cell`` items and each A/B pair at most
    ``max_x_speakers`` X speakers (across), both drawn by a generator seeded with ``seed``.
    Returns ``{"abx_within", "abx_across", "abx_items"}`` for the modes asked.
    """
    rng = np.random.default_rng(seed)
    cells: dict[tuple[str, str, str], list[int]] = {}
    for n, it in enumerate(items):
        cells.setdefault((it.context, it.phone, it.speaker), []).append(n)
    for key in sorted(cells):
        if len(cells[key]) > max_per_cell:
            cells[key] = sorted(rng.choice(cells[key], size=max_per_cell, replace=False).tolist())
    by_context: dict[tuple[str, str], dict[str, list[int]]] = {}  # (context, speaker) -> phones
    speakers_of: dict[tuple[str, str], list[str]] = {}  # (context, phone) -> speakers
    for (ctx, phone, spk), members in sorted(cells.items()):
        by_context.setdefault((ctx, spk), {})[phone] = members
        speakers_of.setdefault((ctx, phone), []).append(spk)

    # every needed (X item, other item) distance, computed in one vectorised pass
    jobs: list[tuple] = []  # (mode, speaker, a, b, context, x cell, a cell, b cell)
    for (ctx, spk), phones in sorted(by_context.items()):
        for a, cell_a in sorted(phones.items()):
            for b, cell_b in sorted(phones.items()):
                if a == b:
                    continue
                if "within" in modes and len(cell_a) > 1:
                    jobs.append(("within", spk, a, b, ctx, cell_a, cell_a, cell_b))
                if "across" in modes:
                    others = [s for s in speakers_of[(ctx, a)] if s != spk]
                    if len(others) > max_x_speakers:
                        others = sorted(rng.choice(others, size=max_x_speakers, replace=False))
                    for x_spk in others:
                        cell_x = cells[(ctx, a, x_spk)]
                        jobs.append(("across", spk, a, b, f"{ctx}|{x_spk}", cell_x, cell_a, cell_b))
    # DTW is not exactly symmetric (backtracking breaks ties left before up), so pairs are keyed
    # in libri-light's order: X first, except within-speaker A-X pairs, which it computes once
    # with the earlier item first and mirrors.
    def key(x: int, other: int, symmetric: bool) -> tuple[int, int]:
        return (min(x, other), max(x, other)) if symmetric else (x, other)

    pairs: set[tuple[int, int]] = set()
    for mode, *_, cell_x, cell_a, cell_b in jobs:
        pairs.update(key(x, a, mode == "within") for x in cell_x for a in cell_a if x != a)
        pairs.update((x, b) for x in cell_x for b in cell_b)
    ordered = sorted(pairs)
    seqs = [np.asarray(units[it.utt][it.start : it.stop]) for it in items]
    dist = dtw_onehot([seqs[x] for x, _ in ordered], [seqs[o] for _, o in ordered])
    lookup = dict(zip(ordered, dist.tolist(), strict=True))

    def table(others: list[int], cell_x: list[int], symmetric: bool) -> np.ndarray:
        """(len(others), len(cell_x)) distances; the within diagonal (A == X) is masked later."""
        return np.array(
            [[lookup.get(key(x, o, symmetric), 0.0) for x in cell_x] for o in others]
        )

    scores: dict[str, dict[tuple[str, str, str], list[float]]] = {m: {} for m in modes}
    for mode, spk, a, b, _ctx, cell_x, cell_a, cell_b in jobs:
        within = mode == "within"
        err = _abx_error(table(cell_a, cell_x, within), table(cell_b, cell_x, False), within)
        scores[mode].setdefault((spk, a, b), []).append(err)
    result: dict[str, float] = {"abx_items": len(items)}
    for mode in modes:
        per_pair: dict[tuple[str, str], list[float]] = {}
        for (_spk, a, b), errs in scores[mode].items():  # mean over contexts (and X speakers)
            per_pair.setdefault((a, b), []).append(float(np.mean(errs)))
        pair_means = [float(np.mean(v)) for v in per_pair.values()]  # mean over speakers
        result[f"abx_{mode}"] = float(np.mean(pair_means)) if pair_means else float("nan")
    return result


# --------------------------------------------------------------------------------------------
# everything at once


def unit_metrics(
    units: Mapping[str, np.ndarray],
    alignments: Mapping[str, Sequence[Interval]],
    frame_rate: float,
    n_codes: int | None = None,
    speakers: Mapping[str, str] | None = None,
    include_silence: bool = False,
    silence: Iterable[str] = SILENCE_LABELS,
    abx_max_per_cell: int = 10,
    abx_max_x_speakers: int = 5,
    abx_seed: int = 0,
    abx_modes: Sequence[str] = ("within", "across"),
) -> dict[str, float]:
    """All metrics for frame-level ``units`` of the utterances that have ``alignments``.

    ``speakers`` (utterance -> speaker) enables ABX; without it ABX is left out.
    """
    evaluated = {u: np.asarray(s) for u, s in units.items() if u in alignments}
    z, y, _ = labelled_frames(evaluated, alignments, frame_rate, include_silence)
    out: dict[str, float] = {"utterances": len(evaluated)}
    out.update(purity_pnmi(z, y))
    out.update(codebook_stats(evaluated, n_codes))
    out["bitrate"] = bitrate(evaluated, frame_rate)
    if speakers is not None and abx_modes:
        items = abx_items(
            alignments,
            frame_rate,
            {u: len(s) for u, s in evaluated.items()},
            {u: speakers[u] for u in evaluated if u in speakers},
            silence,
        )
        out.update(abx(evaluated, items, abx_max_per_cell, abx_max_x_speakers, abx_seed, abx_modes))
    return out
