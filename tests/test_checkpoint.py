"""Checkpoints: plain data, atomic writes, clear errors, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from speechvq.checkpoint import (
    FORMAT,
    CheckpointError,
    capture_rng,
    checkpoint_hash,
    checkpoint_key,
    clean_stale_temps,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from speechvq.files import WriteError


def _state(kind: str = "vqvae") -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {
        "kind": kind,
        "model_config": {"n_speakers": 3, "encoder": {"channels": [4, 8]}},
        "meta": {"speakers": ["a", "b", "c"], "frame_rate": 50.0, "stats": None},
        "model": model.state_dict(),
        "step": 7,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": capture_rng(),
        "best": float("inf"),
    }


def test_round_trip_loads_with_weights_only(tmp_path: Path) -> None:
    state = _state()
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)  # plain torch, no speechvq code needed
    assert raw["format"] == FORMAT
    ckpt = load_checkpoint(path, kind="vqvae")
    assert ckpt["step"] == 7 and ckpt["meta"]["speakers"] == ["a", "b", "c"]
    for key, value in state["model"].items():
        assert torch.equal(ckpt["model"][key], value)
    opt = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    opt.load_state_dict(ckpt["optimizer"])
    assert checkpoint_key(ckpt, "model_config.encoder.channels") == [4, 8]
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["last.pt"]


def test_rng_round_trip() -> None:
    state = capture_rng()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_hash_is_stable_and_content_based(tmp_path: Path) -> None:
    state = _state()
    save_checkpoint(tmp_path / "a.pt", state)
    h = checkpoint_hash(tmp_path / "a.pt")
    assert len(h) == 16 and int(h, 16) >= 0
    assert checkpoint_hash(tmp_path / "a.pt") == h
    state["step"] = 8
    save_checkpoint(tmp_path / "b.pt", state)
    assert checkpoint_hash(tmp_path / "b.pt") != h


def test_failed_save_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**_state(), "step": 99})
    assert path.read_bytes() == before  # the old checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp file left


def test_full_disk_is_one_line_naming_the_checkpoint_and_keeps_the_old_one(
    tmp_path: Path, monkeypatch
) -> None:
    """ENOSPC inside torch's writer comes out of torch.save as a RuntimeError about stream
    positions; the user must read which file could not be written and why."""
    import errno
    import os

    path = tmp_path / "last.pt"
    save_checkpoint(path, _state())
    before = path.read_bytes()
    real = torch.save

    class Full:
        def __init__(self, f) -> None:
            self.f = f

        def write(self, data) -> int:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self) -> None:
            pass

    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real(obj, Full(f), *a, **k))
    with pytest.raises(WriteError) as err:
        save_checkpoint(path, {**_state(), "step": 99})
    assert str(err.value) == f"cannot write {path}: No space left on device"
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_clean_stale_temps_removes_only_checkpoint_temp_files(tmp_path: Path) -> None:
    stale = [tmp_path / ".last.pt.abcd1234.tmp", tmp_path / ".best.pt.x_y_z_00.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / ".units.txt.abcd1234.tmp", tmp_path / ".last.pt.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(clean_stale_temps(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert clean_stale_temps(tmp_path / "missing") == []


def test_non_plain_values_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"checkpoint\.meta\.stats.*numpy"):
        save_checkpoint(tmp_path / "x.pt", {**_state(), "meta": {"stats": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"checkpoint\.config.*DictConfig"):
        save_checkpoint(tmp_path / "x.pt", {**_state(), "config": OmegaConf.create({"a": 1})})
    assert not list(tmp_path.iterdir())


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        checkpoint_hash(tmp_path / "nope.pt")


def test_not_a_speechvq_checkpoint(tmp_path: Path) -> None:
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    with pytest.raises(CheckpointError, match=r"plain\.pt: not a speechvq checkpoint"):
        load_checkpoint(plain)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"text\.pt: not a speechvq checkpoint"):
        load_checkpoint(text)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "obj": Path("x")}, pickled)  # arbitrary object: refused
    with pytest.raises(CheckpointError, match=r"pickled\.pt: not a speechvq checkpoint"):
        load_checkpoint(pickled)
    truncated = tmp_path / "truncated.pt"
    save_checkpoint(truncated, _state())
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: not a speechvq checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("text", ["hello", "checkpoint", '{"step": 1}', "#!/bin/sh\nexit 0\n", ""])
def test_a_text_file_is_one_line_not_a_checkpoint(tmp_path: Path, text: str) -> None:
    path = tmp_path / "model.pt"
    path.write_text(text)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert message.startswith(f"{path}: not a speechvq checkpoint (not a torch.save zip archive")
    assert "\n" not in message and "weights_only" not in message and "KeyError" not in message


def test_pickled_objects_and_corrupt_archives_are_one_line(tmp_path: Path) -> None:
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": FORMAT, "obj": Path("x")}, pickled)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(pickled)
    assert "\n" not in str(err.value) and "objects other than tensors" in str(err.value)
    assert "PosixPath" in str(err.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(corrupt)
    assert "\n" not in str(err.value) and "If you are seeing this error" not in str(err.value)


def test_wrong_kind_and_missing_keys(tmp_path: Path) -> None:
    path = tmp_path / "prior.pt"
    save_checkpoint(path, _state(kind="prior"))
    with pytest.raises(CheckpointError, match=r"prior\.pt: expected a vqvae checkpoint, got prior"):
        load_checkpoint(path, kind="vqvae")
    assert load_checkpoint(path, kind="prior")["kind"] == "prior"
    with pytest.raises(CheckpointError, match=r"missing key 'meta\.n_codes'"):
        load_checkpoint(path, required=["meta.n_codes"])
    state = _state()
    del state["model_config"]
    save_checkpoint(tmp_path / "nocfg.pt", state)
    with pytest.raises(
        CheckpointError, match=r"nocfg\.pt: checkpoint is missing key 'model_config'"
    ):
        load_checkpoint(tmp_path / "nocfg.pt")
    with pytest.raises(CheckpointError, match=r"x\.pt: checkpoint is missing key 'meta\.kind'"):
        checkpoint_key({"meta": {}}, "meta.kind", "x.pt")


def test_load_model_state_strips_wrappers_and_names_the_file(tmp_path: Path) -> None:
    src = torch.nn.Linear(3, 2)
    wrapped = {f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}
    dst = torch.nn.Linear(3, 2)
    load_model_state(dst, {"model": wrapped}, tmp_path / "a.pt")
    assert torch.equal(dst.weight, src.weight)
    with pytest.raises(CheckpointError, match="a.pt: .*weights do not match"):
        load_model_state(torch.nn.Linear(4, 2), {"model": wrapped}, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="a.pt.*model"):
        load_model_state(dst, {}, tmp_path / "a.pt")
