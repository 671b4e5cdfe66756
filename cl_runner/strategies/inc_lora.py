"""IncLoRA: a new LoRA per task, the earlier ones frozen and still in the forward.

The incremental-LoRA baseline of O-LoRA (Wang et al. 2023, arXiv 2310.14152, Sec. 4 /
Table 1 "IncLoRA"): O-LoRA's adapter life cycle without its loss terms, i.e. O-LoRA with
lambda_1 = lambda_2 = 0. Nothing keeps the LoRAs apart, so the overlap of each task's A
with the earlier ones' (`orthogonality_residual` in metrics.json, the same measure O-LoRA
reports) shows what O-LoRA's penalty buys. The life cycle is `parts/per_task_lora.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

from cl_runner.strategies.parts.per_task_lora import PerTaskLoRA
from cl_runner.strategies.registry import register


@dataclass
class IncLoRAConfig:
    name: str = "inc_lora"
    # No options: the LoRA's rank, alpha, dropout and targets are model.lora.*; no
    # carry_optimizer, as O-LoRA: each task trains parameters of its own (a fresh AdamW).


@register("inc_lora", config=IncLoRAConfig,
          summary="IncLoRA: one LoRA per task, earlier ones frozen and kept in the forward, no penalty",
          sharding="it trains LoRA adapters, which trainer.sharding=fsdp does not shard yet",
          example=("model.adapter=lora", "model.lora.dropout=0"))
class IncrementalLoRA(PerTaskLoRA):
    """No penalty, no hooks of its own: the base class's `penalty` returns None."""
