"""Audio in and out: soundfile for decoding/encoding, torchaudio for resampling.

Every function here either returns mono float32 audio at the requested sample rate or raises
:class:`AudioError` naming the file and what is wrong with it, so that a corpus with a few bad files
can be reported and skipped instead of killing a long run.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from speechvq.files import atomic_write

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16")}
_UNKNOWN_SIZE = (0, 0xFFFFFFFF)  # what streaming writers put in a data chunk of unknown length


class AudioError(Exception):
    """A file that cannot be used as audio. ``str(err)`` is ``"<path>: <problem>"``."""

    def __init__(self, path: PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


@dataclass
class AudioInfo:
    """What a full decode of a file found. ``num_samples`` is counted at the target rate."""

    num_samples: int
    orig_sample_rate: int
    channels: int
    notes: list[str] = field(default_factory=list)


def _decode(path: PathLike) -> tuple[np.ndarray, int]:
    """Decode the whole file (so truncation is noticed): returns ``(T, C)`` float32 and its rate."""
    if not os.path.exists(path):
        raise AudioError(path, "no such file")
    if os.path.isdir(path):
        raise AudioError(path, "is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(path, "empty file (0 bytes)")
    _check_riff_data(path)
    try:
        with sf.SoundFile(path) as f:
            declared = f.frames
            data = f.read(dtype="float32", always_2d=True)
            sample_rate = f.samplerate
    except (sf.LibsndfileError, RuntimeError, ValueError) as err:
        raise AudioError(path, f"cannot decode: {err}") from None
    # A FLAC cut at a frame boundary decodes without an error but yields fewer samples than its
    # header declares; anything else that comes up short is truncated too.
    if declared > 0 and data.shape[0] < declared:
        raise AudioError(path, f"truncated: decoded {data.shape[0]} of {declared} samples")
    return data, sample_rate


def _check_riff_data(path: PathLike) -> None:
    """A WAV (RIFF) file whose ``data`` chunk declares more bytes than the file holds is truncated:
    libsndfile quietly decodes what is there (and reports that as the length), so compare the
    header with the file size here. Other formats and unknown sizes (streamed WAVs) pass."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
            if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
                return
            for _ in range(64):  # fmt, LIST, fact, ... come before data
                chunk = f.read(8)
                if len(chunk) < 8:
                    return  # no data chunk at all: libsndfile reports it
                name, declared = chunk[:4], struct.unpack("<I", chunk[4:])[0]
                if name == b"data":
                    present = size - f.tell()
                    if declared not in _UNKNOWN_SIZE and present < declared:
                        raise AudioError(path, f"truncated: its header declares {declared} bytes "
                                               f"of audio data, the file holds {present}")
                    return
                f.seek(declared + (declared & 1), os.SEEK_CUR)  # chunks are padded to even sizes
    except OSError as err:
        raise AudioError(path, f"cannot read: {err.strerror or err}") from None


@functools.lru_cache(maxsize=16)
def _resampler(orig_rate: int, sample_rate: int) -> torchaudio.transforms.Resample:
    """torchaudio's resampling (as ``torchaudio.functional.resample``) with its sinc kernel built
    once per rate pair: building it dominates the cost for short files at e.g. 22.05 kHz."""
    return torchaudio.transforms.Resample(orig_rate, sample_rate)


def _load(path: PathLike, sample_rate: int, min_seconds: float) -> tuple[torch.Tensor, AudioInfo]:
    data, orig_rate = _decode(path)
    num_frames, channels = data.shape
    if num_frames == 0:
        raise AudioError(path, "contains no samples")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or Inf samples")
    notes = []
    if channels > 1:
        data = data.mean(axis=1, keepdims=True)
        notes.append(f"downmixed {channels} channels to mono")
    wav = torch.from_numpy(np.ascontiguousarray(data[:, 0]))
    if orig_rate != sample_rate:
        with torch.no_grad():
            wav = _resampler(orig_rate, sample_rate)(wav)
        notes.append(f"resampled {orig_rate} Hz to {sample_rate} Hz")
    seconds = wav.numel() / sample_rate
    if seconds < min_seconds:
        raise AudioError(path, f"too short: {seconds:.3f} s < min_seconds {min_seconds} s")
    for note in notes:
        log.debug("%s: %s", path, note)
    return wav, AudioInfo(wav.numel(), orig_rate, channels, notes)


