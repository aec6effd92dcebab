"""Writing files: one atomic writer with one permission and cleanup policy, JSON, safe names.

Every file speechvq writes goes through :func:`atomic_write` (or a helper built on it):

- it appears whole or not at all: the content goes to a temp file ``.NAME.XXXXXXXX.tmp`` in the
  target's folder, is flushed and ``fsync``-ed, then ``os.replace``-d over ``NAME`` (and the
  folder is ``fsync``-ed, best effort), so a crash never leaves half a file and a failed write
  keeps the previous one;
- a failed write leaves no temp file behind (it is removed on any error, Ctrl-C included) and
  raises :class:`WriteError`, one line naming the file;
- its mode is what ``open()`` would give a new file: ``0o666`` less the process umask, so 0644
  under the usual umask 022 (``mkstemp`` alone would make it 0600, unreadable to the group).

A process killed between the temp file and the rename leaves the temp file; :func:`clean_temps`
removes such files (only call it while holding the folder's lock: a live writer's temp file
looks the same).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

#: mkstemp's random part: 8 of [a-z0-9_]
_TEMP_PART = r"\.[a-z0-9_]{8}\.tmp"
_UMASK_LOCK = threading.Lock()


class WriteError(OSError):
    """An output file that cannot be written (full disk, no permission, read-only file system).

    ``str(err)`` is one line, ``cannot write <path>: <cause>``; ``err.filename`` is the path.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


def write_error(err: OSError, path: str | os.PathLike) -> WriteError:
    """``err`` (a failed write, mkdir, rename...) as a :class:`WriteError` naming ``path``."""
    if isinstance(err, WriteError):
        return err
    return WriteError(err.errno, err.strerror or str(err) or "write failed", str(path))


def _os_error_behind(err: BaseException) -> OSError | None:
    """The OSError behind ``err``: torch reports a failed write of its zip writer as a
    RuntimeError about stream positions, with the OSError as its ``__context__``."""
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    return seen


# errors that only writing gives: "cannot write FILE: cause" even when the writer did not say so
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def write_problem(err: OSError) -> str | None:
    """One line for a failed write of an output, or None when ``err`` is not one."""
    if isinstance(err, WriteError):
        return str(err)
    if err.errno in _WRITE_ERRNOS:
        where = f" {err.filename}" if err.filename else " the output"
        return f"cannot write{where}: {err.strerror}"
    return None


def probe_writable(folder: str | os.PathLike) -> str | None:
    """Create ``folder`` and write (and remove) a small file in it: None when that works, else one
    line ``cannot write FOLDER: cause`` (no permission, read-only, disk or quota full)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".speechvq-probe.", suffix=".tmp")
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(tmp)
    except OSError as err:
        return f"cannot write {err.filename or folder}: {err.strerror or err}"
    return None


def umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode of every file speechvq writes: ``0o666 & ~umask`` (0644 under umask 022)."""
    return 0o666 & ~umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], mode: str = "w"
                 ) -> Path:
    """Write ``path`` through ``write(file)`` atomically (see the module docstring); returns it.

    ``mode`` is ``"w"`` (text: UTF-8, ``\\n`` line ends) or ``"wb"``. Raises :class:`WriteError`
    naming ``path`` when it cannot be written; any other error of ``write`` propagates. Either way
    no temp file is left and ``path`` is as it was.
    """
    path = Path(path)
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode must be 'w' or 'wb', not {mode!r}")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, file_mode())
        text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with os.fdopen(fd, mode, **text) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        cause = _os_error_behind(err)
        if cause is None:
            raise
        raise write_error(cause, path) from err
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(data), mode="wb")


def write_json(path: str | os.PathLike, data: Mapping[str, Any] | list, indent: int = 1) -> Path:
    """Write ``data`` as indented JSON (and a final newline), atomically."""
    return write_text(path, json.dumps(data, indent=indent) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


def safe_name(text: str) -> str:
    """A file name made from an utterance id or speaker name (no separators or odd characters)."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text)).strip(".")
    return name or "_"


def file_hash(path: str | os.PathLike, digits: int = 16) -> str:
    """The first ``digits`` hex digits of the file's sha256 (read in blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


def temp_pattern(suffix: str = "") -> re.Pattern[str]:
    """Names of the temp files :func:`atomic_write` makes for targets ending in ``suffix``."""
    return re.compile(rf"^\..+{re.escape(suffix)}{_TEMP_PART}$")


def clean_temps(folder: str | os.PathLike, suffix: str = "") -> list[Path]:
    """Remove the temp files killed writes left in ``folder`` (targets ending in ``suffix``).

    Only call it while holding the folder's lock: a live writer's temp file looks the same.
    Returns the files removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = temp_pattern(suffix)
    removed = []
    for entry in folder.iterdir():
        if pattern.match(entry.name) and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
