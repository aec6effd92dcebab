"""speechvq-prepare and speechvq.data.folder: manifests, rejected files, splits, the mini corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hydra import compose, initialize_config_dir

from speechvq.cli import prepare
from speechvq.cli._hydra import StageError, conf_dir
from speechvq.data.folder import folder_candidates, split_rows
from speechvq.data.manifest import ManifestRow, read_manifest

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
    not (prepare.MINI_CORPUS / "train").is_dir(), reason="mini corpus not generated"
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
