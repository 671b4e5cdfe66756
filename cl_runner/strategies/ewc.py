"""Elastic Weight Consolidation, online by default.

Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks" (Eq. 3):
while training task t >= 1 (0-based), the loss gains

    (lambda / 2) * sum_i F_i (theta_i - theta*_i)^2,

with F the diagonal Fisher information of the past tasks and theta* the weights after
them. `mode: online` is Schwarz et al. 2018 ("Progress & Compress", online EWC): one
running F <- gamma F + F_t and theta* <- theta after each task, so memory stays at 2P.
`mode: separate` keeps one (F_k, theta*_k) pair and one penalty term per past task.

The Fisher comes from a separate pass after each task over up to `fisher_samples`
training examples of that task (model in eval mode, no penalty): squared gradients of the
loss on the data labels (`fisher: empirical`) or on labels sampled from the model's own
predictive distribution (`fisher: sampled`, the true Fisher's estimator), per batch
(`granularity: batch`, normalised by the number of batches) or per example (`sample`,
normalised by the number of examples). F and theta* are fp32, on the parameters' devices.

The penalty's gradient, lambda F (theta - theta*), is added to the accumulated gradients
after backward (`penalty_gradient: analytic`, the default), times the fp16 loss scale the
gradients still carry there, before clipping and the step, once per optimizer step
whatever grad_accum. No autograd graph over every parameter is built: `autograd` (the
penalty handed to the loop as a loss term) keeps theta - theta* and its square, fp32, for
every parameter from the forward to the backward, about 2P fp32 beyond F and theta*; it is
kept to check the analytic path against and to profile the difference. Either way the
logged loss is the task loss alone (the loop never logged the penalty).

`fisher: trace_online` is the variant of the TRACE benchmark (Wang et al. 2023, "TRACE: A
Comprehensive Benchmark for Continual Learning in Large Language Models", arXiv 2310.06762;
code: github.com/BeyonderXX/TRACE, model/Regular/EWC.py), for reproducing its numbers. No
separate pass: after every optimizer step of the task the squared gradients of the full
objective (loss + penalty, the gradients the step uses, before clipping; NaN -> 0 and each
entry clamped to +-trainer.max_grad_norm when set, as TRACE clamps to DeepSpeed's
gradient_clipping) are added into a running sum S and the steps counted (n). After the task,
as TRACE does (its Fisher is never reset; it adds into it and divides the whole by the
task's step count): F <- (F_prev + S) / n, i.e. the task's Fisher S / n plus the previous
one divided by n; theta* <- the weights at the task's end. Online mode only; gamma and
normalize_fisher do not apply. S and n are part of the state, so a run resumed mid-task
continues the same accumulation. (TRACE divides by the batches of one epoch and squares the
last micro-batch's gradient; here n counts optimizer steps and the gradient is the step's
accumulated one: the same at one epoch without gradient accumulation.) The anneal steps of
lr_schedule's infinite schedule (which TRACE does not have) stay out of S and n: the Fisher
is the task's training steps' alone, the same whichever `resume_from`; the penalty does act
on the anneal's steps.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from cl_runner.distributed.sharding import global_numel, global_sum, is_sharded, local
from cl_runner.errors import require, require_choice
from cl_runner.strategies.base import Batch, Strategy, tensor_bytes
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.flat_gradients import loss_scale
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Example, Task

IGNORE = -100
MODES = ("online", "separate")
FISHERS = ("empirical", "sampled", "trace_online")
GRANULARITIES = ("batch", "sample")
PENALTY_GRADIENTS = ("analytic", "autograd")
# method -> phase name, for scripts/profile_strategy.py (which wraps these methods: the
# strategies room may not import training.phases).
PHASES = {"fisher_diagonal": "ewc/fisher", "add_penalty_gradient": "ewc/penalty_gradient",
          "anchor_weights": "ewc/anchor", "trace_fisher": "ewc/trace_merge"}


@dataclass
class EWCConfig:
    name: str = "ewc"
    # Penalty strength lambda (the penalty is lambda/2 * sum F (theta - theta*)^2). No value
    # transfers across models and Fisher settings: sweep it (see docs/strategies.md).
    ewc_lambda: float = 400.0
    # online (one running F, theta*) | separate (one pair per past task)
    mode: str = "online"
    # online: decay of the old Fisher, F <- gamma F + F_new (1.0 = plain sum).
    gamma: float = 1.0
    # empirical (data labels) | sampled (labels drawn from the model's predictions) |
    # trace_online (TRACE's: squared full-objective gradients of the training steps, no pass)
    fisher: str = "empirical"
    # batch (squared mean-loss gradient per batch) | sample (per-example squared gradients)
    granularity: str = "batch"
    # Examples of the task's training set in the Fisher pass (a seeded sample when larger).
    fisher_samples: int = 512
    # Examples per Fisher batch (granularity: batch).
    fisher_batch_size: int = 8
    # Divide each new Fisher by its mean over all entries, so lambda transfers across models.
    normalize_fisher: bool = False
    # Keep AdamW's state across tasks instead of a fresh optimizer per task.
    carry_optimizer: bool = False
    # analytic (lambda F (theta - theta*) added to the gradients after backward, no graph) |
    # autograd (the penalty as a loss term: the same gradient, ~2P fp32 more memory)
    penalty_gradient: str = "analytic"


def sample_labels(model: nn.Module, batch: Batch, kind: str, generator: Optional[torch.Generator] = None) -> Batch:
    """A copy of `batch` whose labels are drawn from the model's own predictive
    distribution at the labelled positions (the estimator of the true Fisher).

    causal: logits at position i predict token i+1 (HF shifts labels inside the model), so
    label i is drawn from softmax(logits[i-1]); the inputs keep the data tokens.
    seq2seq: label j is drawn from softmax(decoder logits[j]); the decoder keeps reading the
    data prefix (decoder_input_ids built from the data labels).
    classifier: one class per example, drawn among the task's allowed classes."""
    out = dict(batch)
    with torch.no_grad():
        if kind == "classifier":
            inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}
            logits = model(**inputs).logits.float().masked_fill(~batch["label_mask"], float("-inf"))
            out["labels"] = torch.multinomial(F.softmax(logits, -1), 1, generator=generator).squeeze(1)
            return out
        labels = batch["labels"]
        if kind == "seq2seq" and hasattr(model, "prepare_decoder_input_ids_from_labels"):
            out["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
        logits = model(**out).logits.float()
        new = labels.clone()
        if kind == "causal":
            mask = labels[:, 1:] != IGNORE
            probs = F.softmax(logits[:, :-1][mask], -1)
            new[:, 1:][mask] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            mask = labels != IGNORE
            probs = F.softmax(logits[mask], -1)
            new[mask] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        out["labels"] = new
    return out


@register("ewc", config=EWCConfig, summary="elastic weight consolidation: a Fisher-weighted pull toward earlier tasks' weights",
          example=("strategy.ewc_lambda=100",))
class ElasticWeightConsolidation(Strategy):
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        s, trainable, n_tasks = self.config, inputs.trainable, inputs.n_tasks
        pairs = 1 if s.mode == "online" else max(1, n_tasks - 1)
        note = (f"Fisher + anchor: 2 fp32 copies of the {count(trainable)} trainable parameters per kept pair; "
                + ("online: 1 pair" if s.mode == "online" else
                   f"separate: one pair per past task, {pairs} while training the last of {n_tasks} tasks"))
        if s.fisher == "trace_online":
            note += "; trace_online: + the running sum of squared gradients (1 fp32 copy) while a task trains"
        state = 2 * FP32 * trainable * pairs + (FP32 * trainable if s.fisher == "trace_online" else 0)
        if s.penalty_gradient == "autograd":
            transient = 2 * FP32 * trainable * pairs
            why = ("penalty_gradient=autograd: the penalty's graph keeps theta - theta* and its square (fp32) "
                   "from the forward to the backward")
        elif s.mode == "online" and s.fisher != "trace_online" and n_tasks > 2:
            transient = FP32 * trainable
            why = ("the Fisher pass's new F (fp32) beside the kept F and theta* at a task end from the second on "
                   "(merged in place)")
        else:
            largest = max((p.numel() for p in inputs.facts.model.parameters()), default=0)
            transient = FP32 * largest
            why = "the analytic penalty gradient: one fp32 temporary the size of the largest parameter"
        if s.fisher != "trace_online" and s.fisher_batch_size > int(inputs.cfg.trainer.batch_size):
            why += (f"; not counted: the Fisher pass's activations at strategy.fisher_batch_size="
                    f"{s.fisher_batch_size} > trainer.batch_size (the activations row is the training batch's)")
        return StrategyEstimate(self.name, state_bytes=state, transient_bytes=transient, notes=[note],
                                transient_note=why)

    def __init__(self, config: EWCConfig) -> None:
        super().__init__(config)
        for key, allowed in (("mode", MODES), ("fisher", FISHERS), ("granularity", GRANULARITIES),
                             ("penalty_gradient", PENALTY_GRADIENTS)):
            require_choice(getattr(config, key), f"strategy.{key}", allowed)
        require(config.ewc_lambda >= 0, "strategy.ewc_lambda", config.ewc_lambda,
                "use a value >= 0 (sweep e.g. 1, 10, 100, 400, 1000, 1e4)")
        require(0.0 <= config.gamma <= 1.0, "strategy.gamma", config.gamma, "use a decay in [0, 1]")
        for key in ("fisher_samples", "fisher_batch_size"):
            require(getattr(config, key) >= 1, f"strategy.{key}", getattr(config, key), "use a positive integer")
        if config.fisher == "trace_online":
            for key, ok, why in (("mode", config.mode == "online", "online"), ("gamma", config.gamma == 1.0, "1.0"),
                                 ("normalize_fisher", not config.normalize_fisher, "false")):
                require(ok, f"strategy.{key}", getattr(config, key),
                        f"with strategy.fisher=trace_online use {why} (TRACE's merge has no such option)")
        # trace_online: running sum of squared step gradients of the current task, and its steps.
        self.grad_sq_sum: dict[str, torch.Tensor] = {}
        self.grad_steps = 0
        # One (fisher, anchor) pair in online mode; one per past task in separate mode.
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.fisher_means: list[float] = []
        self.fisher_seconds = 0.0
        self.fisher_examples = 0

    # -- training ---------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        """The penalty as a loss term (`penalty_gradient: autograd` only; the analytic path
        adds its gradient in after_backward and hands the loop no term)."""
        if self.config.penalty_gradient != "autograd":
            return None
        return self.penalty_value(graph=True)

    def penalty_value(self, graph: bool = False) -> Optional[torch.Tensor]:
        """(lambda / 2) sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 (None before any Fisher);
        with graph, differentiable in the parameters."""
        if not self.fishers or self.config.ewc_lambda == 0:
            return None
        params = dict(self.ctx.unwrapped_model.named_parameters())
        total = None
        with torch.set_grad_enabled(graph and torch.is_grad_enabled()):
            for fisher, anchor in zip(self.fishers, self.anchors):
                for name, f in fisher.items():
                    p = params[name]
                    if not p.requires_grad:
                        continue
                    # Local shards under FSDP: each rank adds its slice of the penalty, whose
                    # gradient lands on exactly the weights it holds (no collective).
                    term = (local(f) * (local(p).float() - local(anchor[name])).pow(2)).sum()
                    total = term if total is None else total + term
        if total is None:
            return None
        return 0.5 * self.config.ewc_lambda * total

    def add_penalty_gradient(self) -> None:
        """grad += s lambda F (theta - theta*) for every kept pair, where s is the fp16 loss
        scale the accumulated gradients still carry (the loop unscales at clipping or the
        step, after this hook; 1 without fp16). One parameter-sized fp32 temporary at a
        time; under FSDP each rank updates its own shard (the same slices as the weights)."""
        if not self.fishers or self.config.ewc_lambda == 0:
            return
        factor = self.config.ewc_lambda * loss_scale(self.ctx.accelerator)
        params = dict(self.ctx.unwrapped_model.named_parameters())
        with torch.no_grad():
            for fisher, anchor in zip(self.fishers, self.anchors):
                for name, f in fisher.items():
                    p = params[name]
                    if not p.requires_grad:
                        continue
                    if p.grad is None:  # untouched by the loss: the penalty alone moves it
                        p.grad = torch.zeros_like(p)
                    step = local(p).float() - local(anchor[name])  # a new tensor, safe to scale in place
                    step.mul_(local(f))
                    local(p.grad).add_(step, alpha=factor)
                    del step

    def after_backward(self) -> None:
        if self.config.penalty_gradient == "analytic":
            self.add_penalty_gradient()  # first: trace_online squares the full objective's gradient
        # The anneal of lr_schedule (infinite) is not one of the task's training steps:
        # TRACE's Fisher is the mean over those (the penalty still acts on the anneal).
        if self.config.fisher != "trace_online" or self.ctx.annealing:
            return
        clamp = getattr(self.ctx.trainer, "max_grad_norm", None)
        with torch.no_grad():
            for n, p in self.ctx.unwrapped_model.named_parameters():
                if not p.requires_grad or p.grad is None:
                    continue
                g = torch.nan_to_num(p.grad.float(), nan=0.0)
                if clamp:
                    g = g.clamp(-float(clamp), float(clamp))
                if n not in self.grad_sq_sum:
                    # Shaped like the parameter (a DTensor under FSDP, each rank its shard).
                    self.grad_sq_sum[n] = torch.zeros_like(p, dtype=torch.float32)
                self.grad_sq_sum[n].addcmul_(g, g)
        self.grad_steps += 1

    def trace_fisher(self) -> dict[str, torch.Tensor]:
        """TRACE's merge: (F_prev + S) / n, or S / n for the first task; resets S and n.
        In place, into S (and F_prev's tensors then freed): no third copy at the task end."""
        steps = max(1, self.grad_steps)
        previous = self.fishers[0] if self.fishers else {}
        fisher = self.grad_sq_sum
        for n, s in fisher.items():
            if n in previous:
                s.add_(previous[n])
            s.div_(steps)
        fisher.update({n: f.div_(steps) for n, f in previous.items() if n not in fisher})
        self.grad_sq_sum, self.grad_steps = {}, 0
        return fisher

    def anchor_weights(self, names: Any) -> dict[str, torch.Tensor]:
        """theta*: the current weights (fp32) of `names`, written into the kept anchor's
        tensors where there is one (online mode), so two anchors are never alive at once."""
        model = self.ctx.unwrapped_model
        reuse = self.anchors[0] if self.config.mode == "online" and self.anchors else {}
        anchor = {}
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n not in names:
                    continue
                if n in reuse and reuse[n].shape == p.shape:
                    anchor[n] = reuse[n].copy_(p.detach())
                else:
                    anchor[n] = p.detach().float().clone()
        return anchor

    def after_task(self, t: int, task: Task) -> None:
        if t == len(self.ctx.stream) - 1:
            self.grad_sq_sum, self.grad_steps = {}, 0
            return  # nothing is trained after the last task: its Fisher would never be used
        started = time.perf_counter()
        if self.config.fisher == "trace_online":
            self.fisher_means.append(mean_of(self.grad_sq_sum) / max(1, self.grad_steps))
            fisher = self.trace_fisher()
            self.fishers = [fisher]
            self.anchors = [self.anchor_weights(fisher)]
            self.fisher_seconds += time.perf_counter() - started
            return
        fisher = self.fisher_diagonal(t, task.train)
        self.fisher_means.append(mean_of(fisher))  # before normalising: tells the scale lambda meets
        if self.config.normalize_fisher:
            fisher = normalized_by_mean(fisher)
        if self.config.mode == "separate" or not self.fishers:
            self.fishers.append(fisher)
            self.anchors.append(self.anchor_weights(fisher))
        else:
            # F <- gamma F + F_new in place: old and new F only, never a third copy.
            gamma, kept = self.config.gamma, self.fishers[0]
            for n, f in fisher.items():
                if n in kept:
                    kept[n].mul_(gamma).add_(f)
                else:
                    kept[n] = f
            del fisher
            self.anchors[0] = self.anchor_weights(kept)
        self.fisher_seconds += time.perf_counter() - started

    # -- the Fisher pass --------------------------------------------------------------
    def fisher_examples_for(self, t: int, examples: list[Example]) -> list[Example]:
        """Up to fisher_samples examples: all when the set is small enough, otherwise a
        sample seeded by (seed, t), kept in dataset order."""
        k = self.config.fisher_samples
        if len(examples) <= k:
            return list(examples)
        rng = random.Random(f"{self.ctx.seed}:ewc-fisher:{t}")
        return [examples[i] for i in sorted(rng.sample(range(len(examples)), k))]

    def fisher_diagonal(self, t: int, examples: list[Example]) -> dict[str, torch.Tensor]:
        """Diagonal Fisher of task t (fp32, one tensor per trainable parameter)."""
        ctx, cfg = self.ctx, self.config
        acc = ctx.accelerator
        # The unwrapped model: its backward passes do not trigger DDP's gradient sync. The
        # Fisher batches are cut from the whole sample first and then dealt out to the
        # processes, and each batch has its own label-sampling seed, so the Fisher is the
        # same for any number of processes.
        model = ctx.unwrapped_model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in named}
        chosen = self.fisher_examples_for(t, examples)
        size = 1 if cfg.granularity == "sample" else cfg.fisher_batch_size
        batches = [chosen[start:start + size] for start in range(0, len(chosen), size)]
        sharded = any(is_sharded(p) for _, p in named)
        # Sharded (FSDP) model: every backward ends in a reduce-scatter that averages the
        # ranks' gradients, so all ranks take every batch (the average of equal gradients
        # is the batch's own) and each squares its own shard; unsharded: batches dealt out.
        mine = range(len(batches)) if sharded else range(acc.process_index, len(batches), acc.num_processes)
        was_training = model.training
        model.eval()
        count = 0
        try:
            self._zero_grads(named)
            for index in mine:
                batch = ctx.collate(batches[index])
                if cfg.fisher == "sampled":
                    device = next(iter(batch.values())).device
                    generator = torch.Generator(device=device)
                    generator.manual_seed(hash_seed(ctx.seed, t, index))
                    batch = sample_labels(model, batch, ctx.model_kind, generator)
                with acc.autocast():
                    loss = ctx.loss_fn(model, batch)
                loss.backward()
                with torch.no_grad():
                    for n, p in named:
                        if p.grad is not None:
                            g = p.grad.float()
                            fisher[n].addcmul_(g, g)
                self._zero_grads(named)
                count += 1
        finally:
            model.train(was_training)
            self._zero_grads(named)
        if acc.num_processes > 1 and not sharded:
            fisher = {n: acc.reduce(f, reduction="sum") for n, f in fisher.items()}
            count = int(acc.reduce(torch.tensor(float(count), device=acc.device), reduction="sum").item())
        self.fisher_examples += len(chosen)
        return {n: f.div_(max(1, count)) for n, f in fisher.items()}

    @staticmethod
    def _zero_grads(named: list[tuple[str, nn.Parameter]]) -> None:
        for _, p in named:
            if p.grad is not None:
                p.grad.zero_()

    # -- bookkeeping ----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fishers": self.fishers, "anchors": self.anchors, "fisher_means": list(self.fisher_means),
                "fisher_seconds": self.fisher_seconds, "fisher_examples": self.fisher_examples,
                "grad_sq_sum": self.grad_sq_sum, "grad_steps": self.grad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        devices = {n: p.device for n, p in self.ctx.unwrapped_model.named_parameters()}

        def placed(pairs: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
            return [{n: v.to(devices[n], torch.float32) for n, v in d.items()} for d in pairs]

        self.fishers = placed(state.get("fishers", []))
        self.anchors = placed(state.get("anchors", []))
        self.fisher_means = list(state.get("fisher_means", []))
        self.fisher_seconds = float(state.get("fisher_seconds", 0.0))
        self.fisher_examples = int(state.get("fisher_examples", 0))
        self.grad_sq_sum = placed([state.get("grad_sq_sum", {})])[0]
        self.grad_steps = int(state.get("grad_steps", 0))

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.fishers) + tensor_bytes(self.anchors) + tensor_bytes(self.grad_sq_sum)

    def report(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "fisher": self.config.fisher, "granularity": self.config.granularity,
                "ewc_lambda": self.config.ewc_lambda, "normalize_fisher": self.config.normalize_fisher,
                "fisher_mean_per_task": list(self.fisher_means), "fisher_examples": self.fisher_examples,
                "fisher_seconds": round(self.fisher_seconds, 3)}


def hash_seed(seed: int, t: int, batch_index: int) -> int:
    """A 63-bit generator seed from (run seed, task, Fisher batch)."""
    return random.Random(f"{seed}:ewc-sample:{t}:{batch_index}").getrandbits(63)


def mean_of(fisher: dict[str, torch.Tensor]) -> float:
    count = global_numel(fisher.values())
    return global_sum(fisher.values()) / count if count else 0.0


def normalized_by_mean(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """F / mean(F) over every entry of every tensor, in place (left as is when the mean is 0)."""
    mean = mean_of(fisher)
    return {n: f.div_(mean) for n, f in fisher.items()} if mean > 0 else fisher
