"""A misspelt key on the command line (`trainer.lrr=0.1`) gets a did-you-mean.

Hydra rejects it with "To append to your config use +trainer.lrr=0.1", which is the wrong
advice for a typo. Before Hydra runs, cl-run composes the command line once; when that
fails on a key that does not exist, this names the closest existing key instead."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Optional, Sequence

_NOT_THERE = re.compile(r"Could not override '([^']+)'")


def _plain_overrides(args: Sequence[str]) -> list[str]:
    # key=value words only: no flags (-m, --cfg job), no hydra.* settings.
    return [a for a in args if "=" in a and not a.startswith(("-", "hydra.", "hydra/", "+hydra"))]


def _compose(config_dir: Path, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name="config", overrides=overrides)


def misspelt_key_message(config_dir: Path, args: Sequence[str]) -> Optional[str]:
    """The error line for an override of a key that does not exist, else None (including
    for every other kind of failure, which Hydra then reports itself)."""
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    if GlobalHydra.instance().is_initialized():
        return None  # inside another Hydra context (tests): leave it alone
    overrides = _plain_overrides(args)
    try:
        _compose(config_dir, overrides)
        return None
    except Exception as err:  # noqa: BLE001 - anything but a missing key is Hydra's to report
        found = _NOT_THERE.search(str(err))
        if not found:
            return None
        dotted = found.group(1)
    rest = [o for o in overrides if o.split("=", 1)[0] != dotted]
    try:
        cfg = _compose(config_dir, rest)
    except Exception:  # noqa: BLE001
        return None
    parent, _, leaf = dotted.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not OmegaConf.is_dict(node):
        return None
    known = [str(k) for k in node.keys()]
    close = difflib.get_close_matches(leaf, known, n=1)
    where = f"'{parent}'" if parent else "the top level"
    hint = f"did you mean '{(parent + '.') if parent else ''}{close[0]}'? " if close else ""
    return (f"unknown config key '{dotted}': {hint}known keys of {where}: {', '.join(known)} "
            f"(to add a new key on purpose: +{dotted}=...)")
