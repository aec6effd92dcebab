"""Several nodes: the launcher recipes/lib.sh builds (torchrun --standalone on one node, a c10d
rendezvous across nodes), checked with a logging stub `torchrun`, and a real two-"node" run of
speechvq-train: two torchrun agents side by side on 127.0.0.1, one gloo process each."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from speechvq.checkpoint import load_checkpoint
from speechvq.runtime import replica_checksum
from speechvq.vqvae import load_vqvae

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_training import TINY_MEL, _write_corpus  # noqa: E402

TRAIN = Path(sys.executable).with_name("speechvq-train")
REPO = Path(__file__).resolve().parents[1]


def _train_sh(stubs: Callable, tmp_path: Path, *args: str
              ) -> tuple[subprocess.CompletedProcess, list[str]]:
    env, log = stubs(tmp_path / "bin", "torchrun", "speechvq-train")
    proc = subprocess.run([str(REPO / "recipes" / "train.sh"), "--manifest", "m.tsv", "--out",
                           str(tmp_path / "exp"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_launcher_one_process_one_node_and_several_nodes(tmp_path: Path, command_stubs) -> None:
    bin_train = tmp_path / "bin" / "speechvq-train"
    proc, calls = _train_sh(command_stubs, tmp_path / "one")
    assert proc.returncode == 0, proc.stderr
    assert calls[0].startswith("speechvq-train data.manifest=m.tsv model=mel")  # no torchrun
    proc, calls = _train_sh(command_stubs, tmp_path, "--nproc", "4")
    assert proc.returncode == 0, proc.stderr
    assert calls == [f"torchrun --standalone --nproc_per_node=4 {bin_train} data.manifest=m.tsv "
                     f"model=mel out_dir={tmp_path / 'exp'} resume=auto"]
    for rank in ("0", "1"):  # every node runs the same command, bar its rank
        (tmp_path / "bin" / "calls.log").unlink()
        (tmp_path / "exp" / ".done.train").unlink()  # as if the nodes ran at the same time
        proc, calls = _train_sh(command_stubs, tmp_path, "--nproc", "8", "--nnodes", "2", "--node-rank", rank,
                                "--rdzv-endpoint", "node01:29500", "--rdzv-id", "job7",
                                "trainer=gpu")
        assert proc.returncode == 0, proc.stderr
        assert calls == [
            f"torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d "
            f"--rdzv-endpoint=node01:29500 --rdzv-id=job7 --node-rank={rank} {bin_train} "
            f"data.manifest=m.tsv model=mel out_dir={tmp_path / 'exp'} resume=auto trainer=gpu"]
    # node 1 wrote the marker last, and it is node 0's too: a re-run skips on every node
    for rank in ("0", "1"):
        proc, calls = _train_sh(command_stubs, tmp_path, "--nproc", "8", "--nnodes", "2", "--node-rank", rank,
                                "--rdzv-endpoint", "node01:29500", "--rdzv-id", "job7",
                                "trainer=gpu")
        assert "done, skipping" in proc.stderr and len(calls) == 1
    proc, calls = _train_sh(command_stubs, tmp_path / "anon", "--nnodes", "2", "--rdzv-endpoint", "h:1")
    assert proc.returncode == 0 and calls[0].startswith(  # no rank given: c10d numbers the nodes
        "torchrun --nnodes=2 --nproc_per_node=1 --rdzv-backend=c10d --rdzv-endpoint=h:1 "
        f"--rdzv-id=speechvq {tmp_path / 'anon' / 'bin' / 'speechvq-train'} ")


def test_launcher_refuses_several_nodes_without_an_endpoint(tmp_path: Path,
                                                           command_stubs) -> None:
    proc, calls = _train_sh(command_stubs, tmp_path, "--nnodes", "2", "--nproc", "8")
    assert proc.returncode == 1 and not calls
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in errors[0]
    proc, calls = _train_sh(command_stubs, tmp_path, "--nnodes", "two")
    assert proc.returncode == 1 and "--nnodes takes a positive number" in proc.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def test_two_nodes_c10d_rendezvous_train_in_step(tmp_path: Path) -> None:
    """Two torchrun agents ("nodes") meet at a c10d rendezvous on 127.0.0.1 and train one DDP
    job: it finishes, rank 0 alone writes, and both ranks held identical codebooks."""
    train, valid = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "exp"  # the same out_dir on both nodes (a shared file system)
    port = _free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=test"]
    args = [str(TRAIN), f"data.manifest={train}", f"data.valid_manifest={valid}",
            f"out_dir={out}", "device=cpu", "data.crop_seconds=0.32", "trainer.max_steps=4",
            "trainer.batch_size=2", "trainer.valid_every=2", "trainer.save_every=2",
            "trainer.media_every=null", "trainer.log_every=1", *TINY_MEL]
    nodes = [subprocess.Popen([*launcher, f"--node-rank={rank}", *args], env=_node_env(),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
             for rank in (0, 1)]
    start = time.monotonic()
    try:
        logs = [node.communicate(timeout=120)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(x[-3000:] for x in logs)
    log = (out / "train.log").read_text()
    assert "2 rank(s)" in log and log.count("training vqvae") == 1  # rank 0 speaks, once
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt", kind="vqvae")
    assert ckpt["step"] == 4 and ckpt["rng"]["world_size"] == 2
    assert len(ckpt["replicas"]) == 2 and len(set(ckpt["replicas"])) == 1  # no drift
    model, _ = load_vqvae(out / "checkpoints" / "last.pt")
    assert replica_checksum(model) == ckpt["replicas"][0] and bool(model.quantizer.inited)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    assert not list(tmp_path.glob("outputs")) and not list(out.glob("*/.hydra"))  # one run dir
    assert time.monotonic() - start < 120
