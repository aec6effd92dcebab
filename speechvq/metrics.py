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
- code-vector ABX (ZeroSpeech 2019): the same, with each frame its unit's embedding (a VQ-VAE's
  code vector, a k-means centroid) and the angle between those vectors; one-hot frames are the
  identity embedding. The K x K angles are computed once (:func:`angular_distances`);
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
# DTW over unit sequences: one-hot frames, or frames embedded as code vectors

DISTANCE_BITS = 32  # angular distances are rounded to multiples of 2**-32 (see dtw_units)


def angular_distances(embeddings: np.ndarray, chunk_bytes: int = 1 << 25) -> np.ndarray:
    """Angle ``acos(cos_sim) / pi`` between every two rows of ``embeddings (K, D)``: ``(K, K)``.

    Values lie in [0, 1]. Computed as ``2 atan2(|u - v|, |u + v|)`` of the unit-norm rows (Kahan),
    which unlike ``acos`` stays exact near 0: parallel rows are at distance 0, so they tie, and
    the diagonal is exactly 0 (as in one-hot). A zero row (e.g. a never-trained code) is at 0.5
    from every non-zero row. Works in row blocks of about ``chunk_bytes``.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2 or not emb.size:
        raise ValueError(f"embeddings must be a non-empty (K, D) table, got shape {emb.shape}")
    if not np.isfinite(emb).all():
        raise ValueError("embeddings hold NaN or infinite values")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    unit = emb / np.maximum(norms, np.finfo(np.float64).tiny)
    k, d = unit.shape
    out = np.empty((k, k), dtype=np.float64)
    step = max(1, chunk_bytes // (8 * k * d))
    for s in range(0, k, step):
        block = unit[s : s + step, None, :]
        out[s : s + step] = np.arctan2(
            np.linalg.norm(block - unit[None], axis=-1), np.linalg.norm(block + unit[None], axis=-1)
        )
    out *= 2.0 / math.pi
    np.fill_diagonal(out, 0.0)
    return out


def dtw_onehot(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], max_cells: int = 1 << 22) -> np.ndarray:
    """:func:`dtw_units` with one-hot frames (distance 0 for equal units, 0.5 otherwise): ``(P,)``."""
    return dtw_units(xs, ys, None, max_cells)


def dtw_units(
    xs: Sequence[np.ndarray],
    ys: Sequence[np.ndarray],
    distances: np.ndarray | None = None,
    max_cells: int = 1 << 22,
) -> np.ndarray:
    """libri-light's path-normalised DTW between unit sequences ``xs[p]`` and ``ys[p]``: ``(P,)``.

    ``distances (K, K)``: frame distance between units ``i`` and ``j`` (e.g.
    :func:`angular_distances` of the code vectors), looked up per frame pair; ``None``: one-hot
    frames, whose angular distance is 0 where the units are equal and 0.5 elsewhere. The DTW cost
    (steps: down, right, diagonal) is divided by the length of the path found by libri-light's
    backtracking (diagonal preferred, then left). Costs are summed as exact integers (a table is
    rounded to multiples of ``2**-DISTANCE_BITS``), so equal costs tie exactly whatever the
    summation order. Vectorised over pairs: each row of the cost matrix is one min-plus scan.
    """
    if distances is None:
        table, scale = None, 0.5  # one-hot: mismatch counts, 0.5 each
    else:
        distances = np.asarray(distances, dtype=np.float64)
        if distances.ndim != 2 or distances.shape[0] != distances.shape[1]:
            raise ValueError(f"distances must be a (K, K) table, got shape {distances.shape}")
        table = np.rint(distances * 2.0**DISTANCE_BITS).astype(np.int64)
        scale = 2.0**-DISTANCE_BITS
    k = len(xs)
    out = np.zeros(k, dtype=np.float64)
    if k == 0:
        return out
    nx = np.array([len(x) for x in xs])
    ny = np.array([len(y) for y in ys])
    if (nx == 0).any() or (ny == 0).any():
        raise ValueError("DTW needs non-empty sequences")
    if table is not None:
        _check_ids([*xs, *ys], len(table))
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
        final, path = _dtw_batch([xs[i] for i in idx], [ys[i] for i in idx], n_max, m_max, table)
        out[idx] = scale * final / path
        start = stop
    return out


def _check_ids(seqs: Sequence[np.ndarray], n_units: int) -> None:
    lo = min(int(np.min(s)) for s in seqs)
    hi = max(int(np.max(s)) for s in seqs)
    if lo < 0 or hi >= n_units:
        bad = lo if lo < 0 else hi
        raise ValueError(f"unit {bad} is outside the distance table of {n_units} units")


def _dtw_batch(
    xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], n: int, m: int, table: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer DTW costs ``(B,)`` and path lengths ``(B,)`` of a batch padded to ``(n, m)``.

    ``table (K, K)`` int64: frame costs by unit pair; ``None``: one-hot mismatch counts. Padding
    sits after the real frames, so it never reaches the cost of a real cell.
    """
    b = len(xs)
    x = np.zeros((b, n), dtype=np.int64)
    y = np.zeros((b, m), dtype=np.int64)
    for i, (u, v) in enumerate(zip(xs, ys, strict=True)):
        x[i, : len(u)], y[i, : len(v)] = u, v
    if table is None:
        d = (x[:, :, None] != y[:, None, :]).astype(np.int64)
    else:
        d = table[x[:, :, None], y[:, None, :]]
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
    return final, _path_lengths(cost, lx - 1, ly - 1)


