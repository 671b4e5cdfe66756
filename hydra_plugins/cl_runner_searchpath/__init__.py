"""Hydra search-path plugin: a `configs/` folder in the working directory shadows the
package's configs file by file (users keep their own models and streams beside their
code). Hydra discovers it through the `hydra_plugins` namespace package."""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

PACKAGE_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ClRunnerLocalConfigs(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        local = Path.cwd() / "configs"
        if local.is_dir() and local.resolve() != PACKAGE_CONFIGS.resolve():
            search_path.prepend(provider="cl-runner-local", path=f"file://{local.resolve()}")
