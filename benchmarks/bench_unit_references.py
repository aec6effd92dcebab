"""Where speechvq's units stand among references on a labelled corpus: k-means over features anyone
can compute, over the model's own encoder, the same units made piecewise constant, and a frame
classifier trained on the phones.

    python benchmarks/bench_unit_references.py --work /tmp/bench_units/realdev \
        --checkpoint /tmp/bench_units/realdev/exp/checkpoints/best.pt
    python benchmarks/bench_unit_references.py --work /tmp/bench_units/realdev \
        --extra-train /tmp/bigreal/wav --checkpoint /tmp/bench_units/realdev/exp_bigreal/checkpoints/best.pt

``--work`` is a folder ``bench_units.py`` prepared (``data/`` with ``train.tsv``, ``test.tsv``,
``manifest.tsv`` and ``alignments/``). Every unsupervised reference is K-means with K clusters
(the checkpoint's number of codes) fitted on the train split at the model's unit rate, with the
baseline's settings (standardised features, MiniBatchKMeans, one seed), and scored by PNMI and
phone purity on the test split and on all utterances (``bench_units.py --eval-split all``).
``--extra-train DIR`` (as ``bench_units.py``'s, which prepares it once) fits every k-means on the
train split plus every utterance of DIR, the audio the model trained on; the labelled corpus is
scored as before, and the supervised reference still learns from the train split's phones:

- **speechvq units**: the checkpoint's nearest codes (what ``speechvq-extract`` writes);
- **k-means of speechvq's encoder**: its latents before the quantizer, clustered afresh;
- **MFCC + k-means**: the baseline of ``speechvq-evaluate`` (13 MFCCs + deltas + delta-deltas,
  averaged over a unit's frames); then per-speaker mean and variance normalisation (statistics of
  each speaker's train-split utterances; a speaker with none uses its own), then the normalised
  features of ``c`` units on each side stacked (``--context``);
- **duration-penalised** (``--penalties``): a unit sequence chosen by dynamic programming to
  minimise the summed squared distance of each frame to its unit's centroid plus a penalty per
  change of unit (a multiple of the system's median frame-to-nearest-centroid distance): fewer,
  longer segments, as Kamper's duration-penalised dynamic programming does;
- **supervised** (a reference, not a unit system): a one-hidden-layer MLP trained on the train
  split's phone labels from the context-stacked normalised MFCCs, scored on the test split only:
  its decisions as units (one per phone) and k-means of its posteriors (fitted on the train
  split, K clusters). It shows what the features hold when the phones are known.

Silence frames are left out of PNMI and purity, as ``speechvq-evaluate`` does. Each unsupervised
row also gets ZeroSpeech 2019's code-vector ABX (within and across speakers) on all utterances,
as ``speechvq-evaluate`` computes it (same triplets, ``speechvq.metrics.abx``): a unit is its code
vector, a cluster its centroid in the space k-means was fitted in (``--no-abx`` skips it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from speechvq.audio import AudioError, load_audio
from speechvq.baseline import MfccUnitsFeatures, fit_kmeans
from speechvq.checkpoint import CheckpointError
from speechvq.data.alignments import frame_labels, load_alignments, match_alignments
from speechvq.data.manifest import read_manifest
from speechvq.metrics import (
    SILENCE,
    abx,
    abx_items,
    angular_distances,
    labelled_frames,
    purity_pnmi,
)
from speechvq.synthesis import Synthesizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_units  # noqa: E402  (the --extra-train corpus: one preparation for both scripts)

Features = dict[str, np.ndarray]  # utterance id -> (U, D) float32


def duration_penalised(dist: torch.Tensor, penalty: float) -> np.ndarray:
    """dist: (U, K) cost of giving frame u unit k -> units (U,) int64 minimising
    ``sum_u dist[u, unit_u] + penalty * #{u : unit_u != unit_(u-1)}`` (exactly, by dynamic
    programming in O(U K)). ``penalty = 0`` gives the per-frame argmin."""
    frames, k = dist.shape
    if frames == 0:
        return np.zeros(0, np.int64)
    if penalty <= 0:
        return dist.argmin(1).numpy().astype(np.int64)
    stay_index = torch.arange(k)
    back = torch.empty(frames, k, dtype=torch.long)
    cost = dist[0].double().clone()
    for u in range(1, frames):
        best, arg = cost.min(0)
        switch = best + penalty < cost  # cheaper to come from the best unit and pay the penalty
        back[u] = torch.where(switch, arg, stay_index)
        cost = torch.where(switch, best + penalty, cost) + dist[u].double()
    path = np.empty(frames, np.int64)
    path[-1] = int(cost.argmin())
    for u in range(frames - 1, 0, -1):
        path[u - 1] = int(back[u, path[u]])
    return path


def stack_context(feats: Features, context: int) -> Features:
    """Each frame with ``context`` frames on each side concatenated (edges repeated)."""
    if context == 0:
        return feats
    out = {}
    for key, x in feats.items():
        idx = np.clip(np.arange(len(x))[:, None] + np.arange(-context, context + 1), 0,
                      max(len(x) - 1, 0))
        out[key] = x[idx].reshape(len(x), -1)
    return out


def speaker_normalised(feats: Features, speakers: Mapping[str, str], train_ids: set[str]
                       ) -> Features:
    """Per-speaker mean / variance normalisation; each speaker's statistics from its train-split
    utterances (its own utterances when it has none there)."""
    by_speaker: dict[str, list[np.ndarray]] = {}
    for key, x in feats.items():
        if key in train_ids:
            by_speaker.setdefault(speakers[key], []).append(x)
    unseen: dict[str, list[np.ndarray]] = {}
    for key, x in feats.items():
        if speakers[key] not in by_speaker:
            unseen.setdefault(speakers[key], []).append(x)
    by_speaker.update(unseen)
    moments = {s: (np.concatenate(xs).mean(0), np.concatenate(xs).std(0) + 1e-5)
               for s, xs in by_speaker.items()}
    return {k: (x - moments[speakers[k]][0]) / moments[speakers[k]][1] for k, x in feats.items()}


class Kmeans:
    """The baseline's k-means settings: standardised features, MiniBatchKMeans, one seed."""

    def __init__(self, feats: Features, train_ids: set[str], k: int, seed: int) -> None:
        x = np.concatenate([feats[key] for key in feats if key in train_ids]).astype(np.float64)
        self.mean, self.std = x.mean(0), np.maximum(x.std(0), 1e-5)
        km = fit_kmeans((x - self.mean) / self.std, k, seed)
        self.centroids = torch.from_numpy(km.cluster_centers_)

    def distances(self, x: np.ndarray) -> torch.Tensor:
        z = torch.from_numpy((x.astype(np.float64) - self.mean) / self.std)
        return torch.cdist(z, self.centroids) ** 2


