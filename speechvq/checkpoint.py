"""Self-describing checkpoints: weights + model config + training state + meta, as plain data.

A checkpoint is a ``torch.save`` of a plain dict of tensors and Python scalars/strings/lists/dicts,
so it loads with ``torch.load(weights_only=True)`` (no pickled classes, nothing executed on load)::

    {"format": "speechvq/1", "kind": "vqvae" | "prior",
     "model_config": {...builder kwargs...}, "meta": {...}, "model": state_dict,
     "step": int, "optimizer": ..., "scheduler": ..., "scaler": ..., "rng": ..., "best": float,
     "config": {...resolved hydra config...}}

Every later stage rebuilds its model from ``model_config`` and ``meta`` alone. Writes are atomic:
a temp file in the same folder, then ``os.replace``, so a crash never leaves half a checkpoint, and
a failed write (a full disk) keeps the previous file (:func:`speechvq.files.atomic_write`). This
module also holds what keeps output folders safe: :class:`OutputLock` (one writer per output) and
:func:`clean_stale_temps`.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import random
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from speechvq.files import atomic_write, clean_temps, file_hash, write_error

FORMAT = "speechvq/1"
REQUIRED_KEYS = ("format", "kind", "model_config", "meta", "model", "step")
_SCALARS = (str, int, float, bool, type(None))  # exact types: np.float64 subclasses float
_TORCH = (torch.Tensor, torch.dtype, torch.device, torch.Size)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, of the wrong kind or lacking a key.

    ``str(err)`` names the file and the problem; ``err.path`` is the file.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (plus ``"format"``) to ``path`` atomically.

    Raises ``TypeError`` naming the key when a value is not a tensor or plain Python data
    (numpy arrays, OmegaConf nodes, ... would not load with ``weights_only=True``), and
    :class:`WriteError` naming ``path`` when the file cannot be written (full disk, no
    permission). The file is written to a temp file in the same folder, flushed to disk and
    renamed over ``path``; on any error the temp file is removed and ``path`` is left as it was.
    """
    state = {"format": FORMAT, **state}
    _check_plain(state, "checkpoint")
    atomic_write(path, lambda f: torch.save(state, f), mode="wb")


def clean_stale_temps(folder: str | Path) -> list[Path]:
    """Remove the temp files killed checkpoint writes left in ``folder`` (``.NAME.pt.*.tmp``).

    Only call it while holding the folder's :class:`OutputLock`: a live writer's temp file looks
    the same. Returns the files removed.
    """
    return clean_temps(folder, ".pt")


class OutputInUseError(Exception):
    """Another process holds the lock of an output (a run folder, a unit file).

    ``str(err)`` is one line: ``<output> is in use by another <program> (pid <N>)``.
    """


# lock file (resolved) -> [fd, depth]: the lock is re-entrant within a process (the CLI takes it
# before hydra starts, fit takes it again), flock itself is not (one lock per open file)
_HELD: dict[str, list[int]] = {}


class OutputLock:
    """An exclusive, non-blocking ``fcntl.flock`` on ``lock_file``, describing ``output``.

    Entering it creates ``lock_file`` if needed and writes ``<pid> <program>`` into it; when
    another process holds it, :class:`OutputInUseError` is raised at once, naming ``output``, the
    holder's program and pid. The kernel drops the lock when its process ends (even when killed),
    so a stale lock file never blocks a run; the file itself is left in place (unlinking a lock
    file races with processes opening it). Re-entering in the same process nests.
    """

    def __init__(self, lock_file: str | Path, output: str | Path | None = None,
                 program: str | None = None) -> None:
        self.lock_file = Path(lock_file)
        self.output = Path(output) if output is not None else self.lock_file
        self.program = program or Path(sys.argv[0]).name or "python"
        self._key = ""

    def __enter__(self) -> OutputLock:
        self._key = os.path.realpath(self.lock_file)
        if self._key in _HELD:
            _HELD[self._key][1] += 1
            return self
        try:
            self.lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_error(err, self.lock_file) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            pid = holder[0] if holder else "?"
            program = holder[1] if len(holder) > 1 else "process"
            raise OutputInUseError(
                f"{self.output} is in use by another {program} (pid {pid})"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.program}\n".encode(), 0)
        except OSError as err:
            os.close(fd)
            raise write_error(err, self.lock_file) from None
        _HELD[self._key] = [fd, 1]
        return self

    def __exit__(self, *exc: object) -> None:
        entry = _HELD[self._key]
        entry[1] -= 1
        if entry[1] == 0:
            del _HELD[self._key]
            os.close(entry[0])  # releases the flock


