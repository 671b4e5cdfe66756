"""How many input positions a model has, read from its config (absolute position
embeddings); the config checks and the soft prompts both need it."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

# Keys of a transformers model config that hold its number of (absolute) positions.
POSITION_LIMIT_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def position_limit(model_config: Any) -> Optional[tuple[int, str]]:
    """(positions, key) from a model config (a mapping such as model.architecture_config,
    or a transformers config); None when it names none (T5's relative positions)."""
    for key in POSITION_LIMIT_KEYS:
        value = model_config.get(key) if isinstance(model_config, Mapping) else getattr(model_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None
