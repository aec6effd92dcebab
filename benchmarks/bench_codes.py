"""Nearest-code search: the quantizer's ``nearest_codes`` against the old path and faiss.

    python benchmarks/bench_codes.py [--threads 2] [--frames 50000] [--dim 64] \\
        [--codes 512 2048] [--repeats 7] [--block-rows R]

For each codebook size K, times (min over ``--repeats`` rounds; the methods take turns inside
each round, so load from other processes hits them alike):

- ``old``: ``sq_distances(x, codebook).argmin(1)`` (the full (N, K) distance matrix);
- ``gemm``: ``x @ codebook.T`` alone, the matrix product every method has to do;
- ``nearest_codes``: what training, extraction and k-means use now;
- ``faiss``: ``IndexFlatL2.search(x, 1)`` when ``import faiss`` works (``pip install
  speechvq[faiss]``; an optional extra, not a dependency), index built outside the timing.

``x`` is N(0, 1) frames, the codebook K random frames of x plus a little noise (as k-means
initialisation would place it). Torch runs on ``--threads`` threads (``torch.set_num_threads``),
faiss on as many (``faiss.omp_set_num_threads``). Besides times and ratios it reports how many
indices differ from the old path and from faiss, and how many of those differences are real
near-ties (the two codes' fp64 distances within ``--tie-rtol`` relative).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from speechvq.nn.quantizer import nearest_codes, sq_distances  # noqa: E402

try:
    import faiss
except ImportError:  # optional extra
    faiss = None


def timed(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def near_ties(
    x: torch.Tensor, codebook: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rtol: float
) -> tuple[int, int]:
    """(rows where a != b, of which near-ties): codes a and b (N,) at fp64 distances within rtol."""
    rows = (a != b).nonzero().squeeze(1)
    if rows.numel() == 0:
        return 0, 0
    xs, cb = x[rows].double(), codebook.double()
    da = (xs - cb[a[rows]]).pow(2).sum(1)
    db = (xs - cb[b[rows]]).pow(2).sum(1)
    tie = (da - db).abs() <= rtol * torch.maximum(da, db).clamp(min=1e-30)
    return int(rows.numel()), int(tie.sum())


def bench(n_codes: int, args: argparse.Namespace) -> dict[str, object]:
    gen = torch.Generator().manual_seed(n_codes)
    x = torch.randn(args.frames, args.dim, generator=gen)
    pick = torch.randperm(args.frames, generator=gen)[:n_codes]
    codebook = x[pick] + 0.1 * torch.randn(n_codes, args.dim, generator=gen)

    methods: dict[str, Callable[[], torch.Tensor]] = {
        "old": lambda: sq_distances(x, codebook).argmin(1),
        "gemm": lambda: x @ codebook.t(),
        "nearest_codes": lambda: nearest_codes(x, codebook, block_rows=args.block_rows),
    }
    if faiss is not None:
        index = faiss.IndexFlatL2(args.dim)
        index.add(codebook.numpy())
        x_np = x.numpy()
        methods["faiss"] = lambda: torch.from_numpy(index.search(x_np, 1)[1][:, 0]).long()

    best = dict.fromkeys(methods, float("inf"))
    results: dict[str, object] = {}
    for name, fn in methods.items():  # warm-up (allocations, thread pools)
        results[name] = fn()
    for r in range(args.repeats):
        order = list(methods) if r % 2 == 0 else list(reversed(methods))
        for name in order:
            best[name] = min(best[name], timed(methods[name]))

    new, old = results["nearest_codes"], results["old"]
    row: dict[str, object] = {"K": n_codes, **best}
    row["vs_old"] = near_ties(x, codebook, new, old, args.tie_rtol)
    if "faiss" in results:
        row["vs_faiss"] = near_ties(x, codebook, new, results["faiss"], args.tie_rtol)
    return row


def ratio(value: float, reference: float | None) -> float | None:
    return value / reference if reference else None


def cell(value: float | None, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--frames", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--codes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--tie-rtol", type=float, default=1e-5)
    ap.add_argument("--block-rows", type=int, default=None,
                    help="nearest_codes' rows per block (default: its own choice for K)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    print(f"N={args.frames} D={args.dim} threads={args.threads} torch {torch.__version__}, "
          f"faiss {faiss.__version__ if faiss is not None else 'not installed'}; "
          f"min of {args.repeats} interleaved rounds")

    head = f"{'K':>5} {'old':>8} {'gemm':>8} {'nearest':>8} {'faiss':>8} {'new/faiss':>9} "
    head += f"{'old/faiss':>9} {'new/old':>7}  differing rows (near-ties): vs old, vs faiss"
    print(head)
    for k in args.codes:
        row = bench(k, args)
        ms = {m: 1e3 * row[m] for m in ("old", "gemm", "nearest_codes", "faiss") if m in row}
        faiss_ms = ms.get("faiss")
        diff_old = "{} ({})".format(*row["vs_old"])
        diff_faiss = "{} ({})".format(*row["vs_faiss"]) if "vs_faiss" in row else "-"
        print(f"{k:>5} {ms['old']:8.1f} {ms['gemm']:8.1f} {ms['nearest_codes']:8.1f} "
              f"{cell(faiss_ms, 8, 1)} {cell(ratio(ms['nearest_codes'], faiss_ms), 9, 2)} "
              f"{cell(ratio(ms['old'], faiss_ms), 9, 2)} {ms['nearest_codes'] / ms['old']:7.2f}"
              f"  {diff_old}, {diff_faiss}")
    print("times in ms")


if __name__ == "__main__":
    main()
