"""Downloads that survive bad networks and archives that cannot escape their folder.

- :func:`download`: resumable (HTTP ``Range`` onto ``<file>.part``, both within a run and in the
  next one; a server that ignores it gets a clean restart), retried on transient errors;
- :func:`fetch_archive`: an archive from the first of several URLs that works, checked against
  the publisher's md5 (a mismatch moves it aside to ``<archive>.corrupt``);
- :func:`safe_extract`: tar extraction refusing absolute paths, ``..``, devices and links that
  point outside the target (or outside ``link_root``), with Python's ``filter='data'`` on top.

Errors name the URL or file: :class:`DownloadError`, :class:`ChecksumError`,
:class:`UnsafeArchiveError` (all ValueErrors).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import re
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath

from tqdm import tqdm

log = logging.getLogger(__name__)

_FILTER_ERROR = getattr(tarfile, "FilterError", ())  # Python >= 3.11.4


class DownloadError(ValueError):
    """A download that could not be completed (names the URL and the file)."""


class ChecksumError(ValueError):
    """An archive whose md5 is not the published one (names the file, expected and actual md5)."""


class UnsafeArchiveError(ValueError):
    """An archive member that would land outside the target folder (names archive and member)."""


def md5sum(path: str | os.PathLike, progress: bool = True) -> str:
    """Hex md5 of a file, read in 1 MiB blocks."""
    path = Path(path)
    digest = hashlib.md5()
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"md5 {path.name}",
            disable=not progress,
        ) as bar,
    ):
        while block := f.read(1 << 20):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


# --- download -------------------------------------------------------------------------------

# Errors after which resuming may succeed (a dropped connection, a timeout, a truncated body).
_TRANSIENT = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    retry_wait: float = 2.0,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming what an earlier try left there.

    A partial file is continued with an HTTP ``Range`` request; a server that ignores it (200
    instead of 206) or refuses it (416) gets a clean restart. A dropped connection is resumed up to
    ``retries`` times (waiting ``retry_wait`` * attempt seconds). ``dest`` appears only once the
    whole body arrived. Raises :class:`DownloadError` naming the URL and the file.
    """
    dest = Path(dest)
    part = _part_path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            _fetch(url, part, offset, timeout, progress)
            os.replace(part, dest)
            return dest
        except urllib.error.HTTPError as err:
            if err.code == 416 and offset:  # our .part is not a prefix of this file: start over
                log.warning("%s refused to resume %s at byte %d; restarting", url, part, offset)
                part.unlink()
                error: Exception = err
            elif err.code in (408, 429) or err.code >= 500:
                error = err
            else:
                raise DownloadError(
                    f"{url}: HTTP {err.code} {err.reason} (downloading {dest})"
                ) from None
        except _TRANSIENT as err:
            error = err
        attempt += 1
        have = part.stat().st_size if part.exists() else 0
        if attempt > retries:
            raise DownloadError(
                f"{url}: download to {part} failed after {retries} retries ({error}); "
                f"{have} bytes kept there, re-run to resume"
            )
        log.warning(
            "%s: interrupted (%s) with %d bytes in %s; resuming (retry %d/%d)",
            url, error, have, part, attempt, retries,
        )  # fmt: skip
        time.sleep(retry_wait * attempt)


def _fetch(url: str, part: Path, offset: int, timeout: float, progress: bool) -> None:
    """One request: append to ``part`` from ``offset`` (206) or rewrite it from the start (200)."""
    headers = {"User-Agent": "speechvq"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        if offset and response.status == 206:
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(f"bytes {offset}-"):
                part.unlink()
                raise http.client.HTTPException(
                    f"asked for bytes {offset}- and got {content_range!r}; restarting"
                )
            mode = "ab"
        else:
            if offset:
                log.warning("%s ignores Range requests; downloading %s from the start", url, part)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                disable=not progress,
            ) as bar,
        ):
            while chunk := response.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)


