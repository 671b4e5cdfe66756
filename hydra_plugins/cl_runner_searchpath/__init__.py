"""Hydra search-path plugin: a `configs/` folder in the working directory shadows the
package's configs file by file (users keep their own models and streams beside their
code). Hydra discovers it through the `hydra_plugins` namespace package, for every Hydra
app in the environment, so it acts only when the app is cl-run (its search path holds
cl-runner's own configs). For cl-run it also registers the schema defaults the option files
build on (`cl_runner/config/store.py`)."""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def _cl_runner_configs() -> Path | None:
    try:
        from cl_runner.config.paths import package_configs

        return package_configs().resolve()
    except (ImportError, FileNotFoundError):
        return None


class ClRunnerLocalConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        ours = _cl_runner_configs()
        if ours is None:
            return
        in_use = {p.path.removeprefix("file://") for p in search_path.get_path() if p.path}
        if str(ours) not in in_use:
            return  # another Hydra app: leave its search path alone
        from cl_runner.config.store import register_schemas

        register_schemas()  # the option files' defaults lists name these schema nodes
        local = (Path.cwd() / "configs").resolve()
        if local.is_dir() and local != ours:
            search_path.prepend(provider="cl-runner-local", path=f"file://{local}")
