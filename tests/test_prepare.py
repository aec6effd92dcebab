"""speechvq-prepare and speechvq.data.folder: manifests, rejected files, splits, the mini corpus."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

from speechvq.cli import prepare
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.alignments import Interval, textgrid_text
from speechvq.data.folder import folder_candidates, split_rows
from speechvq.data.manifest import ManifestRow, read_manifest
from speechvq.data.synth import MINI_CORPUS

SR = 16000
PREPARE = Path(sys.executable).parent / "speechvq-prepare"
SPEAKERS = ("alice", "bob", "carol")


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("prepare", overrides=["progress=false", *overrides])


def _signal(rng: np.random.Generator, n: int) -> np.ndarray:
    t = np.arange(n) / SR
    return (
        0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.02 * rng.standard_normal(n)
    ).astype(np.float32)


def _make_folder(root: Path, per_speaker: int) -> dict[str, tuple[str, int]]:
    """``spk/uNNN.{wav,flac}`` files of 0.3-0.6 s; every 10th one stereo at 22.05 kHz.

    Returns id -> (speaker, expected num_samples at 16 kHz)."""
    rng = np.random.default_rng(0)
    expected = {}
    for spk in SPEAKERS:
        (root / spk).mkdir(parents=True)
        for i in range(per_speaker):
            n = int(rng.integers(int(0.3 * SR), int(0.6 * SR))) // 10 * 10
            if i % 10 == 0:  # 22.05 kHz stereo: 441 samples per 320 at 16 kHz
                x = _signal(rng, n * 441 // 320)
                sf.write(root / spk / f"u{i:03d}.wav", np.stack([x, 0.5 * x], 1), 22050)
            else:
                suffix = ".flac" if i % 2 else ".wav"
                sf.write(root / spk / f"u{i:03d}{suffix}", _signal(rng, n), SR)
            expected[f"{spk}_u{i:03d}"] = (spk, n)
    return expected


def _add_bad_files(root: Path) -> dict[str, str]:
    """A zero-byte .wav, a truncated .flac and a text file named .wav: path -> words of the reason."""
    (root / "alice" / "empty.wav").write_bytes(b"")
    good = root / "bob" / "u001.flac"
    data = good.read_bytes()
    (root / "bob" / "cut.flac").write_bytes(data[: len(data) // 2])
    (root / "carol" / "notes.wav").write_text("meeting notes, not audio\n" * 50)
    return {
        str(root / "alice" / "empty.wav"): "empty",
        str(root / "bob" / "cut.flac"): "",
        str(root / "carol" / "notes.wav"): "cannot decode",
    }


def test_cli_folder_acceptance(tmp_path):
    """303 utterances of 3 speakers plus 3 bad files: every good file in, the 3 bad ones listed."""
    root, out = tmp_path / "audio", tmp_path / "out"
    expected = _make_folder(root, per_speaker=101)
    bad = _add_bad_files(root)
    (root / "README.txt").write_text("not an audio file, not even looked at")
    proc = subprocess.run(
        [
            str(PREPARE),
            "data=folder",
            f"data.root={root}",
            f"out_dir={out}",
            "data.split.by=utterance",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "3 rejected" in proc.stdout

    rows = read_manifest(out / "manifest.tsv")
    assert {r.id: (r.speaker, r.num_samples) for r in rows} == expected
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert rejected[0] == "path\treason"
    reasons = dict(line.split("\t") for line in rejected[1:])
    assert set(reasons) == set(bad)
    for path, words in bad.items():
        assert reasons[path] and words in reasons[path]

    # stratified by utterance: no utterance in two subsets, none lost, every speaker everywhere
    splits = {s: read_manifest(out / f"{s}.tsv") for s in ("train", "valid", "test")}
    ids = [r.id for s in splits.values() for r in s]
    assert len(ids) == len(set(ids)) == len(rows)
    for subset in splits.values():
        assert {r.speaker for r in subset} == set(SPEAKERS)
    assert 0.05 < len(splits["valid"]) / len(rows) < 0.15

    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["speakers"]) == list(SPEAKERS)
    assert stats["global"]["frames"] == sum(r.num_samples // 160 for r in splits["train"])
    assert len(stats["global"]["mean"]) == stats["features"]["n_mels"] == 80


def _unescape(field: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"t": "\t", "n": "\n", "r": "\r"}.get(m[1], m[1]), field)


def test_truncated_wav_and_odd_file_names_in_rejected_tsv(tmp_path):
    """A WAV cut in half is rejected (not kept at half its length); names holding a tab, a newline
    or a backslash stay one escaped line of two fields in rejected.tsv."""
    root, out = tmp_path / "audio", tmp_path / "out"
    _make_folder(root, per_speaker=4)
    data = (root / "alice" / "u000.wav").read_bytes()  # 22.05 kHz stereo
    cut = root / "alice" / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    odd = [root / "bob" / "tab\there.wav", root / "bob" / "new\nline.wav",
           root / "bob" / "back\\slash.wav"]
    for path in odd:
        path.write_text("not audio\n" * 50)
    prepare.run(_cfg("data=folder", f"data.root={root}", f"out_dir={out}", "stats=false",
                     "data.split.by=utterance"))
    lines = (out / "rejected.tsv").read_text().split("\n")
    assert lines[0] == "path\treason" and lines[-1] == ""
    fields = [line.split("\t") for line in lines[1:-1]]
    assert all(len(f) == 2 for f in fields), fields
    reasons = {_unescape(path): reason for path, reason in fields}
    assert set(reasons) == {str(cut), *map(str, odd)}
    assert reasons[str(cut)].startswith("truncated: its header declares")
    assert "cut" not in {r.id.split("_")[-1] for r in read_manifest(out / "manifest.tsv")}


def _ids(split: dict) -> dict:
    return {k: sorted(r.id for r in v) for k, v in split.items()}


def test_split_by_speaker_and_by_utterance_never_leak():
    rows = [
        ManifestRow(f"s{s}_{i}", f"/a/s{s}/{i}.wav", 100, f"s{s}")
        for s in range(10)
        for i in range(7)
    ]
    for by in ("speaker", "utterance"):
        split = split_rows(rows, by, valid=0.2, test=0.1, seed=3)
        ids = [r.id for part in split.values() for r in part]
        assert sorted(ids) == sorted(r.id for r in rows)  # each utterance exactly once
        # reproducible, whatever order the files were found in; another seed, another split
        assert _ids(split) == _ids(split_rows(list(reversed(rows)), by, 0.2, 0.1, seed=3))
        assert _ids(split) != _ids(split_rows(rows, by, 0.2, 0.1, seed=4))
        spk = {k: {r.speaker for r in v} for k, v in split.items()}
        if by == "speaker":
            assert not (
                spk["train"] & spk["valid"]
                or spk["train"] & spk["test"]
                or spk["valid"] & spk["test"]
            )
            assert (len(spk["train"]), len(spk["valid"]), len(spk["test"])) == (7, 2, 1)
        else:
            assert spk["train"] == spk["valid"] == spk["test"] == {f"s{s}" for s in range(10)}
    with pytest.raises(ValueError, match="too few"):
        split_rows(rows[:14], "speaker", valid=0.1, test=0.1)


def test_speaker_modes_and_id_clash(tmp_path):
    root = tmp_path / "audio"
    for rel in ("reader1/ch1/a.wav", "reader2/ch9/b.flac"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / rel, np.zeros(800, np.float32), SR)
    items, _ = folder_candidates(root, speaker="grandparent")
    assert [(c.id, c.speaker) for c in items] == [
        ("reader1_ch1_a", "reader1"),
        ("reader2_ch9_b", "reader2"),
    ]
    items, rejected = folder_candidates(root, speaker="regex", speaker_regex=r"ch(\d)")
    assert [c.speaker for c in items] == ["1", "9"] and not rejected
    items, rejected = folder_candidates(root, speaker="regex", speaker_regex=r"ch1")
    assert len(items) == 1 and "does not match" in rejected[0][1]

    sf.write(root / "reader1_ch1_a.flac", np.zeros(800, np.float32), SR)  # id reader1_ch1_a again
    with pytest.raises(StageError, match=r"clash.*reader1_ch1_a.*reader1/ch1/a.wav"):
        prepare.run(_cfg(f"data.root={root}", f"out_dir={tmp_path / 'out'}"))
    with pytest.raises(StageError, match="not a folder"):
        prepare.run(_cfg(f"data.root={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}"))
    with pytest.raises(StageError, match="data.root is required"):
        prepare.run(_cfg(f"out_dir={tmp_path / 'out'}"))


def _make_mini(root: Path) -> None:
    """A LibriSpeech-layout corpus with .phn beside each flac: 2 speakers x 3 splits x 2 utts."""
    rng = np.random.default_rng(1)
    for split in ("train", "valid", "test"):
        for spk in ("11", "22"):
            chapter = root / split / spk / "5"
            chapter.mkdir(parents=True)
            lines = []
            for u in range(2):
                utt = f"{spk}-5-{split[:2]}{u}"
                sf.write(chapter / f"{utt}.flac", _signal(rng, 4000), SR)
                (chapter / f"{utt}.phn").write_text("0.00 0.10 sil\n0.10 0.25 AH\n")
                lines.append(f"{utt} HELLO {split.upper()} {u}")
            (chapter / f"{spk}-5.trans.txt").write_text("\n".join(lines) + "\n")


def test_mini_layout(tmp_path, capsys):
    root, out = tmp_path / "corpus", tmp_path / "out"
    _make_mini(root)
    prepare.run(_cfg("data=mini", f"data.root={root}", f"out_dir={out}"))
    assert "0 rejected" in capsys.readouterr().out
    rows = read_manifest(out / "manifest.tsv")
    assert len(rows) == 12 and {r.speaker for r in rows} == {"11", "22"}
    train = read_manifest(out / "train.tsv")
    assert [r.id for r in train] == ["11-5-tr0", "11-5-tr1", "22-5-tr0", "22-5-tr1"]
    assert train[0].text == "HELLO TRAIN 0"
    test = read_manifest(out / "test.tsv")
    assert all(r.id.endswith(("te0", "te1")) for r in test)
    phn = sorted(p.name for p in (out / "alignments").iterdir())
    assert phn == sorted(f"{r.id}.phn" for r in rows)
    assert (out / "alignments" / "22-5-va1.phn").read_text() == "0.00 0.10 sil\n0.10 0.25 AH\n"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["global"]["frames"] == 4 * (4000 // 160)  # the train split only

    with pytest.raises(StageError, match="not a mini corpus"):
        prepare.run(_cfg("data=mini", f"data.root={tmp_path}", f"out_dir={out}"))


def test_librispeech_errors_are_one_clear_line(tmp_path):
    # data=librispeech is dispatched to speechvq.data.librispeech (tested in test_librispeech.py);
    # its ValueErrors reach the user as a StageError, i.e. one line and exit status 2.
    cfg = _cfg("data=librispeech", "data.subsets=[]", f"out_dir={tmp_path}")
    with pytest.raises(StageError, match="data.subsets is empty"):
        prepare.run(cfg)


@pytest.mark.slow
@pytest.mark.skipif(
    not (MINI_CORPUS / "train").is_dir(), reason="mini corpus not generated"
)
def test_shipped_mini_corpus(tmp_path):
    prepare.run(_cfg("data=mini", f"out_dir={tmp_path}"))
    rows = read_manifest(tmp_path / "manifest.tsv")
    assert rows and all(r.text for r in rows)
    assert len(list((tmp_path / "alignments").glob("*.phn"))) == len(rows)
    split_ids = [
        r.id for s in ("train", "valid", "test") for r in read_manifest(tmp_path / f"{s}.tsv")
    ]
    assert sorted(split_ids) == sorted(r.id for r in rows)


# --- your own labelled corpus: alignments beside the audio or in data.alignments ---------------

TIMIT_PHN = "0 3050 h#\n3050 4559 sh\n4559 {end} ix\n"  # sample indices at 16 kHz
TEXTGRID = textgrid_text({"phones": [Interval(0, 0.1, ""), Interval(0.1, 0.3, "AH0")]})


def _phn_lines(path: Path) -> list[tuple[float, float, str]]:
    out = []
    for line in path.read_text().splitlines():
        start, end, label = line.split()
        out.append((float(start), float(end), label))
    return out


def _timit(root: Path, rng: np.random.Generator) -> None:
    """``DR1/<SPK>/SA1.WAV`` (NIST SPHERE, upper case) + ``SA1.PHN`` in samples for 2 speakers,
    ``SI1027`` for one; one speaker's SX3 has a broken .PHN; MDAB0's SA2 none."""
    for i, spk in enumerate(("FCJF0", "MDAB0")):
        folder = root / "TRAIN" / "DR1" / spk
        folder.mkdir(parents=True)
        for utt in ("SA1", "SA2", "SX3") + (("SI1027",) if i == 0 else ()):
            n = 6000 + 400 * i
            sf.write(folder / f"{utt}.WAV", _signal(rng, n), SR, format="NIST", subtype="PCM_16")
            if (spk, utt) != ("MDAB0", "SA2"):
                (folder / f"{utt}.PHN").write_text(TIMIT_PHN.format(end=n))
        (folder / "SX3.PHN").write_text("0 3050\n")  # two fields: reported and skipped
        (folder / "SA1.WRD").write_text("0 3050 she\n")  # not an alignment


def test_prepare_folder_timit_layout_alignments_beside_audio(tmp_path):
    root, out = tmp_path / "timit", tmp_path / "out"
    _timit(root, np.random.default_rng(2))
    proc = subprocess.run(
        [str(PREPARE), "data=folder", f"data.root={root}", f"out_dir={out}", "stats=false"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "alignments: 4 of 7 utterances" in proc.stdout
    output = proc.stdout + proc.stderr
    assert "SX3.PHN:1:" in output and "3 fields" in output  # file and reason, not fatal
    rows = {r.id: r for r in read_manifest(out / "manifest.tsv")}
    assert len(rows) == 7 and rows["TRAIN_DR1_MDAB0_SA1"].speaker == "MDAB0"
    written = sorted(p.stem for p in (out / "alignments").iterdir())
    assert written == [
        "TRAIN_DR1_FCJF0_SA1", "TRAIN_DR1_FCJF0_SA2", "TRAIN_DR1_FCJF0_SI1027",
        "TRAIN_DR1_MDAB0_SA1",
    ]
    # seconds, each from its own speaker's file (the ends differ: 6000 vs 6400 samples)
    assert _phn_lines(out / "alignments" / "TRAIN_DR1_FCJF0_SA1.phn") == [
        (0.0, 3050 / SR, "h#"), (3050 / SR, 4559 / SR, "sh"), (4559 / SR, 6000 / SR, "ix")
    ]
    assert _phn_lines(out / "alignments" / "TRAIN_DR1_MDAB0_SA1.phn")[-1][1] == 6400 / SR


def test_prepare_folder_mfa_layout_textgrid_beside_audio(tmp_path, capsys):
    root, out = tmp_path / "mfa", tmp_path / "out"
    rng = np.random.default_rng(3)
    for spk in ("s1", "s2"):
        (root / spk).mkdir(parents=True)
        for utt in ("a", "b"):
            sf.write(root / spk / f"{utt}.wav", _signal(rng, 4800), SR)
        (root / spk / "a.TextGrid").write_text(TEXTGRID)
    prepare.run(_cfg("data=folder", f"data.root={root}", f"out_dir={out}", "stats=false"))
    assert "alignments: 2 of 4 utterances" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "alignments").iterdir()) == ["s1_a.phn", "s2_a.phn"]
    assert _phn_lines(out / "alignments" / "s2_a.phn") == [(0, 0.1, "sil"), (0.1, 0.3, "AH")]


def test_prepare_folder_alignments_dir_realdev_layout(tmp_path, capsys):
    """``wav/<spk>/<utt>.wav`` with ``ali/<utt>.phn`` named by file stem (seconds or samples)."""
    root, ali, out = tmp_path / "wav", tmp_path / "ali", tmp_path / "out"
    rng = np.random.default_rng(4)
    ali.mkdir()
    for spk in ("alice", "bob"):
        (root / spk).mkdir(parents=True)
        for utt in (f"{spk}01", f"{spk}02"):
            sf.write(root / spk / f"{utt}.wav", _signal(rng, 4800), SR)
    (ali / "alice01.phn").write_text("0 0.1 sil\n0.1 0.3 AA1\n")
    (ali / "sub").mkdir()
    (ali / "sub" / "BOB02.PHN").write_text("0 1600 sil\n1600 4800 b\n")
    (ali / "carol01.phn").write_text("0 0.2 sil\n")  # no such utterance
    (ali / "bob01.phn").write_text("0.3 0.1 sil\n")  # end before start: skipped
    prepare.run(_cfg(
        "data=folder", f"data.root={root}", f"out_dir={out}", f"data.alignments={ali}",
        "stats=false",
    ))
    summary = capsys.readouterr().out
    assert "alignments: 2 of 4 utterances" in summary and "1 alignment file(s)" in summary
    assert sorted(p.name for p in (out / "alignments").iterdir()) == [
        "alice_alice01.phn", "bob_bob02.phn"
    ]
    assert _phn_lines(out / "alignments" / "alice_alice01.phn") == [(0, 0.1, "sil"), (0.1, 0.3, "AA")]
    assert _phn_lines(out / "alignments" / "bob_bob02.phn") == [(0, 0.1, "sil"), (0.1, 0.3, "b")]

    with pytest.raises(StageError, match="data.alignments"):
        prepare.run(_cfg(
            "data=folder", f"data.root={root}", f"out_dir={out}",
            f"data.alignments={tmp_path / 'missing'}", "stats=false",
        ))
