"""The sidecar ``FILE.json`` of a unit file: what the units are and where they came from.

:class:`Sidecar` is the one definition of its keys (unit rate, codebook size, checkpoint and its
hash, format, dedup, config, counts, rejected files, the hashes of the files beside it), read with
:func:`read_sidecar` and written with :func:`write_sidecar`. It is named after the unit file
rather than a fixed ``units.json`` so that several unit files (splits, shards) can share a folder.
:mod:`speechvq.units` re-exports all of it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speechvq.files import read_json, write_json


def sidecar_path(path: str | os.PathLike) -> Path:
    """``FILE.json``: the sidecar describing a unit file (frame rate, checkpoint, counts...)."""
    path = Path(path)
    return path.with_name(path.name + ".json")


@dataclass
class Sidecar:
    """The sidecar ``FILE.json`` of a unit file: what the units are and where they came from.

    ``speechvq-extract`` fills every field; a converted or merged file keeps its source's. Keys
    this version does not know are kept in ``extra`` and written back unchanged.
    """

    format: str | None = None  # gslm | kaldi | npy | espnet | km
    dedup: bool = False
    unit_rate: float | None = None  # units per second: frame i is centred at (i + 0.5) / it
    n_codes: int | None = None  # codebook size
    model_kind: str | None = None  # "mel" | "wave"
    checkpoint: str | None = None  # the VQ-VAE checkpoint (absolute path) and its file hash
    checkpoint_hash: str | None = None
    manifest: str | None = None  # the manifest (absolute path) and its file hash
    manifest_hash: str | None = None
    shard: int | None = None  # this file's shard of nshards (None: merged or whole)
    nshards: int | None = None
    signature: dict | None = None  # what makes a re-run "already done" (speechvq.extract)
    features: dict | None = None  # the front-end config the units were made with
    normalization: dict | None = None  # where the normalisation statistics came from
    chunking: dict | None = None
    counts: dict = field(default_factory=dict)  # utterances, frames, seconds, rejected
    rejected: list = field(default_factory=list)  # {"id", "path", "reason"} per skipped file
    device: str | None = None
    wall_seconds: float | None = None
    realtime_factor: float | None = None
    created: str | None = None
    config: dict | None = None  # the full resolved config of the run
    units_hash: str | None = None  # the files beside this sidecar (None: not recorded)
    durations_hash: str | None = None
    ids: list | None = None  # km format: the utterance ids in line order
    merged_from: list | None = None  # the unit files this one was merged from
    parts: dict | None = None  # extraction in parts: how many, how many a re-run found done
    extra: dict = field(default_factory=dict)

    #: fields that describe the exact files beside a sidecar: never carried over to another file
    FILE_FIELDS = ("units_hash", "durations_hash", "ids", "parts")

    def to_dict(self) -> dict:
        """Plain JSON data; ``ids``, ``merged_from`` and ``parts`` only when set, unknown keys
        kept."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        for key in ("ids", "merged_from", "parts"):
            if out[key] is None:
                del out[key]
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | os.PathLike = "sidecar") -> Sidecar:
        """The sidecar in ``data``; ValueError naming ``path`` when it is not one."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: not a unit-file sidecar (a JSON object)")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        if "frame_rate" in data and "unit_rate" not in data:  # its former name
            data = {("unit_rate" if k == "frame_rate" else k): v for k, v in data.items()}
        given = {k: v for k, v in data.items() if k in known}
        return cls(**given, extra={k: v for k, v in data.items() if k not in known})

    def for_other_file(self, **changes: Any) -> Sidecar:
        """A copy for another file made from the same units (converted, merged): without the
        fields that describe this file's bytes, with ``changes`` applied."""
        clear = dict.fromkeys(self.FILE_FIELDS)
        return dataclasses.replace(self, **{**clear, **changes}, extra=dict(self.extra))


def read_sidecar(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar ``FILE.json`` of the unit file ``path``, or None when there is none."""
    spath = sidecar_path(path)
    if not spath.exists():
        return None
    return Sidecar.from_dict(read_json(spath), spath)


def write_sidecar(path: str | os.PathLike, sidecar: Sidecar | Mapping[str, Any]) -> None:
    """Write the sidecar ``FILE.json`` of the unit file ``path``, atomically."""
    if not isinstance(sidecar, Sidecar):
        sidecar = Sidecar.from_dict(sidecar, sidecar_path(path))
    write_json(sidecar_path(path), sidecar.to_dict())
