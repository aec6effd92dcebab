"""Shared plumbing for the hydra entry points: where ``conf/`` lives and how a stage starts.

Every ``speechvq-*`` console script is ``main = hydra_main("<config name>", run)`` where ``run(cfg)``
only calls the library. Configs live in the repository's top-level ``conf/`` folder; set
``SPEECHVQ_CONF`` to use another copy.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

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


def hydra_main(config_name: str, run: Callable[[DictConfig], int | None]) -> Callable[[], None]:
    """Wrap ``run(cfg)`` as a console-script entry point over ``conf/<config_name>.yaml``.

    Hydra's own output folders are disabled (``hydra.run.dir`` is ``out_dir``), outputs go to
    ``cfg.out_dir``. A :class:`StageError` (or :class:`speechvq.audio.AudioError`) raised by ``run``
    is printed as one line and exits with status 2.
    """

    def entry() -> None:
        path = str(conf_dir())

        @hydra.main(version_base="1.3", config_path=path, config_name=config_name)
        def _main(cfg: DictConfig) -> None:
            from speechvq.audio import AudioError
            from speechvq.checkpoint import CheckpointError

            try:
                status = run(cfg)
            except (StageError, AudioError, CheckpointError) as err:
                log.error("%s", err)
                sys.exit(2)
            if status:
                sys.exit(int(status))

        _main()

    return entry
