"""Where the shipped configs live: `configs/` beside the package in a source checkout or
an editable install, `cl_runner/configs/` inside an installed wheel (setup.py copies the
top-level folder there at build time, so the repository keeps one copy)."""
from __future__ import annotations

from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # cl_runner/


def package_configs() -> Path:
    # The wheel's own copy first: beside an installed package, `../configs` would be a
    # folder in site-packages that is not ours.
    for candidate in (_PACKAGE_DIR / "configs", _PACKAGE_DIR.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"cl-runner's configs are missing (looked in {_PACKAGE_DIR / 'configs'} and "
        f"{_PACKAGE_DIR.parent / 'configs'}); reinstall the package: pip install -e . or pip install cl-runner")
