"""Alignment readers and frame labelling: hand-computed frame labels at 50 and 100 Hz."""

from __future__ import annotations

import pytest

from speechvq.data.alignments import (
    AlignmentError,
    Interval,
    frame_labels,
    intervals_from_frames,
    load_alignments,
    match_alignments,
    read_frame_tsv,
    read_phn,
    read_textgrid,
    textgrid_text,
    write_frame_tsv,
    write_phn,
)
from speechvq.data.manifest import ManifestRow

# Boundaries sit between frame starts and frame centres, so a labeller that samples frame i at
# i / rate (start) or (i + 1) / rate (end) instead of (i + 0.5) / rate gives different labels.
ABC_50HZ = [Interval(0.0, 0.025, "a"), Interval(0.025, 0.047, "b"), Interval(0.047, 0.1, "c")]
ABC_100HZ = [Interval(0.0, 0.012, "a"), Interval(0.012, 0.031, "b"), Interval(0.031, 0.04, "c")]


def test_frame_labels_50hz_hand_computed():
    # centres 0.01 0.03 0.05 0.07 0.09; floor(0.1 * 50) = 5 frames
    assert frame_labels(ABC_50HZ, 50) == ["a", "b", "c", "c", "c"]
    # one-frame shifts of the same alignment, which the centre convention must not produce
    assert frame_labels(ABC_50HZ, 50) != ["a", "a", "b", "c", "c"]
    assert frame_labels(ABC_50HZ, 50) != ["b", "c", "c", "c", "sil"]


def test_frame_labels_100hz_hand_computed():
    # centres 0.005 0.015 0.025 0.035; floor(0.04 * 100) = 4 frames
    assert frame_labels(ABC_100HZ, 100) == ["a", "b", "b", "c"]


def test_centre_on_boundary_goes_to_later_interval():
    ivs = [Interval(0.0, 0.015, "a"), Interval(0.015, 0.03, "b")]  # frame 1 centre is 0.015
    assert frame_labels(ivs, 100) == ["a", "b", "b"]


def test_frame_labels_silence_gaps_and_padding():
    ivs = [
        Interval(0.0, 0.02, "sp"),
        Interval(0.02, 0.04, "k"),
        Interval(0.06, 0.08, "spn"),  # gap 0.04-0.06 before it
        Interval(0.08, 0.1, "PAU"),
    ]
    assert frame_labels(ivs, 100, n_frames=12, silence="SIL") == (
        ["SIL", "SIL", "k", "k"] + ["SIL"] * 8
    )
    assert frame_labels([], 50, n_frames=3) == ["sil"] * 3
    with pytest.raises(ValueError, match="overlapping"):
        frame_labels([Interval(0, 0.05, "a"), Interval(0.03, 0.06, "b")], 100)


def test_phn_roundtrip_and_labels(tmp_path):
    path = tmp_path / "u1.phn"
    path.write_text("# flite\n0 0.012 sil\n0.012 0.031 hh\n\n0.031 0.04 AH0\n")
    ivs = read_phn(path)
    assert ivs == [
        Interval(0, 0.012, "sil"),
        Interval(0.012, 0.031, "hh"),
        Interval(0.031, 0.04, "AH"),
    ]
    assert frame_labels(ivs, 100) == ["sil", "hh", "hh", "AH"]
    assert read_phn(path, strip_stress=False)[-1].label == "AH0"
    out = tmp_path / "u2.phn"
    write_phn(out, ivs + [Interval(0.04, 2.9065625, "sil")])
    assert read_phn(out)[-1] == Interval(0.04, 2.9065625, "sil")  # exact on a 16 kHz grid


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("0 0.1 sil\n0.1 0.2\n", 2, "3 fields"),
        ("0 0.1 sil\n0.1 x a\n", 2, "numbers"),
        ("0 0.1 sil\n0.05 0.2 a\n", 2, "overlaps"),
        ("0 0.1 sil\n0.3 0.2 a\n", 2, "start <= end"),
    ],
)
def test_phn_errors_name_file_and_line(tmp_path, text, line, match):
    path = tmp_path / "bad.phn"
    path.write_text(text)
    with pytest.raises(AlignmentError, match=match) as err:
        read_phn(path)
    assert f"{path}:{line}:" in str(err.value)


