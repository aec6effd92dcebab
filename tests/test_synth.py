"""The flite mini-corpus generator, and the committed copy in egs/mini/corpus."""

from __future__ import annotations

import csv
import re
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechvq.data.alignments import frame_labels, load_alignments, read_phn
from speechvq.data.synth import (
    FliteError,
    check_sentences,
    generate_corpus,
    load_sentences,
    plan_corpus,
    transcript,
)

CORPUS = Path(__file__).resolve().parents[1] / "egs" / "mini" / "corpus"
needs_flite = pytest.mark.skipif(shutil.which("flite") is None, reason="flite is not installed")

# sentences opening and closing on strong sounds, so the energy check below is sharp
_SENTENCES = [
    "Anna made a lemon cake for me.",
    "All animals were alarmed, and many ran away.",
    "Every morning a young owl was calling.",
    "Our old mule was eating yellow oats.",
]


TINY = {"train": 1, "valid": 0, "test": 1}


def _utterances(root: Path) -> dict[str, dict[str, str]]:
    with open(root / "utterances.tsv", newline="", encoding="utf-8") as f:
        return {row["id"]: row for row in csv.DictReader(f, delimiter="\t")}


def _transcripts(root: Path) -> dict[str, tuple[str, str]]:
    """id -> (split, text) from every trans.txt."""
    out = {}
    for path in root.glob("*/*/*/*.trans.txt"):
        split = path.relative_to(root).parts[0]
        for line in path.read_text(encoding="utf-8").splitlines():
            utt, text = line.split(" ", 1)
            out[utt] = (split, text)
    return out


def _label_energy_shift(wav: np.ndarray, intervals, max_shift: int = 8) -> np.ndarray:
    """Score of each shift (10 ms frames) of the speech/silence labels against frame energy."""
    n = len(wav) // 160
    log_energy = np.log10(np.mean(wav[: n * 160].reshape(n, 160) ** 2, axis=1) + 1e-10)
    speech = np.array([lab != "sil" for lab in frame_labels(intervals, 100, n)])
    scores = []
    for shift in range(-max_shift, max_shift + 1):
        moved = np.zeros_like(speech)  # labels delayed by `shift` frames
        if shift >= 0:
            moved[shift:] = speech[: n - shift]
        else:
            moved[:shift] = speech[-shift:]
        scores.append(log_energy[moved].mean() - log_energy[~moved].mean())
    return np.array(scores)


@needs_flite
def test_generate_tiny_corpus(tmp_path):
    root = tmp_path / "corpus"
    summary = generate_corpus(
        root,
        sentences=_SENTENCES,
        voices=("kal16", "slt"),
        n_per_voice=TINY,
        seed=3,
        progress=False,
    )
    assert summary["utterances"] == 4 and summary["splits"]["valid"]["utterances"] == 0
    flacs = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.flac"))
    assert flacs == [
        "test/1001/3/1001-3-0000.flac",
        "test/1002/3/1002-3-0000.flac",
        "train/1001/1/1001-1-0000.flac",
        "train/1002/1/1002-1-0000.flac",
    ]
    speakers = (root / "SPEAKERS.TXT").read_text()
    assert re.search(r"^1001 *\| M \|.*flite kal16$", speakers, re.M)
    assert re.search(r"^1002 *\| F \|.*flite slt$", speakers, re.M)

    trans = _transcripts(root)
    assert set(trans) == {Path(f).stem for f in flacs}
    assert trans["1001-3-0000"][1] == trans["1002-3-0000"][1]  # test text is parallel
    assert trans["1001-1-0000"][1] != trans["1001-3-0000"][1]  # and never heard in train
    assert all(text in {transcript(s) for s in _SENTENCES} for _split, text in trans.values())

    rows = _utterances(root)
    scores = 0.0
    for f in flacs:
        info = sf.info(root / f)
        assert (info.samplerate, info.channels, info.format, info.subtype) == (
            16000,
            1,
            "FLAC",
            "PCM_16",
        )
        ivs = read_phn((root / f).with_suffix(".phn"))
        assert ivs[0].start == 0 and ivs[0].label == "sil" and ivs[-1].label == "sil"
        assert all(a.end == b.start for a, b in zip(ivs, ivs[1:], strict=False))
        assert ivs[-1].end == pytest.approx(info.frames / 16000, abs=1e-7)
        assert "pau" not in {iv.label for iv in ivs}
        # flite's own last end time vs the audio: a few ms for slt, kal16 cuts its last pause
        row = rows[Path(f).stem]
        assert int(row["num_samples"]) == info.frames
        assert -0.02 <= float(row["align_offset"]) <= (0.2 if row["voice"] == "kal16" else 0.02)
        wav, _ = sf.read(root / f, dtype="float32")
        scores = scores + _label_energy_shift(wav, ivs)
    # speech frames are far louder than silence frames, and best so with the labels unshifted
    # (+-20 ms): a misaligned .phn would move the peak
    assert scores[8] / len(flacs) > 2.0  # > 20 dB
    assert abs(int(np.argmax(scores)) - 8) <= 2

    with pytest.raises(FileExistsError, match="overwrite"):
        generate_corpus(root, sentences=_SENTENCES, voices=("slt",), n_per_voice=TINY)
    again = generate_corpus(
        root,
        sentences=_SENTENCES,
        voices=("slt",),
        overwrite=True,
        progress=False,
        n_per_voice={"train": 1, "valid": 1, "test": 1},
    )
    assert again["utterances"] == 3 and not (root / "train" / "1002").exists()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing"):
        generate_corpus(other, _SENTENCES, ("slt",), TINY, overwrite=True)
    assert (other / "keep.txt").exists()


