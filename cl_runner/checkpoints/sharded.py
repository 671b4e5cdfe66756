"""Checkpoints of FSDP2 runs (`trainer.sharding=fsdp`): every rank writes its own shards.

A checkpoint is a folder `task<t>_<step>.dcp/` (or `task<t>_done.dcp/`) written with
`torch.distributed.checkpoint` (DCP): the model's and the optimizer's sharded state and
every tensor of the strategy's state (Fisher, anchors, bases, ...), each rank writing
its own shards, no rank gathering a full tensor. Beside them `meta.pt` holds the plain
part (progress, scheduler, every rank's RNG state, the strategy state's structure), read
with `torch.load(weights_only=True)`.

DCP re-shards on load: a run saved by 2 processes resumes on 1 or 4. The strategy's
sharded tensors are recreated from their global shapes on the new process grid before
their values are read into them.

The folder is written under a temporary name and renamed once every rank is done, so a
run killed mid-save leaves the previous checkpoint.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from cl_runner.checkpoints.files import CorruptCheckpointError, Progress, checkpoint_name, prune_checkpoints, rng_state
from cl_runner.distributed.sharding import is_sharded

SUFFIX = ".dcp"
_TENSOR = "__sharded_checkpoint_tensor__"


def checkpoint_dir_name(progress: Progress) -> str:
    return checkpoint_name(progress).replace(".pt", SUFFIX)


# --------------------------------------------------------------------------- strategy state
def split_tensors(state: Any, path: str = "s") -> tuple[Any, dict[str, torch.Tensor]]:
    """(skeleton, tensors): the state's tensors replaced by placeholders that record their
    key, global shape, dtype and whether they are sharded; the tensors by key."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, key: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[key] = node
            return {_TENSOR: key, "shape": list(node.shape), "dtype": str(node.dtype).replace("torch.", ""),
                    "sharded": is_sharded(node)}
        if isinstance(node, dict):
            return {k: walk(v, f"{key}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            items = [walk(v, f"{key}.{i}") for i, v in enumerate(node)]
            return items if isinstance(node, list) else tuple(items)
        return node

    return walk(state, path), tensors


def tensor_templates(skeleton: Any, mesh: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Empty tensors to read the strategy's saved tensors into: sharded ones as DTensors
    over `mesh` (only this rank's shard is allocated), the others whole."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor import empty as dtensor_empty

    out: dict[str, torch.Tensor] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict) and _TENSOR in node:
            dtype = getattr(torch, node["dtype"])
            if node["sharded"] and mesh is not None:
                out[node[_TENSOR]] = dtensor_empty(*node["shape"], dtype=dtype, device_mesh=mesh,
                                                   placements=[Shard(0)])
            else:
                out[node[_TENSOR]] = torch.empty(node["shape"], dtype=dtype, device=device)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(skeleton)
    return out


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and _TENSOR in skeleton:
        return tensors[skeleton[_TENSOR]]
    if isinstance(skeleton, dict):
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(join_tensors(v, tensors) for v in skeleton)
    return skeleton


# --------------------------------------------------------------------------- save
def save_sharded_checkpoint(folder: Path, progress: Progress, model: torch.nn.Module,
                            optimizer: Optional[torch.optim.Optimizer], scheduler_state: Optional[dict],
                            strategy_state: dict, keep: int = 1) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    rank = dist.get_rank()
    final = folder / checkpoint_dir_name(progress)
    tmp = folder / (final.name + ".tmp")
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    skeleton, strategy_tensors = split_tensors(strategy_state)
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    if strategy_tensors:
        state["strategy"] = strategy_tensors
    dcp.save(state, checkpoint_id=str(tmp))
    rngs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        meta = {"progress": asdict(progress), "scheduler": scheduler_state, "rng": rngs,
                "strategy": skeleton, "has_optimizer": optimizer is not None,
                "world_size": dist.get_world_size()}
        torch.save(meta, tmp / "meta.pt")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(folder, keep, final, pattern=f"task*{SUFFIX}",
                          remove=lambda p: shutil.rmtree(p, ignore_errors=True))
    dist.barrier()
    return final


# --------------------------------------------------------------------------- load
def sharded_checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob(f"task*{SUFFIX}") if (p / "meta.pt").is_file()) if folder.is_dir() else []


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        meta["progress"] = Progress(**meta["progress"])
    except Exception as err:
        raise CorruptCheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: "
                                     f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return meta


def load_model_and_strategy(path: Path, meta: dict[str, Any], model: torch.nn.Module) -> Any:
    """Collective: reads the model's shards (re-sharded to this world) into `model` and
    returns the strategy state with its tensors in place."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model_state = get_model_state_dict(model)
    dcp.load({"model": model_state}, checkpoint_id=str(path))
    set_model_state_dict(model, model_state)
    mesh = next((p.device_mesh for p in model.parameters() if is_sharded(p)), None)
    device = next(model.parameters()).device
    templates = tensor_templates(meta["strategy"], mesh, device)
    if templates:
        dcp.load({"strategy": templates}, checkpoint_id=str(path))
    return join_tensors(meta["strategy"], templates)


def rank_rng_state(meta: dict[str, Any]) -> dict[str, Any]:
    """This rank's saved RNG state (on another world size: rank r takes saved rank r mod N)."""
    rngs = meta["rng"]
    return rngs[dist.get_rank() % len(rngs)]


def load_optimizer(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Collective: reads the optimizer's shards into `optimizer` (its state is created first)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer)
    dcp.load({"optimizer": state}, checkpoint_id=str(path))
    set_optimizer_state_dict(model, optimizer, state)
