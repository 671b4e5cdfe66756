"""A wheel install (no source checkout beside it) carries the configs and runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import REPO

SOURCES = ["pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "cl_runner", "hydra_plugins",
           "configs", "csrc"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Builds the wheel from a copy of the sources (the checkout stays clean), no
    extension: this is about what the wheel carries, not about compiling."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "CL_RUNNER_NO_EXT": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("pip is not available in this interpreter")
    assert done.returncode == 0, done.stderr
    return next(out.glob("cl_runner-*.whl"))


def test_wheel_ships_every_config_group(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("cl_runner/configs/") for n in names if n.startswith("cl_runner/configs/")}
    expected = {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")}
    assert expected <= shipped, sorted(expected - shipped)
    assert "hydra_plugins/cl_runner_searchpath/__init__.py" in names


def test_installed_wheel_composes_its_configs_outside_any_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    probe = subprocess.run(
        [sys.executable, "-c", "from cl_runner.config.paths import package_configs; print(package_configs())"],
        cwd=workdir, env=env, capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == str(target / "cl_runner" / "configs")
    run = subprocess.run([sys.executable, "-m", "cl_runner.cli", "dry_run=true", "logger=none",
                          "strategy=svd_orthogonal"], cwd=workdir, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert "name: svd_orthogonal" in run.stdout
