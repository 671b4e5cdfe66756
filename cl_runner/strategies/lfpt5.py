"""LFPT5 (Qin & Joty 2022, ICLR, arXiv 2110.07298; authors' code qcwthu/Lifelong-Fewshot-Language-
Learning; TRACE's version model/Replay/LFPT5.py): prompt tuning of a frozen backbone that is
also trained as a generator of its own tasks' examples, and replays what it generates.

One soft prompt (model.prompt, prompt tuning) trains throughout. Every micro-batch's loss is

    L_task + lm_lambda * L_gen + kd_lambda / (1 - kd_lambda) * KL(p_prev || p_cur),

* L_gen: the same examples as generation targets after their task's marker
  ("__gen__ <task>" -> "<prompt> __ans__ <answer>", parts/generative_replay.py), so the model
  learns to write each task's examples.
* KL (from the second task on): on the new task's own examples (not the pseudo ones), the
  answer-token distributions of the prompt as the task started (frozen) against the current
  prompt's, per example (summed over its answer tokens, averaged over the examples); the
  authors' label-consistency term. The authors weigh (1 - kd)(L_task + L_gen) + kd * KL;
  dividing by the constant (1 - kd) gives the form above, the same minimiser and, under
  Adam, the same steps up to epsilon.
* Before task t >= 1, pseudo examples of every earlier task are generated (sampled, top-k
  64 as the authors' `_generative_samples`) from its marker and kept when they parse with a
  known label; ceil(pseudo_ratio * |new task|) in all, split evenly (LAMOL's gamma), mixed
  into the new task's examples (so the task's steps cover them, as the authors concatenate
  them with the new data).

For causal LMs this is LAMOL-style generative replay on a prompted model: the marker and the
sample are one sequence, the loss on the sample. `pseudo_inputs: stored` is TRACE's version:
the earlier tasks' real inputs are replayed with the model's own answers (TRACE takes the
earlier tasks' test inputs; here their training inputs, so no test input is trained on), no
generation objective needed (set lm_lambda=0 for TRACE's loss, which has no KL either:
kd_lambda=0; `configs/strategy/lfpt5_trace.yaml`). An encoder classifier cannot generate, so
the registration names the model kinds it runs on.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cl_runner.errors import require, require_choice
from cl_runner.models.prompts import SinglePrompt
from cl_runner.strategies.base import Batch, StrategyContext, tensor_bytes
from cl_runner.strategies.lwf import distillation_kl, distilled_rows, frozen_logits, model_inputs
from cl_runner.strategies.memory import FP32, PlanInputs, StrategyEstimate, count
from cl_runner.strategies.parts.generative_replay import (
    generate_texts,
    generation_example,
    parse_generated,
    pseudo_quota,
    task_marker,
)
from cl_runner.strategies.parts.prompt_strategy import NO_ADAPTERS, NO_SHARDING, PromptStrategy
from cl_runner.strategies.registry import register
from cl_runner.streams.task import Example, Task

PSEUDO_INPUTS = ("generated", "stored")
SAMPLES_SHOWN = 3  # generated texts kept per earlier task for the report
# Inner phases scripts/profile_strategy.py times ({method: phase name}).
PHASES = {"_make_pseudo": "lfpt5/pseudo_examples", "_generation_loss": "lfpt5/generation_objective",
          "_label_consistency": "lfpt5/kl"}


@dataclass
class LFPT5Config:
    name: str = "lfpt5"
    # Weight of the generation objective (the authors' Classification.sh: lm_lambda 0.25).
    lm_lambda: float = 0.25
    # The label-consistency KL's share (the authors' kd_lamda 0.01), in [0, 1).
    kd_lambda: float = 0.01
    # Pseudo examples made before a task, as a fraction of its training examples, split
    # over the earlier tasks (LAMOL's gamma 0.2; the authors keep 2 per class of a 16-shot task).
    pseudo_ratio: float = 0.2
    # generated: the model writes input and answer from the task marker (the paper) | stored:
    # earlier tasks' real training inputs with the model's greedy answers (TRACE).
    pseudo_inputs: str = "generated"
    # Sampling of generated examples (the authors: top-k 64, temperature 1).
    top_k: int = 64
    temperature: float = 1.0
    # Rounds of sampling to fill a task's quota (each samples what is still missing, twice over).
    generation_rounds: int = 3
    generation_batch_size: int = 16
    # New tokens a sample may have (input, marker and answer); null = what model.max_length
    # leaves after the task marker. Sampling costs one decoding step per token.
    max_sample_tokens: Optional[int] = None


@register("lfpt5", config=LFPT5Config,
          summary="LFPT5: prompt tuning that also trains the model to generate each task's examples and replays "
                  "generated pseudo examples of earlier tasks, with a KL to the previous prompt",
          adapters=NO_ADAPTERS, sharding=NO_SHARDING, model_kinds=("causal", "seq2seq"),
          example=("model.prompt.length=2", "strategy.pseudo_ratio=0.5", "strategy.generation_rounds=1"))
class LFPT5(PromptStrategy):
    # TRACE and the authors: 300 virtual tokens (configs/strategy/lfpt5.yaml).
    suggested_length = 300

    def __init__(self, config: LFPT5Config) -> None:
        super().__init__(config)
        require(0 <= config.lm_lambda < float("inf"), "strategy.lm_lambda", config.lm_lambda,
                "use a finite value >= 0 (the authors: 0.25)")
        require(0 <= config.kd_lambda < 1, "strategy.kd_lambda", config.kd_lambda,
                "use a value in [0, 1) (the authors: 0.01)")
        require(0 <= config.pseudo_ratio < float("inf"), "strategy.pseudo_ratio", config.pseudo_ratio,
                "use a finite value >= 0 (LAMOL: 0.2; 0 = no replay)")
        require_choice(config.pseudo_inputs, "strategy.pseudo_inputs", PSEUDO_INPUTS)
        require(config.top_k >= 1, "strategy.top_k", config.top_k, "use a positive top-k (the authors: 64)")
        require(0 < config.temperature < float("inf"), "strategy.temperature", config.temperature,
                "use a finite temperature > 0")
        require(config.generation_rounds >= 1, "strategy.generation_rounds", config.generation_rounds,
                "use at least one round")
        require(config.generation_batch_size >= 1, "strategy.generation_batch_size", config.generation_batch_size,
                "use a positive batch size")
        require(config.max_sample_tokens is None or config.max_sample_tokens >= 1, "strategy.max_sample_tokens",
                config.max_sample_tokens, "use a positive count, or null for what model.max_length leaves")
        self.task = 0
        self.pseudo: dict[int, list[Example]] = {}  # task -> the pseudo examples mixed into it
        self.counts: dict[int, dict[str, dict[str, int]]] = {}  # task -> earlier task -> asked/sampled/kept
        # task -> earlier task -> the first samples as generated (why few parse, at a glance)
        self.samples: dict[int, dict[str, list[str]]] = {}
        self.teacher: Optional[dict[str, torch.Tensor]] = None  # the prompt as the task started
        self._captured: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self._own_forward = False
        self._hook = None

    def _owns(self, source: nn.Module) -> bool:
        return isinstance(source, SinglePrompt)

    def setup(self, ctx: StrategyContext) -> None:
        super().setup(ctx)
        if self._hook is not None:
            self._hook.remove()
        self._hook = ctx.unwrapped_model.register_forward_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
        # The loss's forward of a training micro-batch: its logits are the KL's student.
        if self._own_forward or self.teacher is None or not module.training or not torch.is_grad_enabled():
            return
        ids, logits = kwargs.get("input_ids"), getattr(output, "logits", None)
        self._captured = (ids, logits) if ids is not None and logits is not None else None

    # -- data -----------------------------------------------------------------------------
    def before_task(self, t: int, task: Task) -> None:
        self.task = t
        self.teacher = {n: p.detach().clone() for n, p in self.ctx.unwrapped_model.named_parameters()
                        if p.requires_grad} if t >= 1 else None
        if t >= 1 and self.config.pseudo_ratio > 0 and t not in self.pseudo:
            self.pseudo[t] = self._make_pseudo(t, len(task.train))

    def train_examples(self, t: int, task: Task, examples: list[Example]) -> list[Example]:
        return list(examples) + self.pseudo.get(t, [])

    def _make_pseudo(self, t: int, new_examples: int) -> list[Example]:
        quota = pseudo_quota(new_examples, self.config.pseudo_ratio, t)
        made: list[Example] = []
        self.counts[t], self.samples[t] = {}, {}
        for k, wanted in enumerate(quota):
            earlier = self.ctx.stream[k]
            seed = self.ctx.seed * 1_000_003 + t * 1_000 + k
            if self.config.pseudo_inputs == "generated":
                examples, sampled = self._sampled(earlier, wanted, seed)
            else:
                examples, sampled = self._answered(earlier, wanted, seed), wanted
            self.counts[t][earlier.name] = {"asked": wanted, "sampled": sampled, "kept": len(examples)}
            made += examples
        return made

    def _sampled(self, earlier: Task, wanted: int, seed: int) -> tuple[list[Example], int]:
        """Up to `wanted` parsed samples of the earlier task, in generation_rounds rounds."""
        cfg, collate = self.config, self.ctx.collate
        kept: list[Example] = []
        sampled = 0
        budget = max(1, collate.max_length - len(collate.tok.encode(task_marker(earlier.name))) - 1)
        if cfg.max_sample_tokens is not None:
            budget = min(budget, cfg.max_sample_tokens)
        for round_ in range(cfg.generation_rounds):
            missing = wanted - len(kept)
            if missing <= 0:
                break
            asked = 2 * missing  # samples fail to parse; ask for more than is missing
            texts = generate_texts(self.ctx.unwrapped_model, collate, [task_marker(earlier.name)] * asked, budget,
                                   sample=True, top_k=cfg.top_k, temperature=cfg.temperature, seed=seed + round_,
                                   batch_size=cfg.generation_batch_size)
            sampled += len(texts)
            self.samples.setdefault(self.task, {}).setdefault(earlier.name, []).extend(
                texts[:SAMPLES_SHOWN - len(self.samples.get(self.task, {}).get(earlier.name, []))])
            for text in texts:
                example = parse_generated(text, earlier.name, earlier.labels)
                if example is not None and len(kept) < wanted:
                    kept.append(example)
        return kept, sampled

    def _answered(self, earlier: Task, wanted: int, seed: int) -> list[Example]:
        """TRACE's pseudo data: real inputs of the earlier task with the model's answers."""
        chosen = random.Random(seed).sample(earlier.train, min(wanted, len(earlier.train)))
        answers = generate_texts(self.ctx.unwrapped_model, self.ctx.collate, [ex.prompt for ex in chosen],
                                 earlier.max_new_tokens, sample=False, top_k=self.config.top_k, temperature=1.0,
                                 seed=seed, batch_size=self.config.generation_batch_size)
        return [Example(prompt=ex.prompt, answer=a, task=earlier.name) for ex, a in zip(chosen, answers) if a]

    # -- loss -----------------------------------------------------------------------------
    def penalty(self, model: nn.Module, batch: Batch) -> Optional[torch.Tensor]:
        captured, self._captured = self._captured, None
        examples = self.ctx.batch_examples
        terms = []
        if self.teacher is not None and self.config.kd_lambda > 0 and examples is not None:
            real = torch.tensor([ex.task == self.ctx.stream[self.task].name for ex in examples])
            if bool(real.any()):
                weight = self.config.kd_lambda / (1.0 - self.config.kd_lambda)
                terms.append(weight * self._label_consistency(captured, batch, real))
        if self.config.lm_lambda > 0 and examples:
            terms.append(self.config.lm_lambda * self._generation_loss(examples))
        return sum(terms) if terms else None

    def _generation_loss(self, examples: list[Example]) -> torch.Tensor:
        collate = self.ctx.collate
        targets = [generation_example(ex, ex.task, collate.tok, collate.max_length) for ex in examples]
        self._own_forward = True
        try:
            return self.ctx.loss_fn(self.ctx.unwrapped_model, collate(targets))
        finally:
            self._own_forward = False

    def _label_consistency(self, captured: Optional[tuple[torch.Tensor, torch.Tensor]], batch: Batch,
                           real: torch.Tensor) -> torch.Tensor:
        """sum over the real examples' answer tokens of KL(p_prev || p_cur), / their count."""
        kind, model = self.ctx.model_kind, self.ctx.unwrapped_model
        ids = batch["input_ids"]
        if captured is not None and captured[0].data_ptr() == ids.data_ptr() and captured[0].shape == ids.shape:
            student = captured[1]
        else:
            self._own_forward = True
            try:
                student = model(**model_inputs(batch, kind)).logits
            finally:
                self._own_forward = False
        self._own_forward = True
        try:
            teacher = frozen_logits(model, self.teacher, batch, kind)
        finally:
            self._own_forward = False
        if kind == "causal":  # the virtual tokens come first: drop their logits
            student, teacher = student[:, -ids.shape[1]:], teacher[:, -ids.shape[1]:]
        real = real.to(ids.device)
        rows = {k: v[real] for k, v in batch.items()}
        new, _ = distilled_rows(student[real], rows, kind, "answer")
        old, _ = distilled_rows(teacher[real], rows, kind, "answer")
        if new.shape[0] == 0:
            return student.float().sum() * 0.0
        return distillation_kl(new, old, 1.0, "standard").sum() / int(real.sum())

    # -- cost and bookkeeping ---------------------------------------------------------------
    def memory_estimate(self, inputs: PlanInputs) -> StrategyEstimate:
        cfg = inputs.cfg
        width, length = inputs.facts.hidden, int(cfg.model.prompt.length)
        prompt = length * width
        rows = int(cfg.trainer.batch_size) * int(cfg.model.max_length)
        transient = 3 * FP32 * rows * inputs.facts.vocab
        return StrategyEstimate(
            self.name, state_bytes=2 * prompt * FP32, transient_bytes=transient, trainable_params=prompt,
            notes=[f"{self.name}: one prompt of {length} vectors ({count(prompt)} fp32, the only weights that "
                   "train) and its copy as the task started (the KL's teacher); pseudo examples are text in host "
                   "memory"],
            transient_note="per micro-batch: the teacher's logits and both log-softmaxes (fp32); not counted: the "
                           "generation objective's forward, alive with the task's until backward (its activations "
                           "about equal the task's row)")

    def extra_state_bytes(self) -> int:
        return tensor_bytes(self.teacher) if self.teacher else 0

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "teacher": self.teacher, "counts": self.counts, "samples": self.samples,
                "pseudo": {t: [(ex.prompt, ex.answer, ex.task) for ex in made] for t, made in self.pseudo.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task = int(state.get("task", 0))
        self.counts = {int(t): c for t, c in state.get("counts", {}).items()}
        self.samples = {int(t): c for t, c in state.get("samples", {}).items()}
        self.pseudo = {int(t): [Example(prompt=p, answer=a, task=n) for p, a, n in made]
                       for t, made in state.get("pseudo", {}).items()}
        saved = state.get("teacher")
        if saved is None:
            self.teacher = None
            return
        params = dict(self.ctx.unwrapped_model.named_parameters())
        self.teacher = {n: v.to(device=params[n].device, dtype=params[n].dtype, copy=True) for n, v in saved.items()}

    def report(self) -> dict[str, Any]:
        names = self.ctx.stream.names if self.ctx is not None else []
        return {"pseudo_inputs": self.config.pseudo_inputs, "pseudo_ratio": self.config.pseudo_ratio,
                "lm_lambda": self.config.lm_lambda, "kd_lambda": self.config.kd_lambda,
                "pseudo_examples": {(names[t] if t < len(names) else str(t)): c for t, c in sorted(self.counts.items())},
                "generated_samples": {(names[t] if t < len(names) else str(t)): c
                                      for t, c in sorted(self.samples.items())}}
