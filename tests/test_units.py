"""Unit files: every format round-trips, dedup + durations expand back, shards merge, BPE runs."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from speechvq import unit_merge as M
from speechvq import units as U

FORMATS = ["gslm", "kaldi", "npy", "espnet", "km"]
SUFFIX = {"gslm": ".txt", "kaldi": ".txt", "npy": ".npz", "espnet": ".txt", "km": ".km"}


def _corpus(seed: int = 0, n: int = 6) -> dict[str, np.ndarray]:
    """Frame-level units with runs, an empty utterance, ids that sort differently in C order."""
    rng = np.random.default_rng(seed)
    ids = ["b-2", "a_10", "B-1", "a-9", "Zz", "é-1"][:n]
    out = {}
    for utt in ids:
        values = rng.integers(0, 500, size=int(rng.integers(1, 30)))
        out[utt] = np.repeat(values, rng.integers(1, 5, size=len(values))).astype(np.int32)
    out["empty"] = np.zeros(0, np.int32)
    return out


def _same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _write(tmp_path, units, fmt, **kw):
    path = tmp_path / f"units_{fmt}{SUFFIX[fmt]}"
    U.write_units(path, units, fmt, **kw)
    if fmt == "km":  # ids live in the sidecar
        U.write_sidecar(path, {"format": "km", "ids": list(units)})
    return path


# ------------------------------------------------------------------------------- dedup


def test_dedup_and_expand_are_inverse():
    seq = np.array([3, 3, 3, 7, 7, 3, 1, 1, 1, 1])
    values, durations = U.dedup(seq)
    assert values.tolist() == [3, 7, 3, 1]
    assert durations.tolist() == [3, 2, 1, 4]
    assert np.array_equal(U.expand(values, durations), seq)
    empty_v, empty_d = U.dedup(np.zeros(0, int))
    assert len(empty_v) == len(empty_d) == 0
    with pytest.raises(ValueError):
        U.expand([1, 2], [1, 0])


# ------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips(tmp_path, fmt):
    units = _corpus()
    path = _write(tmp_path, units, fmt)
    back = U.read_units(path)
    assert _same(units, back)
    assert not U.durations_path(path).exists()


@pytest.mark.parametrize("src,dst", list(itertools.permutations(FORMATS, 2)))
def test_conversion_between_formats_is_exact(tmp_path, src, dst):
    units = _corpus(seed=1)
    a = _write(tmp_path, units, src, dedup=True)
    b = tmp_path / f"converted{SUFFIX[dst]}"
    U.convert_units(a, b, dst)
    assert _same(U.read_units(b, expand=True), units)
    assert _same(U.read_units(b), U.read_units(a))  # still deduplicated
    # and back again
    c = tmp_path / f"back{SUFFIX[src]}"
    U.convert_units(b, c, src)
    assert _same(U.read_units(c), U.read_units(a))
    assert _same(U.read_durations(c), U.read_durations(a))
    keeps_order = dst in ("gslm", "npy", "km") or src in ("kaldi", "espnet")
    if keeps_order and src != "npy":  # text files come back byte for byte
        assert c.read_bytes() == a.read_bytes()
        assert U.durations_path(c).read_bytes() == U.durations_path(a).read_bytes()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dedup_files_expand_to_frames(tmp_path, fmt):
    units = _corpus(seed=2)
    path = _write(tmp_path, units, fmt, dedup=True)
    assert U.durations_path(path).exists()
    dedup = U.read_units(path)
    for utt, seq in units.items():
        values, durations = U.dedup(seq)
        assert np.array_equal(dedup[utt], values)
        assert np.array_equal(U.read_durations(path)[utt], durations)
    assert _same(U.read_units(path, expand=True), units)
    # rewriting without dedup removes the stale durations file
    U.write_units(path, units, fmt)
    assert not U.durations_path(path).exists()


def test_text_layouts(tmp_path):
    units = {"u2": np.array([1, 1, 2]), "u10": np.array([0, 5])}
    U.write_units(tmp_path / "g.txt", units, "gslm")
    assert (tmp_path / "g.txt").read_text() == "u2|1 1 2\nu10|0 5\n"  # given order
    U.write_units(tmp_path / "k.txt", units, "kaldi")
    assert (tmp_path / "k.txt").read_text() == "u10 0 5\nu2 1 1 2\n"  # LC_ALL=C order
    U.write_units(tmp_path / "e.txt", units, "espnet", dedup=True)
    assert (tmp_path / "e.txt").read_text() == "u10 \u4e00\u4e05\nu2 \u4e01\u4e02\n"  # no spaces
    assert (tmp_path / "e.txt.durations").read_text() == "u10 1 1\nu2 2 1\n"
    U.write_units(tmp_path / "x.km", units, "km", n_codes=8)
    assert (tmp_path / "x.km").read_text() == "1 1 2\n0 5\n"
    assert (tmp_path / "dict.km.txt").read_text() == "".join(f"{i} 1\n" for i in range(8))
    U.write_units(tmp_path / "n.npz", units, "npy")
    with np.load(tmp_path / "n.npz") as data:
        assert data["u2"].dtype == np.int16 and data.files == ["u2", "u10"]


def test_kaldi_order_is_byte_order(tmp_path):
    ids = ["a", "B", "a-b", "a_b", "ab", "é", "Z1", "a1"]
    U.write_units(tmp_path / "k.txt", {i: np.array([1]) for i in ids}, "kaldi")
    written = [line.split()[0] for line in (tmp_path / "k.txt").read_text().splitlines()]
    assert written == sorted(ids, key=lambda s: s.encode())  # what `LC_ALL=C sort` gives
    assert written[:2] == ["B", "Z1"]


def test_format_inference(tmp_path):
    units = {"x": np.array([4, 2])}
    for fmt in ("gslm", "kaldi", "espnet"):
        U.write_units(tmp_path / f"{fmt}.units", units, fmt)
        assert U.infer_format(tmp_path / f"{fmt}.units") == fmt
    U.write_units(tmp_path / "bin.units", units, "npy")  # content: a zip archive
    assert U.infer_format(tmp_path / "bin.units") == "npy"
    assert U.infer_format(tmp_path / "a.npz.shard-0-of-2") == "npy"
    assert U.infer_format(tmp_path / "a.km.durations") == "km"
    (tmp_path / "weird.txt").write_text("x hello world\n")
    with pytest.raises(ValueError, match="weird.txt:1"):
        U.infer_format(tmp_path / "weird.txt")


def test_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("a|1 2\nb|1 x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        U.read_units(path)
    path.write_text("a|1\na|2\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: duplicate"):
        U.read_units(path)
    with pytest.raises(ValueError, match="whitespace"):
        U.write_units(tmp_path / "o.txt", {"a b": np.array([1])}, "kaldi")
    with pytest.raises(ValueError, match="espnet"):
        U.write_units(tmp_path / "o.txt", {"a": np.array([30000])}, "espnet")
    with pytest.raises(ValueError, match="km"):
        U.write_units(tmp_path / "lonely.km", {"a": np.array([1])}, "km")
        U.read_units(tmp_path / "lonely.km")  # no ids anywhere
    U.write_units(tmp_path / "d.txt", {"a": np.array([1, 1])}, "gslm", dedup=True)
    U.write_sidecar(tmp_path / "d.txt", {"dedup": True})
    U.durations_path(tmp_path / "d.txt").unlink()
    with pytest.raises(FileNotFoundError, match="durations"):
        U.read_units(tmp_path / "d.txt", expand=True)


def test_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "u.txt"
    U.write_units(path, {"a": np.array([1])}, "gslm")
    original = path.read_text()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(U, "_line_body", boom)
    with pytest.raises(RuntimeError):
        U.write_units(path, {"a": np.array([2])}, "gslm")
    assert path.read_text() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.txt"]  # no temp files left


class _Killed(BaseException):
    """A kill between two renames (not an Exception: nothing may catch it)."""


def _rewrite_killed_at(monkeypatch, kill_at: int, path, units, fmt: str, dedup: bool) -> bool:
    """``write_units`` killed just before its ``kill_at``-th atomic write; True if it finished."""
    real, calls = U.atomic_write, []

    def write(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == kill_at:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(U, "atomic_write", write)
    try:
        U.write_units(path, units, fmt, dedup=dedup)
        return True
    except _Killed:
        return False
    finally:
        monkeypatch.setattr(U, "atomic_write", real)


@pytest.mark.parametrize("fmt", ["gslm", "kaldi", "npy"])
@pytest.mark.parametrize("old_dedup,new_dedup", [(True, True), (True, False), (False, True)])
def test_a_killed_rewrite_never_pairs_units_with_other_durations(
    tmp_path, monkeypatch, fmt, old_dedup, new_dedup
):
    """Killed before any of its renames, the rewrite of a unit file leaves the old pair, the new
    pair or no unit file -- never new units beside old durations (nor old units without theirs)."""
    old, new = _corpus(seed=1), _corpus(seed=2)
    versions = []
    for name, units, dedup in (("old", old, old_dedup), ("new", new, new_dedup)):
        ref = tmp_path / f"ref_{name}{SUFFIX[fmt]}"
        U.write_units(ref, units, fmt, dedup=dedup)
        versions.append((U.read_units(ref, fmt), U.read_durations(ref, fmt)))
    for kill_at in itertools.count(1):
        path = tmp_path / f"k{kill_at}" / f"units{SUFFIX[fmt]}"
        U.write_units(path, old, fmt, dedup=old_dedup)
        finished = _rewrite_killed_at(monkeypatch, kill_at, path, new, fmt, new_dedup)
        if path.exists():
            units, durations = U.read_units(path, fmt), U.read_durations(path, fmt)
            assert any(
                _same(units, v_units) and (durations is None) == (v_durations is None)
                and (durations is None or _same(durations, v_durations))
                for v_units, v_durations in versions
            ), kill_at
        if finished:
            assert _same(U.read_units(path, fmt), versions[1][0])
            break


# ------------------------------------------------------------------------------- shards


@pytest.mark.parametrize("fmt,dedup", [("gslm", False), ("kaldi", True), ("npy", True), ("km", False)])
def test_merge_shards(tmp_path, fmt, dedup):
    units = _corpus(seed=3)
    ids = list(units)
    out = tmp_path / f"all{SUFFIX[fmt]}"
    blocks = [ids[:3], ids[3:5], ids[5:]]
    for i, block in enumerate(blocks):
        shard = U.shard_path(out, i, 3)
        assert shard.name == f"{out.name}.shard-{i}-of-3"
        part = {k: units[k] for k in block}
        U.write_units(shard, part, fmt, dedup=dedup)
        meta = {"format": fmt, "dedup": dedup, "checkpoint_hash": "abc", "unit_rate": 50.0,
                "n_codes": 512, "counts": {"utterances": len(block), "frames": 7},
                "rejected": [{"id": f"bad{i}", "path": "x", "reason": "y"}]}
        if fmt == "km":
            meta["ids"] = block
        U.write_sidecar(shard, meta)
    merged = M.merge_shards(out, 3, remove=True)
    assert _same(U.read_units(out, expand=True), units)
    if fmt in ("gslm", "npy", "km"):
        assert list(U.read_units(out)) == ids  # shard order = manifest order
    assert merged.counts == {"utterances": len(ids), "frames": 21}
    assert [r["id"] for r in merged.rejected] == ["bad0", "bad1", "bad2"]
    assert json.loads(U.sidecar_path(out).read_text())["nshards"] == 3
    assert not list(tmp_path.glob("*shard*"))


def test_merge_refuses_mismatched_or_missing_shards(tmp_path):
    out = tmp_path / "u.txt"
    for i, h in enumerate(["aaa", "bbb"]):
        U.write_units(U.shard_path(out, i, 2), {f"x{i}": np.array([i])}, "gslm")
        U.write_sidecar(U.shard_path(out, i, 2), {"format": "gslm", "checkpoint_hash": h})
    with pytest.raises(ValueError, match="checkpoint_hash"):
        M.merge_shards(out, 2)
    with pytest.raises(FileNotFoundError, match="shard-2-of-3"):
        M.merge_shards(out, 3)


# ------------------------------------------------------------------------------- ASR recipes


def test_espnet_text_with_sentencepiece_bpe(tmp_path):
    """The README's "Units for ASR" BPE path: an ESPnet text file -> sentencepiece BPE pieces."""
    spm = pytest.importorskip("sentencepiece")
    rng = np.random.default_rng(0)
    units = {f"utt{i:03d}": rng.integers(0, 40, size=300) // 2 for i in range(60)}
    text = tmp_path / "text"
    U.write_units(text, units, "espnet", dedup=True)
    # training input: the unit strings without ids (what ESPnet's bpe stage feeds sentencepiece)
    corpus = tmp_path / "units_for_bpe.txt"
    corpus.write_text("".join(line.split(" ", 1)[1] for line in open(text, encoding="utf-8")))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "bpe"), vocab_size=60, model_type="bpe",
        character_coverage=1.0, max_sentence_length=100000, minloglevel=2,
        bos_id=-1, eos_id=-1,
    )
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bpe.model"))
    values = U.read_units(text)
    for utt in list(values)[:5]:
        chars = U.to_cjk(values[utt])
        pieces = sp.encode(chars, out_type=str)
        assert len(pieces) < len(chars)  # pieces span several units
        assert "".join(pieces).replace("\u2581", "") == chars  # lossless
        assert np.array_equal(U.from_cjk("".join(pieces).replace("\u2581", "")), values[utt])


