"""Shared plumbing for the hydra entry points: where ``conf/`` lives and how a stage starts.

Every ``speechvq-*`` console script is ``main = hydra_main("<config name>", run)`` where ``run(cfg)``
only calls the library. Configs live in the repository's top-level ``conf/`` folder; set
``SPEECHVQ_CONF`` to use another copy.

Before hydra starts (it writes its log file and ``.hydra/`` into the run folder at once), the
config is composed and checked, the run folder is checked to be writable and a stage's ``claim``
hook may refuse the run or lock the folder: a refused run leaves the folder as it was.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from speechvq.audio import AudioError
from speechvq.checkpoint import CheckpointError, OutputInUseError
from speechvq.files import WriteError

log = logging.getLogger("speechvq")

# `out_dir: ${speechvq_dirname:${out}}`: a stage whose output is a file runs hydra in its folder.
OmegaConf.register_new_resolver(
    "speechvq_dirname", lambda p: str(Path(str(p)).parent), replace=True
)


def conf_dir() -> Path:
    """The folder holding the hydra configs (``SPEECHVQ_CONF`` or the repo's ``conf/``)."""
    env = os.environ.get("SPEECHVQ_CONF")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "conf"
    if not (path / "train.yaml").exists() and not any(path.glob("*.yaml")):
        raise SystemExit(
            f"speechvq: no hydra configs found in {path}. Install speechvq from a clone with "
            "`pip install -e .` or point SPEECHVQ_CONF at a copy of the repository's conf/ folder."
        )
    return path


class StageError(Exception):
    """An error a stage reports to the user as one clear line (no traceback)."""


# errors that only writing gives: "cannot write FILE: cause" even when the library did not say so
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


def _write_problem(err: OSError) -> str | None:
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


def _one_line(err: Exception) -> str:
    """Hydra/OmegaConf's multi-line messages folded into one line, without search-path noise."""
    text = str(err)
    head, _, rest = text.partition("Available options in")
    parts = [ln.strip() for ln in head.splitlines() if ln.strip()]
    parts = [ln for ln in parts if not ln.startswith(("full_key:", "object_type=", "To append",
                                                       "Config search path", "provider="))]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        parts.append(str(cause).strip().splitlines()[0])
    msg = " ".join(parts)
    if rest:
        options = [ln.strip() for ln in rest.split("Config search path")[0].splitlines()[1:]]
        msg += "; choose from " + ", ".join(o for o in options if o)
    return msg


def _missing_key(err: Exception) -> str | None:
    """The key behind a 'Missing mandatory value' error (also when reached by interpolation)."""
    match = re.search(r"Missing mandatory value: ?([\w.\-]+)", str(err))
    return match.group(1) if match else getattr(err, "full_key", None)


def _missing_values(cfg: DictConfig, aliases: Mapping[str, str]) -> str | None:
    """One line naming every required (``???``) value left out, or None."""
    keys = sorted(OmegaConf.missing_keys(cfg))
    if not keys:
        return None
    given = " ".join(f"{aliases.get(k, k)}=..." for k in keys)
    return f"missing required value{'s' if len(keys) > 1 else ''}: {given}"


def _check_config(path: str, config_name: str, overrides: list[str],
                  aliases: Mapping[str, str]) -> tuple[str | None, DictConfig | None]:
    """Compose the config as hydra will: ``(problem, cfg)``. ``problem`` is, as one line naming
    the key, what hydra would print as a multi-line error or a traceback: an unknown config-group
    option, an unknown key, a required value left out that the run folder needs; ``cfg`` is the
    config (with its ``hydra`` node) when it composes. ``(None, None)`` when hydra's own flags
    (``--help``, ``--cfg``, ``-m``, ...) are given: hydra handles those."""
    if any(a.startswith("-") for a in overrides):
        return None, None
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=path, version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            missing = _missing_values(
                OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), aliases)
            if missing:
                return missing, None
            str(cfg.hydra.run.dir)
    except OmegaConfBaseException as err:
        key = _missing_key(err)
        return (_one_line(err) if key is None else f"missing required value: {key}=..."), None
    except HydraException as err:
        return _one_line(err), None
    return None, cfg


def _run_reported(run: Callable[[DictConfig], int | None], cfg: DictConfig,
                  aliases: Mapping[str, str]) -> None:
    """``run(cfg)`` inside hydra; user errors become one logged line and exit status 2."""
    missing = _missing_values(cfg, aliases)
    if missing:
        log.error("%s", missing)
        sys.exit(2)
    try:
        status = run(cfg)
    except (StageError, AudioError, CheckpointError, OutputInUseError) as err:
        log.error("%s", err)
        sys.exit(2)
    except MissingMandatoryValue as err:
        key = _missing_key(err)
        log.error("missing required value: %s=...", aliases.get(key, key))
        sys.exit(2)
    except OSError as err:
        problem = _write_problem(err)
        if problem is None:
            raise
        log.error("%s", problem)
        sys.exit(2)
    if status:
        sys.exit(int(status))


Claim = Callable[[DictConfig], AbstractContextManager]


def _before_hydra(cfg: DictConfig, claim: Claim | None, stack: contextlib.ExitStack) -> str | None:
    """The checks that must come before hydra writes anything: the run folder can be written,
    and the stage's ``claim`` (refusals, locks; entered on ``stack``). One line, or None."""
    problem = probe_writable(str(cfg.hydra.run.dir))
    if problem or claim is None:
        return problem
    try:
        stack.enter_context(claim(cfg))
    except (StageError, OutputInUseError, WriteError) as err:
        return str(err)
    return None


def hydra_main(config_name: str, run: Callable[[DictConfig], int | None],
               aliases: Mapping[str, str] | None = None,
               claim: Claim | None = None) -> Callable[[], None]:
    """Wrap ``run(cfg)`` as a console-script entry point over ``conf/<config_name>.yaml``.

    Hydra's own output folders are disabled (``hydra.run.dir`` is ``out_dir``), outputs go to
    ``cfg.out_dir``. A :class:`StageError` (or :class:`speechvq.audio.AudioError`,
    :class:`~speechvq.checkpoint.CheckpointError`, an output in use, a file that cannot be
    written) raised by ``run`` is printed as one line and exits with status 2, and so is a config
    that does not compose or leaves a required (``???``) value out, and a run folder that cannot
    be written. ``aliases`` maps a config key to the name the command line uses for it in those
    messages (sample's ``prior_checkpoint`` is given as ``prior=``). ``claim(cfg)``, when given,
    runs before hydra writes anything (with the composed config, ``hydra`` node included): it
    raises :class:`StageError` to refuse the run and returns a context manager held for the
    whole run (a lock on the output).
    """
    aliases = dict(aliases or {})
    name = f"speechvq-{config_name.replace('_', '-')}"

    def entry() -> None:
        path = str(conf_dir())

        @hydra.main(version_base="1.3", config_path=path, config_name=config_name)
        def _main(cfg: DictConfig) -> None:
            _run_reported(run, cfg, aliases)

        problem, cfg = _check_config(path, config_name, sys.argv[1:], aliases)
        with contextlib.ExitStack() as stack:
            if problem is None and cfg is not None:
                problem = _before_hydra(cfg, claim, stack)
            if problem:
                print(f"{name}: {problem}", file=sys.stderr)
                sys.exit(2)
            _main()

    return entry
