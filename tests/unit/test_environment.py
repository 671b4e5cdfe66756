"""The run environment record (cl_runner/reporting/environment.py) and trainer.cpu_threads."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess

import pytest
import torch

from cl_runner.reporting import environment
from cl_runner.reporting.environment import (ENVIRONMENT_FILE, apply_cpu_threads, collect, git_state,
                                   load_environment, record_environment)
from tests.helpers import REPO

KEYS = {"cl_runner", "git_commit", "git_dirty", "python", "torch", "transformers", "accelerate", "datasets",
        "peft", "cuda", "cudnn", "device", "device_names", "cpu", "cpu_count", "torch_threads",
        "torch_interop_threads", "world_size", "hostname", "os", "command", "started_at"}


def test_collect_records_versions_devices_threads_and_the_command_line():
    env = collect(argv=["cl-run", "seed=1", "task_stream.order=[a, b]"])
    assert KEYS <= set(env)
    assert env["python"] == platform.python_version()
    assert env["torch"] == torch.__version__
    assert env["transformers"] and env["accelerate"] and env["datasets"]
    try:
        import peft  # noqa: F401
    except ImportError:
        assert env["peft"] is None
    assert env["cuda"] == torch.version.cuda
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["world_size"] == 1 and env["device"] == "cpu"
    assert env["cpu"] and env["hostname"]
    assert env["command"] == "cl-run seed=1 'task_stream.order=[a, b]'"  # exact, shell-quoted
    json.dumps(env)  # JSON-ready as it is


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_git_commit_and_dirty_flag_of_this_checkout():
    commit, dirty = git_state()
    assert commit is not None and len(commit) == 40 and isinstance(dirty, bool)


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_no_commit_when_the_package_is_not_a_checkouts_own(tmp_path, monkeypatch):
    """Installed into a venv that lies inside some other repository: the commit would be
    that repository's, so none is recorded; outside any repository neither."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)
    site = tmp_path / "venv" / "site-packages" / "cl_runner"
    site.mkdir(parents=True)
    monkeypatch.setattr(environment, "PACKAGE_DIR", site)
    assert git_state() == (None, None)
    monkeypatch.setattr(environment, "PACKAGE_DIR", tmp_path / "cl_runner")  # the repo's own package
    (tmp_path / "cl_runner").mkdir()
    commit, dirty = git_state()
    assert commit is not None and dirty is False


def test_record_keeps_earlier_starts_of_a_resumed_run(tmp_path):
    first = record_environment(tmp_path)
    assert json.loads((tmp_path / ENVIRONMENT_FILE).read_text())["command"] == first["command"]
    record_environment(tmp_path)
    third = record_environment(tmp_path)
    assert len(third["earlier_starts"]) == 2
    assert "earlier_starts" not in third["earlier_starts"][0]
    assert load_environment(tmp_path) == json.loads(json.dumps(third))


def test_cpu_threads_set_and_null_restores_the_default(monkeypatch):
    monkeypatch.setattr(environment, "_default_threads", None)
    before = torch.get_num_threads()
    try:
        apply_cpu_threads(1)
        assert torch.get_num_threads() == 1
        assert collect()["torch_threads"] == 1
        apply_cpu_threads(None)  # a later run of the same process without the setting
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)
