"""How phonetic are speechvq's units on a labelled corpus, against MFCC + k-means: the whole protocol.

    python benchmarks/bench_units.py --root ../shared/realdev/wav --alignments ../shared/realdev/ali \
        --minutes 15 --work /tmp/bench_units/realdev
    python benchmarks/bench_units.py --mini --minutes 15 --work /tmp/bench_units/mini
    python benchmarks/bench_units.py --root ../shared/realdev/wav --alignments ../shared/realdev/ali \
        --extra-train /tmp/bigreal/wav --minutes 15 --work /tmp/bench_units/realdev --exp exp_bigreal

1. ``speechvq-prepare data=folder`` (or ``data=mini``): split by utterance, every speaker in every
   split (``--valid``/``--test`` fractions), alignments matched to the utterances.
2. ``speechvq-train`` with the defaults on the (unlabelled) train split for ``--minutes`` minutes
   (or ``--steps``), validation on the valid split; the steps reached and steps/s are printed.
   ``--extra-train DIR`` (any folder of audio, e.g. bigreal's ``wav/``; speaker = the file's
   folder) adds every utterance of DIR to the training audio: DIR is prepared once into
   ``WORK/extra_<name>/`` (``speechvq-prepare data=folder``, no split) and the training manifest
   becomes ``WORK/train_<name>/train.tsv``, the train split plus all of DIR (with the front-end
   states of both). The labelled corpus keeps its split: validation and scoring are unchanged.
3. ``speechvq-extract`` the test split with ``best.pt``.
4. ``speechvq-evaluate`` against the phones, with MFCC + k-means fitted on exactly the audio the
   model trained on (the train split, plus DIR with ``--extra-train``),
   as many clusters as units used, at the same rate (``--eval-split all``: the units of every
   utterance instead of the test split's, to compare variants on a larger sample).
5. A table: each metric for both systems and their ratio (speechvq / MFCC + k-means).

Every stage is skipped when its output exists (``--force`` redoes them), so an interrupted run
resumes and a second ``--exp`` reuses the prepared data (a prepared folder whose front-end
state store an older speechvq wrote is prepared again). Extra ``key=value`` arguments go to
``speechvq-train`` (e.g. ``model.decoder.jitter=0.25``) to measure a variant.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from speechvq.baseline import ROWS
from speechvq.data.manifest import read_manifest, write_manifest
from speechvq.stats import STATE_FILE, StateStore

# the metrics compared, in this order; labels and scales are speechvq-evaluate's (baseline.ROWS)
KEYS = ("pnmi", "phone_purity", "abx_within_codevec", "abx_across_codevec", "abx_within",
        "abx_across", "used", "bitrate")


def _tool(name: str) -> str:
    """The stage's console script beside this Python (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _run(cmd: list[str], log_path: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))


def _stale(folder: Path) -> str | None:
    """Why ``folder``'s front-end state store cannot be used (an older format, a damaged file), or
    None: a folder prepared by an older speechvq is prepared again rather than reused, so that
    every run does not measure its states again (nor a merge of it fail)."""
    if not (folder / STATE_FILE).exists():
        return None
    try:
        StateStore.load(folder / STATE_FILE)
    except ValueError as err:
        return str(err)
    return None


def _reuse(folder: Path, done: Path, args: argparse.Namespace) -> bool:
    """Whether the prepared ``folder`` (``done`` is its last file) is reused, saying so."""
    if not done.exists() or args.force:
        return False
    problem = _stale(folder)
    print(f"prepare: {folder} exists, "
          + ("reused" if problem is None else f"prepared again: {problem}"))
    return problem is None


def prepare(args: argparse.Namespace, data: Path, need_alignments: bool = True) -> None:
    if _reuse(data, data / "test.tsv", args):
        return
    if args.mini:
        cmd = [_tool("speechvq-prepare"), "data=mini", f"out_dir={data}"]
    else:
        cmd = [_tool("speechvq-prepare"), "data=folder", f"data.root={args.root}",
               f"data.speaker={args.speaker}", "data.split.by=utterance",
               f"data.split.valid={args.valid}", f"data.split.test={args.test}",
               f"data.split.seed={args.seed}", f"out_dir={data}"]
        if args.alignments:
            cmd.append(f"data.alignments={args.alignments}")
    _run(cmd, data / "bench_prepare.log")
    if need_alignments and not (data / "alignments").is_dir():
        sys.exit(f"{data}/alignments: no alignments were found for the corpus")