def load_audio(path: PathLike, sample_rate: int = 16000, min_seconds: float = 0.0) -> torch.Tensor:
    """Decode ``path`` to mono float32 at ``sample_rate``: returns ``wav: (T,)``.

    Multi-channel audio is averaged to mono and other rates are resampled (both logged at DEBUG).
    Raises :class:`AudioError` for a missing, undecodable, truncated, empty or NaN/Inf-bearing file
    and for one shorter than ``min_seconds``.
    """
    return _load(path, sample_rate, min_seconds)[0]


# Formats whose decoders give the same samples for a window as for the whole file: a window read of
# these decodes only the window; any other file (lossy codecs, other sample rates) is decoded whole.
WINDOW_FORMATS = frozenset({"WAV", "WAVEX", "W64", "RF64", "FLAC", "AIFF", "CAF"})


def read_window(path: PathLike, start: int, frames: int, sample_rate: int = 16000,
                num_samples: int | None = None) -> torch.Tensor:
    """Samples ``[start, start + frames)`` of ``path`` exactly as ``load_audio(path)`` gives them,
    mono float32 at ``sample_rate``: ``wav: (frames,)`` (fewer only at the end of the file).

    A lossless file stored at ``sample_rate`` (:data:`WINDOW_FORMATS`) has only that window
    decoded (what a training crop costs); anything else is decoded whole and cut. ``num_samples``:
    the length the manifest recorded; a file of another length raises :class:`AudioError` (it
    changed since ``speechvq-prepare``), as do the errors of :func:`load_audio`.
    """
    try:
        with sf.SoundFile(path) as f:
            whole = f.samplerate != sample_rate or f.format not in WINDOW_FORMATS
            if not whole:
                length = f.frames
                if num_samples is not None and length != num_samples:
                    raise AudioError(path, f"has {length} samples, the manifest says "
                                           f"{num_samples}: re-run speechvq-prepare")
                f.seek(min(start, length))
                data = f.read(max(0, min(frames, length - start)), dtype="float32",
                              always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError, OSError) as err:
        return _window_of_whole(path, start, frames, sample_rate, num_samples, err)
    if whole:
        return _window_of_whole(path, start, frames, sample_rate, num_samples)
    if data.shape[0] < min(frames, length - start):
        raise AudioError(path, f"truncated: decoded {data.shape[0]} samples of its window at "
                               f"{start}")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN or Inf samples")
    if data.shape[1] > 1:
        data = data.mean(axis=1, keepdims=True)  # as _load averages channels, sample by sample
    return torch.from_numpy(np.ascontiguousarray(data[:, 0]))


def _window_of_whole(path: PathLike, start: int, frames: int, sample_rate: int,
                     num_samples: int | None, err: Exception | None = None) -> torch.Tensor:
    """The window cut from the whole decoded file (errors: those of :func:`load_audio`)."""
    wav = load_audio(path, sample_rate)
    if err is not None:  # the window could not be read but the whole file could: say why
        raise AudioError(path, f"cannot read a window of it: {err}")
    if num_samples is not None and wav.numel() != num_samples:
        raise AudioError(path, f"has {wav.numel()} samples, the manifest says {num_samples}: "
                               "re-run speechvq-prepare")
    return wav[start : start + frames].clone()


def inspect_audio(path: PathLike, sample_rate: int = 16000, min_seconds: float = 0.0) -> AudioInfo:
    """Fully decode ``path`` as :func:`load_audio` does and describe it (same errors).

    ``num_samples`` is the length :func:`load_audio` returns, so a manifest built from it is exact.
    Digital silence (every sample 0) is refused too: it teaches a corpus nothing and skews the
    per-speaker feature statistics.
    """
    wav, info = _load(path, sample_rate, min_seconds)
    if not bool(wav.any()):
        raise AudioError(path, "silent: every sample is 0")
    return info


def save_audio(path: PathLike, wav: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write mono ``wav: (T,)`` (floats in [-1, 1], clipped) as 16-bit WAV or FLAC by suffix.

    The file appears atomically: it is written to a temporary file in the same folder first.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: cannot save audio as {suffix!r}; use .wav or .flac")
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu", torch.float32).numpy()
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim != 1:
        raise ValueError(f"{path}: expected mono audio of shape (T,), got {wav.shape}")
    if not np.isfinite(wav).all():
        raise ValueError(f"{path}: refusing to save audio containing NaN or Inf")
    # libsndfile wraps around on overflow when converting floats to PCM: clip first.
    wav = np.clip(wav, -1.0, 1.0)
    fmt, subtype = _FORMATS[suffix]
    atomic_write(path, lambda f: sf.write(f, wav, sample_rate, format=fmt, subtype=subtype),
                 mode="wb")
