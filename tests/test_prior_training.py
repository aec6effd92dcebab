"""The unit prior (speechvq.prior, PriorTask): its baselines and splits, training through fit(),
speechvq-train-prior, and sampling units, on tiny models."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from speechvq.checkpoint import load_checkpoint
from speechvq.data.manifest import ManifestRow, write_manifest
from speechvq.prior import (
    UnitSequences,
    flat_sequences,
    load_prior,
    ngram_perplexities,
    prior_data,
    prior_model_config,
    sample_units,
    split_ids,
    unit_perplexity,
    windows,
)
from speechvq.tasks import PriorTask
from speechvq.training import fit
from speechvq.units import read_units, write_sidecar, write_units

BIN = Path(sys.executable).parent
SPEAKERS = ["alice", "bob"]
TINY_PRIOR = dict(block_size=256, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False)


def _cyclic_units(n_utts: int = 24, length: int = 60, n_codes: int = 8) -> dict:
    """Runs of a cycle of units: easy for a prior, hard for a unigram model."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n_utts):
        start = rng.integers(n_codes)
        seq = [(start + j // 3) % n_codes for j in range(length)]
        out[f"u{i:02d}"] = np.asarray(seq)
    return out


@pytest.fixture
def prior_trainer(trainer_cfg):
    """The trainer config of these tests (``conf/trainer/default.yaml`` + ``overrides``)."""

    def make(**overrides) -> dict:
        return trainer_cfg(**{**dict(max_steps=40, batch_size=4, lr=3e-3, warmup_steps=2,
                                     log_every=5, valid_every=20, media_every=20, save_every=20,
                                     precision="fp32"), **overrides})

    return make


# ---------------------------------------------------------------- baselines and splits


def test_ngram_perplexities_on_a_hand_case():
    # train: [0 0 1]; add-one over 2 codes. unigram counts 1+2, 1+1 -> p = 3/5, 2/5
    train = [np.array([0, 0, 1])]
    valid = [np.array([1, 0])]
    ppl = ngram_perplexities(train, valid, n_codes=2)
    uni = math.exp(-(math.log(2 / 5) + math.log(3 / 5)) / 2)
    assert ppl["unigram"] == pytest.approx(uni)
    # bigram rows (add-one): start -> {0: 2, 1: 1}; 0 -> {0: 2, 1: 2}; 1 -> {0: 1, 1: 1}
    big = math.exp(-(math.log(1 / 3) + math.log(1 / 2)) / 2)
    assert ppl["bigram"] == pytest.approx(big)
    assert ppl["units"] == 2


def test_split_ids_is_seeded_and_disjoint():
    ids = [f"u{i}" for i in range(40)]
    train, valid = split_ids(ids, 0.1, seed=3)
    assert len(valid) == 4 and not set(train) & set(valid) and len(train) + len(valid) == 40
    assert split_ids(ids, 0.1, seed=3) == (train, valid)
    assert split_ids(ids, 0.1, seed=4)[1] != valid


# ---------------------------------------------------------------- training through fit()


def test_prior_trains_through_fit_and_beats_the_baselines(tmp_path, prior_trainer):
    units = _cyclic_units()
    ids = sorted(units)
    train = {i: units[i] for i in ids[:20]}
    valid = {i: units[i] for i in ids[20:]}
    speaker_of = {i: SPEAKERS[k % 2] for k, i in enumerate(ids)}
    task = PriorTask(
        train,
        valid,
        speaker_of,
        SPEAKERS,
        TINY_PRIOR,
        n_codes=8,
        max_units=40,
        meta={"units": "synthetic"},
        seed=0,
    )
    assert task.meta["speakers"] == SPEAKERS
    before = unit_perplexity(task.model, task.valid_set)
    result = fit(task, prior_trainer(), tmp_path / "run", seed=0, device="cpu")
    assert result["step"] == 40
    prior, meta = load_prior(result["best_path"])
    after = unit_perplexity(prior, task.valid_set)
    assert after < before / 2
    assert after < task.baselines["unigram"]
    assert meta["speakers"] == SPEAKERS and meta["n_codes"] == 8
    assert meta["baselines"]["unigram"] == pytest.approx(task.baselines["unigram"])
    ckpt = load_checkpoint(result["last"], kind="prior")
    assert ckpt["model_config"] == prior_model_config(prior)
    tb = list((tmp_path / "run" / "tb").glob("events.*"))
    assert tb and b"valid/perplexity" in b"".join(p.read_bytes() for p in tb)


def test_train_prior_cli(tmp_path, run_cli):
    units = _cyclic_units(n_utts=20, length=40)
    write_units(tmp_path / "units.txt", units, format="gslm")
    rows = [
        ManifestRow(i, "/nonexistent.wav", 16000, SPEAKERS[k % 2])
        for k, i in enumerate(sorted(units))
    ]
    write_manifest(tmp_path / "m.tsv", rows)
    out = tmp_path / "prior"
    proc = run_cli(
        [
            str(BIN / "speechvq-train-prior"),
            f"units={tmp_path / 'units.txt'}",
            f"data.manifest={tmp_path / 'm.tsv'}",
            f"out_dir={out}",
            "prior=tiny",
            "n_codes=8",
            "valid_fraction=0.2",
            "trainer.max_steps=30",
            "trainer.batch_size=4",
            "trainer.lr=3e-3",
            "trainer.warmup_steps=2",
            "trainer.valid_every=15",
            "trainer.save_every=15",
            "trainer.media_every=null",
            "device=cpu",
        ],
        tmp_path,
    )
    report = json.loads((out / "perplexity.json").read_text())
    assert {"prior", "bigram", "unigram"} <= set(report) and report["valid_utterances"] == 4
    assert "unigram" in proc.stdout and "bigram" in proc.stdout
    _, meta = load_prior(out / "checkpoints" / "best.pt")
    assert meta["speakers"] == SPEAKERS  # the manifest's speakers, sorted


def test_train_prior_speakers_default_to_the_units_manifest(tmp_path, tiny_vqvae):
    """Without data.manifest the speakers come from the manifest named in the units' sidecar; with
    none known, no speaker tokens at all (sampling must not use tokens training never saw)."""

    rows = [ManifestRow(f"u{k}", "/nonexistent.wav", 16000, SPEAKERS[k % 2]) for k in range(4)]
    write_manifest(tmp_path / "m.tsv", rows)
    unit_file = tmp_path / "u.txt"
    write_units(unit_file, {r.id: np.arange(6) % 8 for r in rows}, "gslm")
    write_sidecar(unit_file, {"format": "gslm", "manifest": str(tmp_path / "m.tsv")})
    vq = tiny_vqvae(tmp_path / "vq.pt", speakers=["bob", "alice", "carol"])
    data = prior_data(str(unit_file), None, 0.25, 0, None, str(vq), None, True)
    assert data.speaker_of == {"u0": "alice", "u1": "bob", "u2": "alice", "u3": "bob"}
    assert data.speakers == ["bob", "alice", "carol"]  # the decoder's names, so tokens match
    assert data.n_codes == 32 and len(data.train) == 3 and len(data.valid) == 1
    write_sidecar(unit_file, {"format": "gslm", "manifest": str(tmp_path / "gone.tsv")})
    data = prior_data(str(unit_file), None, 0.25, 0, None, str(vq), None, True)
    assert (data.speaker_of, data.speakers) == ({}, [])


def test_sample_units_seeded_prompted_and_in_codebook(tmp_path, tiny_prior):
    prior, _ = load_prior(tiny_prior(tmp_path / "prior.pt"))
    a = sample_units(prior, 3, 40, speaker=[0, 1, None], temperature=5.0, seed=1)
    assert a.shape == (3, 40) and a.min() >= 0 and a.max() < 32
    assert torch.equal(a, sample_units(prior, 3, 40, speaker=[0, 1, None], temperature=5.0, seed=1))
    assert not torch.equal(a, sample_units(prior, 3, 40, speaker=[0, 1, None], seed=2))
    prompt = torch.tensor([5, 5, 7, 9])
    b = sample_units(prior, 2, 10, speaker=0, prompt=prompt, seed=0)
    assert torch.equal(b[:, :4], prompt.expand(2, -1))


# ---------------------------------------------------------------- the prior's data at scale


def _former_items(sequences, leads, max_units, crop, seed, epoch):
    """What UnitSequences gave before it held one compact array: the reference."""
    items = []
    for seq, lead in zip(sequences, leads, strict=True):
        seq = np.asarray(seq, dtype=np.int64)
        if seq.size:
            items.extend((p, lead) for p in ([seq] if crop else windows(seq, max_units)))
    out = []
    for index, (seq, lead) in enumerate(items):
        if crop and len(seq) > max_units:
            rng = np.random.default_rng((seed, epoch, index))
            start = int(rng.integers(0, len(seq) - max_units + 1))
            seq = seq[start : start + max_units]
        out.append(np.concatenate([[lead], seq]))
    return out


@pytest.mark.parametrize("crop", [True, False])
def test_unit_sequences_hold_one_compact_array_and_give_the_same_items(tmp_path, crop):
    rng = np.random.default_rng(0)
    units = {f"u{i:03d}": rng.integers(0, 500, size=int(rng.integers(0, 90))) for i in range(40)}
    write_units(tmp_path / "u.txt", units, "kaldi", dedup=True)
    read = read_units(tmp_path / "u.txt", expand=True, dtype=np.int16)  # as prior_data reads
    ids = sorted(read)
    leads = [600 + i % 3 for i in range(len(ids))]
    data = UnitSequences([read[i] for i in ids], leads, 32, crop=crop, seed=5)
    flat = next(iter(read.values())).base
    assert data.units is flat  # used in place: no copy of the units at all
    assert data.nbytes == flat.nbytes + 3 * 8 * len(data)  # + start, length, lead per item
    data.set_epoch(3)
    expected = _former_items([units[i] for i in ids], leads, 32, crop, 5, 3)
    assert len(data) == len(expected)
    for index, tokens in enumerate(expected):
        item = data[index]
        assert item["idx"].dtype == torch.long and item["targets"].dtype == torch.long
        assert item["idx"].tolist() == tokens[:-1].tolist()
        assert item["targets"].tolist() == tokens[1:].tolist()
    # plain int64 lists: one compact int16 copy
    copied = UnitSequences([np.asarray(units[i]) for i in ids], leads, 32, crop=crop, seed=5)
    assert copied.units.dtype == np.int16 and copied.units.base is None
    assert copied.units.size == sum(len(u) for u in units.values())
    copied.set_epoch(3)
    assert all(torch.equal(copied[i]["idx"], data[i]["idx"]) for i in range(len(data)))
    wide = flat_sequences([np.array([1, 70000]), np.array([], dtype=np.int64)])
    assert wide[0].dtype == np.int32 and wide[2].tolist() == [2, 0]


def test_bench_units_io_runs(tmp_path):
    """benchmarks/bench_units_io.py end to end on a tiny file (the README's figures come from
    its default size)."""
    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_units_io.py"
    proc = subprocess.run([sys.executable, str(bench), "--million", "0.02", "--in-process",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum("173 M units" in line for line in lines) == 2  # gslm and kaldi, extrapolated
    for mode in ("parse-old", "parse-int32", "parse-int16", "prior-old", "prior-new"):
        assert sum(line.strip().startswith(mode) for line in lines) == 2
    assert not list(tmp_path.iterdir())  # its files are gone