def fetch_archive(
    archive: str,
    download_dir: str | os.PathLike,
    urls: Sequence[str],
    md5: str,
    md5_source: str = "the built-in table",
    **download_kwargs,
) -> Path:
    """Download the file ``archive`` (trying ``urls`` in turn) and check its md5; return its path.

    An archive already in ``download_dir`` is checked, not downloaded again. A wrong md5 moves the
    file aside to ``<archive>.corrupt`` (so a re-run downloads afresh) and raises
    :class:`ChecksumError`.
    """
    dest = Path(download_dir) / archive
    progress = download_kwargs.get("progress", True)
    if not dest.exists():
        errors = []
        for url in urls:
            try:
                download(url, dest, **download_kwargs)
                break
            except DownloadError as err:
                log.warning("%s", err)
                errors.append(str(err))
        else:
            raise DownloadError(
                f"could not download {archive} from any of {len(urls)} URL(s): "
                + "; ".join(errors)
            )
    actual = md5sum(dest, progress=progress)
    if actual != md5.lower():
        bad = dest.with_name(dest.name + ".corrupt")
        os.replace(dest, bad)
        raise ChecksumError(
            f"{dest}: md5 {actual} does not match the expected {md5} (from {md5_source}); "
            f"not extracted, moved to {bad} so the next run downloads it again"
        )
    log.info("%s: md5 %s ok", dest, actual)
    return dest


# --- safe extraction --------------------------------------------------------------------------


def _check_member(member: tarfile.TarInfo, dest: Path, link_root: Path | None = None) -> str | None:
    """Why ``member`` must not be extracted into ``dest`` (resolved), or None if it is safe.

    Symbolic links must point inside ``link_root`` (resolved; default ``dest``): the folder that is
    kept, so that no link points out of it once it is moved."""
    name = PurePosixPath(member.name)
    if (
        name.is_absolute()
        or member.name.startswith(("/", "\\"))
        or re.match(r"^[A-Za-z]:", member.name)
    ):
        return "absolute path"
    if ".." in name.parts:
        return "'..' in its path"
    target = (dest / name).resolve()
    if not target.is_relative_to(dest):
        return "it resolves outside the target folder"
    if member.isdev() or member.isfifo():
        return "device or FIFO"
    if member.issym() or member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute() or member.linkname.startswith(("/", "\\")):
            return f"link to an absolute path {member.linkname!r}"
        base = target.parent if member.issym() else dest  # hard links name a member of the archive
        points_to = (base / link).resolve()
        if not points_to.is_relative_to(dest):
            return f"link {member.linkname!r} points outside the target folder"
        if member.issym() and link_root is not None and not points_to.is_relative_to(link_root):
            return (f"link {member.linkname!r} points outside "
                    f"{link_root.relative_to(dest).as_posix()}/")
    return None


def _safe_members(
    tar: tarfile.TarFile, archive: Path, dest: Path, link_root: Path | None
) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        reason = _check_member(member, dest, link_root)
        if reason:
            raise UnsafeArchiveError(
                f"{archive}: refusing to extract member {member.name!r}: {reason}"
            )
        yield member


def safe_extract(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    progress: bool = True,
    link_root: str | None = None,
) -> None:
    """Extract a tar archive into ``dest``, refusing absolute paths, ``..`` and escaping links.

    ``link_root`` (a folder inside ``dest``, e.g. ``LibriSpeech/dev-clean``) confines symbolic
    links further: a link pointing anywhere outside it is refused, since that folder is moved
    elsewhere after extraction and ``toroot -> ../..`` would then point at what surrounds it.
    The check is our own; Python's ``filter='data'`` (3.11.4+) is applied on top when available.
    Raises :class:`UnsafeArchiveError` at the first bad member (``dest`` then holds a partial
    extraction: callers extract into a scratch folder) and ValueError for an unreadable archive.
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    links = (root / link_root).resolve() if link_root is not None else None
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = _safe_members(tar, archive, root, links)
            members = tqdm(
                members, desc=f"extract {archive.name}", unit=" files", disable=not progress
            )
            tar.extractall(root, members=members, **kwargs)
    except _FILTER_ERROR as err:  # Python's own filter found something our check let through
        raise UnsafeArchiveError(f"{archive}: refusing to extract: {err}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{archive}: not a readable tar archive ({err})") from None
