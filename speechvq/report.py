"""The listening page: ``index.html`` beside the WAVs, one spectrogram PNG per clip.

A page is a list of :class:`Row` (one utterance or one sample), each holding :class:`Clip` (a WAV
under the page's folder, with a label and optionally its unit sequence); each clip is drawn as its
log-mel spectrogram with its F0 track underneath. Every link is relative, so
the folder can be copied or served anywhere; every piece of text is html-escaped. The same clips can
be written to TensorBoard with :func:`log_to_tensorboard`.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np
import torch

from speechvq.audio import load_audio
from speechvq.features import build_logmel
from speechvq.files import atomic_write, write_text
from speechvq.pitch import f0_track
from speechvq.units import dedup

log = logging.getLogger(__name__)

F0_PLOT_RANGE = (50.0, 400.0)  # Hz, the F0 panel under each spectrogram
UNITS_SHOWN = 80  # deduplicated units shown inline; the full sequence goes in a <details>

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; }
td, th { border: 1px solid #ccc; padding: 0.5em; vertical-align: top; text-align: left; }
img { display: block; width: 480px; margin: 0.3em 0; }
.units { font-family: monospace; font-size: 0.8em; max-width: 480px; word-wrap: break-word; }
.note { color: #666; font-size: 0.9em; }
"""


@dataclass
class Clip:
    """One audio file of the page. ``wav`` must lie inside the page's folder."""

    wav: Path
    label: str
    units: Sequence[int] | np.ndarray | None = None
    note: str = ""


@dataclass
class Row:
    """One line of the page: e.g. an utterance's original, reconstruction and converted voices."""

    title: str
    clips: list[Clip] = field(default_factory=list)


def _rel_path(path: Path, root: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(root))
    except ValueError:
        raise ValueError(f"{path}: clip is outside the report folder {root}") from None


def _relative(path: Path, root: Path) -> str:
    """URL of ``path`` relative to ``root`` (percent-encoded, '/' separators)."""
    return quote(_rel_path(path, root).as_posix())


def _mel_png(wav_path: Path, png_path: Path, features_cfg: Mapping) -> None:
    """Plot the (un-normalised) log-mel spectrogram of ``wav_path`` and, below it, its F0 track
    (:func:`speechvq.pitch.f0_track`, voiced frames) into ``png_path``, atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    logmel = build_logmel(features_cfg)
    sr = int(features_cfg["sample_rate"])
    wav = load_audio(wav_path, sample_rate=sr)
    with torch.no_grad():
        mel = logmel(wav).numpy()
    f0 = f0_track(wav, sr, logmel.hop_length).numpy()
    seconds = wav.numel() / float(sr)
    fig = Figure(figsize=(6, 3.0), dpi=80)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.1, 0.42, 0.88, 0.55))
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma",
              extent=(0.0, seconds, 0, mel.shape[0]))
    ax.set_ylabel("mel bin")
    ax.tick_params(labelbottom=False)
    axf = fig.add_axes((0.1, 0.16, 0.88, 0.22), sharex=ax)
    times = (np.arange(f0.size) + 0.5) * logmel.hop_length / sr
    voiced = f0 > 0
    axf.plot(times[voiced], f0[voiced], ".", markersize=2, color="tab:blue")
    axf.set_ylim(F0_PLOT_RANGE)
    axf.set_xlim(0.0, seconds)
    axf.set_ylabel("F0 (Hz)")
    axf.set_xlabel("seconds")
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"), mode="wb")


def _units_html(units: Sequence[int] | np.ndarray) -> str:
    values = dedup(np.asarray(units).reshape(-1))[0].tolist()
    text = " ".join(map(str, values[:UNITS_SHOWN]))
    if len(values) > UNITS_SHOWN:
        text += " …"
    full = " ".join(map(str, np.asarray(units).reshape(-1).tolist()))
    return (f'<div class="units">{html.escape(text)}'
            f"<details><summary>all {np.asarray(units).size} frame-level units</summary>"
            f"{html.escape(full)}</details></div>")


def _clip_html(clip: Clip, out_dir: Path, png: Path | None) -> str:
    parts = [f"<b>{html.escape(clip.label)}</b>"]
    if clip.note:
        parts.append(f'<div class="note">{html.escape(clip.note)}</div>')
    parts.append(f'<audio controls preload="none" src="{_relative(clip.wav, out_dir)}"></audio>')
    if png is not None:
        alt = html.escape(f"mel spectrogram of {clip.label}", quote=True)
        parts.append(f'<img src="{_relative(png, out_dir)}" alt="{alt}">')
    if clip.units is not None:
        parts.append(_units_html(clip.units))
    return "<td>" + "\n".join(parts) + "</td>"


def write_report(out_dir: str | os.PathLike, rows: Sequence[Row], title: str,
                 features_cfg: Mapping | None, intro: str = "") -> Path:
    """Write ``out_dir/index.html`` (and ``out_dir/img/*.png``) for ``rows``; returns the page.

    ``features_cfg`` is the LogMel config (from the VQ-VAE checkpoint's meta) used to draw the
    spectrograms (None: no spectrograms). Clips' WAVs must already exist under ``out_dir``.
    """
    out_dir = Path(out_dir)
    body = [f"<h1>{html.escape(title)}</h1>"]
    if intro:
        body.append(f"<p>{html.escape(intro)}</p>")
    body.append("<table>")
    for row in rows:
        cells = []
        for clip in row.clips:
            rel = _rel_path(clip.wav, out_dir)  # also checks the clip lies under out_dir
            png = None
            if features_cfg is not None:
                png = out_dir / "img" / rel.with_suffix(".png")
                _mel_png(Path(clip.wav), png, features_cfg)
            cells.append(_clip_html(clip, out_dir, png))
        body.append(f"<tr><th>{html.escape(row.title)}</th>{''.join(cells)}</tr>")
    body.append("</table>")
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    return write_text(out_dir / "index.html", page)


def _tag(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_./-]+", "_", text).strip("_") or "clip"


def log_to_tensorboard(tb_dir: str | os.PathLike, rows: Sequence[Row], step: int = 0,
                       sample_rate: int = 16000) -> None:
    """Write every clip's audio (and its deduplicated units as text) to TensorBoard in ``tb_dir``."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tb_dir))
    try:
        for row in rows:
            for clip in row.clips:
                tag = f"{_tag(row.title)}/{_tag(clip.label)}"
                wav = load_audio(clip.wav, sample_rate=sample_rate)
                writer.add_audio(tag, wav.unsqueeze(0), step, sample_rate=sample_rate)
                if clip.units is not None:
                    units = " ".join(map(str, dedup(np.asarray(clip.units).reshape(-1))[0]))
                    writer.add_text(tag, units, step)
    finally:
        writer.close()
