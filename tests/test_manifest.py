"""speechvq.data.manifest: the TSV format, its checks, and atomic writes."""

from __future__ import annotations

import pytest

from speechvq.data.manifest import ManifestRow, read_manifest, speakers_of, write_manifest


def test_roundtrip_with_and_without_text(tmp_path):
    rows = [
        ManifestRow("b_1", str(tmp_path / "b" / "1.wav"), 16000, "b"),
        ManifestRow("a_1", str(tmp_path / "a" / "1.flac"), 800, "a"),
    ]
    write_manifest(tmp_path / "m.tsv", rows)
    assert read_manifest(tmp_path / "m.tsv") == rows
    assert (tmp_path / "m.tsv").read_text().splitlines()[0] == "id\tpath\tnum_samples\tspeaker"

    with_text = [rows[0], ManifestRow("a_1", rows[1].path, 800, "a", "HELLO WORLD")]
    write_manifest(tmp_path / "t.tsv", with_text)
    lines = (tmp_path / "t.tsv").read_text().splitlines()
    assert lines[0].endswith("\ttext") and lines[2].endswith("\tHELLO WORLD")
    assert read_manifest(tmp_path / "t.tsv") == with_text  # empty text reads back as None
    assert speakers_of(with_text) == ["a", "b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.tsv", "t.tsv"]  # no temp files


def test_paths_written_absolute_read_relative_to_manifest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_manifest(tmp_path / "out" / "m.tsv", [ManifestRow("x", "audio/x.wav", 1, "s")])
    assert read_manifest(tmp_path / "out" / "m.tsv")[0].path == str(tmp_path / "audio" / "x.wav")

    (tmp_path / "rel.tsv").write_text("id\tpath\tnum_samples\tspeaker\nx\tsub/x.wav\t5\ts\n")
    monkeypatch.chdir("/")
    assert read_manifest(tmp_path / "rel.tsv")[0].path == str(tmp_path / "sub" / "x.wav")


@pytest.mark.parametrize(
    "body, where, words",
    [
        ("x\ta.wav\t5\ts\nx\tb.wav\t5\ts\n", ":3:", "duplicate id 'x' (first on line 2)"),
        ("x\ta.wav\t5\n", ":2:", "expected 4"),
        ("x\ta.wav\tfive\ts\n", ":2:", "num_samples"),
        ("x\ta.wav\t-3\ts\n", ":2:", "num_samples"),
        ("\ta.wav\t5\ts\n", ":2:", "empty id"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, body, where, words):
    path = tmp_path / "bad.tsv"
    path.write_text("id\tpath\tnum_samples\tspeaker\n" + body)
    with pytest.raises(ValueError) as err:
        read_manifest(path)
    assert f"{path}{where}" in str(err.value) and words in str(err.value)


def test_bad_header_and_missing_file(tmp_path):
    (tmp_path / "h.tsv").write_text("utt\tpath\tnum_samples\tspeaker\n")
    with pytest.raises(ValueError, match=r"h.tsv:1: bad header"):
        read_manifest(tmp_path / "h.tsv")
    with pytest.raises(ValueError, match="nope.tsv"):
        read_manifest(tmp_path / "nope.tsv")


def test_write_refuses_duplicates_and_tabs(tmp_path):
    row = ManifestRow("x", "a.wav", 1, "s")
    with pytest.raises(ValueError, match="duplicate id 'x'"):
        write_manifest(tmp_path / "m.tsv", [row, row])
    with pytest.raises(ValueError, match="tab"):
        write_manifest(tmp_path / "m.tsv", [ManifestRow("x", "a.wav", 1, "s\t2")])
    assert not (tmp_path / "m.tsv").exists()
