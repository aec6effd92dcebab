"""A stage's config checked before hydra runs: what hydra would print as a multi-line error or
a traceback, as one line naming the key (an unknown config-group option, an unknown key, a
required ``???`` value left out)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


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


def call(fn: Callable[..., T], *args: Any, errors: tuple[type[Exception], ...]) -> T:
    """``fn(*args)``: the one library call of a stage; its user errors (``errors``, whose
    messages are one line naming the file or key) become a :class:`StageError`."""
    try:
        return fn(*args)
    except errors as err:
        raise StageError(str(err)) from None



def one_line(err: Exception) -> str:
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


def missing_key(err: Exception) -> str | None:
    """The key behind a 'Missing mandatory value' error (also when reached by interpolation)."""
    match = re.search(r"Missing mandatory value: ?([\w.\-]+)", str(err))
    return match.group(1) if match else getattr(err, "full_key", None)


def missing_values(cfg: DictConfig) -> str | None:
    """One line naming every required (``???``) value left out, or None."""
    keys = sorted(OmegaConf.missing_keys(cfg))
    if not keys:
        return None
    given = " ".join(f"{k}=..." for k in keys)
    return f"missing required value{'s' if len(keys) > 1 else ''}: {given}"


def check_config(path: str, config_name: str, overrides: list[str]
                 ) -> tuple[str | None, DictConfig | None]:
    """Compose the config as hydra will: ``(problem, cfg)``. ``problem`` is, as one line naming
    the key, what hydra would print as a multi-line error or a traceback: an unknown config-group
    option, an unknown key, a required value left out that the run folder needs; ``cfg`` is the
    config (with its ``hydra`` node) when it composes. ``(None, None)`` when hydra's own flags
    (``--help``, ``--cfg``, ``-m``, ...) are given: hydra handles those."""
    if any(a.startswith("-") for a in overrides):
        return None, None
    try:
        with initialize_config_dir(config_dir=path, version_base="1.3", job_name=config_name):
            cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
            missing = missing_values(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
            if missing:
                return missing, None
            str(cfg.hydra.run.dir)
    except OmegaConfBaseException as err:
        key = missing_key(err)
        return (one_line(err) if key is None else f"missing required value: {key}=..."), None
    except HydraException as err:
        return one_line(err), None
    return None, cfg
