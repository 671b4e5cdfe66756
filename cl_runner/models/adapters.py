"""LoRA adapters on a built model (model.adapter=lora), made with PEFT.

The base weights are frozen; strategies see and train only the LoRA factors (and, for an
encoder classifier, its head). A strategy may ask for several named adapters (O-LoRA: one
per task); all are created here, before the model is wrapped for DDP, so the parameter set
never changes during a run and checkpoints always hold the same keys.

A classifier's head is not a PEFT `modules_to_save` copy: PEFT keeps one head copy per
adapter, each starting from the original head, so with one LoRA per task the classes
learned under the earlier adapters would be lost. Here one head is shared by every adapter
and trains in every task, as in seq_ft (docs/adapters.md).
"""
from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch import nn

from cl_runner.errors import ConfigError

# The adapter of runs that need only one (seq_ft, ewc, replay, ...): PEFT's own default name.
DEFAULT_ADAPTER = "default"
# Names a classifier's head has under the transformers auto classes (BERT: classifier; LLaMA/Qwen: score).
HEAD_NAMES = ("classifier", "score")


def default_target_modules(family: str) -> list[str]:
    """The q/v projections of the family, from PEFT's own mapping (the one O-LoRA's scripts
    rely on: LoraConfig without target_modules)."""
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(family)
    if not targets:
        raise ConfigError(f"model.lora.target_modules is null but there is no default for model family {family!r}; "
                          "list the modules to adapt, e.g. model.lora.target_modules=[q_proj,v_proj]")
    return list(targets)


def _adaptable(module: nn.Module) -> bool:
    # Linear layers, and GPT-2's Conv1D (a transposed linear layer).
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def check_targets(model: nn.Module, targets: list[str]) -> None:
    """Every target must name (or end a dotted name of) at least one linear layer: PEFT's
    matching rule, checked here so a typo fails with the names that do exist."""
    names = [n for n, m in model.named_modules() if _adaptable(m)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"bad value for 'model.lora.target_modules': {missing} match(es) no linear layer of this "
                          f"model; its linear layers are named: {', '.join(leaves)}")


def head_modules(model: nn.Module) -> dict[str, nn.Module]:
    """A classifier's head modules by attribute name (on the unwrapped transformers model)."""
    return {n: getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)}


def attach_lora(model: nn.Module, options: Any, kind: str, family: str,
                adapter_names: Optional[list[str]] = None) -> nn.Module:
    """`model` wrapped in a PeftModel with one LoRA per name (the first active and trainable,
    the others inactive and frozen), base weights frozen, a classifier's head trainable."""
    from peft import LoraConfig, get_peft_model

    names = list(adapter_names or [DEFAULT_ADAPTER])
    targets = list(options.target_modules) if options.target_modules else default_target_modules(family)
    check_targets(model, targets)
    heads = head_modules(model) if kind == "classifier" else {}
    if kind == "classifier" and not heads:
        raise ConfigError(f"model.adapter=lora on a classifier needs its head ({' or '.join(HEAD_NAMES)}), and this "
                          f"{family!r} model has neither; use model.adapter=none")
    config = LoraConfig(r=int(options.r), lora_alpha=float(options.alpha), lora_dropout=float(options.dropout),
                        target_modules=targets, fan_in_fan_out=family == "gpt2", bias="none")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    activate(peft_model, [names[0]], trainable=names[0])
    # DDP registers the parameters that require gradients when it wraps the model, before any
    # strategy runs: every adapter must be among them for its gradients to be synchronised
    # in its own task. The strategy (O-LoRA's setup) freezes all but the current one after
    # the wrap; cl-run turns on DDP's unused-parameter detection for it (freezes_parameters).
    for name in names[1:]:
        for p in adapter_parameters(peft_model, name):
            p.requires_grad_(True)
    return peft_model


def is_adapted(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every LoRA-wrapped linear layer."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def lora_factors(model: nn.Module, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer name -> (A (r x in), B (out x r)) of one adapter."""
    return {name: (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight)
            for name, layer in lora_layers(model) if adapter in layer.lora_A}


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    return [p for a, b in lora_factors(model, adapter).values() for p in (a, b)]


def activate(model: nn.Module, active: list[str], trainable: Optional[str]) -> None:
    """Make `active` the adapters in the forward (their outputs add up), with only
    `trainable` (one of them, or None) receiving gradients; the head stays trainable."""
    model.base_model.set_adapter(list(active))  # PEFT marks every active adapter trainable...
    for name in model.peft_config:
        if name != trainable:  # ...so freeze the earlier ones again
            for p in adapter_parameters(model, name):
                # No stale (zeroed) gradient either: clipping's norm would count it, so a run
                # resumed from a checkpoint (no gradients) would round differently.
                p.requires_grad_(False)
                p.grad = None
    for head in head_modules(model.get_base_model()).values():
        head.requires_grad_(True)


def adapter_summary(model: nn.Module) -> dict[str, Any]:
    """What the adapters cost, for metrics.json and the cost line."""
    config = next(iter(model.peft_config.values()))
    names = list(model.peft_config)
    lora = sum(p.numel() for n in names for p in adapter_parameters(model, n))
    head = sum(p.numel() for m in head_modules(model.get_base_model()).values() for p in m.parameters())
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) - head
    return {"kind": "lora", "r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "target_modules": sorted(config.target_modules), "adapters": len(names),
            "layers": sum(1 for _ in lora_layers(model)), "adapter_parameters": lora, "head_parameters": head,
            "base_parameters": base}


def merged_for_saving(model: nn.Module) -> nn.Module:
    """The plain transformers model with the active adapters merged into its weights (in place:
    call it only when the run is done)."""
    active = model.base_model.active_adapters
    return model.merge_and_unload(adapter_names=list(active))