class CodevecAbx:
    """Code-vector ABX of units over all utterances (``speechvq-evaluate``'s triplets and
    sampling): ``__call__(units, embeddings (K, D))`` -> ``{"abx_within_codevec",
    "abx_across_codevec"}`` (fractions)."""

    def __init__(self, alignments: Mapping, rate: float, n_frames: Mapping[str, int],
                 speakers: Mapping[str, str]) -> None:
        self.items = abx_items(alignments, rate, n_frames, speakers)

    def __call__(self, units: Mapping[str, np.ndarray], embeddings: np.ndarray
                 ) -> dict[str, float]:
        got = abx(units, self.items, distances=angular_distances(np.asarray(embeddings)))
        return {"abx_within_codevec": got["abx_within"], "abx_across_codevec": got["abx_across"]}


def scored(units: Mapping[str, np.ndarray], alignments: Mapping, rate: float,
           test_ids: set[str], codevec: CodevecAbx | None = None,
           embeddings: np.ndarray | None = None) -> dict[str, float]:
    out = {}
    for split, keep in (("test", lambda k: k in test_ids), ("all", lambda k: True)):
        u, labels, _ = labelled_frames({k: v for k, v in units.items() if keep(k)}, alignments,
                                       rate)
        fig = purity_pnmi(u, labels)
        out[f"pnmi_{split}"], out[f"purity_{split}"] = fig["pnmi"], fig["phone_purity"]
    lengths = [len(v) for v in units.values() if len(v)]
    changes = [1 + int(np.sum(np.diff(v) != 0)) for v in units.values() if len(v)]
    out["segments_per_frame"] = sum(changes) / sum(lengths)
    if codevec is not None and embeddings is not None:
        out.update(codevec(units, embeddings))
    return out