def test_phn_converts_timit_sample_indices(tmp_path):
    path = tmp_path / "SA1.PHN"
    path.write_text("0 3050 h#\n3050 4559 sh\n4559 5723 ix\n")
    assert read_phn(path) == [
        Interval(0.0, 3050 / 16000, "h#"),
        Interval(3050 / 16000, 4559 / 16000, "sh"),
        Interval(4559 / 16000, 5723 / 16000, "ix"),
    ]
    assert read_phn(path, sample_rate=8000)[-1] == Interval(4559 / 8000, 5723 / 8000, "ix")
    # integer seconds (short) and float seconds are seconds
    path.write_text("0 1 sil\n1 2 a\n")
    assert read_phn(path) == [Interval(0, 1, "sil"), Interval(1, 2, "a")]
    path.write_text("0 1500.5 sil\n")
    assert read_phn(path) == [Interval(0, 1500.5, "sil")]
    assert load_alignments(path) == {"SA1": [Interval(0, 1500.5, "sil")]}


LONG_TEXTGRID = textgrid_text({  # a quoted word, empty intervals: Praat's long format
    "words": [Interval(0, 0.03, ""), Interval(0.03, 0.1, 'a "quoted" word')],
    "phones": [Interval(0, 0.03, ""), Interval(0.03, 0.05, "AH0"), Interval(0.05, 0.07, ""),
               Interval(0.07, 0.1, "ER1")],
})

SHORT_TEXTGRID = """File type = "ooTextFile"
Object class = "TextGrid"

0
0.1
<exists>
2
"TextTier"
"events"
0
0.1
1
0.04
"click"
"IntervalTier"
"spk1 - phones"
0
0.1
4
0
0.03
""
0.03
0.05
"AH0"
0.05
0.07
""
0.07
0.1
"ER1"
"""

EXPECTED_PHONES = [
    Interval(0.0, 0.03, "sil"),
    Interval(0.03, 0.05, "AH"),
    Interval(0.05, 0.07, "sil"),  # an empty interval is kept as silence, never dropped
    Interval(0.07, 0.1, "ER"),
]


