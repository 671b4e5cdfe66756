"""Examples -> tensors, and the training loss, for each model kind.

Causal LMs see `prompt + answer + EOS` with the loss on the answer tokens (and EOS)
only; seq2seq models read the prompt and decode the answer; classifiers predict the
answer's class among the task's own labels (other classes are masked out).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from cl_runner.models.label_space import LabelSpace
from cl_runner.streams.task import Example

IGNORE = -100


class Collator:
    def __init__(self, kind: str, tokenizer: Any, max_length: int, label_space: Optional[LabelSpace] = None,
                 device: Any = "cpu") -> None:
        self.kind = kind
        self.tok = tokenizer
        self.max_length = max_length
        self.label_space = label_space
        self.device = device

    # -- training batches -----------------------------------------------------------
    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        if self.kind == "causal":
            batch = self._causal(examples)
        elif self.kind == "seq2seq":
            batch = self._seq2seq(examples)
        else:
            batch = self._classifier(examples)
        return {k: v.to(self.device) for k, v in batch.items()}

    def _prompt_ids(self, prompt: str) -> list[int]:
        ids = self.tok.encode(prompt)
        if self.kind == "causal" and self.tok.bos_token_id is not None:
            ids = [self.tok.bos_token_id] + ids
        return ids

    def _causal_answer(self, ex: Example) -> list[int]:
        return (self.tok.encode(ex.answer) + [self.tok.eos_token_id])[: self.max_length - 1]

    def _causal(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for ex in examples:
            prompt = self._prompt_ids(ex.prompt)
            answer = self._causal_answer(ex)
            # Keep the answer whole; cut the prompt from the left when too long.
            prompt = prompt[-(self.max_length - len(answer)):]
            rows.append(prompt + answer)
            labels.append([IGNORE] * len(prompt) + answer)
        return _pad_right(rows, labels, self.tok.pad_token_id)

    def _seq2seq(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        eos = self.tok.eos_token_id
        rows = [(self.tok.encode(ex.prompt)[: self.max_length - 1]) + [eos] for ex in examples]
        targets = [(self.tok.encode(ex.answer)[: self.max_length - 1]) + [eos] for ex in examples]
        batch = _pad_right(rows, None, self.tok.pad_token_id)
        width = max(len(t) for t in targets)
        batch["labels"] = torch.tensor([t + [IGNORE] * (width - len(t)) for t in targets])
        return batch

    def _classifier(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        enc = self.tok.hf([ex.prompt for ex in examples], truncation=True, max_length=self.max_length,
                          padding=True, return_tensors="pt")
        space = self.label_space
        mask = torch.zeros(len(examples), len(space), dtype=torch.bool)
        for i, ex in enumerate(examples):
            mask[i, space.task_class_ids(ex.task)] = True
        labels = torch.tensor([space.class_id(ex.task, ex.answer) for ex in examples])
        return {**dict(enc), "labels": labels, "label_mask": mask}

    # -- prompts that do not fit ---------------------------------------------------
    def count_cut(self, examples: list[Example], room: Optional[int] = None) -> int:
        """How many prompts of `examples` are cut to fit model.max_length: in training
        batches (`room` None; a causal prompt shares the length with its answer), or as
        generation inputs leaving `room` new tokens. Same arithmetic as the cutting."""
        if not examples:
            return 0
        if self.kind == "classifier":
            encoded = self.tok.hf([ex.prompt for ex in examples], truncation=False, verbose=False)
            return sum(len(ids) > self.max_length for ids in encoded["input_ids"])
        if self.kind == "seq2seq":
            return sum(len(self.tok.encode(ex.prompt)) > self.max_length - 1 for ex in examples)
        cut = 0
        for ex in examples:
            keep = self.max_length - len(self._causal_answer(ex)) if room is None else max(1, self.max_length - room)
            cut += len(self._prompt_ids(ex.prompt)) > keep
        return cut

    @property
    def cut_side(self) -> str:
        return "from the left: their start is dropped" if self.kind == "causal" else "at the end"

    # -- generation inputs (left-padded prompts) -------------------------------------
    def prompts(self, examples: list[Example], room: int) -> dict[str, torch.Tensor]:
        """Prompts for generation, cut from the left to leave `room` new tokens."""
        if self.kind == "seq2seq":
            eos = self.tok.eos_token_id
            rows = [(self.tok.encode(ex.prompt)[: self.max_length - 1]) + [eos] for ex in examples]
            return {k: v.to(self.device) for k, v in _pad_right(rows, None, self.tok.pad_token_id).items()}
        keep = max(1, self.max_length - room)
        rows = [self._prompt_ids(ex.prompt)[-keep:] for ex in examples]
        width = max(len(r) for r in rows)
        pad = self.tok.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        att = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        return {"input_ids": ids.to(self.device), "attention_mask": att.to(self.device)}


def _pad_right(rows: list[list[int]], labels: Optional[list[list[int]]], pad: int) -> dict[str, torch.Tensor]:
    width = max(len(r) for r in rows)
    out = {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
    }
    if labels is not None:
        out["labels"] = torch.tensor([l + [IGNORE] * (width - len(l)) for l in labels])
    return out


def masked_class_logits(logits: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    return logits.float().masked_fill(~label_mask, float("-inf"))


def compute_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean loss over the batch's answer tokens (LMs) or examples (classifiers)."""
    if "label_mask" in batch:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}
        logits = model(**inputs).logits
        return F.cross_entropy(masked_class_logits(logits, batch["label_mask"]), batch["labels"])
    return model(**batch).loss