def test_sidecar_fields_and_the_former_frame_rate_key(tmp_path):
    U.write_units(tmp_path / "u.txt", {"a": np.array([1, 2])}, "gslm")
    U.write_sidecar(tmp_path / "u.txt", {"format": "gslm", "frame_rate": 50.0, "mine": 1})
    meta = U.read_sidecar(tmp_path / "u.txt")
    assert meta.unit_rate == 50.0 and meta.extra == {"mine": 1}  # unknown keys kept
    U.write_sidecar(tmp_path / "u.txt", meta)
    written = json.loads(U.sidecar_path(tmp_path / "u.txt").read_text())
    assert written["unit_rate"] == 50.0 and "frame_rate" not in written and written["mine"] == 1


# ------------------------------------------------------------------------------- splits


def _subset(tmp_path, name, units, fmt, dedup, **meta):
    path = tmp_path / f"{name}{SUFFIX[fmt]}"
    U.write_units(path, units, fmt, dedup=dedup)
    U.write_sidecar(path, {"format": fmt, "dedup": dedup, "checkpoint_hash": "abc",
                           "unit_rate": 50.0, "n_codes": 512, "ids": list(units), **meta})
    return path


@pytest.mark.parametrize("fmt,dedup", [("gslm", True), ("kaldi", True), ("npy", True),
                                       ("espnet", False), ("km", False)])
