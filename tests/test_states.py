"""Per-utterance front-end states stored with the corpus, window reads, and crops that cost what
the crop costs: stored state == recomputed state, a crop from a window read == the crop cut from
the whole file (bit-exact features and F0), device-batched features == the loader's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechvq.audio import AudioError, load_audio, read_window
from speechvq.data.dataset import CropDataset, collate
from speechvq.data.manifest import ManifestRow, speakers_of, write_manifest
from speechvq.features import (
    STATE_FILE,
    FrontEnd,
    compute_stats,
    measure_states,
    states_for_rows,
)
from speechvq.stats import StateStore, UtteranceState, pitch_key

SR, SPU = 16000, 320


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[ManifestRow]:
    """Voiced, noisy, DC-shifted utterances of 0.4-2.3 s from three speakers: FLAC, WAV, stereo."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        n = int((0.4 + 0.38 * i) * SR) + 37 * i  # not whole units
        t = np.arange(n) / SR
        f0 = 110 + 30 * i + 20 * np.sin(2 * np.pi * 1.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / SR
        wav = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.05 + 0.05 * i)
        wav = wav + 0.003 * rng.standard_normal(n) + 0.01 * (i - 2)
        wav = wav.astype(np.float32)
        if i == 4:  # stereo: load_audio averages the channels
            path = root / f"u{i}.wav"
            sf.write(path, np.stack([wav, 0.5 * wav], 1), SR, subtype="PCM_16")
        else:
            path = root / f"u{i}.{'flac' if i % 2 else 'wav'}"
            sf.write(path, wav, SR, subtype="PCM_16")
        rows.append(ManifestRow(f"u{i}", str(path), load_audio(path, SR).numel(), f"s{i % 3}"))
    return rows


@pytest.mark.parametrize("normalize", ["speaker", "utterance"])
def test_stored_state_equals_recomputed_state(corpus, features_cfg, tmp_path, normalize):
    cfg = {**features_cfg, "normalize": normalize}
    store = measure_states(corpus, cfg, SPU, pitch=(50.0, 600.0), progress=False)
    store.save(tmp_path / STATE_FILE)
    loaded = StateStore.load(tmp_path / STATE_FILE)
    assert (tmp_path / f"frontend_state.f0-{pitch_key((50, 600))}.npy").exists()
    assert loaded.problem(cfg, SPU) is None
    assert "unit" in loaded.problem(cfg, 640)  # measured on another unit size
    assert "n_mels" in loaded.problem({**cfg, "n_mels": 40}, SPU)
    front = FrontEnd(cfg, analysis_only=True)
    index = loaded.lookup([r.id for r in corpus], [r.num_samples for r in corpus])
    assert list(index) == list(range(len(corpus)))
    for row, i in zip(corpus, index, strict=True):
        wav = load_audio(row.path, SR)
        n = wav.numel() // SPU * SPU
        again = front.measure(wav, n, moments=normalize == "utterance")
        state = loaded.state(int(i))
        assert state.dc == again.dc and state.ref == again.ref  # float64, bit for bit
        if normalize == "utterance":
            assert torch.equal(state.moments.mean, again.moments.mean)
            assert torch.equal(state.moments.std, again.moments.std)
        else:
            assert state.moments is None and not loaded.has_moments
        assert torch.equal(loaded.f0(int(i), "50-600"), front.f0(wav, n, 50.0, 600.0))
        assert state.speech.dtype == torch.bool and torch.equal(state.speech, again.speech)
    # speech frames (bit-packed end to end, so masks start mid-byte) survive saving, picking and
    # joining stores
    rng = np.random.default_rng(1)
    masks = [torch.from_numpy(rng.random(n) < 0.5) for n in (5, 13, 8, 1, 20, 0)]
    states = [UtteranceState(0.0, 1.0 + i, speech=m) for i, m in enumerate(masks)]
    made = StateStore.from_states(cfg, SPU, list("abcdef"), [100] * 6, states)
    made.save(tmp_path / "speech.npz")
    made = StateStore.load(tmp_path / "speech.npz")
    assert all(torch.equal(made.speech(i), m) for i, m in enumerate(masks))
    joined = StateStore.concat([made.subset(np.array([4, 1])), made.subset(np.array([0, 5, 3]))])
    for j, i in enumerate([4, 1, 0, 5, 3]):
        assert torch.equal(joined.speech(j), masks[i]) and joined.state(j).ref == 1.0 + i
    # a row whose length changed since the store was made has no state in it
    moved = [corpus[0].id, corpus[1].id]
    assert list(loaded.lookup(moved, [corpus[0].num_samples, 5])) == [0, -1]


