"""Command-line mistakes Hydra reports badly, caught before Hydra runs.

- A misspelt key (`trainer.lrr=0.1`): Hydra says "To append to your config use
  +trainer.lrr=0.1", the wrong advice for a typo. cl-run composes the command line once;
  when that fails on a key that does not exist, this names the closest existing key.
- An unknown option of a config group (`strategy=foo`, `+experiment=foo`): Hydra prints
  a dozen lines ending in its search path, or, for an optional group (`experiment`),
  drops the option and runs the default. This lists the group's options instead, from
  the package's configs and a working-directory `configs/` (which adds to them).
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Optional, Sequence

_NOT_THERE = re.compile(r"Could not override '([^']+)'")
# A sweep function (`strategy=choice(ewc,hft)`, `glob(*)`): Hydra expands it itself.
_SWEEP_FUNCTION = re.compile(r"^\w+\(.*\)$")


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


def group_options(config_dirs: Sequence[Path], group: str) -> Optional[list[str]]:
    """The option names of a config group (its YAML files, in any of `config_dirs`), or
    None when no config folder has that group."""
    folders = [d / group for d in config_dirs if (d / group).is_dir()]
    if not folders:
        return None
    return sorted({f.relative_to(folder).with_suffix("").as_posix() for folder in folders
                   for f in folder.rglob("*.yaml")})


def _group_choices(args: Sequence[str]) -> list[tuple[str, str]]:
    """(group, option) of each `group=option` on the command line: `+group=`, `++group=`
    and `group@package=` name the group too; a multirun list (`a,b`) gives one pair per
    option. Deletions (`~group`), dotted keys, sweep functions and Hydra's own settings
    are not group choices."""
    pairs = []
    for arg in _plain_overrides(args):
        if arg.startswith("~"):
            continue
        key, value = arg.lstrip("+").split("=", 1)
        group = key.split("@", 1)[0].strip()
        if not group or "." in group or _SWEEP_FUNCTION.match(value.strip()):
            continue
        for option in value.split(","):
            option = option.strip().strip("'\"")
            if option:
                pairs.append((group, option))
    return pairs


def unknown_option_message(config_dirs: Sequence[Path], args: Sequence[str]) -> Optional[str]:
    """The error line for the first `group=option` whose option is not among the group's
    YAML files (package configs and working-directory configs/), else None."""
    for group, option in _group_choices(args):
        options = group_options(config_dirs, group)
        if options is None or option in options:
            continue
        if option == "null":  # Hydra fails on it with a traceback
            return (f"{group}=null: a config group cannot be set to null; choose one of {', '.join(options)}, "
                    f"or leave {group} out (~{group} drops an optional group)")
        close = difflib.get_close_matches(option, options, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return (f"unknown {group} '{option}': choose one of {', '.join(options)}{hint}; "
                f"your own options go in configs/{group}/<name>.yaml in the working directory")
    return None
