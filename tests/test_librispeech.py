"""LibriSpeech download/verify/extract/manifest, against a local HTTP server on 127.0.0.1.

The helpers at the top (a tarball in LibriSpeech's exact layout, an HTTP server with Range support
that can cut a response short or ignore Range) are shared with tests/test_recipes.py.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechvq.data import download as dl
from speechvq.data import librispeech as ls
from speechvq.data.alignments import Interval, textgrid_text
from speechvq.data.manifest import read_manifest

# --- helpers ----------------------------------------------------------------------------------

# {subset: {speaker: {chapter: number of utterances}}}; speakers are disjoint across subsets
_LAYOUT = {
    "dev-clean": {"1272": {"128104": 2}, "84": {"121123": 1, "121550": 2}},
    "train-clean-5": {"19": {"198": 2}, "26": {"495": 1}},
}
_SR = 16000


def _text(utt_id: str) -> str:
    return f"HELLO {utt_id.replace('-', ' ')} WORLD"


def _num_samples(utt_id: str) -> int:
    return _SR // 4 + 160 * (sum(map(int, utt_id.split("-"))) % 50)  # 0.25-0.75 s, distinct


def _make_tree(root: Path, subset: str) -> dict[str, tuple[str, int]]:
    """Write ``root/LibriSpeech/...`` for ``subset``; returns {utt id: (speaker, num_samples)}."""
    base = root / "LibriSpeech"
    base.mkdir(parents=True, exist_ok=True)
    for doc in ("BOOKS", "CHAPTERS", "LICENSE", "README", "SPEAKERS"):
        (base / f"{doc}.TXT").write_text(f"; {doc} of a synthetic LibriSpeech\n")
    expected = {}
    rng = np.random.default_rng(0)
    for spk, chapters in _LAYOUT[subset].items():
        for chapter, n in chapters.items():
            folder = base / subset / spk / chapter
            folder.mkdir(parents=True)
            lines = []
            for i in range(n):
                utt = f"{spk}-{chapter}-{i:04d}"
                t = np.arange(_num_samples(utt)) / _SR
                wav = 0.3 * np.sin(2 * np.pi * (150 + 40 * i) * t) + 0.01 * rng.standard_normal(
                    t.size
                )
                sf.write(folder / f"{utt}.flac", wav.astype(np.float32), _SR, subtype="PCM_16")
                lines.append(f"{utt} {_text(utt)}")
                expected[utt] = (spk, t.size)
            (folder / f"{spk}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return expected


def _make_archive(
    tmp: Path, subset: str, extra: tarfile.TarInfo | None = None
) -> tuple[Path, dict]:
    """``tmp/<resource>/<subset>.tar.gz`` in LibriSpeech's layout (+ an ``extra`` member last)."""
    tree = tmp / f"tree-{subset}"
    expected = _make_tree(tree, subset)
    archive = tmp / "srv" / str(ls.SUBSETS[subset].resource) / f"{subset}.tar.gz"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "LibriSpeech", arcname="LibriSpeech")
        if extra is not None:
            data = b"" if extra.issym() or extra.islnk() else b"gotcha\n"
            extra.size = len(data)
            tar.addfile(extra, io.BytesIO(data))
    return archive, expected


def _write_alignments(folder: Path, expected: dict[str, tuple[str, int]]) -> Path:
    """``folder/<id>.phn`` covering each utterance with a few phones (a stand-in for MFA's)."""
    folder.mkdir(parents=True, exist_ok=True)
    phones = ["sil", "HH", "AH0", "L", "OW1", "sil"]
    for utt, (_, n) in expected.items():
        edges = np.linspace(0.0, n / _SR, len(phones) + 1)
        lines = [
            f"{a:.4f} {b:.4f} {p}" for a, b, p in zip(edges[:-1], edges[1:], phones, strict=True)
        ]
        (folder / f"{utt}.phn").write_text("\n".join(lines) + "\n")
    return folder


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_checksums(path: Path, *archives: Path) -> Path:
    path.write_text("".join(f"{_md5(a)}  {a.name}\n" for a in archives))
    return path