def test_read_window_is_the_slice_of_the_whole_file(corpus, tmp_path):
    for row in corpus:
        whole = load_audio(row.path, SR)
        for start, frames in ((0, 1000), (1234, 4000), (whole.numel() - 500, 4000)):
            window = read_window(row.path, start, frames, SR, num_samples=whole.numel())
            assert torch.equal(window, whole[start : start + frames])
    # another sample rate: decoded whole and resampled, then cut (the same samples as load_audio)
    path = tmp_path / "slow.wav"
    sf.write(path, np.sin(np.arange(22050) / 7.0).astype(np.float32) * 0.3, 22050)
    whole = load_audio(path, SR)
    assert torch.equal(read_window(path, 100, 300, SR), whole[100:400])
    with pytest.raises(AudioError, match="the manifest says 17"):
        read_window(corpus[0].path, 0, 100, SR, num_samples=17)
    with pytest.raises(AudioError, match="no such file"):
        read_window(tmp_path / "gone.flac", 0, 100, SR)


def _items(ds: CropDataset, epochs=(0, 1, 2)) -> list[dict]:
    out = []
    for epoch in epochs:
        ds.set_epoch(epoch)
        out += [ds[i] for i in range(len(ds))]
    return out


@pytest.mark.parametrize("normalize", ["speaker", "utterance"])
def test_crops_from_stored_states_and_windows_are_bit_exact(corpus, features_cfg, normalize):
    """The old way (decode the whole file, measure it, cut the crop) and the new (stored state,
    decode the window only) give the same crops: waveform, features and F0 condition."""
    cfg = {**features_cfg, "normalize": normalize}
    stats = compute_stats(corpus, cfg, progress=False)
    speakers = speakers_of(corpus)
    store = measure_states(corpus, cfg, SPU, pitch=(50.0, 600.0), progress=False)
    index = store.lookup([r.id for r in corpus], [r.num_samples for r in corpus])
    args = (corpus, speakers, stats, cfg, 0.64, SR, SPU)
    old = CropDataset(*args, seed=3, pitch=(50.0, 600.0))
    new = CropDataset(*args, seed=3, pitch=(50.0, 600.0), states=(store, index))
    a, b = _items(old), _items(new)
    assert not new._states and new._cache == {}  # nothing measured, nothing decoded whole
    for x, y in zip(a, b, strict=True):
        assert x["id"] == y["id"] and x["num_samples"] == y["num_samples"]
        for key in ("wav", "feats", "pitch"):
            assert torch.equal(x[key], y[key]), key
    # the device path: the same features, made for the whole batch at once
    dev = CropDataset(*args, seed=3, states=(store, index), features_on="device")
    items = _items(dev, epochs=(1,))
    assert "feats" not in items[0] and items[0]["norm"].shape == (2, cfg["n_mels"])
    batch = collate(items, SPU)
    front = FrontEnd(cfg, stats)
    feats = front.batch(batch["wav"], batch["dc"], batch["ref"], batch["num_samples"],
                        batch["norm"][:, 0], batch["norm"][:, 1])
    loader_side = collate(_items(CropDataset(*args, seed=3, states=(store, index)), (1,)), SPU)
    assert feats.shape == loader_side["feats"].shape
    assert torch.allclose(feats, loader_side["feats"], atol=1e-4, rtol=0)