def test_textgrid_long_format_keeps_empty_intervals_and_strips_stress(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_text(LONG_TEXTGRID)
    ivs = read_textgrid(path)
    assert ivs == EXPECTED_PHONES
    # concatenating durations (what converters that drop empty intervals do) would move ER to
    # 0.05 s; with the empty interval kept ER starts at frame 7 (centre 0.075) at 100 Hz
    assert frame_labels(ivs, 100) == ["sil"] * 3 + ["AH"] * 2 + ["sil"] * 2 + ["ER"] * 3
    assert read_textgrid(path, tier="words")[1].label == 'a "quoted" word'
    assert read_textgrid(path, strip_stress=False)[1].label == "AH0"


def test_textgrid_short_format_utf16_and_mfa_speaker_tier(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_text(SHORT_TEXTGRID, encoding="utf-16")
    assert read_textgrid(path) == EXPECTED_PHONES


def test_textgrid_errors(tmp_path):
    path = tmp_path / "utt.TextGrid"
    path.write_text(LONG_TEXTGRID)
    with pytest.raises(AlignmentError, match=r"no interval tier named 'syllables'.*words"):
        read_textgrid(path, tier="syllables")
    bad = tmp_path / "bad.TextGrid"
    bad.write_text(LONG_TEXTGRID.replace("xmax = 0.05", "xmax = zero"))
    line = LONG_TEXTGRID.splitlines().index("            xmax = 0.05") + 1
    with pytest.raises(AlignmentError, match="unexpected .zero.") as err:
        read_textgrid(bad)
    assert f"{bad}:{line}:" in str(err.value)
    cut = tmp_path / "cut.TextGrid"
    cut.write_text(LONG_TEXTGRID[:-60])
    with pytest.raises(AlignmentError, match="ends early"):
        read_textgrid(cut)
    notgrid = tmp_path / "x.TextGrid"
    notgrid.write_text("hello\n")
    with pytest.raises(AlignmentError, match=str(notgrid)):
        read_textgrid(notgrid)


def test_frame_tsv_roundtrip_and_errors(tmp_path):
    labels = {"u2": ["sil", "a", "a", "b"], "u1": ["sil"] * 3 + ["k"] * 2}
    path = tmp_path / "frames.tsv"
    write_frame_tsv(path, labels, 50)
    assert path.read_text().splitlines()[:2] == [
        "id\tframe_rate\tlabels",
        "u1\t50\tsil sil sil k k",
    ]
    assert read_frame_tsv(path) == labels
    ivs = load_alignments(path)
    assert ivs["u2"] == intervals_from_frames(labels["u2"], 50)
    for utt, seq in labels.items():  # back to frames at the same rate: identical
        assert frame_labels(ivs[utt], 50, n_frames=len(seq)) == seq
    bad = tmp_path / "bad.tsv"
    bad.write_text("u1\t50\ta b\nu2\tfast\ta\n")
    with pytest.raises(AlignmentError, match=rf"{bad}:2:.*frame_rate"):
        read_frame_tsv(bad)
    bad.write_text("u1\t50\ta b\nu1\t50\ta\n")
    with pytest.raises(AlignmentError, match="duplicate"):
        read_frame_tsv(bad)


def test_load_alignments_folder(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    write_phn(tmp_path / "a" / "u1.phn", ABC_100HZ)
    (tmp_path / "a" / "b" / "u2.TextGrid").write_text(LONG_TEXTGRID)
    (tmp_path / "a" / "notes.txt").write_text("ignored")
    found = load_alignments(tmp_path)
    assert sorted(found) == ["u1", "u2"]
    assert found["u1"] == ABC_100HZ and found["u2"] == EXPECTED_PHONES
    assert load_alignments(tmp_path / "a" / "u1.phn") == {"u1": ABC_100HZ}
    # a stem in two folders (any case): those files are keyed by relative path, others by stem
    write_phn(tmp_path / "U1.PHN", ABC_50HZ)
    assert sorted(load_alignments(tmp_path)) == ["U1", "a/u1", "u2"]
    (tmp_path / "U1.textgrid").write_text(LONG_TEXTGRID)
    with pytest.raises(AlignmentError, match="also aligned"):
        load_alignments(tmp_path)
    (tmp_path / "U1.textgrid").unlink()
    # unreadable files: fatal by default, reported and skipped with on_error
    (tmp_path / "a" / "broken.phn").write_text("0 x sil\n")
    with pytest.raises(AlignmentError, match="broken.phn:1:"):
        load_alignments(tmp_path)
    errors: list[AlignmentError] = []
    assert sorted(load_alignments(tmp_path, on_error=errors.append)) == ["U1", "a/u1", "u2"]
    assert [e.path for e in errors] == [str(tmp_path / "a" / "broken.phn")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AlignmentError, match="no .phn or .TextGrid"):
        load_alignments(empty)
    with pytest.raises(AlignmentError, match="does not exist"):
        load_alignments(tmp_path / "missing.phn")


def _row(utt: str, path: str, speaker: str) -> ManifestRow:
    return ManifestRow(utt, path, 16000, speaker)


def _one(label: str) -> list[Interval]:
    return [Interval(0.0, 1.0, label)]


def test_match_alignments_by_id_stem_and_speaker_prefix():
    alignments = {"spk_u1": _one("id"), "u2": _one("stem"), "U3": _one("ci"), "u4": _one("x")}
    rows = [
        _row("spk_u1", "/c/spk/other.wav", "spk"),  # exact id beats the stem
        _row("spk_u2", "/c/spk/u2.wav", "spk"),  # stem
        _row("spk_u3", "/c/spk/u3.flac", "spk"),  # stem, case-insensitive
        _row("spk_u5", "/c/spk/u5.wav", "spk"),  # nothing
        _row("spk_u4", "/cache/0001.wav", "spk"),  # id minus its speaker prefix
    ]
    found = match_alignments(alignments, rows)
    assert list(found) == ["spk_u1", "spk_u2", "spk_u3", "spk_u4"]  # row order, no spk_u5
    assert [v[0].label for v in found.values()] == ["id", "stem", "ci", "x"]
    # <speaker>_<stem> keys, e.g. another prepare's OUT/alignments, for rows with other ids
    found = match_alignments({"s1_a": _one("a")}, [_row("dr1_s1_a", "/c/dr1/s1/a.wav", "s1")])
    assert found == {"dr1_s1_a": _one("a")}


def test_match_alignments_resolves_timit_sa1_by_path():
    # load_alignments keys TIMIT's repeated stems by relative path; si1027 by its unique stem
    alignments = {
        "dr1/fcjf0/sa1": _one("f"),
        "dr1/mdab0/sa1": _one("m"),
        "si1027": _one("si"),
    }
    rows = [
        _row("DR1_FCJF0_SA1", "/t/TRAIN/DR1/FCJF0/SA1.WAV", "FCJF0"),
        _row("dr1_mdab0_sa1", "/t/train/dr1/mdab0/sa1.wav", "mdab0"),
        _row("dr2_x_sa1", "/t/train/dr2/x/sa1.wav", "x"),  # no alignment: not guessed
        _row("dr1_fcjf0_si1027", "/t/train/dr1/fcjf0/si1027.wav", "fcjf0"),
    ]
    found = match_alignments(alignments, rows)
    assert {k: v[0].label for k, v in found.items()} == {
        "DR1_FCJF0_SA1": "f",
        "dr1_mdab0_sa1": "m",
        "dr1_fcjf0_si1027": "si",
    }
    # one key "sa1" and several rows with that stem: ambiguous, nobody gets it
    assert match_alignments({"sa1": _one("?")}, rows[:2]) == {}
    # ... but a single row with that stem does
    assert match_alignments({"sa1": _one("1")}, rows[:1]) == {"DR1_FCJF0_SA1": _one("1")}
