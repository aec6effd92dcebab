"""DDP on CPU: a real `torchrun --nproc_per_node=2` (gloo) run of speechvq-train, and the
replica check that makes drifting codebooks an error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from speechvq.checkpoint import load_checkpoint
from speechvq.runtime import DistInfo, ReplicaDriftError, replica_checksum, verify_replicas
from speechvq.vqvae import load_vqvae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY_MEL, _write_corpus  # noqa: E402

TRAIN = Path(sys.executable).with_name("speechvq-train")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(port: int | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    if port is not None:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return env


def test_torchrun_two_ranks_gloo(tmp_path: Path) -> None:
    train, valid = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "exp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={_free_port()}", str(TRAIN),
        f"data.manifest={train}", f"data.valid_manifest={valid}", f"out_dir={out}",
        "data.crop_seconds=0.32", "trainer.max_steps=4", "trainer.batch_size=2",
        "trainer.valid_every=2", "trainer.save_every=2", "trainer.media_every=null",
        "trainer.log_every=1", *TINY_MEL,
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "2 rank(s)" in log and log.count("training vqvae") == 1  # rank 0 speaks, once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt", kind="vqvae")
    assert ckpt["step"] == 4 and ckpt["rng"]["world_size"] == 2
    # both ranks' parameters and buffers (EMA codebook, usage counts) were identical at the save
    assert len(ckpt["replicas"]) == 2 and len(set(ckpt["replicas"])) == 1
    model, meta = load_vqvae(out / "checkpoints" / "last.pt")
    assert replica_checksum(model) == ckpt["replicas"][0]
    assert bool(model.quantizer.inited) and meta.speakers == ["ann", "bob", "cid"]
    # one TensorBoard writer (rank 0) and no per-rank hydra folders
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in out.iterdir()) == [
        ".hydra", ".lock", "checkpoints", "frontend_state.npz", "stats.json", "tb", "train.log"]


def _drift_worker(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        module = torch.nn.Linear(3, 2)
        module.register_buffer("codebook", torch.zeros(4, 2))
        info = DistInfo(rank=rank, world_size=2)
        sums = verify_replicas(module, info)
        assert len(sums) == 2 and sums[0] == sums[1]
        if rank == 1:
            module.codebook[0, 0] = 1e-6  # one rank's EMA update went its own way
        try:
            verify_replicas(module, info)
            outcome = "no error"
        except ReplicaDriftError as err:
            outcome = str(err)
        Path(result_dir, f"rank{rank}.txt").write_text(outcome)
    finally:
        dist.destroy_process_group()


def test_drifting_replicas_are_an_error(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_drift_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "replicas drifted apart" in text and "codebook" in text, text