def smoothed_rows(name: str, distances: Callable[[str], torch.Tensor], keys: list[str],
                  penalties: list[float], alignments: Mapping, rate: float, test_ids: set[str],
                  codevec: CodevecAbx | None = None, embeddings: Any = None
                  ) -> dict[str, dict[str, float]]:
    """One row per penalty (0: nearest centroid) for a system given by its frame distances;
    ``embeddings`` (K, D): its units' vectors, for code-vector ABX."""
    dist = {k: distances(k) for k in keys}
    nearest = np.concatenate([d.min(1).values.numpy() for d in dist.values() if len(d)])
    scale = float(np.median(nearest))
    rows = {}
    for p in penalties:
        units = {k: duration_penalised(d, p * scale) for k, d in dist.items()}
        label = name if p == 0 else f"{name}, duration-penalised ({p:g} x median distance)"
        rows[label] = scored(units, alignments, rate, test_ids, codevec, embeddings)
    return rows


def supervised_rows(feats: Features, alignments: Mapping, rate: float, train_ids: set[str],
                    test_ids: set[str], k: int, seed: int) -> dict[str, dict[str, float]]:
    from sklearn.neural_network import MLPClassifier

    def labels(key: str) -> list[str]:
        return frame_labels(alignments[key], rate, n_frames=len(feats[key]), silence=SILENCE)

    train = [key for key in feats if key in train_ids and key in alignments]
    x = np.concatenate([feats[key] for key in train])
    y = sum((labels(key) for key in train), [])
    mean, std = x.mean(0), x.std(0) + 1e-5
    clf = MLPClassifier((256,), max_iter=60, random_state=seed).fit((x - mean) / std, y)
    posteriors = {key: clf.predict_proba((v - mean) / std) for key, v in feats.items()}
    test = {key: p for key, p in posteriors.items() if key in test_ids}
    decisions = {key: p.argmax(1) for key, p in test.items()}
    hits = [np.mean(clf.classes_[decisions[key]] == np.array(labels(key)))
            for key in test if key in alignments]
    km = Kmeans(posteriors, train_ids, k, seed)
    clustered = {key: km.distances(p).argmin(1).numpy() for key, p in test.items()}
    rows = {"supervised MLP, its phone decisions as units": scored(decisions, alignments, rate,
                                                                  test_ids),
            "supervised MLP, k-means of its posteriors": scored(clustered, alignments, rate,
                                                                test_ids)}
    rows["supervised MLP, its phone decisions as units"]["frame_accuracy"] = float(np.mean(hits))
    for fig in rows.values():  # trained on the train split's labels: the test split only
        fig["pnmi_all"] = fig["purity_all"] = None
    return rows


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except (ValueError, OSError, CheckpointError, AudioError) as err:  # names the file
        raise SystemExit(f"bench_unit_references: {err}") from None


