"""speechvq.audio: decoding, mono/resampling conversions, and every kind of bad file."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.audio import AudioError, inspect_audio, load_audio, save_audio

SR = 16000


def _tone(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wav: torch.Tensor, sr: int) -> float:
    spec = np.abs(np.fft.rfft(wav.numpy()))
    return float(np.argmax(spec) * sr / wav.numel())


def test_stereo_22k_is_downmixed_and_resampled(tmp_path, caplog):
    left = _tone(440, 0.5, 22050)
    right = _tone(440, 0.5, 22050, amp=0.1)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 22050)

    with caplog.at_level(logging.DEBUG, logger="speechvq.audio"):
        wav = load_audio(path, SR)
    assert wav.dtype == torch.float32 and wav.dim() == 1
    assert wav.numel() == 8000  # 0.5 s at 16 kHz
    assert abs(_peak_hz(wav, SR) - 440) < 5  # same pitch after resampling
    assert abs(float(wav.abs().max()) - 0.3) < 0.02  # mean of the two channels
    assert "downmixed" in caplog.text and "resampled" in caplog.text

    info = inspect_audio(path, SR)
    assert (info.num_samples, info.orig_sample_rate, info.channels) == (8000, 22050, 2)
    assert any("downmixed" in n for n in info.notes) and any("resampled" in n for n in info.notes)


def test_16k_mono_is_untouched(tmp_path):
    x = _tone(300, 0.3, SR)
    sf.write(tmp_path / "a.flac", x, SR)
    wav = load_audio(tmp_path / "a.flac", SR)
    np.testing.assert_allclose(wav.numpy(), x, atol=1e-4)  # 16-bit FLAC quantisation only
    assert inspect_audio(tmp_path / "a.flac", SR).notes == []


@pytest.mark.parametrize("suffix", [".wav", ".flac"])
def test_save_roundtrip_and_atomic(tmp_path, suffix):
    x = torch.from_numpy(_tone(500, 0.25, SR)) * 2.5  # out of range: must be clipped, not wrapped
    path = tmp_path / "sub" / f"out{suffix}"
    save_audio(path, x, SR)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    y = load_audio(path, SR)
    assert y.numel() == x.numel()
    np.testing.assert_allclose(y.numpy(), x.clamp(-1, 1).numpy(), atol=1e-4)
    assert sf.info(path).format == suffix[1:].upper()


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="mp3"):
        save_audio(tmp_path / "x.mp3", np.zeros(10), SR)
    with pytest.raises(ValueError, match="NaN"):
        save_audio(tmp_path / "x.wav", np.array([0.0, np.nan]), SR)
    with pytest.raises(ValueError, match="mono"):
        save_audio(tmp_path / "x.wav", np.zeros((10, 2)), SR)


def _bad_files(tmp_path):
    """name -> (path, expected words in the error)."""
    bad = {}
    zero = tmp_path / "zero.wav"
    zero.write_bytes(b"")
    bad["zero"] = (zero, "empty")
    text = tmp_path / "text.wav"
    text.write_text("this is not audio at all\n" * 20)
    bad["text"] = (text, "cannot decode")
    full = tmp_path / "full.flac"
    sf.write(full, _tone(200, 1.0, SR) + 0.01 * np.random.default_rng(0).standard_normal(SR), SR)
    trunc = tmp_path / "trunc.flac"
    trunc.write_bytes(full.read_bytes()[: full.stat().st_size * 2 // 3])
    bad["truncated"] = (trunc, "")
    nan = tmp_path / "nan.wav"
    y = _tone(200, 0.2, SR)
    y[100] = np.nan
    sf.write(nan, y, SR, subtype="FLOAT")
    bad["nan"] = (nan, "NaN")
    empty = tmp_path / "nosamples.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    bad["no samples"] = (empty, "no samples")
    bad["missing"] = (tmp_path / "missing.wav", "no such file")
    return bad


def test_bad_files_raise_audio_error_naming_the_file(tmp_path):
    for name, (path, words) in _bad_files(tmp_path).items():
        for fn in (load_audio, inspect_audio):
            with pytest.raises(AudioError) as err:
                fn(path, SR)
            assert err.value.path == str(path), name
            assert str(path) in str(err.value), name
            assert words in str(err.value), name


def test_too_short(tmp_path):
    sf.write(tmp_path / "short.wav", _tone(200, 0.05, SR), SR)
    assert load_audio(tmp_path / "short.wav", SR, min_seconds=0.04).numel() == 800
    with pytest.raises(AudioError, match="too short"):
        load_audio(tmp_path / "short.wav", SR, min_seconds=0.1)


def test_flac_cut_at_a_frame_boundary_is_truncated(tmp_path, monkeypatch):
    """A FLAC that decodes cleanly but yields fewer samples than its header declares."""
    import speechvq.audio as audio

    path = tmp_path / "a.flac"
    sf.write(path, _tone(200, 0.5, SR), SR)

    class Short(sf.SoundFile):
        def read(self, *args, **kwargs):
            return super().read(*args, **kwargs)[:-4096]

    monkeypatch.setattr(audio.sf, "SoundFile", Short)
    with pytest.raises(AudioError, match="truncated"):
        load_audio(path, SR)


def test_a_truncated_wav_is_refused_not_read_at_half_length(tmp_path):
    """libsndfile decodes what a cut WAV holds and reports that as its length: the header's data
    chunk size against the bytes present tells."""
    import struct

    full = tmp_path / "full.wav"
    sf.write(full, _tone(200, 1.0, SR), SR)
    data = full.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    for fn in (load_audio, inspect_audio):
        with pytest.raises(AudioError, match="truncated: its header declares 32000 bytes") as err:
            fn(cut, SR)
        assert err.value.path == str(cut)
    # a streamed WAV (data size unknown: 0xFFFFFFFF) and a WAV with a trailing chunk still load
    streamed = bytearray(data)
    at = streamed.find(b"data")
    streamed[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
    assert load_audio(tmp_path / "streamed.wav", SR).numel() == SR
    (tmp_path / "tail.wav").write_bytes(data + b"LIST\x04\x00\x00\x00abcd")
    assert load_audio(tmp_path / "tail.wav", SR).numel() == SR


def test_digital_silence_is_refused_by_inspection_only(tmp_path):
    # prepare inspects every file: an all-zero file is rejected with a reason naming it; loading
    # it (e.g. during extraction) still works, so units can be asked of anything.
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros(SR, dtype=np.float32), SR)
    with pytest.raises(AudioError, match="silent") as err:
        inspect_audio(path, SR)
    assert str(path) in str(err.value)
    assert load_audio(path, SR).abs().sum() == 0
