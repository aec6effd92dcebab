"""speechvq.data.dataset: deterministic crops, padding masks, features, and surviving bad files."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile as sf
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from speechvq.cli._hydra import conf_dir
from speechvq.data.dataset import CropDataset, UtteranceDataset, collate
from speechvq.data.manifest import ManifestRow, speakers_of
from speechvq.features import Z_MAX, FrontEnd, compute_stats, measure_states

SR = 16000
HOP = 320  # samples per unit of the default models


@pytest.fixture(scope="module")
def features_cfg() -> dict:
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("prepare", overrides=["out_dir=unused"])
    return OmegaConf.to_container(cfg.features, resolve=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two speakers, utterances of 0.3-1.2 s (some shorter than the 0.5 s crop), one broken file."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    rows = []
    for spk, freq in (("ann", 220.0), ("bob", 330.0)):
        for i, seconds in enumerate((0.3, 0.8, 1.2, 0.61)):
            n = int(seconds * SR)
            wav = 0.3 * np.sin(2 * np.pi * freq * np.arange(n) / SR) + 0.05 * rng.standard_normal(n)
            path = root / f"{spk}_{i}.flac"
            sf.write(path, wav.astype(np.float32), SR)
            rows.append(ManifestRow(f"{spk}_{i}", str(path), n, spk))
    broken = root / "broken.wav"
    broken.write_text("not audio")
    rows.insert(3, ManifestRow("broken", str(broken), 12000, "ann"))
    return rows


@pytest.fixture(scope="module")
def stats(corpus, features_cfg):
    return compute_stats(corpus, features_cfg, progress=False)


def _crops(corpus, stats, features_cfg, seed=0, crop=0.5):
    return CropDataset(corpus, speakers_of(corpus), stats, features_cfg, crop, SR, HOP, seed=seed)


def _same(a: dict, b: dict) -> bool:
    return (
        a["id"] == b["id"]
        and torch.equal(a["wav"], b["wav"])
        and torch.equal(a["feats"], b["feats"])
    )


def test_crops_are_a_function_of_seed_epoch_index(corpus, stats, features_cfg):
    ds = _crops(corpus, stats, features_cfg)
    long_idx = [i for i, r in enumerate(corpus) if r.num_samples > SR]
    ds.set_epoch(3)
    first = [ds[i] for i in range(len(ds))]
    # a fresh dataset (a resumed run), visited in another order, sees exactly the same data
    again = _crops(corpus, stats, features_cfg)
    again.set_epoch(3)
    for i in reversed(range(len(again))):
        assert _same(again[i], first[i])
    ds.set_epoch(4)
    assert not all(torch.equal(ds[i]["wav"], first[i]["wav"]) for i in long_idx)
    other = _crops(corpus, stats, features_cfg, seed=1)
    other.set_epoch(3)
    assert not all(torch.equal(other[i]["wav"], first[i]["wav"]) for i in long_idx)


def test_crop_content_shapes_and_features(corpus, stats, features_cfg):
    ds = _crops(corpus, stats, features_cfg)
    crop = ds.crop_samples
    assert crop == 8000 and crop % HOP == 0
    for i in range(len(ds)):
        item = ds[i]
        row = corpus[i]
        assert item["wav"].shape == (crop,)
        assert item["feats"].shape == (features_cfg["n_mels"], crop // features_cfg["hop_length"])
        assert item["speaker"] == speakers_of(corpus).index(row.speaker)
        if row.id == "broken":
            continue
        full = torch.from_numpy(sf.read(row.path, dtype="float32")[0])
        n = item["num_samples"]
        assert n == min(crop, full.numel())
        if full.numel() >= crop:  # a real slice of the utterance
            starts = [
                s
                for s in range(full.numel() - crop + 1)
                if torch.equal(full[s : s + crop], item["wav"])
            ]
            assert starts
        else:  # zero-padded at the end
            assert torch.equal(item["wav"][:n], full) and not item["wav"][n:].any()
        # the dataset's features are exactly the one front-end's, made with the state (level,
        # DC) of the whole utterance the crop comes from, normalised per speaker
        front = FrontEnd(features_cfg, stats)
        whole = full[: full.numel() // HOP * HOP]
        expected = front(item["wav"], row.speaker, front.measure(whole), n)
        valid = n // features_cfg["hop_length"]
        assert torch.equal(item["feats"][:, :valid], expected[:, :valid])
        assert not item["feats"][:, valid:].any()


def test_bad_file_is_replaced_deterministically(corpus, stats, features_cfg, caplog):
    bad = next(i for i, r in enumerate(corpus) if r.id == "broken")
    ds = _crops(corpus, stats, features_cfg)
    with caplog.at_level(logging.WARNING):
        item = ds[bad]
    assert item["id"] != "broken" and "broken.wav" in caplog.text
    assert _same(_crops(corpus, stats, features_cfg)[bad], item)
    # a corpus with nothing readable is an error, not an endless loop
    with pytest.raises(RuntimeError, match="broken"):
        _crops([corpus[bad]], stats, features_cfg)[0]


def test_collate_pads_and_masks(corpus, stats, features_cfg):
    ds = _crops(corpus, stats, features_cfg)
    items = [ds[i] for i in range(len(ds))]
    batch = collate(items, HOP)
    b, crop = len(items), ds.crop_samples
    assert batch["wav"].shape == (b, crop)
    assert batch["feats"].shape == (b, features_cfg["n_mels"], crop // features_cfg["hop_length"])
    assert batch["mask"].shape == (b, crop // HOP) and batch["mask"].dtype == torch.bool
    assert batch["speaker"].dtype == torch.long and batch["num_samples"].dtype == torch.long
    for k, it in enumerate(items):
        assert int(batch["mask"][k].sum()) == it["num_samples"] // HOP
    short = [k for k, it in enumerate(items) if it["num_samples"] < crop]
    assert short and not batch["mask"][short[0]].all()
    # default DataLoader plumbing works
    loader = torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=lambda items: collate(items, HOP))
    assert sum(len(x["ids"]) for x in loader) == len(ds)


def test_waveform_only_and_config_checks(corpus, stats, features_cfg):
    ds = CropDataset(corpus, speakers_of(corpus), None, None, 0.5, SR, HOP)
    assert "feats" not in ds[0]
    with pytest.raises(ValueError, match="stats"):
        CropDataset(corpus, speakers_of(corpus), None, features_cfg, 0.5, SR, HOP)
    with pytest.raises(ValueError, match="n_mels"):
        CropDataset(corpus, speakers_of(corpus), stats, {**features_cfg, "n_mels": 40}, 0.5, SR,
                    HOP)
    with pytest.raises(ValueError, match="bob"):
        CropDataset(corpus, ["ann"], stats, features_cfg, 0.5, SR, HOP)
    utt = CropDataset(
        corpus, speakers_of(corpus), None, {**features_cfg, "normalize": "utterance"}, 2.0, SR, HOP
    )
    item = utt[1]  # shorter than the crop: the whole utterance, normalised by its own moments
    assert item["num_samples"] == corpus[1].num_samples
    valid = item["num_samples"] // features_cfg["hop_length"]
    front = FrontEnd({**features_cfg, "normalize": "utterance"})
    own = front.measure(item["wav"], item["num_samples"]).moments
    feats = front.features_of(item["wav"][: item["num_samples"]])
    expected = ((feats - own.mean[:, None]) / own.std[:, None]).clamp(-Z_MAX, Z_MAX)
    # (the last frame differs: there the crop's window reaches its zero padding)
    torch.testing.assert_close(item["feats"][:, : valid - 1], expected[:, : valid - 1])


def test_utterances_in_order_bad_ones_dropped(corpus, stats, features_cfg, caplog):
    ds = UtteranceDataset(corpus, ["bob"], stats, features_cfg, SR, HOP)
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    bad = next(i for i, r in enumerate(corpus) if r.id == "broken")
    assert items[bad] is None
    for row, it in zip(corpus, items, strict=True):
        if it is None:
            continue
        assert it["id"] == row.id
        assert it["num_samples"] == row.num_samples // HOP * HOP == it["wav"].numel()
        assert it["speaker"] == (0 if row.speaker == "bob" else -1)
    batch = collate(items, HOP)
    assert batch["ids"] == [r.id for r in corpus if r.id != "broken"]
    longest = max(r.num_samples for r in corpus if r.id != "broken") // HOP * HOP
    assert batch["wav"].shape[1] == longest
    assert batch["feats"].shape[2] == longest // features_cfg["hop_length"]
    assert batch["mask"].shape[1] == longest // HOP
    assert collate([None, None], HOP) is None


def test_sorted_batches_cover_everything_once(corpus, stats, features_cfg):
    ds = UtteranceDataset(corpus, speakers_of(corpus), stats, features_cfg, SR, HOP)
    batches = ds.sorted_batches(max_seconds=2.0)
    assert sorted(i for b in batches for i in b) == list(range(len(ds)))
    for b in batches:
        longest = max(corpus[i].num_samples for i in b)
        assert len(b) == 1 or longest * len(b) <= 2.0 * SR
    assert batches == ds.sorted_batches(max_seconds=2.0)


def test_audio_cache_gives_identical_crops(corpus, stats, features_cfg):
    plain = _crops(corpus, stats, features_cfg)
    cached = CropDataset(
        corpus, speakers_of(corpus), stats, features_cfg, 0.5, SR, HOP, cache_audio=True
    )
    for epoch in (0, 1):
        plain.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(corpus)):
            assert _same(plain[i], cached[i])
    assert len(cached._cache) == len(corpus) - 1  # every readable file once, the broken one never


def test_duration_sampling_crops_each_second_equally_often(corpus):
    """``sampling="duration"``: utterances are cropped in proportion to their length (each second
    of audio equally often), as a pure function of (seed, epoch, index); the default crops each
    file once per epoch."""
    rows = [r for r in corpus if r.id != "broken"]
    spk = speakers_of(rows)

    def picks(sampling, seed=0, epochs=range(400)):
        ds = CropDataset(rows, spk, None, None, 0.5, SR, HOP, seed=seed, sampling=sampling)
        return np.array([[ds.utterance_of(e, i) for i in range(len(ds))] for e in epochs])

    assert (picks("utterance", epochs=range(3)) == np.arange(len(rows))).all()
    chosen = picks("duration")
    share = np.bincount(chosen.ravel(), minlength=len(rows)) / chosen.size
    expected = np.array([r.num_samples for r in rows]) / sum(r.num_samples for r in rows)
    assert np.abs(share - expected).max() < 0.02, (share, expected)
    assert (picks("duration", epochs=range(5)) == chosen[:5]).all()  # a resumed run: the same
    assert not (picks("duration", seed=1, epochs=range(5)) == chosen[:5]).all()
    # the item is a crop of the utterance picked, its start spread over the whole utterance
    ds = CropDataset(rows, spk, None, None, 0.5, SR, HOP, sampling="duration")
    longest = int(np.argmax([r.num_samples for r in rows]))
    starts = []
    for e in range(60):
        ds.set_epoch(e)
        for i in range(len(ds)):
            if ds.utterance_of(e, i) == longest:
                item = ds[i]
                assert item["id"] == rows[longest].id
                starts.append(item["wav"])
    assert len(starts) > 20 and len({float(w[0]) for w in starts}) > len(starts) // 2
    with pytest.raises(ValueError, match="sampling"):
        CropDataset(rows, spk, None, None, 0.5, SR, HOP, sampling="speech")


def test_speech_biased_crops_land_on_the_speech(tmp_path, features_cfg):
    """``speech``: a crop that is mostly silence is redrawn elsewhere in its utterance, so crops of
    a recording that is 3/4 silence land on its speech; without it they land where they fall."""
    rng = np.random.default_rng(0)
    n = 4 * SR
    wav = 1e-4 * rng.standard_normal(n)  # silence: ~70 dB below the tone
    speech = slice(SR, 2 * SR)
    wav[speech] += 0.3 * np.sin(2 * np.pi * 220.0 * np.arange(SR) / SR)
    path = tmp_path / "a.flac"
    sf.write(path, wav.astype(np.float32), SR)
    rows = [ManifestRow("a", str(path), n, "ann")]
    stats = compute_stats(rows, features_cfg, progress=False)

    def speech_in_crops(share, states=None):
        ds = CropDataset(rows, ["ann"], stats, features_cfg, 0.5, SR, HOP, speech=share,
                         states=states)
        got = []
        for e in range(40):
            ds.set_epoch(e)
            w = ds[0]["wav"].numpy()
            got.append(float(np.mean(np.abs(w) > 0.01)))  # share of the crop on the tone
        assert states is None or not ds._states  # chosen by the stored speech frames alone
        return np.array(got)

    plain, biased = speech_in_crops(0.0), speech_in_crops(0.5)
    store = measure_states(rows, features_cfg, HOP, progress=False)
    stored = speech_in_crops(0.5, (store, store.lookup(["a"], [n])))
    assert np.array_equal(stored, biased)  # the same crops from a state store
    assert (plain < 0.1).mean() > 0.4  # most crops of the plain sampler are silence
    assert (biased >= 0.4).mean() > 0.9 and biased.mean() > plain.mean() + 0.3
    with pytest.raises(ValueError, match="share"):
        CropDataset(rows, ["ann"], stats, features_cfg, 0.5, SR, HOP, speech=1.5)
    with pytest.raises(ValueError, match="front-end"):
        CropDataset(rows, ["ann"], None, None, 0.5, SR, HOP, speech=0.5)
