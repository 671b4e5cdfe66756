"""Learning without Forgetting: distil the previous task's model on the current inputs.

Li & Hoiem 2017, "Learning without Forgetting" (TPAMI, arXiv 1606.09282, Sec. 3); TRACE's
variant: Wang et al. 2023 (arXiv 2310.06762), code github.com/BeyonderXX/TRACE,
model/Regular/LwF.py. From the second task on (t >= 1, 0-based), every micro-batch's loss gains

    weight * T^2 * KL_T,     p^T = softmax(z / T),

with z the logits the loss uses: the answer-token distributions of a causal or seq2seq LM
(the logits that predict a label other than -100) or the task's classes of a classifier
(the other classes masked out, as in the loss). The teacher ("old model") is the model as
the task starts, i.e. at the end of the previous task, frozen, in eval mode (no dropout).

    direction: standard   KL(p_old || p_new) = sum p_old (log p_old - log p_new)
                          the paper's distillation (its Eq. 2 is the cross-entropy
                          -sum p_old log p_new, which differs by p_old's entropy, a constant)
    direction: trace      KL(p_new || p_old) = sum p_new (log p_new - log p_old)
                          what TRACE's KD_loss computes: F.kl_div(log_softmax(prev / T),
                          softmax(new / T)) is sum target * (log target - input), target = p_new

`t_squared` multiplies by T^2 (Hinton et al. 2015, Sec. 2: keeps the soft targets'
gradient scale independent of T); Li & Hoiem and TRACE do not. `reduction: mean` averages
over the distilled distributions (tokens or examples, like the task loss); `per_example`
sums them and divides by the examples in the batch (TRACE's reduction='batchmean' over
[batch, seq, vocab] logits). `positions: answer` distils the answer tokens only; `all`
every attended position (TRACE distils every position of the sequence, padding included).

The teacher is a copy of the trainable tensors (all weights, or the LoRA factors and the
head under model.adapter=lora) in the weights' dtype; the teacher's forward runs the same
module with those tensors swapped in (torch.func.functional_call), so frozen base weights
are shared, never copied. The student's logits are taken from the loss's own forward (a
forward hook) rather than a second forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Batch, Strategy, StrategyContext, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Task

IGNORE = -100
DIRECTIONS = ("standard", "trace")
REDUCTIONS = ("mean", "per_example")
POSITIONS = ("answer", "all")


@dataclass
class LwFConfig:
    name: str = "lwf"
    # lambda, the weight of the distillation term (TRACE LwF.py line 86: added with weight 1;
    # Li & Hoiem Sec. 3: lambda_o = 1).
    weight: float = 1.0
    # T of softmax(z / T) (TRACE LwF.py line 86: KD_loss(..., 2); Li & Hoiem Sec. 3: T = 2).
    temperature: float = 2.0
    # standard: KL(p_old || p_new), the paper | trace: KL(p_new || p_old), TRACE's kl_div order
    direction: str = "standard"
    # Multiply by T^2 (Hinton et al. 2015); false as in Li & Hoiem and TRACE.
    t_squared: bool = True
    # mean: over distilled tokens/examples | per_example: summed, / batch size (TRACE's batchmean)
    reduction: str = "mean"
    # answer: the answer tokens' distributions | all: every attended position (TRACE: all)
    positions: str = "answer"


# -- the math (pure functions) --------------------------------------------------------------

def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, direction: str,
                    allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL per distribution between softmax(teacher / T) and softmax(student / T), in fp32.

    student, teacher: [N, C] logits; allowed: optional [N, C] bool, the classes each row is
    a distribution over (the others have probability 0 in both). Returns [N]:
    standard KL(p_old || p_new), trace KL(p_new || p_old)."""
    new = student.float() / temperature
    old = teacher.float() / temperature
    if allowed is not None:
        new = new.masked_fill(~allowed, float("-inf"))
        old = old.masked_fill(~allowed, float("-inf"))
    log_new, log_old = F.log_softmax(new, -1), F.log_softmax(old, -1)
    log_p, log_q = (log_old, log_new) if direction == "standard" else (log_new, log_old)
    terms = log_p.exp() * (log_p - log_q)
    if allowed is not None:  # 0 * (-inf - -inf) is NaN: classes outside the task add nothing
        terms = torch.where(allowed, terms, torch.zeros_like(terms))
    return terms.sum(-1)