class _Server:
    """Serves ``root`` on 127.0.0.1 with HTTP Range support; records every request.

    ``cut_after[url_path] = n``: the next response for that path sends its full Content-Length
    header but only ``n`` body bytes, then closes the connection (a dropped download).
    ``ignore_range``: answer 200 with the whole file even when asked for a range.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[dict] = []
        self.cut_after: dict[str, int] = {}
        self.ignore_range = False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                owner._serve(self)

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        record = {"path": h.path, "range": h.headers.get("Range"), "status": 404, "sent": 0}
        self.requests.append(record)
        file = self.root / h.path.lstrip("/")
        if ".." in h.path or not file.is_file():
            h.send_error(404)
            return
        data = file.read_bytes()
        start, status = 0, 200
        m = re.fullmatch(r"bytes=(\d+)-", record["range"] or "")
        if m and not self.ignore_range:
            start, status = int(m.group(1)), 206
            if start >= len(data):
                record["status"] = 416
                h.send_error(416)
                return
        body = data[start:]
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        cut = self.cut_after.pop(h.path, None)
        if cut is not None:
            body = body[:cut]
            h.close_connection = True
        h.wfile.write(body)
        h.wfile.flush()
        record.update(status=status, sent=len(body))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def _no_proxy(monkeypatch):
    """urllib honours *_proxy variables: make sure 127.0.0.1 is always reached directly."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path, _no_proxy):
    srv = _Server(tmp_path / "srv")
    yield srv
    srv.close()


def _cfg(server: _Server, tmp: Path, checksums: Path | None, **over) -> dict:
    cfg = {
        "name": "librispeech",
        "subsets": ["dev-clean"],
        "root": None,
        "download_dir": str(tmp / "corpus"),
        "base_url": server.url,
        "mirrors": [],
        "checksums": str(checksums) if checksums else None,
        "retries": 2,
        "retry_wait": 0.0,
        "timeout": 10.0,
        "splits": {"train": None, "valid": None, "test": None},
        "stats_utterances_per_speaker": None,
    }
    cfg.update(over)
    return cfg


def _gets(server: _Server, name: str) -> list[dict]:
    return [r for r in server.requests if r["path"].endswith(name)]


# --- the built-in table and checksum files ----------------------------------------------------


def test_builtin_md5_table_is_the_publishers():
    expected = {
        "dev-clean": "42e2234ba48799c1f50f24a7926300a1",
        "dev-other": "c8d0bcc9cca99d4f8b62fcc847357931",
        "test-clean": "32fa31d27d2e1cad72775fee3f4849a9",
        "test-other": "fb5a50374b501bb3bac4815ee91d3135",
        "train-clean-100": "2a93770f6d5c6c964bc36631d331a522",
        "train-clean-360": "c0e676e450a7ff2f54aeade5171606fa",
        "train-other-500": "d1a0fd59409feb2c614ce4d30c387708",
        "train-clean-5": "5df7d4e78065366204ca6845bb08f490",
        "dev-clean-2": "6d7ab67ac6a1d2c993d050e16d61080d",
    }
    assert {name: s.md5 for name, s in ls.SUBSETS.items()} == expected
    assert ls.subset_url(ls.SUBSETS["dev-clean"], "https://www.openslr.org/resources/") == (
        "https://www.openslr.org/resources/12/dev-clean.tar.gz"
    )
    assert ls.subset_url(ls.SUBSETS["dev-clean-2"], "http://m").endswith("/31/dev-clean-2.tar.gz")
    with pytest.raises(ValueError, match="unknown LibriSpeech subset 'dev-cleen'"):
        ls.get_subset("dev-cleen")


