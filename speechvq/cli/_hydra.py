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
import logging
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TypeVar

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from speechvq.audio import AudioError
from speechvq.checkpoint import CheckpointError, OutputInUseError
from speechvq.cli._config import (  # noqa: F401 (StageError, call, conf_dir: the CLIs' API)
    StageError,
    call,
    check_config,
    conf_dir,
    missing_key,
    missing_values,
)
from speechvq.files import WriteError, probe_writable, write_problem

log = logging.getLogger("speechvq")
T = TypeVar("T")

# `out_dir: ${speechvq_dirname:${out}}`: a stage whose output is a file runs hydra in its folder.
OmegaConf.register_new_resolver(
    "speechvq_dirname", lambda p: str(Path(str(p)).parent), replace=True
)


def _run_reported(run: Callable[[DictConfig], int | None], cfg: DictConfig) -> None:
    """``run(cfg)`` inside hydra; user errors become one logged line and exit status 2."""
    missing = missing_values(cfg)
    if missing:
        log.error("%s", missing)
        sys.exit(2)
    try:
        status = run(cfg)
    except (StageError, AudioError, CheckpointError, OutputInUseError) as err:
        log.error("%s", err)
        sys.exit(2)
    except MissingMandatoryValue as err:
        log.error("missing required value: %s=...", missing_key(err))
        sys.exit(2)
    except OSError as err:
        problem = write_problem(err)
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
               claim: Claim | None = None) -> Callable[[], None]:
    """Wrap ``run(cfg)`` as a console-script entry point over ``conf/<config_name>.yaml``.

    Hydra's own output folders are disabled (``hydra.run.dir`` is ``out_dir``), outputs go to
    ``cfg.out_dir``. A :class:`StageError` (or :class:`speechvq.audio.AudioError`,
    :class:`~speechvq.checkpoint.CheckpointError`, an output in use, a file that cannot be
    written) raised by ``run`` is printed as one line and exits with status 2, and so is a config
    that does not compose or leaves a required (``???``) value out, and a run folder that cannot
    be written (:mod:`speechvq.cli._config`). ``claim(cfg)``, when given,
    runs before hydra writes anything (with the composed config, ``hydra`` node included): it
    raises :class:`StageError` to refuse the run and returns a context manager held for the
    whole run (a lock on the output).
    """
    name = f"speechvq-{config_name.replace('_', '-')}"

    def entry() -> None:
        path = str(conf_dir())

        @hydra.main(version_base="1.3", config_path=path, config_name=config_name)
        def _main(cfg: DictConfig) -> None:
            _run_reported(run, cfg)

        problem, cfg = check_config(path, config_name, sys.argv[1:])
        with contextlib.ExitStack() as stack:
            if problem is None and cfg is not None:
                problem = _before_hydra(cfg, claim, stack)
            if problem:
                print(f"{name}: {problem}", file=sys.stderr)
                sys.exit(2)
            _main()

    return entry