def distilled_rows(logits: torch.Tensor, batch: Batch, kind: str, positions: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The distributions to distil, as ([N, C] logits, [N, C] allowed classes or None).

    causal: logits at i predict token i+1 (HF shifts inside the model), so `answer` keeps
    logits[:, :-1] where labels[:, 1:] != -100 (exactly the ones the loss scores); `all`
    keeps every position whose attention_mask is 1. seq2seq: decoder logits[j] predicts
    labels[j]; both settings keep the real (non -100) decoder positions. classifier: one
    row per example, over the task's classes (label_mask)."""
    if kind == "classifier":
        return logits, batch["label_mask"]
    labels = batch["labels"]
    if kind == "causal":
        if positions == "all":
            return logits[batch["attention_mask"].bool()], None
        return logits[:, :-1][labels[:, 1:] != IGNORE], None
    return logits[labels != IGNORE], None


def lwf_term(student: torch.Tensor, teacher: torch.Tensor, batch: Batch, kind: str, config: Any) -> torch.Tensor:
    """weight * (T^2) * the reduced KL between the teacher's and the student's logits."""
    rows_new, allowed = distilled_rows(student, batch, kind, config.positions)
    rows_old, _ = distilled_rows(teacher, batch, kind, config.positions)
    kl = distillation_kl(rows_new, rows_old, config.temperature, config.direction, allowed)
    if kl.numel() == 0:  # nothing to distil here (still part of the graph for DDP)
        return student.float().sum() * 0.0
    reduced = kl.mean() if config.reduction == "mean" else kl.sum() / student.shape[0]
    scale = config.weight * (config.temperature ** 2 if config.t_squared else 1.0)
    return scale * reduced


def frozen_logits(model: nn.Module, tensors: dict[str, torch.Tensor], batch: Batch, kind: str) -> torch.Tensor:
    """The model's logits on `batch` with `tensors` swapped in for its own (a teacher's
    weights; frozen base weights shared, never copied), in eval mode, without a graph."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.func.functional_call(model, tensors, args=(), kwargs=model_inputs(batch, kind), strict=False)
        return out.logits.detach()
    finally:
        model.train(was_training)


def model_inputs(batch: Batch, kind: str) -> Batch:
    """The forward's keyword arguments (the loss's own: classifiers get no labels)."""
    if kind == "classifier":
        return {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}
    return dict(batch)


@register("lwf", config=LwFConfig,
          summary="learning without forgetting: distil the previous task's model on the current task's inputs",
          sharding="its teacher forward swaps a whole copy of the trained weights into the model "
                   "(torch.func.functional_call), which FSDP's sharded parameters do not support",
          example=("strategy.weight=4",))
class LearningWithoutForgetting(Strategy):
    def __init__(self, config: LwFConfig) -> None:
        super().__init__(config)
        require_choice(config.direction, "strategy.direction", DIRECTIONS)
        require_choice(config.reduction, "strategy.reduction", REDUCTIONS)
        require_choice(config.positions, "strategy.positions", POSITIONS)
        require(config.weight >= 0 and config.weight != float("inf"), "strategy.weight", config.weight,
                "use a finite value >= 0 (Li & Hoiem and TRACE use 1)")
        require(config.temperature > 0 and config.temperature != float("inf"), "strategy.temperature",
                config.temperature, "use a finite temperature > 0 (Li & Hoiem and TRACE use 2)")
        # name -> the teacher's value of every trainable tensor (None before task 2).
        self.teacher: Optional[dict[str, torch.Tensor]] = None
        self._captured: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (input_ids, logits)
        self._in_teacher = False
        self._hook = None

    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        cfg = inputs.cfg
        teacher = inputs.trainable * inputs.param_bytes
        what = "LoRA factors and head" if inputs.adapter_params else "weights"
        # A classifier distils one row of a few classes per example: no transient worth counting.
        rows = 0 if inputs.facts.kind == "classifier" else int(cfg.trainer.batch_size) * int(cfg.model.max_length)
        transient = 3 * FP32 * rows * inputs.facts.vocab
        return StrategyEstimate(
            self.name, state_bytes=teacher,
            notes=[f"lwf: the teacher, a copy of the {count(inputs.trainable)} trainable parameters ({what}) in the "
                   "weights' dtype, from task 2 on"],
            transient_bytes=transient,
            transient_note="per micro-batch: the teacher's logits and both log-softmaxes (fp32) of every position")

    # -- life cycle ---------------------------------------------------------------------
    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        model = ctx.unwrapped_model
        if self._hook is not None:
            self._hook.remove()
        self._hook = model.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        # The loss's forward of a training micro-batch: keep its logits for penalty().
        if self.teacher is None or self._in_teacher or not module.training or not torch.is_grad_enabled():
            return
        ids = kwargs.get("input_ids")
        logits = getattr(output, "logits", None)
        self._captured = (ids, logits) if ids is not None and logits is not None else None

    def before_task(self, t: int, task: Task) -> None:
        # The model as task t starts is the previous task's final model (after any anneal).
        self.teacher = self._snapshot() if t >= 1 else None

    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.ctx.unwrapped_model.named_parameters() if p.requires_grad}

    # -- loss -------------------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        captured, self._captured = self._captured, None
        if self.teacher is None or self.config.weight == 0:
            return None
        kind = self.ctx.model_kind
        student = self._student_logits(captured, batch, kind)
        teacher = self._teacher_logits(batch, kind)
        return lwf_term(student, teacher, batch, kind, self.config)

    def _student_logits(self, captured: Optional[tuple[torch.Tensor, torch.Tensor]], batch: Batch,
                        kind: str) -> torch.Tensor:
        ids = batch["input_ids"]
        if captured is not None and captured[0].data_ptr() == ids.data_ptr() and captured[0].shape == ids.shape:
            return captured[1]
        # Not from this batch's loss forward (a caller without one): run it here.
        self._in_teacher = True  # not a capture either
        try:
            return self.ctx.unwrapped_model(**model_inputs(batch, kind)).logits
        finally:
            self._in_teacher = False

    def _teacher_logits(self, batch: Batch, kind: str) -> torch.Tensor:
        self._in_teacher = True  # not a capture
        try:
            return frozen_logits(self.ctx.unwrapped_model, self.teacher, batch, kind)
        finally:
            self._in_teacher = False

    # -- bookkeeping ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("teacher")
        if saved is None:
            self.teacher = None
            return
        params = dict(self.ctx.unwrapped_model.named_parameters())
        self.teacher = {n: v.to(device=params[n].device, dtype=params[n].dtype, copy=True) for n, v in saved.items()}

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.teacher) if self.teacher else 0

    def report(self) -> dict[str, Any]:
        cfg = self.config
        return {"weight": cfg.weight, "temperature": cfg.temperature, "direction": cfg.direction,
                "t_squared": cfg.t_squared, "reduction": cfg.reduction, "positions": cfg.positions}
