"""speechvq-extract and the chunked encoder: every format, exact chunking, shards, bad files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from speechvq import extract as E
from speechvq import units as U
from speechvq.audio import load_audio, save_audio
from speechvq.cli import extract
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.manifest import ManifestRow, read_manifest, write_manifest
from speechvq.features import FeatureStats, FrontEnd, Moments, build_logmel, compute_stats
from speechvq.files import file_hash
from speechvq.nn.quantizer import kmeans, sq_distances
from speechvq.vqvae import build_vqvae, load_vqvae

CONF = conf_dir()
EXTRACT = Path(sys.executable).parent / "speechvq-extract"
SR = 16000
SPEAKERS = ("alice", "bob", "carol")
FORMATS = {"gslm": "units.txt", "kaldi": "units.kaldi", "npy": "units.npz",
           "espnet": "text", "km": "train.km"}


# ---------------------------------------------------------------- fixtures: a tiny model, audio




def _signal(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Phone-like stretches: harmonic tones of changing pitch and noise bursts."""
    pieces = []
    while sum(len(p) for p in pieces) < seconds * SR:
        n = int(rng.integers(800, 3200))
        t = np.arange(n) / SR
        if rng.random() < 0.3:
            pieces.append(0.05 * rng.standard_normal(n))
        else:
            f0 = rng.uniform(90, 250)
            pieces.append(sum(np.sin(2 * np.pi * f0 * k * t) * rng.uniform(0, 0.2) for k in range(1, 8)))
    return np.concatenate(pieces)[: int(seconds * SR)].astype(np.float32)


@pytest.fixture(scope="session")
def kmeans_vqvae(tiny_vqvae_cfg, save_vqvae):
    """``kmeans_vqvae(path, kind, stats, wavs)``: an untrained VQ-VAE whose codebook is spread over
    its own encoder outputs on ``wavs`` (so the units vary), saved as a checkpoint."""

    def make(path: Path, kind: str, stats: FeatureStats, wavs: list[torch.Tensor]) -> Path:
        cfg = tiny_vqvae_cfg(kind)
        torch.manual_seed(0)
        model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=len(SPEAKERS)).eval()
        logmel = build_logmel(cfg["features"])
        with torch.no_grad():
            z = torch.cat([
                model.encoder((stats.normalize(logmel(w), None, "global") if kind == "mel"
                               else w)[None])[0].T for w in wavs
            ])
            model.quantizer.codebook.copy_(kmeans(z, model.n_codes, 10)[0])  # as training's init
            model.quantizer.inited.fill_(True)
        return save_vqvae(path, model, cfg, SPEAKERS, stats)

    return make


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, kmeans_vqvae, features_cfg):
    """9 utterances of 0.3-2.5 s by 3 speakers, one corrupt file; stats.json beside the manifest
    covers alice and bob only (carol's statistics must be computed at extraction)."""
    root = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(0)
    rows, wavs = [], []
    for i in range(9):
        wav = _signal(rng, float(rng.uniform(0.3, 2.5)))
        path = root / "audio" / f"u{i}.wav"
        save_audio(path, wav, SR)
        rows.append(ManifestRow(f"utt-{i}", str(path), len(wav), SPEAKERS[i % 3]))
        wavs.append(load_audio(path))
    bad = root / "audio" / "broken.wav"
    bad.write_bytes(b"RIFF0000WAVEjunk" * 10)
    rows.insert(4, ManifestRow("broken", str(bad), 16000, "alice"))
    write_manifest(root / "manifest.tsv", rows)
    features = dict(features_cfg)
    stats = compute_stats([r for r in rows if r.speaker != "carol" and r.id != "broken"],
                          features, progress=False)
    stats.save(root / "stats.json")
    ckpt = kmeans_vqvae(root / "best.pt", "mel", stats, wavs)
    return {"root": root, "manifest": root / "manifest.tsv", "ckpt": ckpt, "stats": stats,
            "rows": [r for r in rows if r.id != "broken"], "features": features}


