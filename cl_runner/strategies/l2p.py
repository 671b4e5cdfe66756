"""L2P: Learning to Prompt (Wang et al. 2022, CVPR, arXiv 2112.08654), as TRACE runs it on
language models (zjwang21/TRACE, model/Dynamic_network/L2P.py).

A pool of M prompts (model.prompt.length vectors each) with keys k_1..k_M sits in front of
a frozen backbone. An input's query q(x) is its mean input embedding (TRACE's
`embedding_key: mean`); it gets the k prompts whose keys are most cosine-similar to q(x),
concatenated, most similar first. The loss is

    L_task + pull_coefficient * mean_batch sum_{i chosen} (1 - cos(q(x), k_i)),

the paper's surrogate term that pulls the chosen keys toward their queries (TRACE writes
`- 0.5 * sum cos / B`: the same gradient). The pool and its math are
`parts/prompt_sources.py`; docs/strategies.md lists every default with its source.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Batch
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.prompt_sources import KEYS, QUERIES, PromptPool
from cl_runner.strategies.parts.prompt_strategy import NO_ADAPTERS, NO_SHARDING, PromptStrategy
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task


@dataclass
class L2PConfig:
    name: str = "l2p"
    # Prompts in the pool (TRACE training/main.py: args.pool_size = 10); each prompt's
    # length is model.prompt.length (TRACE: args.prompt_length = 5, configs/strategy/l2p.yaml).
    pool_size: int = 10
    # Prompts each input gets (TRACE L2P.py: top_k=3).
    top_k: int = 3
    # Weight of the key-pull term (TRACE L2P.py: pull_constraint_coeff=0.5).
    pull_coefficient: float = 0.5
    # learned: keys of their own, trained by the pull term (the paper) | prompt_mean: a
    # prompt's key is the mean of its vectors (TRACE: prompt_key = mean(prompt, dim=1)).
    key: str = "learned"
    # input: the mean embedding of the input's own tokens (no pads; a causal LM's answer
    # tokens left out, as at test time) | trace: the mean over every position of the batch's
    # rows, pads and (in training) answer tokens included (TRACE's torch.mean(dim=1)).
    query: str = "input"


@register("l2p", config=L2PConfig,
          summary="L2P: a pool of soft prompts with keys; each input gets the top-k prompts whose keys match its query",
          adapters=NO_ADAPTERS, sharding=NO_SHARDING,
          example=("model.prompt.length=2", "strategy.pool_size=4", "strategy.top_k=2"))
class LearningToPrompt(PromptStrategy):
    suggested_length = 5

    def __init__(self, config: L2PConfig) -> None:
        super().__init__(config)
        require(config.pool_size >= 1, "strategy.pool_size", config.pool_size, "use a pool of at least one prompt")
        require(1 <= config.top_k <= config.pool_size, "strategy.top_k", config.top_k,
                f"use 1 <= top_k <= strategy.pool_size ({config.pool_size})")
        require(config.pull_coefficient >= 0 and config.pull_coefficient != float("inf"),
                "strategy.pull_coefficient", config.pull_coefficient, "use a finite value >= 0 (TRACE: 0.5)")
        require_choice(config.key, "strategy.key", KEYS)
        require_choice(config.query, "strategy.query", QUERIES)
        self.task = 0
        # usage[t][i]: how many training inputs of task t got prompt i (is the pool shared or split?).
        self.usage: dict[int, list[int]] = {}

    def _owns(self, source: nn.Module) -> bool:
        return isinstance(source, PromptPool)

    def prompt_source(self, maker: Any, num_tasks: int) -> Optional[nn.Module]:
        cfg = self.config
        return PromptPool(maker.vectors(cfg.pool_size), cfg.top_k, key=cfg.key, query=cfg.query)

    def before_task(self, t: int, task: Task) -> None:
        self.task = t

    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        pool = self.source
        if pool.last_chosen is not None and not self.ctx.annealing:
            counts = torch.bincount(pool.last_chosen.flatten().cpu(), minlength=self.config.pool_size).tolist()
            old = self.usage.get(self.task, [0] * self.config.pool_size)
            self.usage[self.task] = [a + b for a, b in zip(old, counts)]
        if not self.config.pull_coefficient or pool.last_pull is None:
            return None
        return self.config.pull_coefficient * pool.last_pull

    # -- cost and bookkeeping ---------------------------------------------------------------
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        cfg = self.config
        width, length = inputs.facts.hidden, int(inputs.cfg.model.prompt.length)
        keys = cfg.pool_size * width if cfg.key == "learned" else 0
        pool = cfg.pool_size * length * width + keys
        batch = int(inputs.cfg.trainer.batch_size)
        picked = batch * cfg.top_k * length * width  # the chosen prompts, gathered per batch
        return StrategyEstimate(self.name, state_bytes=pool * FP32, transient_bytes=picked * FP32,
                                trainable_params=pool + self.head_params(inputs), notes=[
                                    f"{self.name}: a pool of {cfg.pool_size} prompts x {length} vectors"
                                    f"{' and their keys' if keys else ''}, {count(pool)} fp32 parameters, the only "
                                    f"weights that train (the backbone is frozen; a classifier's head trains too)"])

    def extra_state_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.source.parameters()) if self.ctx else 0

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "usage": {t: list(u) for t, u in self.usage.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task = int(state.get("task", 0))
        self.usage = {int(t): [int(x) for x in u] for t, u in state.get("usage", {}).items()}

    def report(self) -> dict[str, Any]:
        names = self.ctx.stream.names if self.ctx is not None else []
        usage = {(names[t] if t < len(names) else str(t)): u for t, u in sorted(self.usage.items())}
        return {"pool_size": self.config.pool_size, "top_k": self.config.top_k, "key": self.config.key,
                "query": self.config.query, "pull_coefficient": self.config.pull_coefficient,
                "prompt_usage": usage}