def test_read_checksums_md5sum_format(tmp_path):
    f = tmp_path / "md5sum.txt"
    f.write_text(
        "42E2234BA48799C1F50F24A7926300A1  dev-clean.tar.gz\n"
        "\n"
        "c8d0bcc9cca99d4f8b62fcc847357931 *some/dir/dev-other.tar.gz\n"
    )
    assert ls.read_checksums(f) == {
        "dev-clean.tar.gz": "42e2234ba48799c1f50f24a7926300a1",
        "dev-other.tar.gz": "c8d0bcc9cca99d4f8b62fcc847357931",
    }
    f.write_text("not-an-md5  dev-clean.tar.gz\n")
    with pytest.raises(ValueError, match=r"md5sum.txt:1"):
        ls.read_checksums(f)
    with pytest.raises(ValueError, match="no md5 for test-clean.tar.gz"):
        ls.expected_md5(ls.SUBSETS["test-clean"], {"dev-clean.tar.gz": "0" * 32}, str(f))


# --- download, verify, extract, manifests -----------------------------------------------------


def _composed(out: Path, *overrides: str):
    """conf/prepare.yaml with data=librispeech, as speechvq-prepare would see it."""
    from hydra import compose, initialize_config_dir

    from speechvq.cli._hydra import conf_dir

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose("prepare", ["data=librispeech", f"out_dir={out}", *overrides])


def test_every_config_key_is_used():
    cfg = _composed(Path("/nowhere"))
    source = Path(ls.__file__).read_text()
    unused = [k for k in cfg.data if f'"{k}"' not in source and k != "name"]
    assert not unused, f"conf/data/librispeech.yaml keys the module never reads: {unused}"


def test_prepare_downloads_verifies_and_writes_manifests(tmp_path, server):
    archive, expected = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    out = tmp_path / "manifests"
    cfg = _composed(out, f"data.base_url={server.url}", f"data.checksums={checksums}",
                    "data.mirrors=[]", f"data.download_dir={tmp_path / 'corpus'}")  # fmt: skip
    summary = ls.prepare(cfg.data, out, cfg.features, progress=False)

    corpus = tmp_path / "corpus" / "LibriSpeech"
    assert (corpus / "SPEAKERS.TXT").is_file() and (corpus / "dev-clean" / ".complete").is_file()
    assert (tmp_path / "corpus" / "dev-clean.tar.gz").is_file()  # kept by default
    assert not list((tmp_path / "corpus").glob(".extract-*"))
    assert [r["path"] for r in server.requests] == ["/12/dev-clean.tar.gz"]

    rows = read_manifest(out / "dev-clean.tsv")
    assert [r.id for r in rows] == sorted(expected)
    for r in rows:
        speaker, n = expected[r.id]
        assert r.speaker == speaker == r.id.split("-")[0]  # the reader, not reader-chapter
        assert r.num_samples == n
        assert r.text == _text(r.id)
        assert Path(r.path) == (
            corpus / "dev-clean" / speaker / r.id.split("-")[1] / f"{r.id}.flac"
        )
    # union manifests: no train-* subset, so train.tsv is every subset; valid.tsv the dev ones
    assert [r.id for r in read_manifest(out / "manifest.tsv")] == sorted(expected)
    assert [r.id for r in read_manifest(out / "train.tsv")] == sorted(expected)
    assert [r.id for r in read_manifest(out / "valid.tsv")] == sorted(expected)
    assert not (out / "test.tsv").exists()
    assert (out / "rejected.tsv").read_text() == "path\treason\n"
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["speakers"]) == ["1272", "84"] and len(stats["global"]["mean"]) == 80
    assert summary["utterances"] == {"dev-clean": len(expected)}

    # a second run finds the completion marker: no request, nothing downloaded again
    ls.prepare(_cfg(server, tmp_path, checksums), out, None, progress=False)
    assert len(server.requests) == 1


