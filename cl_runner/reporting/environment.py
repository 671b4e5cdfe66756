"""What a run ran on: versions, git commit, devices, threads, host and command line.

cl-run's rank 0 writes `collect()`'s answer to `<run folder>/environment.json` as soon as
the folder exists (so a run killed later still has it) and copies it into metrics.json
(`environment`). Every probe is best-effort: what cannot be found is null, and nothing
here ever fails a run. `apply_cpu_threads` sets torch's thread pools from
`trainer.cpu_threads` before that, so the recorded thread count is the one used.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Optional

from cl_runner.reporting.outputs import ENVIRONMENT_FILE

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft")
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # cl_runner/


def package_version(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    # No optional locks: never take index.lock from under someone committing in the checkout.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        done = subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=10, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_state() -> tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of the checkout cl_runner is imported from; (None, None) when it is
    not imported from a git checkout (an installed wheel), even inside some other repo.
    Dirty means uncommitted changes to tracked files."""
    top = _git("rev-parse", "--show-toplevel")
    if not top or (Path(top) / PACKAGE_DIR.name).resolve() != PACKAGE_DIR:
        return None, None
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit, (None if status is None else bool(status))


def cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _cudnn_version() -> Optional[int]:
    try:
        import torch

        return torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    except Exception:  # noqa: BLE001 - a probe, never a failure
        return None


def device_names(device: Any) -> list[str]:
    """The GPUs' names on a CUDA run (every visible one); empty on a CPU run."""
    try:
        import torch

        if getattr(device, "type", str(device)).startswith("cuda"):
            return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001
        pass
    return []


def collect(accelerator: Any = None, argv: Optional[list[str]] = None) -> dict[str, Any]:
    """This process's environment, as JSON-ready values."""
    import torch

    from cl_runner import __version__

    commit, dirty = git_state()
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    world_size = accelerator.num_processes if accelerator is not None else int(os.environ.get("WORLD_SIZE", "1"))
    return {
        "cl_runner": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        **{name: package_version(name) for name in PACKAGES},
        "cuda": torch.version.cuda,
        "cudnn": _cudnn_version(),
        "device": str(device),
        "device_names": device_names(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "world_size": world_size,
        "hostname": socket.gethostname(),
        "os": platform.platform(),
        "command": shlex.join(sys.argv if argv is None else argv),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def load_environment(run_dir: Path) -> Optional[dict[str, Any]]:
    try:
        data = json.loads((Path(run_dir) / ENVIRONMENT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def record_environment(run_dir: Path, accelerator: Any = None) -> dict[str, Any]:
    """Write this start's environment to the run folder. A resumed run keeps the earlier
    starts' environments in `earlier_starts` (oldest first). Never raises."""
    from cl_runner.reporting.tracking import write_json

    env = collect(accelerator)
    earlier = load_environment(run_dir)
    if earlier is not None:
        env["earlier_starts"] = list(earlier.pop("earlier_starts", None) or []) + [earlier]
    try:
        write_json(Path(run_dir) / ENVIRONMENT_FILE, env)
    except OSError as err:
        print(f"[cl-run] warning: {ENVIRONMENT_FILE} not written ({err})", file=sys.stderr)
    return env


def run_environment(run_dir: Path, accelerator: Any = None) -> dict[str, Any]:
    """What metrics.json records: the run folder's environment.json, or (a loop driven
    without cl-run) this process's environment now."""
    return load_environment(run_dir) or collect(accelerator)


_default_threads: Optional[int] = None


def apply_cpu_threads(threads: Optional[int]) -> None:
    """`trainer.cpu_threads`: torch's intra-op threads (and inter-op threads, which torch
    lets a process set once, before any parallel work). None keeps torch's default, and
    restores it after an earlier run of this process (a sweep job) set another."""
    global _default_threads
    import torch

    if threads is None:
        if _default_threads is not None:
            torch.set_num_threads(_default_threads)
        return
    if _default_threads is None:
        _default_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        torch.set_num_interop_threads(int(threads))
    except RuntimeError:
        pass  # already fixed in this process (parallel work ran, or set before)
