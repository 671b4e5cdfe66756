"""The strategy protocol: loop-agnostic hooks in Avalanche's vocabulary.

The loop calls every hook at a fixed point (see `cl_runner/training/loop.py`) and never
names a strategy. Every hook is a no-op by default, so a strategy overrides only what it
changes; `memory_estimate` is the one method every strategy must write. Base strategies
(seq_ft, ewc, ...) and add-ons (replay, lr_schedule, lines) implement the same protocol;
`StrategyStack` in `stack.py` runs one base and any add-ons together. What the rest of the
program needs to know without running a strategy (kind, label order, what it supports)
is declared with `@register` (`registry.py`). docs/writing_a_strategy.md walks through it.

Task indices `t` are 0-based throughout the code (task t is row t+1 of R).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from cl_runner.strategies.memory import PlanInputs, StrategyEstimate
from cl_runner.streams.task import Example, Task, TaskStream

Batch = dict[str, torch.Tensor]


@dataclass
class StrategyContext:
    """What the loop shares with strategies at `setup`. Strategies never import the loop:
    everything they need to run the model is handed to them here."""

    accelerator: Any  # accelerate.Accelerator
    model: nn.Module  # the prepared (possibly DDP-wrapped) training model
    stream: TaskStream
    model_kind: str  # "causal" | "seq2seq" | "classifier"
    model_family: str  # "gpt2" | "llama" | "t5" | "bert" | ... (lower-case model_type)
    seed: int
    trainer: Any  # the validated trainer config (lr, weight_decay, batch_size, ...)
    # loss_fn(model, batch) -> mean loss over the batch's answer tokens (or labels)
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    # collate(examples) -> a batch of tensors on the accelerator's device
    collate: Callable[[list[Example]], Batch]
    # log(metrics) -> sends numbers to the tracker (rank 0 only)
    log: Callable[[dict[str, Any]], None] = lambda metrics: None
    # anneal(t, batches, factor_at, keep_optimizer) -> losses: optimizer steps on the given
    # global micro-batches through the training step path (every strategy's per-step hooks),
    # with a copy of task t's optimizer at lr = trainer.lr * factor_at(step); no training
    # counters move. lr_schedule's infinite anneal; see ContinualLoop.anneal.
    anneal: Optional[Callable[..., list[float]]] = None
    # True while `anneal` runs: per-step hooks run as in training, and a hook that gathers
    # statistics of the training steps (EWC's trace_online Fisher) leaves the anneal out.
    annealing: bool = False
    # The run folder (strategies that keep large state on disk write under it); None in tests.
    run_dir: Optional[Path] = None
    # The examples this process's current micro-batch was collated from, set by the loop
    # before its forward: a penalty that needs the text behind the tensors (lfpt5's
    # generation objective) reads them. None outside a training step.
    batch_examples: Optional[list[Example]] = None

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)


class Strategy:
    """Base class with no-op hooks. `@register` sets `name`; the constructor takes the
    strategy's validated config node and checks its options (ValueError naming the key)."""

    name: str = "base"
    # -- declared facts (class attributes; a constructor may set them from its options) --
    # Keep the optimizer (and its moments) from one task to the next.
    carry_optimizer: bool = False
    # Sets requires_grad=False on some parameters during training. Under DDP every
    # parameter registered at wrap time must get a gradient each step unless unused
    # parameters are detected, so cl-run turns that detection on for such strategies.
    freezes_parameters: bool = False
    # Replaces AdamW's update rule (classp): a stack refuses a second owner, and any member
    # that sets `lr_lambda` (a learning-rate curve meant for AdamW).
    owns_update_rule: bool = False
    # Makes the choice of `optimizer` / `lr_lambda`; None = it does when its class
    # overrides the hook. A stack refuses two members that make the same choice.
    sets_optimizer: Optional[bool] = None
    sets_lr_lambda: Optional[bool] = None

    def __init__(self, config: Any = None) -> None:
        self.config = config
        self.ctx: StrategyContext | None = None
        # A strategy whose config has `carry_optimizer` follows it (seq_ft, ewc, hft, ...).
        self.carry_optimizer = bool(getattr(config, "carry_optimizer", type(self).carry_optimizer))

    # -- checks and cost, before anything is built ---------------------------------
    def check_run_config(self, cfg: Any) -> None:
        """Refuse (ValueError, one line naming the key and the fix) a run config this
        strategy cannot train with; called with the whole validated config before any
        folder or model exists (classp: clipping in absolute mode)."""

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        """Bytes of state this strategy keeps beyond model and optimizer (and its largest
        transient working set, and any change to the optimizer's state), counted the way
        its code allocates them, for `cl-run dry_run=true`. Every strategy writes one; a
        stateless strategy says so in a note."""
        raise NotImplementedError(f"strategy {self.name!r} has no memory_estimate")

    # -- life cycle ---------------------------------------------------------------
    def adapter_names(self, num_tasks: int) -> Optional[list[str]]:
        """With model.adapter=lora: the named adapters to create before the model is wrapped
        (O-LoRA: one per task), or None for one adapter trained throughout."""
        return None

    def prompt_source(self, maker: Any, num_tasks: int) -> Optional[nn.Module]:
        """With model.prompt.length > 0: the module that gives each input its soft prompts
        (`forward(inputs_embeds, query_mask) -> (B, P, d)`, made with `maker`, a
        models.prompts.PromptMaker), created before the model is wrapped; None for one
        prompt for every input (prompt tuning)."""
        return None

    def setup(self, ctx: StrategyContext) -> None:
        self.ctx = ctx

    def before_task(self, t: int, task: Task) -> None:
        """Before task t's first step (and before its optimizer is built)."""

    def after_task(self, t: int, task: Task) -> None:
        """After task t's last step, before it is evaluated. In a stack the add-ons run
        first and the base's last, so the base's task state (masks, bases, penalty) is
        still in force in an add-on's after_task (lr_schedule anneals there)."""

    # -- data -----------------------------------------------------------------------
    def train_examples(self, t: int, task: Task, examples: list[Example]) -> list[Example]:
        """The examples task t trains on (multitask takes the union of tasks so far)."""
        return examples

    def compose_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        """Rewrite the stream of batches (replay mixes stored examples in)."""
        return batches

    def compose_anneal_batches(self, t: int, batches: Iterator[list[Example]]) -> Iterator[list[Example]]:
        """Rewrite the batches of the anneal after task t (replay mixes stored examples in,
        as during the task; its own seed and counts, so the task's plan is not touched)."""
        return batches

    def num_train_steps(self, t: int, steps: int) -> int:
        """The number of optimizer steps for task t, given the trainer's count."""
        return steps

    # -- optimisation ---------------------------------------------------------------
    def optimizer(self, named_params: list[tuple[str, nn.Parameter]], previous: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
        """Return an optimizer to replace the trainer's AdamW, or None to keep it."""
        return None

    def lr_lambda(self, t: int, num_steps: int) -> Optional[Callable[[int], float]]:
        """Return step -> multiplier of the base lr for task t, or None for the trainer's."""
        return None

    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        """A term added to the loss of every micro-batch (EWC)."""
        return None

    def after_backward(self) -> None:
        """Once per optimizer step on the accumulated (unscaled) gradients, before
        clipping and the step (gradient projection, masks, thresholds)."""

    def before_optimizer_step(self) -> None:
        """Right before optimizer.step()."""

    def after_optimizer_step(self) -> None:
        """Right after optimizer.step() (re-project the weight update)."""

    # -- evaluation -----------------------------------------------------------------
    def evaluation_weights(self, t: int) -> contextlib.AbstractContextManager:
        """A context in which the model holds the weights to evaluate after task t
        (LiNeS eval-only scaling, an annealed copy); the training weights come back on exit."""
        return contextlib.nullcontext()

    def evaluation_weights_for(self, t: int, k: Optional[int]) -> contextlib.AbstractContextManager:
        """Inside `evaluation_weights(t)`, around the scoring of one task: a context in which
        the model holds the weights to score stream task k (0-based) with after task t, or a
        monitor task (k None). The row's weights are back when `evaluation_weights(t)` exits.
        Not called for the row before training. Default: one model scores every task
        (per_task_ft: task k's own model)."""
        return contextlib.nullcontext()

    def predict_examples(self, t: int, k: Optional[int], task: Task, examples: list[Example],
                         predict: Callable[[list[Example]], list[str]]) -> list[str]:
        """Inside `evaluation_weights_for(t, k)`: the predictions for `examples` (this
        process's test examples of stream task k, or of a monitor task when k is None), in
        their order. `predict(examples)` is the plain prediction with the weights the model
        holds; a strategy may change the weights around its calls (MbPA++'s local
        adaptation) and must leave them as it found them. Not called for the row before
        training. Default: the plain prediction."""
        return predict(examples)

    def test_time_seconds(self) -> float:
        """Seconds of evaluation spent on the strategy's own work at test time (MbPA++'s
        local adaptation), part of eval_time_s: metrics.json, the cost line, cl-report."""
        return 0.0

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def extra_state_bytes(self) -> int:
        """Bytes of state this strategy keeps beyond model and optimizer."""
        return 0

    def report(self) -> dict[str, Any]:
        """Numbers for metrics.json (costs, chosen ranks, masks)."""
        return {}


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors inside nested dicts/lists/tuples, held by this process
    (a sharded DTensor counts its local shard)."""
    if isinstance(obj, torch.Tensor):
        held = obj.to_local() if hasattr(obj, "to_local") else obj
        return held.numel() * held.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def plain_config(node: Any) -> Any:
    """An OmegaConf node as plain dicts/lists (for options that are free-form mappings)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