def test_merge_units_builds_a_split_from_its_subsets(tmp_path, fmt, dedup):
    units = _corpus(seed=4)
    ids = list(units)
    a = _subset(tmp_path, "a", {k: units[k] for k in ids[:4]}, fmt, dedup,
                rejected=[{"id": "bad-a", "path": "x", "reason": "y"},
                          {"id": "other", "path": "x", "reason": "y"}])
    b = _subset(tmp_path, "b", {k: units[k] for k in ids[4:]}, fmt, dedup)
    split = [ids[5], ids[0], "bad-a", ids[6], ids[2]]  # the split manifest's order, across subsets
    out = tmp_path / f"split{SUFFIX[fmt]}"
    meta = M.merge_units(out, [a, b], split)
    back = U.read_units(out, expand=True)
    assert _same(back, {k: units[k] for k in split if k != "bad-a"})
    wanted = [k for k in split if k != "bad-a"]
    assert list(U.read_units(out)) == (sorted(wanted, key=str.encode)
                                       if fmt in ("kaldi", "espnet") else wanted)
    assert U.durations_path(out).exists() == dedup
    frames = sum(len(units[k]) for k in wanted)
    assert meta.counts == {"utterances": 4, "frames": frames, "seconds": frames / 50.0,
                           "rejected": 1}
    assert [r["id"] for r in meta.rejected] == ["bad-a"]  # the split's, not the subsets' others
    assert meta.merged_from == [str(a), str(b)] and meta.checkpoint_hash == "abc"
    assert U.read_sidecar(out).merged_from == [str(a), str(b)]
    only_b = M.merge_units(tmp_path / f"b_only{SUFFIX[fmt]}", [a, b], [ids[5]])
    assert only_b.merged_from == [str(b)]  # sources that gave no utterance are not named