def _reference_units(corpus) -> dict[str, np.ndarray]:
    """Each utterance encoded whole and alone, the way training prepares an utterance."""
    model, meta = load_vqvae(corpus["ckpt"])
    rows = corpus["rows"]
    carol = compute_stats([r for r in rows if r.speaker == "carol"], corpus["features"],
                          progress=False)
    stats = corpus["stats"]
    out = {}
    for r in rows:
        wav = load_audio(r.path)
        wav = wav[: len(wav) // 320 * 320]
        s = carol if r.speaker == "carol" else stats
        feats = FrontEnd(meta.features, s)(wav, r.speaker)
        out[r.id] = model.encode(feats[None])[0].numpy()
    return out


def _run(overrides: list[str]) -> int:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("extract", overrides=["progress=false", "num_workers=0", *overrides])
    return extract.run(cfg)


# ---------------------------------------------------------------- the CLI


def test_cli_extracts_dedup_units_with_sidecar(corpus, tmp_path):
    out = tmp_path / "units.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [str(EXTRACT), f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}",
         f"out={out}", "format=gslm", "dedup=true", "progress=false"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "9 utterances" in proc.stdout and "1 rejected" in proc.stdout
    reference = _reference_units(corpus)
    frames = U.read_units(out, expand=True)
    assert list(frames) == [r.id for r in corpus["rows"]]  # manifest order, bad file skipped
    for utt, seq in reference.items():
        assert np.array_equal(frames[utt], seq), utt
    assert any(len(np.unique(s)) > 3 for s in frames.values())  # the test means something
    meta = json.loads(U.sidecar_path(out).read_text())
    assert meta["unit_rate"] == 50.0 and meta["n_codes"] == 32 and meta["dedup"] is True
    assert meta["model_kind"] == "mel" and len(meta["checkpoint_hash"]) == 16
    assert meta["counts"]["utterances"] == 9 and meta["counts"]["rejected"] == 1
    assert meta["rejected"][0]["id"] == "broken" and "broken.wav" in meta["rejected"][0]["path"]
    assert meta["normalization"]["speakers_from_checkpoint"] == 2
    assert meta["normalization"]["speakers_computed"] == 1
    assert meta["config"]["format"] == "gslm"
    assert not (tmp_path / ".hydra").exists()


def test_every_format_holds_the_same_units(corpus, tmp_path):
    reference = _reference_units(corpus)
    for fmt, name in FORMATS.items():
        out = tmp_path / fmt / name
        assert _run([f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}",
                     f"out={out}", f"format={fmt}", "max_batch_seconds=3"]) == 0
        back = U.read_units(out)
        assert set(back) == set(reference), fmt
        for utt, seq in reference.items():
            assert np.array_equal(back[utt], seq), (fmt, utt)
    assert (tmp_path / "km" / "dict.km.txt").read_text().count("\n") == 32


def test_rerun_is_skipped_until_something_changes(corpus, tmp_path, capsys):
    args = [f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}",
            f"out={tmp_path / 'u.txt'}"]
    _run(args)
    capsys.readouterr()
    _run(args)
    assert "already done" in capsys.readouterr().out
    _run([*args, "dedup=true"])  # another config: extracted again
    assert "already done" not in capsys.readouterr().out
    _run([*args, "dedup=true", "force=true"])
    assert "already done" not in capsys.readouterr().out


def test_sidecar_describes_the_files_beside_it(corpus, tmp_path, capsys):
    """Units replaced after the sidecar was written (another run, another checkpoint): the re-run
    of the first is not "already done", it extracts again and the sidecar matches again."""
    out = tmp_path / "u.txt"
    args = [f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}", f"out={out}",
            "dedup=true"]
    _run(args)
    meta = json.loads(U.sidecar_path(out).read_text())
    assert meta["units_hash"] == file_hash(out)
    assert meta["durations_hash"] == file_hash(U.durations_path(out))
    mine = out.read_bytes()
    theirs = {utt: (seq + 1) % 32 for utt, seq in U.read_units(out, expand=True).items()}
    U.write_units(out, theirs, "gslm", dedup=True)  # as another run would have left them
    capsys.readouterr()
    _run(args)
    assert "already done" not in capsys.readouterr().out
    assert out.read_bytes() == mine
    _run(args)
    assert "already done" in capsys.readouterr().out