def prepare_extra(args: argparse.Namespace, data: Path, work: Path) -> Path:
    """The training manifest: ``data/train.tsv``, or with ``--extra-train DIR`` the train split
    plus every utterance of DIR (prepared once, see the module docstring)."""
    if not args.extra_train:
        return data / "train.tsv"
    root = Path(args.extra_train).resolve()
    if not root.is_dir():
        sys.exit(f"--extra-train {root}: not a folder")
    extra, merged = work / f"extra_{root.name}", work / f"train_{root.name}"
    fresh = not _reuse(extra, extra / "manifest.tsv", args)
    if fresh:
        _run([_tool("speechvq-prepare"), "data=folder", f"data.root={root}", "data.speaker=parent",
              "data.split.by=none", f"out_dir={extra}"], extra / "bench_prepare.log")
    out = merged / "train.tsv"
    if not fresh and _reuse(merged, out, args):
        return out
    own, more = read_manifest(data / "train.tsv"), read_manifest(extra / "manifest.tsv")
    clash = sorted({r.id for r in own} & {r.id for r in more})
    if clash:
        sys.exit(f"--extra-train {root}: {len(clash)} utterance id(s) also in the labelled corpus "
                 f"(e.g. {clash[0]!r}): the same audio cannot be both trained on and scored")
    stores = [StateStore.load(d / STATE_FILE) for d in (data, extra) if (d / STATE_FILE).exists()]
    merged.mkdir(parents=True, exist_ok=True)
    if stores:  # what the two prepares measured, so that training measures nothing again
        StateStore.concat(stores).save(merged / STATE_FILE)
    write_manifest(out, own + more)
    minutes = sum(r.num_samples for r in more) / 16000 / 60
    print(f"prepare: {out}: {len(own)} train-split utterances + {len(more)} of {root} "
          f"({minutes:.1f} min)")
    return out