def test_merge_units_refuses_gaps_and_mismatches(tmp_path):
    units = _corpus(seed=5)
    ids = list(units)
    a = _subset(tmp_path, "a", {k: units[k] for k in ids[:3]}, "gslm", False)
    b = _subset(tmp_path, "b", {k: units[k] for k in ids[3:]}, "gslm", False)
    with pytest.raises(ValueError, match=r"2 utterance\(s\) are in none of .*: nope-1, nope-2"):
        M.merge_units(tmp_path / "s.txt", [a, b], [ids[0], "nope-1", "nope-2"])
    other = _subset(tmp_path, "other", {"zz": np.array([1])}, "gslm", False,
                    checkpoint_hash="def")
    with pytest.raises(ValueError, match="checkpoint_hash='def'"):
        M.merge_units(tmp_path / "s.txt", [a, other], [ids[0]])
    kaldi = _subset(tmp_path, "k", {"zz": np.array([1])}, "kaldi", False)
    with pytest.raises(ValueError, match="format='kaldi'"):
        M.merge_units(tmp_path / "s.txt", [a, kaldi], [ids[0]])
    twice = _subset(tmp_path, "twice", {ids[0]: units[ids[0]]}, "gslm", False)
    with pytest.raises(ValueError, match=f"id '{ids[0]}' is in both"):
        M.merge_units(tmp_path / "s.txt", [a, twice], [ids[0]])
    with pytest.raises(FileNotFoundError, match="missing unit file"):
        M.merge_units(tmp_path / "s.txt", [a, tmp_path / "gone.txt"], [ids[0]])
    assert not (tmp_path / "s.txt").exists()