@needs_flite
def test_unknown_voice(tmp_path):
    with pytest.raises(FliteError, match="no voice 'nobody'"):
        generate_corpus(tmp_path / "c", _SENTENCES, ("nobody",), TINY)
    assert not (tmp_path / "c").exists()


def test_missing_flite_is_a_clear_error(tmp_path):
    with pytest.raises(FliteError, match="apt-get install flite"):
        generate_corpus(tmp_path / "c", flite="no-such-flite-binary")


def test_shipped_sentences():
    sentences = load_sentences()
    assert len(sentences) >= 400
    assert all(5 <= len(s.split()) <= 12 for s in sentences)
    assert len({transcript(s) for s in sentences}) == len(sentences)


def test_load_sentences_errors(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("# mine\nThe cat sat down.\nThere were 3 cats.\n")
    with pytest.raises(ValueError, match=rf"{path}:3:.*spell numbers out"):
        load_sentences(path)
    path.write_text("The cat sat down.\n\nthe cat, sat down!\n")
    with pytest.raises(ValueError, match=rf"{path}:3:.*repeats line 1"):
        load_sentences(path)
    assert transcript("The dragon's cave, isn't it?") == "THE DRAGON'S CAVE ISN'T IT"
    with pytest.raises(ValueError, match=r"sentences:2:.*spell"):
        check_sentences(["Fine words here.", "Route 66 is long."])


def test_plan_is_deterministic_disjoint_and_extendable():
    sentences = load_sentences()
    plan = plan_corpus(sentences)
    assert plan == plan_corpus(sentences) and plan != plan_corpus(sentences, seed=1)
    texts = defaultdict(set)
    for u in plan:
        texts[u.split].add(u.text)
        assert re.fullmatch(rf"{u.speaker}-{u.chapter}-\d{{4}}", u.id)
        assert 0.9 <= u.duration_stretch <= 1.15
        assert (u.f0_shift is None) == (u.voice == "rms")
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["valid"]
    assert not texts["valid"] & texts["test"]
    assert len(texts["test"]) == 10 and len(texts["train"]) == 160  # parallel test, distinct train
    bigger = plan_corpus(sentences, n_per_voice={"train": 90, "valid": 7, "test": 10})
    assert set(plan) <= set(bigger)  # more train utterances keep every earlier one
    with pytest.raises(ValueError, match="fewer utterances"):
        plan_corpus(sentences, n_per_voice={"train": 500, "valid": 7, "test": 10})
    with pytest.raises(ValueError, match="exactly the keys"):
        plan_corpus(sentences, n_per_voice={"train": 5})


def test_committed_corpus():
    files = [p for p in CORPUS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 12 * 1024 * 1024
    flacs = {p.stem: p for p in CORPUS.glob("*/*/*/*.flac")}
    phns = {p.stem: p for p in CORPUS.glob("*/*/*/*.phn")}
    assert flacs and set(flacs) == set(phns)  # every flac has its alignment, and nothing else
    trans = _transcripts(CORPUS)
    assert set(trans) == set(flacs)

    speakers_by_split = defaultdict(set)
    texts_by_split = defaultdict(set)
    for utt, (split, text) in trans.items():
        speaker, chapter, _ = utt.split("-")
        assert flacs[utt].relative_to(CORPUS).parts[:3] == (split, speaker, chapter)
        speakers_by_split[split].add(speaker)
        texts_by_split[split].add(text)
    assert set(speakers_by_split) == {"train", "valid", "test"}
    all_speakers = set.union(*speakers_by_split.values())
    assert len(all_speakers) == 4
    assert all(s == all_speakers for s in speakers_by_split.values())
    assert not texts_by_split["train"] & texts_by_split["test"]
    assert not texts_by_split["train"] & texts_by_split["valid"]
    speakers_txt = (CORPUS / "SPEAKERS.TXT").read_text()
    assert all(re.search(rf"^{s} ", speakers_txt, re.M) for s in all_speakers)

    alignments = load_alignments(CORPUS)
    for utt, path in flacs.items():
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert alignments[utt][-1].end == pytest.approx(info.frames / 16000, abs=1e-7)

    # the committed copy is what the generator's defaults plan (ids and texts)
    planned = {u.id: (u.split, transcript(u.text)) for u in plan_corpus(load_sentences())}
    assert planned == trans
