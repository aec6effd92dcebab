"""The listening page: relative links that resolve, escaping, units, and a real browser load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from speechvq.audio import save_audio
from speechvq.report import Clip, Row, log_to_tensorboard, write_report

CONF = Path(__file__).resolve().parents[1] / "conf"
CHROMIUM = Path("/usr/bin/chromium")


def _tone(path: Path, f0: float, seconds: float = 0.5) -> Path:
    t = np.arange(int(16000 * seconds)) / 16000
    save_audio(path, (0.2 * np.sin(2 * np.pi * f0 * t)).astype(np.float32), 16000)
    return path


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href"):
                self.links.append((tag, value))

    def handle_data(self, data):
        self.text.append(data)


def _page(tmp_path: Path, features_cfg) -> Path:
    out = tmp_path / "page dir"  # a space: links must be percent-encoded
    rows = [
        Row("utt <1> & \"co\"", [
            Clip(_tone(out / "original" / "utt 1.wav", 220), "original", None, "speaker <a>"),
            Clip(_tone(out / "reconstruction" / "utt 1.wav", 230), "reconstruction",
                 np.array([3, 3, 3, 7, 7, 1] * 30), "decoded as a"),
            Clip(_tone(out / "converted" / "b" / "utt 1.wav", 240), "as <script>b</script>"),
        ]),
        Row("sample 0", [Clip(_tone(out / "sample_000.wav", 300), "sample 0", [1, 2, 2, 3])]),
    ]
    return write_report(out, rows, "test <page>", dict(features_cfg), intro="a & b")


def test_links_are_relative_and_resolve(tmp_path, features_cfg):
    index = _page(tmp_path, features_cfg)
    parser = _Links()
    parser.feed(index.read_text(encoding="utf-8"))
    tags = [t for t, _ in parser.links]
    assert tags.count("audio") == 4 and tags.count("img") == 4
    for _, link in parser.links:
        url = urlparse(link)
        assert not url.scheme and not url.netloc and not link.startswith("/"), link
        assert (index.parent / unquote(url.path)).is_file(), link
    # the folder can be moved: links still resolve
    moved = shutil.move(index.parent, tmp_path / "moved")
    for _, link in parser.links:
        assert (Path(moved) / unquote(link)).is_file()


def test_text_is_escaped_and_units_deduplicated(tmp_path, features_cfg):
    html_text = _page(tmp_path, features_cfg).read_text(encoding="utf-8")
    assert "<script>" not in html_text and "&lt;script&gt;" in html_text
    assert "utt &lt;1&gt; &amp; &quot;co&quot;" in html_text
    assert "test &lt;page&gt;" in html_text and "a &amp; b" in html_text
    parser = _Links()
    parser.feed(html_text)
    text = " ".join(parser.text)
    # the inline units are deduplicated (and truncated); the full frame-level list is in <details>
    assert "3 7 1 3 7 1" in text
    assert "all 180 frame-level units" in text and "<details>" in html_text
    assert "3 3 3 7 7 1" in text  # the full frame-level sequence


def test_clips_outside_the_folder_are_refused(tmp_path, features_cfg):
    outside = _tone(tmp_path / "elsewhere.wav", 200)
    with pytest.raises(ValueError, match="outside"):
        write_report(tmp_path / "page", [Row("r", [Clip(outside, "x")])], "t", dict(features_cfg))


def test_tensorboard_gets_the_clips(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "p"
    rows = [Row("sample 0", [Clip(_tone(out / "a.wav", 200), "sample 0", [1, 1, 2])])]
    log_to_tensorboard(out / "tb", rows)
    acc = EventAccumulator(str(out / "tb"), size_guidance={"audio": 0})
    acc.Reload()
    tags = acc.Tags()["audio"]
    assert tags == ["sample_0/sample_0"]
    assert acc.Audio(tags[0])[0].sample_rate == 16000


_CHECK = """
<script>
// One status per <audio> and <img>: pending -> ok | error, shown in div#result at every change.
const result = document.createElement('div');
result.id = 'result';
document.body.appendChild(result);
const media = Array.from(document.querySelectorAll('audio, img'));
const status = media.map(() => 'pending');
const show = () => { result.textContent = media.map((m, i) => m.tagName + '=' + status[i]).join(' '); };
media.forEach((m, i) => {
  const done = (s) => { status[i] = s; show(); };
  if (m.tagName === 'AUDIO') {
    m.addEventListener('loadedmetadata', () => done(m.duration > 0 ? 'ok' : 'empty'));
    m.addEventListener('error', () => done('error'));
    m.load();
  } else if (m.complete) {
    done(m.naturalWidth > 0 ? 'ok' : 'error');
  } else {
    m.addEventListener('load', () => done(m.naturalWidth > 0 ? 'ok' : 'error'));
    m.addEventListener('error', () => done('error'));
  }
});
show();
</script>
"""


def _browser_statuses(check: Path, tmp_path: Path) -> list[str]:
    profile = tmp_path / "profile"
    args = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", f"--user-data-dir={profile}", "--allow-file-access-from-files",
            "--virtual-time-budget=10000", "--dump-dom", check.as_uri()]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    found = re.search(r'<div id="result">([^<]*)</div>', proc.stdout)
    assert found, proc.stderr[-2000:]
    return found.group(1).split()


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_headless_chromium_loads_every_clip_and_image(tmp_path, features_cfg):
    index = _page(tmp_path, features_cfg)
    check = index.with_name("check.html")  # same folder: the same relative links
    check.write_text(index.read_text(encoding="utf-8").replace("</body>", _CHECK + "</body>"),
                     encoding="utf-8")
    # a busy machine may dump the page before every file has loaded: look again, a few times
    for _ in range(3):
        statuses = _browser_statuses(check, tmp_path)
        assert not [s for s in statuses if not s.endswith(("=ok", "=pending"))], statuses
        if all(s.endswith("=ok") for s in statuses):
            break
    assert statuses == ["AUDIO=ok", "IMG=ok"] * 4, statuses