def test_shards_merge_to_the_whole(corpus, tmp_path, capsys):
    common = [f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}",
              "format=kaldi", "dedup=true"]
    _run([*common, f"out={tmp_path / 'all.txt'}"])
    for i in range(3):
        _run([*common, f"out={tmp_path / 'sharded.txt'}", f"shard={i}", "nshards=3"])
        assert (tmp_path / f"sharded.txt.shard-{i}-of-3").exists()
    _run([f"out={tmp_path / 'sharded.txt'}", "nshards=3", "merge=true"])
    assert "merged 3 shards" in capsys.readouterr().out
    assert (tmp_path / "sharded.txt").read_text() == (tmp_path / "all.txt").read_text()
    assert (tmp_path / "sharded.txt.durations").read_text() == (
        tmp_path / "all.txt.durations").read_text()
    meta = json.loads((tmp_path / "sharded.txt.json").read_text())
    assert meta["counts"]["utterances"] == 9 and len(meta["rejected"]) == 1
    assert meta["units_hash"] == file_hash(tmp_path / "sharded.txt")  # not shard 0's
    assert meta["durations_hash"] == file_hash(tmp_path / "sharded.txt.durations")


def test_stage_errors(corpus, tmp_path):
    with pytest.raises(StageError, match="checkpoint"):
        _run([f"out={tmp_path / 'u.txt'}", f"data.manifest={corpus['manifest']}"])
    with pytest.raises(StageError, match="nope.pt"):
        _run([f"out={tmp_path / 'u.txt'}", f"data.manifest={corpus['manifest']}",
              f"checkpoint={tmp_path / 'nope.pt'}"])
    with pytest.raises(StageError, match="format"):
        _run([f"out={tmp_path / 'u.txt'}", "format=csv"])
    with pytest.raises(StageError, match="shard-1-of-2"):
        _run([f"out={tmp_path / 'u.txt'}", "nshards=2", "merge=true"])


# ---------------------------------------------------------------- chunked = whole


