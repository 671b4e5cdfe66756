"""What a strategy's memory estimate sees and returns (`Strategy.memory_estimate`).

`cl-run dry_run=true` builds the model on the meta device and asks the run's strategy
stack for its estimate; `cl_runner/memory_plan.py` lays the rows out per rank. Estimates
count what the strategy code allocates, in bytes, on one process holding the whole model;
the plan splits them under FSDP unless the estimate brings its own `sharded` layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

FP32 = 4
GIB = 1024 ** 3


@dataclass
class ModelFacts:
    """What the plan needs from the model, read from its meta-device build."""
    name: str
    kind: str
    family: str
    source: str
    params: int
    matmul_params: int  # weights of Linear/Conv1D layers (autocast casts these)
    hidden: int
    blocks: int
    vocab: int
    largest_unit: int  # parameters of the largest block or top-level module (FSDP unit)
    model: nn.Module  # on the meta device: shapes only
    intermediate: int = 0  # MLP width (0: unknown, taken as 4 x hidden)
    kv_dim: int = 0  # key/value heads x head size (0: unknown, taken as hidden)
    gated_mlp: bool = False  # SwiGLU-style: gate and up projections


@dataclass
class PlanInputs:
    """What an estimate may read: the validated run config, the model's facts, the
    planned number of tasks, the weights' bytes per value, and the parameters the
    strategy trains (the LoRA factors and a head under model.adapter=lora)."""
    cfg: Any
    facts: ModelFacts
    n_tasks: int
    param_bytes: int
    trainable: int
    adapter_params: Optional[int] = None  # one LoRA's parameters; None without adapters
    # For an add-on: the base strategy's estimate (what trains, its optimizer's bytes).
    base: Optional["StrategyEstimate"] = None

    def optimizer_bytes(self) -> int:
        """Bytes of the optimizer state the base strategy trains with (AdamW's two moments
        in the weights' dtype unless the base replaces it)."""
        base = self.base or StrategyEstimate("")
        trained = base.trainable_params if base.trainable_params is not None else self.trainable
        per_param = base.optimizer_bytes_per_param if base.optimizer_bytes_per_param is not None \
            else 2 * self.param_bytes
        return int(trained * per_param)


@dataclass
class ShardedEstimate:
    """A strategy's own implementation under `trainer.sharding=fsdp` at one world size,
    where that is not its unsharded state split evenly (svd_orthogonal's ShardedSubspaces):
    bytes as that code lays them out on the rank that holds the most (rank 0)."""
    state_unsharded: int  # the same implementation at world size 1
    state_per_rank: int
    transient_unsharded: int
    transient_per_rank: int
    notes: list[str] = field(default_factory=list)
    transient_note: str = ""


@dataclass
class StrategyEstimate:
    name: str
    state_bytes: int = 0
    transient_bytes: int = 0
    trainable_params: Optional[int] = None  # None: every parameter trains
    optimizer_bytes_per_param: Optional[float] = None  # None: AdamW in the weights' dtype
    optimizer_note: str = ""
    notes: list[str] = field(default_factory=list)
    transient_note: str = ""
    # trainer.sharding=fsdp with an implementation of its own: world size -> its estimate,
    # which then replaces state_bytes / transient_bytes (add-ons below are split evenly).
    sharded: Optional[Callable[[int], ShardedEstimate]] = None
    # Add-ons (LiNeS) summed into the fields above, kept apart for `sharded`.
    addon_state_bytes: int = 0
    addon_notes: list[str] = field(default_factory=list)
    addon_transient_bytes: int = 0
    addon_transient_note: str = ""
    # State kept in host memory, not on the device (replay's example buffer): in the plan's
    # notes and assumptions, not its per-rank rows. An upper bound where the size depends on data.
    host_bytes: int = 0
    # Rows of their own in the plan: (name, bytes on one process holding everything, note);
    # split over ranks under FSDP like the state.
    rows: list[tuple[str, int, str]] = field(default_factory=list)

    def add_addon(self, extra: "StrategyEstimate") -> None:
        """Fold an add-on's estimate into this (the base's) one."""
        self.state_bytes += extra.state_bytes
        self.notes += extra.notes
        self.addon_state_bytes += extra.state_bytes
        self.addon_notes += extra.notes
        if extra.transient_bytes > self.transient_bytes:
            self.transient_bytes, self.transient_note = extra.transient_bytes, extra.transient_note
        if extra.transient_bytes > self.addon_transient_bytes:
            self.addon_transient_bytes, self.addon_transient_note = extra.transient_bytes, extra.transient_note
        self.rows += extra.rows
        self.host_bytes += extra.host_bytes
        if extra.optimizer_bytes_per_param is not None and self.optimizer_bytes_per_param is None:
            self.optimizer_bytes_per_param, self.optimizer_note = (extra.optimizer_bytes_per_param,
                                                                   extra.optimizer_note)


def gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.2f} GiB"
    if n >= 1024 ** 2:
        return f"{n / 1024 ** 2:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