def train(args: argparse.Namespace, data: Path, exp: Path, overrides: list[str],
          train_manifest: Path | None = None) -> dict:
    ckpt = exp / "checkpoints" / "best.pt"
    timing = exp / "bench_train.json"
    if ckpt.exists() and timing.exists() and not args.force:
        print(f"train: {ckpt} exists, reused")
        return json.loads(timing.read_text())
    if args.force and exp.exists():
        shutil.rmtree(exp)
    limit = ([f"trainer.max_steps={args.steps}"] if args.steps
             else [f"trainer.max_minutes={args.minutes}"])
    manifest = train_manifest or data / "train.tsv"
    cmd = [_tool("speechvq-train"), f"data.manifest={manifest}",
           f"data.valid_manifest={data / 'valid.tsv'}", f"out_dir={exp}", f"seed={args.seed}",
           "trainer.valid_every=1000", *limit, *overrides]
    start = time.perf_counter()
    _run(cmd, exp / "bench_train.log")
    seconds = time.perf_counter() - start
    last = torch.load(exp / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    rows = read_manifest(manifest)
    info = {"steps": int(last["step"]), "seconds": seconds,
            "steps_per_second": int(last["step"]) / max(seconds, 1e-9), "overrides": overrides,
            "train_manifest": str(manifest), "train_utterances": len(rows),
            "train_hours": sum(r.num_samples for r in rows) / 16000 / 3600}
    timing.write_text(json.dumps(info, indent=1) + "\n")
    return info


def evaluate(args: argparse.Namespace, data: Path, exp: Path,
             train_manifest: Path | None = None) -> dict:
    split = args.eval_split
    manifest = data / ("manifest.tsv" if split == "all" else f"{split}.tsv")
    units = exp / "units" / f"{split}.txt"
    out = exp / "eval" / f"{split}.json"
    if out.exists() and not args.force:
        return json.loads(out.read_text())
    _run([_tool("speechvq-extract"), f"checkpoint={exp / 'checkpoints' / 'best.pt'}",
          f"data.manifest={manifest}", f"out={units}", "force=true"],
         exp / f"bench_extract_{split}.log")
    _run([_tool("speechvq-evaluate"), f"units={units}", f"alignments={data / 'alignments'}",
          f"data.manifest={manifest}",
          f"baseline.train_manifest={train_manifest or data / 'train.tsv'}",
          f"out={out}"], exp / f"bench_evaluate_{split}.log")
    return json.loads(out.read_text())


def table(report: dict, info: dict) -> str:
    ours, base = report["metrics"], (report.get("baseline") or {}).get("metrics", {})
    lines = [f"{'metric':32s}{'speechvq':>12s}{'MFCC+k-means':>14s}{'ratio':>8s}"]
    labels = {key: (label, scale) for key, label, scale, _ in ROWS}
    for key in KEYS:
        a, b = ours.get(key), base.get(key)
        if a is None:
            continue
        label, scale = labels[key]
        ratio = f"{a / b:8.2f}" if isinstance(b, (int, float)) and b else f"{'-':>8s}"
        fb = f"{b * scale:14.3f}" if isinstance(b, (int, float)) else f"{'-':>14s}"
        lines.append(f"{label:32s}{a * scale:12.3f}{fb}{ratio}")
    lines.append(f"training: {info['steps']} steps in {info['seconds'] / 60:.1f} min "
                 f"({info['steps_per_second']:.2f} steps/s, incl. start-up and validation)")
    if "train_utterances" in info:
        lines.append(f"training audio (the model's and the baseline's): "
                     f"{info['train_utterances']} utterances, {info['train_hours'] * 60:.2f} min "
                     f"({Path(info['train_manifest']).parent.name}/"
                     f"{Path(info['train_manifest']).name})")
    return "\n".join(lines)


def add_protocol_arguments(parser: argparse.ArgumentParser, source: Any) -> None:
    """The corpus (``--root``/``--mini``, into the mutually exclusive group ``source``) and
    training arguments of the protocol (also used by ``bench_resynth.py``)."""
    source.add_argument("--root", help="folder of audio (searched recursively)")
    source.add_argument("--mini", action="store_true", help="the shipped mini corpus")
    parser.add_argument("--alignments", help="folder of .phn/.TextGrid files (else: beside the "
                        "audio)")
    parser.add_argument("--speaker", default="parent", help="data.speaker of data=folder")
    parser.add_argument("--work", help="output folder (data/ and exp*/ inside)")
    parser.add_argument("--exp", default="exp", help="name of the experiment folder in --work")
    parser.add_argument("--minutes", type=float, default=15.0, help="training time")
    parser.add_argument("--steps", type=int, default=None, help="train this many steps instead")
    parser.add_argument("--valid", type=float, default=0.1)
    parser.add_argument("--test", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra-train", metavar="DIR", help="a folder of unlabelled audio added "
                        "to the training audio of the model and of the baseline")
    parser.add_argument("--force", action="store_true", help="redo every stage")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
    """Parse ``argv`` (default: the command line); the arguments left over must be ``key=value``
    training overrides."""
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unknown arguments {bad} (training overrides are key=value)")
    return args, overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(parser, parser.add_mutually_exclusive_group(required=True))
    parser.add_argument("--eval-split", choices=("test", "all"), default="test",
                        help="units evaluated: the held-out test split (the protocol), or every "
                        "utterance (a larger sample for comparing variants on a small corpus)")
    args, overrides = parse_with_overrides(parser, argv)
    if not args.work:
        parser.error("--work is required")
    work = Path(args.work)
    data, exp = work / "data", work / args.exp
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    prepare(args, data)
    train_manifest = prepare_extra(args, data, work)
    info = train(args, data, exp, overrides, train_manifest)
    report = evaluate(args, data, exp, train_manifest)
    text = table(report, info)
    (exp / f"bench_units_{args.eval_split}.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