def test_train_and_dev_subsets_make_splits_and_stats_cover_every_speaker(tmp_path, server):
    dev, dev_expected = _make_archive(tmp_path, "dev-clean")
    train, train_expected = _make_archive(tmp_path, "train-clean-5")
    checksums = _write_checksums(tmp_path / "md5sum.txt", dev, train)
    out = tmp_path / "m"
    cfg = _cfg(server, tmp_path, checksums, subsets=["train-clean-5", "dev-clean"],
               stats_utterances_per_speaker=1)  # fmt: skip
    features = {"sample_rate": 16000, "n_fft": 400, "win_length": 400, "hop_length": 160,
                "n_mels": 8, "f_min": 50.0, "f_max": 8000.0, "preemphasis": 0.97,
                "log_floor": 1e-5}  # fmt: skip
    ls.prepare(cfg, out, features, progress=False)
    assert [r.id for r in read_manifest(out / "train.tsv")] == sorted(train_expected)
    assert [r.id for r in read_manifest(out / "valid.tsv")] == sorted(dev_expected)
    assert len(read_manifest(out / "manifest.tsv")) == len(train_expected) + len(dev_expected)
    stats = json.loads((out / "stats.json").read_text())
    assert sorted(stats["speakers"]) == ["1272", "19", "26", "84"]  # dev speakers too
    assert stats["speakers"]["19"]["frames"] == _num_samples("19-198-0000") // 160  # 1 utt/speaker
    train_frames = sum(_num_samples(u) // 160 for u in ("19-198-0000", "26-495-0000"))
    assert stats["global"]["frames"] == train_frames  # global: the train split only

    with pytest.raises(ValueError, match=r"data.splits.valid names \['test-clean'\]"):
        ls.choose_splits(["dev-clean"], {"valid": ["test-clean"]})
    assert ls.choose_splits(["dev-clean", "dev-other"], {"valid": "dev-clean"})["valid"] == [
        "dev-clean"
    ]


def test_interrupted_download_resumes_with_a_range_request(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    size = archive.stat().st_size
    server.cut_after["/12/dev-clean.tar.gz"] = 1000
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)

    first, second = _gets(server, "dev-clean.tar.gz")
    assert first["range"] is None and first["sent"] == 1000
    assert second["range"] == "bytes=1000-" and second["status"] == 206
    assert second["sent"] == size - 1000  # nothing fetched twice
    assert dl.md5sum(tmp_path / "corpus" / "dev-clean.tar.gz", progress=False) == _md5(archive)
    assert read_manifest(tmp_path / "m" / "dev-clean.tsv")


def test_a_part_file_left_by_an_earlier_run_is_continued(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    part = tmp_path / "corpus" / "dev-clean.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(archive.read_bytes()[:1234])
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    (req,) = server.requests
    assert req["range"] == "bytes=1234-" and req["sent"] == archive.stat().st_size - 1234
    assert not part.exists()


def test_a_server_ignoring_range_gets_a_clean_restart(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    part = tmp_path / "corpus" / "dev-clean.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * 500)  # appending the whole file to this would corrupt it
    server.ignore_range = True
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    (req,) = server.requests
    assert req["range"] == "bytes=500-" and req["status"] == 200
    assert _md5(tmp_path / "corpus" / "dev-clean.tar.gz") == _md5(archive)


def test_a_part_file_longer_than_the_archive_restarts(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    part = tmp_path / "corpus" / "dev-clean.tar.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"x" * (archive.stat().st_size + 10))
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    assert [r["status"] for r in server.requests] == [416, 200]
    assert _md5(tmp_path / "corpus" / "dev-clean.tar.gz") == _md5(archive)


def test_a_dead_base_url_falls_back_to_a_mirror(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    cfg = _cfg(server, tmp_path, checksums, base_url=server.url + "/nowhere",
               mirrors=[server.url])  # fmt: skip
    ls.prepare(cfg, tmp_path / "m", None, progress=False)
    assert [r["status"] for r in server.requests] == [404, 200]


def test_a_corrupted_download_fails_the_checksum_and_is_not_extracted(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    good = archive.read_bytes()
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    archive.write_bytes(bytes(bad))
    actual = hashlib.md5(bytes(bad)).hexdigest()
    with pytest.raises(dl.ChecksumError) as err:
        ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    message = str(err.value)
    assert "dev-clean.tar.gz" in message and hashlib.md5(good).hexdigest() in message
    assert actual in message and str(checksums) in message
    corpus = tmp_path / "corpus"
    assert not (corpus / "LibriSpeech").exists() and not (corpus / "dev-clean.tar.gz").exists()
    assert (corpus / "dev-clean.tar.gz.corrupt").is_file()  # kept aside for a look
    assert not (tmp_path / "m" / "dev-clean.tsv").exists()

    archive.write_bytes(good)  # the server is mended: the next run downloads afresh
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    assert len(_gets(server, "dev-clean.tar.gz")) == 2 and server.requests[-1]["range"] is None
    assert read_manifest(tmp_path / "m" / "dev-clean.tsv")


def test_the_builtin_table_rejects_a_fake_archive(tmp_path, server):
    _make_archive(tmp_path, "dev-clean")
    with pytest.raises(dl.ChecksumError, match="42e2234ba48799c1f50f24a7926300a1.*built-in table"):
        ls.prepare(_cfg(server, tmp_path, None), tmp_path / "m", None, progress=False)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize(
    "member, reason",
    [
        (_member("../evil.txt"), "'..' in its path"),
        (_member("LibriSpeech/dev-clean/../../../evil.txt"), "'..' in its path"),
        (_member("{tmp}/evil.txt"), "absolute path"),  # an absolute path under tmp_path
        (_member("LibriSpeech/dev-clean/evil", tarfile.SYMTYPE, "../../../.."), "points outside"),
        (_member("LibriSpeech/dev-clean/evil", tarfile.SYMTYPE, "/etc/passwd"), "absolute path"),
        (_member("LibriSpeech/dev-clean/evil", tarfile.LNKTYPE, "../outside"), "'..'|outside"),
        # inside the archive's root, but out of the subset folder that is kept: once moved, it
        # would point at the download folder and the subset's manifest would pick up its files
        (_member("LibriSpeech/dev-clean/evil", tarfile.SYMTYPE, "../.."),
         "points outside LibriSpeech/dev-clean/"),
        (_member("LibriSpeech/dev-clean/1272/evil", tarfile.SYMTYPE, "../../dev-other"),
         "points outside LibriSpeech/dev-clean/"),
    ],
)
@pytest.mark.parametrize("python_filter", [True, False])
def test_an_archive_with_an_escaping_member_is_refused(
    tmp_path, server, monkeypatch, member, reason, python_filter
):
    if not python_filter:  # our own check alone (Python < 3.11.4 has no filter='data')
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    member = copy.copy(member)
    member.name = member.name.format(tmp=tmp_path)
    archive, _ = _make_archive(tmp_path, "dev-clean", extra=member)
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    with pytest.raises(dl.UnsafeArchiveError, match=reason) as err:
        ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    assert "dev-clean.tar.gz" in str(err.value) and repr(member.name) in str(err.value)
    corpus = tmp_path / "corpus"
    assert not (corpus / "LibriSpeech").exists()  # nothing extracted, not even the good members
    assert not list(corpus.glob(".extract-*"))
    assert not list(tmp_path.rglob("evil*"))


def test_safe_extract_accepts_links_inside_the_target(tmp_path):
    archive = tmp_path / "ok.tar"
    with tarfile.open(archive, "w") as tar:
        data = b"x"
        info = _member("a/file.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(data))
        tar.addfile(_member("a/sym", tarfile.SYMTYPE, "file.txt"))
    dl.safe_extract(archive, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "a" / "sym").read_bytes() == b"x"
    dl.safe_extract(archive, tmp_path / "kept", progress=False, link_root="a")
    assert (tmp_path / "kept" / "a" / "sym").read_bytes() == b"x"


def test_a_changed_checksum_source_fetches_again(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    ls.prepare(_cfg(server, tmp_path, checksums), tmp_path / "m", None, progress=False)
    marker = json.loads((tmp_path / "corpus/LibriSpeech/dev-clean/.complete").read_text())
    assert marker["md5"] == _md5(archive)
    other = tmp_path / "other-md5.txt"
    other.write_text(f"{'0' * 32}  dev-clean.tar.gz\n")  # different expectation -> not "done"
    with pytest.raises(dl.ChecksumError):
        ls.prepare(_cfg(server, tmp_path, other), tmp_path / "m", None, progress=False)
    assert len(server.requests) == 2


def test_download_only_writes_no_manifest(tmp_path, server):
    archive, _ = _make_archive(tmp_path, "dev-clean")
    checksums = _write_checksums(tmp_path / "md5sum.txt", archive)
    cfg = _cfg(server, tmp_path, checksums, download_only=True)
    ls.prepare(cfg, tmp_path / "m", None, progress=False)
    assert (tmp_path / "corpus/LibriSpeech/dev-clean/.complete").is_file()
    assert not (tmp_path / "m" / "manifest.tsv").exists()


@pytest.mark.parametrize("level", ["parent", "librispeech"])
def test_an_existing_copy_is_used_without_downloading(tmp_path, level, caplog):
    expected = _make_tree(tmp_path / "copy", "dev-clean")
    root = tmp_path / "copy" if level == "parent" else tmp_path / "copy" / "LibriSpeech"
    cfg = {"subsets": ["dev-clean"], "root": str(root), "base_url": "http://127.0.0.1:9/none"}
    ls.prepare(cfg, tmp_path / "m", None, progress=False)
    rows = read_manifest(tmp_path / "m" / "dev-clean.tsv")
    assert {r.id: (r.speaker, r.num_samples) for r in rows} == expected
    assert "5 utterances found, the published subset has 2703" in caplog.text  # incomplete copy
    with pytest.raises(ValueError, match="no LibriSpeech/test-clean/ or test-clean/ folder"):
        ls.prepare({**cfg, "subsets": ["test-clean"]}, tmp_path / "m", None, progress=False)


def test_alignments_are_imported_from_textgrids(tmp_path):
    alignments = pytest.importorskip("speechvq.data.alignments")
    _make_tree(tmp_path / "copy", "dev-clean")
    mfa = tmp_path / "mfa" / "dev-clean" / "84" / "121123"
    mfa.mkdir(parents=True)
    (mfa / "84-121123-0000.TextGrid").write_text(_TEXTGRID)
    (mfa / "99-1-0000.TextGrid").write_text(_TEXTGRID)  # not in the manifests: ignored
    cfg = {
        "subsets": ["dev-clean"],
        "root": str(tmp_path / "copy"),
        "alignments": str(tmp_path / "mfa"),
    }
    summary = ls.prepare(cfg, tmp_path / "m", None, progress=False)
    assert summary["alignments"] == 1
    loaded = alignments.load_alignments(tmp_path / "m" / "alignments")
    assert list(loaded) == ["84-121123-0000"]
    labels = [(i.start, i.end, i.label) for i in loaded["84-121123-0000"]]
    assert labels == [(0.0, 0.1, "sil"), (0.1, 0.25, "HH"), (0.25, 0.4, "AH"), (0.4, 0.5, "sil")]


_TEXTGRID = textgrid_text({
    "words": [Interval(0, 0.5, "HELLO")],
    "phones": [Interval(0, 0.1, ""), Interval(0.1, 0.25, "HH"), Interval(0.25, 0.4, "AH0"),
               Interval(0.4, 0.5, "sil")],
})