# ------------------------------------------------------------------------------- reading fast


def test_reading_gives_views_into_one_array_of_the_dtype_asked(tmp_path):
    units = _corpus(seed=6)
    for fmt in ("gslm", "kaldi", "espnet", "npy"):
        path = _write(tmp_path, units, fmt, dedup=True)
        for dtype in (np.int32, np.int16):
            back = U.read_units(path, expand=True, dtype=dtype)
            assert _same(back, units)
            arrays = [a for a in back.values() if a.size]
            assert {a.dtype for a in arrays} == {np.dtype(dtype)}
            assert len({id(a.base) for a in arrays}) == 1  # one allocation for the file
            assert sum(a.size for a in arrays) <= arrays[0].base.size


def test_reading_checks_what_numpy_would_let_through(tmp_path):
    path = tmp_path / "u.txt"
    path.write_text("a|1 2\nb| \nc|40000 1\n")  # numpy reads " " as [0] and wraps 40000 in int16
    back = U.read_units(path, "gslm")
    assert back["a"].tolist() == [1, 2] and back["b"].tolist() == [] and back["c"][0] == 40000
    with pytest.raises(ValueError, match=r"u.txt:3: unit 40000 does not fit int16"):
        U.read_units(path, "gslm", dtype=np.int16)
    path.write_text("a 1 2\nb 3 x 4\n")
    with pytest.raises(ValueError, match=r"u.txt:2: expected integer units, got '3 x 4'"):
        U.read_units(path, "kaldi")
    path.write_text("a 1 2\nb 3 99999999999\n")  # would wrap silently in int32
    with pytest.raises(ValueError, match=r"u.txt:2: unit 99999999999 does not fit int32"):
        U.read_units(path, "kaldi")
