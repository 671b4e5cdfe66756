"""Model outputs for a task's test examples: generated text or the predicted label."""
from __future__ import annotations

from typing import Any

import torch

from cl_runner.models.batching import Collator, masked_class_logits
from cl_runner.streams.task import Example, Task


@torch.no_grad()
def predict(model: torch.nn.Module, collator: Collator, task: Task, examples: list[Example],
            decoding: Any, batch_size: int, synced: bool = False) -> list[str]:
    """Predictions for `examples` in order. `decoding` is the evaluation config. `synced`:
    every process generates in lock-step (a sharded model's forward is collective)."""
    was_training = model.training
    model.eval()
    # Batches of similar length pad less: the examples go through longest first (a memory
    # error shows at once) and the predictions come back in the caller's order.
    order = length_order(examples)
    out: list[str] = [""] * len(examples)
    try:
        for start in range(0, len(order), batch_size):
            positions = order[start:start + batch_size]
            chunk = [examples[i] for i in positions]
            if collator.kind == "classifier":
                predicted = _classify(model, collator, chunk)
            else:
                predicted = _generate(model, collator, task, chunk, decoding, synced)
            for i, text in zip(positions, predicted):
                out[i] = text
    finally:
        model.train(was_training)
    return out


def length_order(examples: list[Example]) -> list[int]:
    """Indices of `examples`, longest prompt first (characters: a proxy for tokens that needs
    no tokenizer). Ties keep their order, so every process of a run sorts alike."""
    return sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))


def _classify(model: torch.nn.Module, collator: Collator, chunk: list[Example]) -> list[str]:
    batch = collator(chunk)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "label_mask")}
    logits = masked_class_logits(model(**inputs).logits, batch["label_mask"])
    return [collator.label_space.label_of(int(i)) for i in logits.argmax(-1)]


def generation_budget(decoding: Any, task: Task) -> int:
    """New tokens generated per answer: evaluation.max_new_tokens, or (null) the task's own."""
    return decoding.max_new_tokens if decoding.max_new_tokens is not None else task.max_new_tokens


def _generate(model: torch.nn.Module, collator: Collator, task: Task, chunk: list[Example], decoding: Any,
              synced: bool = False) -> list[str]:
    tok = collator.tok
    budget = generation_budget(decoding, task)
    inputs = collator.prompts(chunk, room=budget)
    kwargs = dict(max_new_tokens=budget, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if synced:
        kwargs["synced_gpus"] = True
    if decoding.decoding == "sample":
        kwargs.update(do_sample=True, temperature=decoding.temperature, top_p=decoding.top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    generated = model.generate(**inputs, **kwargs)
    if collator.kind == "causal":
        generated = generated[:, inputs["input_ids"].shape[1]:]
    texts = []
    for row in generated.tolist():
        if collator.kind == "seq2seq" and row and row[0] == model.config.decoder_start_token_id:
            row = row[1:]
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode(row).strip())
    return texts