@dataclass(frozen=True)
class VQVAEMeta:
    """The ``meta`` of a VQ-VAE checkpoint: what every later stage needs besides the weights.

    Written by :class:`speechvq.tasks.VQVAETask` (``to_dict``), read back by
    :func:`speechvq.vqvae.load_vqvae` (``from_dict``): the one definition of its keys.

    Attributes:
        kind: ``"mel"`` or ``"wave"``.
        speakers: the decoder's speakers; the index of a name is its embedding.
        features: the log-mel front-end config (``conf/features``) the model was trained with.
        stats: :meth:`speechvq.features.FeatureStats.to_dict` of the training statistics, or None
            (wave model, or normalisation that needs none).
        sample_rate, unit_rate, n_codes, samples_per_unit: the model's audio rate, units per
            second, codebook size and samples per unit (the model's own values).
        manifest, valid_manifest: what it was trained and validated on (absolute paths).
    """

    kind: str
    speakers: list[str]
    features: dict | None
    stats: dict | None
    sample_rate: int
    unit_rate: float
    n_codes: int
    samples_per_unit: int
    manifest: str | None = None
    valid_manifest: str | None = None

    def to_dict(self) -> dict:
        """Plain data for the checkpoint."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, meta: Mapping[str, Any], model: Any, path: str | Path = "<checkpoint>"
                  ) -> VQVAEMeta:
        """The meta of a checkpoint of ``model`` (a :class:`speechvq.vqvae.VQVAE`).

        The frame geometry and codebook size are the model's (older checkpoints may lack them);
        a value in ``meta`` that contradicts the model is a :class:`CheckpointError`.
        """
        own = {"kind": model.kind, "sample_rate": int(model.sample_rate),
               "unit_rate": float(model.unit_rate), "n_codes": int(model.n_codes),
               "samples_per_unit": int(model.samples_per_unit)}
        meta = {"unit_rate": meta.get("frame_rate"), **meta}  # its former name
        for key, value in own.items():
            if meta.get(key) is not None and meta[key] != value:
                raise CheckpointError(path, f"meta.{key} is {meta[key]!r} but its model has "
                                            f"{value!r}")
        return cls(speakers=[str(s) for s in meta.get("speakers") or []],
                   features=dict(meta["features"]) if meta.get("features") else None,
                   stats=meta.get("stats"), manifest=meta.get("manifest"),
                   valid_manifest=meta.get("valid_manifest"), **own)


def load_checkpoint(
    path: str | Path,
    kind: str | None = None,
    required: Iterable[str] = (),
    map_location: str | torch.device = "cpu",
) -> dict:
    """Load a speechvq checkpoint with ``weights_only=True`` and check it.

    Args:
        path: the ``.pt`` file.
        kind: ``"vqvae"`` or ``"prior"`` to insist on that kind; ``None`` accepts any.
        required: extra keys that must be present, dotted for nested ones (``"meta.speakers"``).
        map_location: where tensors go (CPU by default).
    Raises:
        CheckpointError: missing file, not a speechvq checkpoint, wrong kind, missing key.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(path, "is not a file (expected a checkpoint .pt file)")
    ckpt = _torch_load(path, map_location)
    if not isinstance(ckpt, dict) or not str(ckpt.get("format", "")).startswith("speechvq/"):
        raise CheckpointError(path, "not a speechvq checkpoint (no 'format': 'speechvq/...' key)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(
            path, f"checkpoint format {ckpt['format']!r} is not supported (expected {FORMAT!r})"
        )
    if kind is not None and ckpt.get("kind") != kind:
        raise CheckpointError(path, f"expected a {kind} checkpoint, got {ckpt.get('kind')}")
    for key in (*REQUIRED_KEYS, *required):
        _get_dotted(ckpt, key, path)
    return ckpt


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    """``torch.load(weights_only=True)``; anything else (a text file, a truncated or pickled
    file) is a one-line :class:`CheckpointError`, never torch's multi-line advice."""
    try:
        with path.open("rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as err:
        raise CheckpointError(path, f"cannot be read ({err.strerror})") from None
    if head != _ZIP_MAGIC:
        what = "an empty file" if not head else f"a file starting with {head!r}"
        raise CheckpointError(
            path, f"not a speechvq checkpoint (not a torch.save zip archive: {what})"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        extra = f": {found.group(1)}" if found else ""
        raise CheckpointError(
            path, f"not a speechvq checkpoint (it holds objects other than tensors and plain "
            f"data{extra})"
        ) from None
    except Exception as err:  # RuntimeError/EOFError/... for truncated or foreign files
        raise CheckpointError(
            path, f"not a speechvq checkpoint (cannot be read: {type(err).__name__}: "
            f"{_first_sentence(str(err))})"
        ) from None


def _first_sentence(text: str) -> str:
    """The first line of ``text`` up to its first full stop (torch appends paragraphs)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line.split(". ")[0].rstrip(".")


def checkpoint_key(ckpt: Mapping, key: str, path: str | Path = "<checkpoint>") -> Any:
    """``ckpt[a][b]`` for ``key="a.b"``; a missing key raises :class:`CheckpointError` naming it."""
    return _get_dotted(ckpt, key, Path(path))


def load_model_state(model: torch.nn.Module, ckpt: Mapping, path: str | Path) -> None:
    """Load ``ckpt["model"]`` into ``model``: DDP's ``module.`` and torch.compile's
    ``_orig_mod.`` prefixes are dropped; weights that do not fit raise :class:`CheckpointError`
    naming the file (every stage rebuilding a model from a checkpoint goes through here)."""
    state = {}
    for key, value in checkpoint_key(ckpt, "model", path).items():
        stripped = None
        while stripped != key:
            stripped = key
            for prefix in ("module.", "_orig_mod."):
                key = key.removeprefix(prefix)
        state[key] = value
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(Path(path), f"weights do not match its model_config: {err}") from None


def checkpoint_hash(path: str | Path) -> str:
    """The first 16 hex digits of the file's sha256: names the exact weights units came from."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such checkpoint file")
    return file_hash(path)


def capture_rng(device: torch.device | str | None = None) -> dict:
    """This process's torch / numpy / Python RNG states as tensors and plain data, and the CUDA
    RNG of ``device`` when it is a GPU (the one this rank trains on, whichever is current)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {
            "version": int(version),
            "state": torch.tensor(py_state, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping, device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng` (the CUDA state goes to ``device``, when it is a GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            int(np_state["pos"]),
            int(np_state["has_gauss"]),
            float(np_state["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(py["state"].tolist()), py["gauss_next"]))
    device = torch.device(device) if device is not None else None
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def first_difference(a: Any, b: Any, where: str = "model_config") -> str:
    """Where two configs first differ: ``"model_config.x.y: 1 != 2"`` (or a key in one only)."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{where}.{key} is only in one of them"
            if a[key] != b[key]:
                return first_difference(a[key], b[key], f"{where}.{key}")
    return f"{where}: {a!r} != {b!r}"


def _get_dotted(ckpt: Mapping, key: str, path: Path) -> Any:
    node: Any = ckpt
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise CheckpointError(path, f"checkpoint is missing key {key!r}")
        node = node[part]
    return node


def _check_plain(obj: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` would not load, naming the key."""
    if isinstance(obj, dict):  # not any Mapping: an OmegaConf DictConfig would not load
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str/int")
            _check_plain(value, f"{where}.{key}")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif type(obj) not in _SCALARS and not isinstance(obj, _TORCH):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only "
            "tensors and plain Python data (convert numpy arrays to tensors, configs to dicts)"
        )
