"""The errors every room may raise, and the one-line 'bad value' messages: the key, the value, the fix.

Strategies raise ValueError (cl-run turns it into `cl-run: config error: ...`, exit 2);
config validation passes its ConfigError as `error`."""
from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A config value the run cannot use; the message names the key and the fix."""


def bad_value(key: str, value: Any, fix: str) -> str:
    return f"bad value for '{key}': {value!r}; {fix}"


def require(ok: bool, key: str, value: Any, fix: str, error: type[Exception] = ValueError) -> None:
    if not ok:
        raise error(bad_value(key, value, fix))


def require_choice(value: Any, key: str, allowed: Iterable[Any], error: type[Exception] = ValueError) -> Any:
    allowed = tuple(allowed)
    require(value in allowed, key, value, f"choose one of: {', '.join(map(str, allowed))}", error)
    return value