def test_a_corpus_without_states_is_measured_once_and_kept(corpus, features_cfg, tmp_path, caplog):
    cfg = {**features_cfg, "normalize": "speaker"}
    kept = tmp_path / "run" / STATE_FILE
    with caplog.at_level(logging.INFO):
        store, index = states_for_rows(corpus, cfg, SPU, found=[tmp_path / "absent.npz"],
                                       cache=kept, progress=False)
    assert "measuring the front-end state of 6 of 6 utterances" in caplog.text
    assert "re-run" in caplog.text and kept.exists() and (index >= 0).all()
    caplog.clear()
    with caplog.at_level(logging.INFO):  # a resumed run: nothing to measure
        again, index2 = states_for_rows(corpus, cfg, SPU, found=[kept], cache=kept,
                                        progress=False)
    assert "measuring" not in caplog.text and list(index2) == list(index)
    # a store of the corpus that lacks a row, and F0 tracks: only what is missing is measured
    partial = tmp_path / "corpus" / STATE_FILE
    measure_states(corpus[:4], cfg, SPU, progress=False).save(partial)
    with caplog.at_level(logging.INFO):
        store, index = states_for_rows(corpus, cfg, SPU, found=[partial], progress=False)
    assert "of 2 of 6 utterances" in caplog.text
    for row, i in zip(corpus, index, strict=True):
        assert store.arrays["ids"][i] == row.id
    # a store made with other features is not used
    caplog.clear()
    with caplog.at_level(logging.INFO):
        states_for_rows(corpus[:1], {**cfg, "dynamic_range_db": 60.0}, SPU, found=[partial],
                        progress=False)
    assert "not used" in caplog.text and "dynamic_range_db" in caplog.text


def test_prepare_writes_the_states_and_training_uses_them(tmp_path, compose_cfg, corpus):
    """speechvq-prepare stores the states with the corpus; the VQ-VAE task finds them there and
    measures nothing (stats.json's neighbour)."""
    from speechvq.cli.prepare import run as prepare
    from speechvq.tasks import VQVAETask

    root = tmp_path / "audio"
    for row in corpus:
        dest = root / row.speaker / Path(row.path).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(Path(row.path).read_bytes())
    out = tmp_path / "data"
    cfg = compose_cfg("prepare", [f"data.root={root}", f"out_dir={out}", "data.speaker=parent",
                                  "data.split.by=none", "progress=false"])
    assert prepare(cfg) == 0
    store = StateStore.load(out / STATE_FILE)
    assert len(store) == len(corpus) and store.samples_per_unit == 320
    train = compose_cfg("train", [f"data.manifest={out / 'manifest.tsv'}", "out_dir=unused",
                                  "model.encoder.channels=8", "model.decoder.channels=8"],
                        plain=True)
    task = VQVAETask(train, out_dir=tmp_path / "exp", progress=False)
    assert not (tmp_path / "exp" / STATE_FILE).exists()  # nothing was measured
    assert task.train_set._store is not None and (task.train_set._store_index >= 0).all()
    assert task.train_set.sampling == "duration" and task.train_set.speech == 0.5  # the defaults
    write_manifest(tmp_path / "m.tsv", corpus)  # no store beside this one: measured and kept
    train["data"]["manifest"] = str(tmp_path / "m.tsv")
    train["data"].update(crop_sampling="utterance", crop_speech=0.25)
    task = VQVAETask(train, out_dir=tmp_path / "exp2", progress=False)
    assert (tmp_path / "exp2" / STATE_FILE).exists()
    # data.crop_sampling and data.crop_speech reach the crops
    assert task.train_set.sampling == "utterance" and task.train_set.speech == 0.25