@pytest.mark.parametrize("kind", ["mel", "wave"])
def test_long_file_in_chunks_equals_whole_file(tmp_path, kind, kmeans_vqvae, features_cfg):
    """A 40 s file cut into 3 s windows (+ context) gives exactly the units of one pass."""
    wav = torch.from_numpy(_signal(np.random.default_rng(1), 40.0))
    features = dict(features_cfg)
    logmel = build_logmel(features)
    feats = logmel(wav)
    stats = FeatureStats(features, _moments(feats), {})
    ckpt = kmeans_vqvae(tmp_path / "m.pt", kind, stats, [wav[: 5 * SR]])
    model, _ = load_vqvae(ckpt)
    make_input = E.ModelInput(kind, model.samples_per_unit, SR, features | {"normalize": "global"},
                              stats, chunk_seconds=3.0)
    path = tmp_path / "long.wav"
    save_audio(path, wav.numpy(), SR)
    x = make_input(str(path), "anyone")
    wav16 = load_audio(path)[: len(wav) // 320 * 320]
    if kind == "mel":  # the chunked log-mels are the one-pass log-mels
        one_pass = FrontEnd(features | {"normalize": "global"}, stats, chunk_seconds=1000.0)
        whole_x = one_pass(wav16, None)
        assert torch.equal(x, whole_x)
    else:
        whole_x = wav16
    whole = model.encode(whole_x[None])[0].numpy()
    encoder = E.ChunkedEncoder(model, chunk_seconds=3.0, context_seconds=None, max_batch_seconds=8.0)
    assert encoder.context >= encoder.receptive_field / encoder.downsampling
    short = x[..., : 37 * encoder.downsampling]  # batched with the long file's windows
    chunked, alone = encoder([x, short])
    assert len(chunked) == len(whole) == 2000
    assert len(E.plan_chunks(len(whole), encoder.chunk, encoder.context)) >= 13
    assert np.array_equal(alone, model.encode(short[None])[0].numpy())
    assert len(np.unique(whole)) > 3
    # Exact up to float rounding: convolutions over windows round differently (~1e-7) from one
    # pass over the file, so a frame whose two nearest codes are tied to within the quantizer's
    # own precision may flip. No other frame may differ.
    differ = np.flatnonzero(chunked != whole)
    assert len(differ) <= 0.005 * len(whole)
    z = model.encoder(whole_x[None])[0].T[differ]  # (n, D)
    d = sq_distances(z, model.quantizer.codebook)
    rows = torch.arange(len(differ))
    gap = (d[rows, torch.from_numpy(chunked[differ]).long()] - d[rows, whole[differ]]).abs()
    scale = z.pow(2).sum(1) + model.quantizer.codebook.pow(2).sum(1).max()
    assert bool((gap <= 1e-5 * scale).all()), (differ, gap, scale)


def _moments(feats: torch.Tensor) -> Moments:
    return Moments(feats.mean(1), feats.std(1), feats.shape[1])


def test_batching_never_changes_units(corpus):
    """Utterances encoded together (padded batches) = each encoded alone."""
    model, meta = load_vqvae(corpus["ckpt"])
    make_input = E.ModelInput("mel", 320, SR, meta.features | {"normalize": "global"},
                              corpus["stats"])
    xs = [make_input(r.path, r.speaker) for r in read_manifest(corpus["manifest"])
          if r.id != "broken"]
    together = E.ChunkedEncoder(model, chunk_seconds=30.0, context_seconds=None,
                                max_batch_seconds=100.0)(xs)
    for x, units in zip(xs, together, strict=True):
        assert np.array_equal(units, model.encode(x[None])[0].numpy())


def test_receptive_field_matches_measurement(tiny_vqvae_cfg):
    cfg = tiny_vqvae_cfg("mel")
    model = build_vqvae(cfg["model"], cfg["quantizer"], n_speakers=1)
    rf, stride = E.receptive_field(model.encoder)
    assert stride == 2
    assert rf == E.measured_receptive_field(model.encoder, (80,), 200)


@pytest.mark.parametrize("n,chunk,context", [(1, 5, 3), (7, 5, 3), (100, 7, 3), (13, 100, 4),
                                             (50, 10, 0), (9, 3, 4)])
def test_chunk_plan_tiles_and_keeps_context(n, chunk, context):
    plan = E.plan_chunks(n, chunk, context)
    kept = [k for _, _, a, b, _ in plan for k in range(a, b)]
    assert kept == list(range(n))
    for start, stop, a, b, pad_ok in plan:
        assert start <= a < b <= stop <= n
        assert a - start >= min(context, a)  # left context unless at the start
        assert stop - b >= context or stop == n  # right context unless at the end
        if pad_ok:  # right padding only ever reaches frames past `context` before the end
            assert stop - b >= context
        else:
            assert stop == n


# ---------------------------------------------------------------- parts: what a crash loses


def _common(corpus, *extra):
    return [f"checkpoint={corpus['ckpt']}", f"data.manifest={corpus['manifest']}", *extra]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_parts_and_shards_give_the_bytes_of_one_pass(corpus, tmp_path, fmt):
    """Units written part by part (and shard by shard, merged) are byte for byte those of one
    uninterrupted pass, durations and dict.km.txt included."""
    name = FORMATS[fmt]
    whole, parts, shards = (tmp_path / d / name for d in ("whole", "parts", "shards"))
    _run(_common(corpus, f"out={whole}", f"format={fmt}", "dedup=true", "part_seconds=null"))
    _run(_common(corpus, f"out={parts}", f"format={fmt}", "dedup=true", "part_seconds=1.5"))
    for i in range(2):
        _run(_common(corpus, f"out={shards}", f"format={fmt}", "dedup=true", "part_seconds=1.5",
                     f"shard={i}", "nshards=2"))
    _run([f"out={shards}", "nshards=2", "merge=true", f"format={fmt}"])
    for other in (parts, shards):
        assert other.read_bytes() == whole.read_bytes()
        assert U.durations_path(other).read_bytes() == U.durations_path(whole).read_bytes()
        assert sorted(p.name for p in other.parent.iterdir() if ".part-" in p.name) == []
    if fmt == "km":
        assert (parts.parent / "dict.km.txt").read_bytes() == (
            whole.parent / "dict.km.txt").read_bytes()
    meta = json.loads(U.sidecar_path(parts).read_text())
    assert meta["parts"]["parts"] >= 4 and meta["parts"]["resumed"] == 0
    assert "parts" not in json.loads(U.sidecar_path(whole).read_text())


def test_a_crash_loses_one_part_and_the_rerun_encodes_only_the_rest(corpus, tmp_path,
                                                                     monkeypatch, caplog):
    out, ref = tmp_path / "u.txt", tmp_path / "ref" / "u.txt"
    args = _common(corpus, "format=kaldi", "dedup=true", "part_seconds=1.5")
    _run([*args, f"out={ref}", "part_seconds=null"])
    rows = read_manifest(corpus["manifest"])
    plan = E.plan_parts(rows, 1.5, SR)
    assert len(plan) >= 4 and [a for a, _ in plan[1:]] == [b for _, b in plan[:-1]]
    write_part = E._write_part
    written = []

    def crash_after_two(path, wanted, result):
        if len(written) == 2:
            raise RuntimeError("killed")
        write_part(path, wanted, result)
        written.append(path)

    monkeypatch.setattr(E, "_write_part", crash_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        _run([*args, f"out={out}"])
    assert not out.exists() and sorted(p.name for p in tmp_path.glob("u.txt.part-*")) == [
        "u.txt.part-00000.json", "u.txt.part-00000.npz",
        "u.txt.part-00001.json", "u.txt.part-00001.npz"]
    monkeypatch.setattr(E, "_write_part", write_part)
    encoded = []
    extract_units = E.extract_units

    def counting(part_rows, *a, **kw):
        encoded.extend(r.id for r in part_rows)
        return extract_units(part_rows, *a, **kw)

    monkeypatch.setattr(E, "extract_units", counting)
    with caplog.at_level("INFO", logger="speechvq.extract"):
        _run([*args, f"out={out}"])
    assert encoded == [r.id for r in rows[plan[2][0]:]]  # parts 0 and 1 were not encoded again
    assert "resuming: 2 of" in caplog.text
    assert out.read_bytes() == ref.read_bytes()
    assert U.durations_path(out).read_bytes() == U.durations_path(ref).read_bytes()
    assert not list(tmp_path.glob("u.txt.part-*"))
    meta, ref_meta = (json.loads(U.sidecar_path(p).read_text()) for p in (out, ref))
    assert meta["counts"] == ref_meta["counts"] and meta["counts"]["utterances"] == 9
    assert meta["rejected"] == ref_meta["rejected"] and len(meta["rejected"]) == 1
    assert meta["parts"]["parts"] == len(plan) and meta["parts"]["resumed"] == 2


def test_stale_parts_are_discarded(corpus, tmp_path, monkeypatch, caplog):
    """Parts of another job (here dedup=false) are not used: logged, removed, all re-encoded."""
    out = tmp_path / "u.txt"
    write_part = E._write_part

    def crash_after_one(path, wanted, result):
        write_part(path, wanted, result)
        raise RuntimeError("killed")

    monkeypatch.setattr(E, "_write_part", crash_after_one)
    with pytest.raises(RuntimeError):
        _run(_common(corpus, f"out={out}", "dedup=false", "part_seconds=1.5"))
    monkeypatch.setattr(E, "_write_part", write_part)
    encoded = []
    extract_units = E.extract_units
    monkeypatch.setattr(E, "extract_units", lambda r, *a, **k: (
        encoded.extend(x.id for x in r), extract_units(r, *a, **k))[1])
    with caplog.at_level("INFO", logger="speechvq.extract"):
        _run(_common(corpus, f"out={out}", "dedup=true", "part_seconds=1.5"))
    assert "part 0 is stale (made with another checkpoint, manifest, format" in caplog.text
    assert "discarding 2 stale part file(s)" in caplog.text
    assert len(encoded) == 10 and not list(tmp_path.glob("u.txt.part-*"))


# ---------------------------------------------------------------- a split from its subsets


def test_split_units_are_merged_from_the_subsets(corpus, tmp_path, capsys, caplog):
    rows = read_manifest(corpus["manifest"])  # 10 rows, one of them unreadable ("broken")
    # every speaker's statistics beside the manifests (as prepare writes them for LibriSpeech):
    # a subset and a split normalise a speaker alike
    compute_stats(corpus["rows"], corpus["features"], progress=False).save(tmp_path / "stats.json")
    write_manifest(tmp_path / "a.tsv", rows[:5])
    write_manifest(tmp_path / "b.tsv", rows[5:])
    split = [rows[7], rows[1], rows[4], rows[9], rows[2]]
    write_manifest(tmp_path / "split.tsv", split)
    fmt = ["format=kaldi", "dedup=true"]
    for name in ("a", "b", "direct"):
        manifest = tmp_path / ("split.tsv" if name == "direct" else f"{name}.tsv")
        _run([f"checkpoint={corpus['ckpt']}", f"data.manifest={manifest}",
              f"out={tmp_path / name / 'u.txt'}", *fmt])
    sources = f"from_units=[{tmp_path / 'a' / 'u.txt'},{tmp_path / 'b' / 'u.txt'}]"
    out = tmp_path / "split" / "u.txt"
    merge = [f"data.manifest={tmp_path / 'split.tsv'}", f"out={out}", sources, *fmt]
    capsys.readouterr()
    assert _run([*merge, f"checkpoint={corpus['ckpt']}"]) == 0
    assert "merged 2 unit file(s)" in capsys.readouterr().out
    direct = tmp_path / "direct" / "u.txt"
    assert out.read_bytes() == direct.read_bytes()  # the same bytes as extracting the split
    assert U.durations_path(out).read_bytes() == U.durations_path(direct).read_bytes()
    meta, ref = (json.loads(U.sidecar_path(p).read_text()) for p in (out, direct))
    assert meta["merged_from"] == [str(tmp_path / "a" / "u.txt"), str(tmp_path / "b" / "u.txt")]
    assert meta["counts"]["utterances"] == ref["counts"]["utterances"] == 4
    assert meta["counts"]["frames"] == ref["counts"]["frames"]
    assert [r["id"] for r in meta["rejected"]] == ["broken"]  # rows[4], unreadable
    assert meta["manifest_hash"] == ref["manifest_hash"] == file_hash(tmp_path / "split.tsv")
    assert meta["checkpoint_hash"] == ref["checkpoint_hash"]
    assert meta["units_hash"] == file_hash(out)
    _run(merge)
    assert "already done" in capsys.readouterr().out
    side = json.loads(U.sidecar_path(tmp_path / "a" / "u.txt").read_text())
    assert side["normalization"]["speakers_computed"] == 0
    side["normalization"]["speakers_computed"] = 1  # as without a stats.json for every speaker
    U.sidecar_path(tmp_path / "a" / "u.txt").write_text(json.dumps(side))
    with caplog.at_level("WARNING", logger="speechvq.extract"):
        _run([*merge, "force=true"])
    assert "statistics were computed over its own manifest" in caplog.text
    # another checkpoint's units, another format, a gap: refused, naming the problem
    other = tmp_path / "other.pt"
    other.write_bytes(b"not these weights")
    with pytest.raises(StageError, match="checkpoint_hash"):
        _run([*merge, f"checkpoint={other}", "force=true"])
    with pytest.raises(StageError, match="has format='kaldi', not 'gslm'"):
        _run([f"data.manifest={tmp_path / 'split.tsv'}", f"out={tmp_path / 'g.txt'}", sources,
              "format=gslm", "dedup=true"])
    write_manifest(tmp_path / "more.tsv", [*split, ManifestRow("new-1", "/x.wav", 16000, "x")])
    with pytest.raises(StageError, match=r"1 utterance\(s\) are in none of .*: new-1"):
        _run([f"data.manifest={tmp_path / 'more.tsv'}", f"out={tmp_path / 'm.txt'}", sources,
              *fmt])


# ---------------------------------------------------------------- CUDA numerics


def test_extraction_numerics_on_cuda_and_nothing_elsewhere():
    """TF32 off, deterministic cuDNN, no autotuning inside; the settings before restored after
    (flags only: no GPU needed)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn

    def state():
        tf32 = (matmul.fp32_precision, cudnn.conv.fp32_precision) if hasattr(
            matmul, "fp32_precision") else (matmul.allow_tf32, cudnn.allow_tf32)
        return (*tf32, cudnn.deterministic, cudnn.benchmark)

    before = state()
    try:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision = cudnn.conv.fp32_precision = "tf32"
            exact, fast = ("ieee", "ieee", True, False), ("tf32", "tf32", False, True)
        else:
            matmul.allow_tf32 = cudnn.allow_tf32 = True
            exact, fast = (False, False, True, False), (True, True, False, True)
        cudnn.deterministic, cudnn.benchmark = False, True
        with E.extraction_numerics("cuda"):
            assert state() == exact
        assert state() == fast
        with E.extraction_numerics("cpu"):
            assert state() == fast
        with pytest.raises(RuntimeError), E.extraction_numerics(torch.device("cuda", 0)):
            assert state() == exact
            raise RuntimeError("a failed extraction restores them too")
        assert state() == fast
    finally:
        if hasattr(matmul, "fp32_precision"):
            matmul.fp32_precision, cudnn.conv.fp32_precision = before[:2]
        else:
            matmul.allow_tf32, cudnn.allow_tf32 = before[:2]
        cudnn.deterministic, cudnn.benchmark = before[2:]