def _path_lengths(cost: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Length of libri-light's backtracked path from ``(i, j)`` in ``cost (B, n, m)``: ``(B,)``."""
    rows = np.arange(len(cost))
    path = np.ones(len(cost), dtype=np.int64)
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
    return path + i + j  # the rest of the path runs along the first row or column


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


Cells = dict[tuple[str, str, str], list[int]]  # (context, phone, speaker) -> item indices
Job = tuple[str, str, str, str, list[int], list[int], list[int]]  # mode, spk, a, b, X, A, B


def _abx_cells(items: Sequence[AbxItem], max_per_cell: int, rng: np.random.Generator) -> Cells:
    """Items grouped by (context, phone, speaker), each cell capped at ``max_per_cell``."""
    cells: Cells = {}
    for n, it in enumerate(items):
        cells.setdefault((it.context, it.phone, it.speaker), []).append(n)
    for key in sorted(cells):
        if len(cells[key]) > max_per_cell:
            cells[key] = sorted(rng.choice(cells[key], size=max_per_cell, replace=False).tolist())
    return cells


def _abx_jobs(
    cells: Cells, modes: Sequence[str], max_x_speakers: int, rng: np.random.Generator
) -> list[Job]:
    """Every (mode, speaker, a, b, X cell, A cell, B cell) to score, in a reproducible order."""
    by_context: dict[tuple[str, str], dict[str, list[int]]] = {}  # (context, speaker) -> phones
    speakers_of: dict[tuple[str, str], list[str]] = {}  # (context, phone) -> speakers
    for (ctx, phone, spk), members in sorted(cells.items()):
        by_context.setdefault((ctx, spk), {})[phone] = members
        speakers_of.setdefault((ctx, phone), []).append(spk)
    jobs: list[Job] = []
    for (ctx, spk), phones in sorted(by_context.items()):
        for a, cell_a in sorted(phones.items()):
            for b, cell_b in sorted(phones.items()):
                if a == b:
                    continue
                if "within" in modes and len(cell_a) > 1:
                    jobs.append(("within", spk, a, b, cell_a, cell_a, cell_b))
                if "across" in modes:
                    others = [s for s in speakers_of[(ctx, a)] if s != spk]
                    if len(others) > max_x_speakers:
                        others = sorted(rng.choice(others, size=max_x_speakers, replace=False))
                    for x_spk in others:
                        jobs.append(("across", spk, a, b, cells[(ctx, a, x_spk)], cell_a, cell_b))
    return jobs


def _pair_key(x: int, other: int, symmetric: bool) -> tuple[int, int]:
    """DTW is not exactly symmetric (backtracking breaks ties left before up), so pairs are keyed
    in libri-light's order: X first, except within-speaker A-X pairs, which it computes once with
    the earlier item first and mirrors (``symmetric``)."""
    return (min(x, other), max(x, other)) if symmetric else (x, other)


def _abx_distances(
    units: Mapping[str, np.ndarray],
    items: Sequence[AbxItem],
    jobs: Sequence[Job],
    distances: np.ndarray | None,
) -> dict[tuple[int, int], float]:
    """DTW distance of every item pair the jobs need (keyed by :func:`_pair_key`), in one pass."""
    pairs: set[tuple[int, int]] = set()
    for mode, *_, cell_x, cell_a, cell_b in jobs:
        pairs.update(_pair_key(x, a, mode == "within") for x in cell_x for a in cell_a if x != a)
        pairs.update((x, b) for x in cell_x for b in cell_b)
    ordered = sorted(pairs)
    seqs = [np.asarray(units[it.utt][it.start : it.stop]) for it in items]
    dist = dtw_units([seqs[x] for x, _ in ordered], [seqs[o] for _, o in ordered], distances)
    return dict(zip(ordered, dist.tolist(), strict=True))


def abx(
    units: Mapping[str, np.ndarray],
    items: Sequence[AbxItem],
    max_per_cell: int = 10,
    max_x_speakers: int = 5,
    seed: int = 0,
    modes: Sequence[str] = ("within", "across"),
    distances: np.ndarray | None = None,
) -> dict[str, float]:
    """Within- and across-speaker ABX error (fractions in [0, 1]; NaN when no triplet exists).

    ``units``: frame-level units by utterance; ``items``: from :func:`abx_items`. Each
    (context, phone, speaker) cell keeps at most ``max_per_cell`` items and each A/B pair at most
    ``max_x_speakers`` X speakers (across), both drawn by a generator seeded with ``seed``.
    ``distances (K, K)``: frame distance between units, e.g. :func:`angular_distances` of their
    embeddings (ZeroSpeech 2019's code-vector ABX); ``None``: one-hot frames. The same ``seed``
    draws the same triplets whatever the distances.
    Returns ``{"abx_within", "abx_across", "abx_items"}`` for the modes asked.
    """
    rng = np.random.default_rng(seed)
    jobs = _abx_jobs(_abx_cells(items, max_per_cell, rng), modes, max_x_speakers, rng)
    lookup = _abx_distances(units, items, jobs, distances)

    def table(others: list[int], cell_x: list[int], symmetric: bool) -> np.ndarray:
        """(len(others), len(cell_x)) distances; the within diagonal (A == X) is masked later."""
        return np.array(
            [[lookup.get(_pair_key(x, o, symmetric), 0.0) for x in cell_x] for o in others]
        )

    scores: dict[str, dict[tuple[str, str, str], list[float]]] = {m: {} for m in modes}
    for mode, spk, a, b, cell_x, cell_a, cell_b in jobs:
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
    embeddings: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics for frame-level ``units`` of the utterances that have ``alignments``.

    ``speakers`` (utterance -> speaker) enables ABX; without it ABX is left out. ``embeddings``
    ``(K, D)`` (unit ``i``'s code vector or centroid is row ``i``) adds ZeroSpeech 2019's ABX over
    those vectors (angular distance, same triplets) as ``abx_within_codevec`` /
    ``abx_across_codevec`` beside the one-hot ``abx_within`` / ``abx_across``.
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
        sampling = (abx_max_per_cell, abx_max_x_speakers, abx_seed, abx_modes)
        out.update(abx(evaluated, items, *sampling))
        if embeddings is not None:
            codevec = abx(evaluated, items, *sampling, distances=angular_distances(embeddings))
            out.update({f"abx_{mode}_codevec": codevec[f"abx_{mode}"] for mode in abx_modes})
    return out
