"""Apply the `ops` config group to `cl_runner.ops` (the projection backends)."""
from __future__ import annotations

from typing import Any

from cl_runner.errors import ConfigError


def configure_ops(cfg: Any) -> None:
    if cfg.backend is None:
        return
    from cl_runner import ops

    try:
        ops.set_default_backend(cfg.backend)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"bad value for 'ops.backend': {err}") from None
