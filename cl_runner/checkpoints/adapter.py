"""Checkpoints of adapter runs (model.adapter=lora) hold what trains, not the frozen base.

A LoRA run trains the adapters (and a classifier's head); the base weights stay as they
were loaded, so saving them at every task boundary only copies the model file again
(SmolLM2: 540 MB a checkpoint for a few MB of adapters; 7B: 28 GB). Here a checkpoint keeps
the state-dict entries outside the base, plus a fingerprint of the base (a float64 sum and
L2 norm per entry). Resuming builds the model as the run did (same config, same seed),
loads the saved entries on top and refuses to go on if the base it built does not match
the fingerprint (a changed model file, another random init): the adapters were trained on
that base, not this one.

A strategy that writes into the base under an adapter (none does by design; a merge of
zero task vectors could still round) makes the base differ from the fingerprint taken at
the start: that checkpoint then holds the whole model, as before, and says so.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import nn

from cl_runner.checkpoints.files import CheckpointError
from cl_runner.models.adapters import head_modules, is_adapted

ADAPTER_SCOPE = "adapter"   # the checkpoint's model entry holds the adapters and head only
FULL_SCOPE = "full"         # the whole state dict (every run before this, and full fine-tuning)
# Sums over up to billions of float32 values taken in float64 on another device or in
# another order agree to ~1e-12 relative; a changed weight moves them far more.
FINGERPRINT_RTOL = 1e-9


def base_entries(model: nn.Module) -> list[str]:
    """State-dict keys of the frozen base of a PEFT-wrapped model: all but the LoRA factors
    and a classifier's head (which trains under an adapter)."""
    head_prefixes = tuple(f"{name}." for name in head_modules(model.get_base_model()))
    keys = []
    for key in model.state_dict():
        inner = key.removeprefix("base_model.model.")
        if "lora_" in key or inner.startswith(head_prefixes):
            continue
        keys.append(key)
    return keys


def fingerprint(state: Mapping[str, torch.Tensor], keys: list[str]) -> list[list[float]]:
    """[sum, L2 norm] of each entry, accumulated in float64 (no float64 copy of the tensor)."""
    prints = []
    for key in keys:
        t = state[key].detach()
        if not t.is_floating_point():
            t = t.float()
        prints.append([float(torch.sum(t, dtype=torch.float64)),
                       float(torch.linalg.vector_norm(t, dtype=torch.float64))])
    return prints


def _first_difference(keys: list[str], a: list[list[float]], b: list[list[float]]) -> Optional[str]:
    for key, x, y in zip(keys, a, b):
        if not all(math.isclose(u, v, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-12) for u, v in zip(x, y)):
            return key
    return None


class FrozenBase:
    """The base of an adapter run as it was before training: which entries, and their fingerprint."""

    def __init__(self, model: nn.Module) -> None:
        self.keys = base_entries(model)
        self.prints = fingerprint(model.state_dict(), self.keys)
        self.warned = False

    @classmethod
    def of(cls, model: nn.Module) -> Optional["FrozenBase"]:
        """For a PEFT-wrapped model; None for a plain one (its checkpoints hold everything)."""
        return cls(model) if is_adapted(model) else None

    def trim(self, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the entries to save, the checkpoint's `model_scope` record)."""
        changed = _first_difference(self.keys, fingerprint(state, self.keys), self.prints)
        if changed is not None:
            if not self.warned:
                print(f"[cl-run] note: the frozen base weight {changed} changed during this adapter run, so its "
                      "checkpoints hold the whole model", flush=True)
                self.warned = True
            return state, {"kind": FULL_SCOPE}
        base = set(self.keys)
        kept = {k: v for k, v in state.items() if k not in base}
        return kept, {"kind": ADAPTER_SCOPE, "base_keys": len(self.keys), "fingerprint": self.prints}

    def check_matches(self, scope: dict[str, Any], source: str) -> None:
        """Refuses an adapter checkpoint whose base fingerprint is not this model's."""
        saved = scope.get("fingerprint") or []
        if len(saved) != len(self.keys):
            raise CheckpointError(
                f"checkpoint {source} holds adapters for a base of {len(saved)} weight entries, but this run's model "
                f"has {len(self.keys)}: resume with the model config the run started with (config.yaml in the run "
                "folder)")
        changed = _first_difference(self.keys, self.prints, saved)
        if changed is not None:
            raise CheckpointError(
                f"checkpoint {source} holds adapters trained on another base model: weight {changed} differs from "
                "the one the run started with (model.path, model.gguf_file or the seed of a random init changed?). "
                "Resume with the run's own config.yaml, or start a new run")


def load_model_state(model: nn.Module, payload: dict[str, Any], base: Optional[FrozenBase], source: str) -> None:
    """Loads a checkpoint's model entry: the whole state dict, or (adapter checkpoints)
    the adapters and head on top of the freshly built base, after checking it is the same base."""
    scope = payload.get("model_scope") or {"kind": FULL_SCOPE}
    if scope.get("kind") != ADAPTER_SCOPE:
        model.load_state_dict(payload["model"])
        return
    if base is None:
        raise CheckpointError(f"checkpoint {source} holds LoRA adapters only, but this run's model has none: "
                              "resume with model.adapter=lora as in the run's config.yaml")
    base.check_matches(scope, source)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    stray = sorted(set(missing) - set(base.keys)) + sorted(unexpected)
    if stray:
        raise CheckpointError(f"checkpoint {source} does not fit this model's adapters (e.g. {stray[0]}): resume "
                              "with the model.lora and strategy settings in the run's config.yaml")