def run(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="bench_units.py's folder (data/ inside)")
    parser.add_argument("--checkpoint", required=True, help="the speechvq model to place")
    parser.add_argument("--context", type=int, nargs="+", default=[1, 2],
                        help="units of context on each side for the stacked MFCC rows")
    parser.add_argument("--penalties", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0],
                        help="duration penalties, in median frame distances (0: none)")
    parser.add_argument("--no-supervised", action="store_true", help="skip the MLP reference")
    parser.add_argument("--no-abx", action="store_true", help="skip code-vector ABX")
    parser.add_argument("--extra-train", metavar="DIR", help="unlabelled audio the model also "
                        "trained on (bench_units.py --extra-train): the references fit on it too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON of every row (default: beside the checkpoint's "
                        "experiment, bench_unit_references.json)")
    args = parser.parse_args(argv)
    data = Path(args.work) / "data"
    start = time.perf_counter()
    synth = Synthesizer.from_checkpoint(args.checkpoint)
    model, rate, k = synth.vqvae, synth.unit_rate, synth.n_codes
    rows_all = read_manifest(data / "manifest.tsv")
    train_manifest = bench_units.prepare_extra(
        argparse.Namespace(extra_train=args.extra_train, force=False), data, Path(args.work))
    train_ids = {r.id for r in read_manifest(train_manifest)}
    test_ids = {r.id for r in read_manifest(data / "test.tsv")}
    labelled = {r.id for r in rows_all}
    extra_rows = [r for r in read_manifest(train_manifest) if r.id not in labelled]
    alignments = match_alignments(load_alignments(data / "alignments"), rows_all)
    if not alignments:
        raise SystemExit(f"bench_unit_references: no utterance of {data / 'manifest.tsv'} has an "
                         f"alignment in {data / 'alignments'} (prepare with bench_units.py "
                         "--alignments)")
    synth.add_speakers(rows_all + extra_rows)
    mfcc = MfccUnitsFeatures(synth.features, rate, 13, "mean")
    latents: Features = {}
    base: Features = {}
    speakers = {r.id: r.speaker for r in rows_all + extra_rows}
    for row in tqdm(rows_all + extra_rows, desc="features", unit="utt"):
        try:
            wav = load_audio(row.path, synth.sample_rate)
        except AudioError as err:  # reported and left out of every row
            tqdm.write(f"skipping {err}")
            continue
        wav = wav[: synth.num_units(wav.numel()) * synth.samples_per_unit]
        with torch.no_grad():
            x = synth.front(wav, row.speaker).unsqueeze(0)
            z = model.quantizer._prepare(model.encoder(x)[0].T)
        latents[row.id] = z.numpy()
        base[row.id] = mfcc(wav)[: len(z)]
    keys = [key for key in latents if key in labelled]  # scored; the k-means fit on train_ids
    codes = model.quantizer.decode_codes().double()
    codevec = None if args.no_abx else CodevecAbx(
        alignments, rate, {key: len(latents[key]) for key in keys}, speakers)
    results: dict[str, dict[str, float]] = {}

    def add(rows: dict[str, dict[str, float]]) -> None:
        for name, fig in rows.items():
            results[name] = fig
            print(f"{name}: " + ", ".join(f"{key} {_fmt(value)}" for key, value in fig.items()),
                  flush=True)

    add(smoothed_rows("speechvq units", lambda key: torch.cdist(
        torch.from_numpy(latents[key]).double(), codes) ** 2, keys, args.penalties, alignments,
        rate, test_ids, codevec, codes.numpy()))
    km = Kmeans(latents, train_ids, k, args.seed)
    add(smoothed_rows("k-means of speechvq's encoder", lambda key: km.distances(latents[key]),
                      keys, [0.0], alignments, rate, test_ids, codevec, km.centroids.numpy()))
    km = Kmeans(base, train_ids, k, args.seed)
    add(smoothed_rows("MFCC + k-means (the baseline)", lambda key: km.distances(base[key]), keys,
                      args.penalties, alignments, rate, test_ids, codevec, km.centroids.numpy()))
    normalised = speaker_normalised(base, speakers, train_ids)
    for context in [0, *args.context]:
        feats = stack_context(normalised, context)
        km = Kmeans(feats, train_ids, k, args.seed)
        name = "MFCC, speaker-normalised" + (f", +-{context} units stacked" if context else "")
        add(smoothed_rows(name + ", + k-means", lambda key, f=feats, m=km: m.distances(f[key]),
                          keys, [0.0], alignments, rate, test_ids, codevec, km.centroids.numpy()))
    if not args.no_supervised:
        feats = stack_context(normalised, max([0, *args.context]))
        add(supervised_rows(feats, alignments, rate, train_ids, test_ids, k, args.seed))
    out = Path(args.out) if args.out else (Path(args.checkpoint).parent.parent
                                           / "bench_unit_references.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "k": k, "unit_rate": rate,
                               "rows": results}, indent=1) + "\n")
    print("\n| reference | PNMI (test) | PNMI (all) | phone purity (test) | segments per frame | "
          "ABX within, code vectors (%, all) | ABX across, code vectors (%, all) |")
    print("|---|---|---|---|---|---|---|")
    for name, fig in results.items():
        within, across = (fig.get(f"abx_{m}_codevec") for m in ("within", "across"))
        print(f"| {name} | {_fmt(fig['pnmi_test'])} | {_fmt(fig['pnmi_all'])} | "
              f"{_fmt(fig['purity_test'])} | {_fmt(fig['segments_per_frame'], 2)} | "
              f"{_fmt(within and within * 100, 2)} | {_fmt(across and across * 100, 2)} |")
    fitted = sum(1 for key in latents if key in train_ids)
    print(f"\n{len(keys)} utterances ({len(test_ids)} test), K = {k}, {rate:g} Hz, k-means "
          f"fitted on {fitted} ({train_manifest}); "
          f"{time.perf_counter() - start:.0f} s; written {out}")


if __name__ == "__main__":
    main()
