"""`trainer.sharding=fsdp`: FSDP2 over the processes of a `torchrun` / `accelerate launch`.

Every repeated transformer block is one `fully_shard` unit and the root (embeddings,
final norm, head) another, so parameters, gradients and AdamW's moments live as DTensor
shards on dim 0, one slice per process; a block's full weights exist only between FSDP's
all-gather and its reshard. Under `trainer.precision=bf16` the gathered parameters are
bf16 and gradients are reduced in fp32; the sharded weights the optimizer steps keep
`model.dtype` (fp32 master weights for a float32 model).

Strategies see the sharded parameters (`DTensor`s) and work on their local shards
(`local`); `is_sharded` tells a strategy which world it is in.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn


def is_sharded(tensor: Any) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient, or state made like one)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group even for one process (`cl-run trainer.sharding=fsdp`
    without a launcher): make a single-rank one when none exists."""
    import torch.distributed as dist

    global _OWN_GROUP
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP = True


def release_process_group() -> None:
    """Destroy the single-rank group `ensure_process_group` made (a later run in the same
    Python process, e.g. the next job of a sweep, must not find it)."""
    import torch.distributed as dist

    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP = False


_OWN_GROUP = False


def global_sum(values: Iterable[torch.Tensor]) -> float:
    """The sum of every entry of `values` over all shards: local sums, one scalar all-reduce."""
    import torch.distributed as dist

    values = list(values)
    total = sum((local(v).double().sum() for v in values), torch.zeros((), dtype=torch.float64))
    if any(is_sharded(v) for v in values) and dist.is_initialized() and dist.get_world_size() > 1:
        device = local(values[0]).device
        total = total.to(device)
        dist.all_reduce(total)
    return float(total)


def global_numel(values: Iterable[torch.Tensor]) -> int:
    return sum(v.numel() for v in values)  # a DTensor's numel is its global size


def shard_model(model: nn.Module, trainer: Any) -> nn.Module:
    """Apply FSDP2 to `model` in place (blocks first, then the root) and return it."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    from cl_runner.models.parts import block_stacks

    options = trainer.fsdp
    if trainer.precision == "bf16":
        mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif trainer.precision == "fp16":
        mixed = MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    else:
        mixed = MixedPrecisionPolicy()
    offload = CPUOffloadPolicy() if options.cpu_offload else OffloadPolicy()
    if options.activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ValueError(f"trainer.fsdp.activation_checkpointing: {type(model).__name__} does not support "
                             "gradient checkpointing; set it to false")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = [block for stack in block_stacks(model).values() for block in stack]
    for block in blocks:
        fully_shard(block, mp_policy=mixed, offload_policy=offload,
                    reshard_after_forward=options.reshard_after_forward)
    fully_shard(model, mp_policy=mixed, offload_policy=offload, reshard_after_forward=options.reshard_after_forward)
    return model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduce-scatter at the end of backward: off for
    all but the last micro-batch of a gradient-accumulation step."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is not None:
        setter(enabled)


def full_state_dict(model: nn.Module) -> Optional[dict[str, torch.Tensor]]:
    """The consolidated model state on rank 0 (CPU), None on the other ranks. Gathers one
    tensor at a time (for `save_final_model`, not for checkpoints)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state or None
