"""Generative replay with the model itself as the data generator (LAMOL, Sun et al. 2020;
LFPT5, Qin & Joty 2022): the model learns, beside each task, to write that task's examples
after a task marker; before a new task it writes pseudo examples of the earlier tasks, which
are mixed into the new task's training data.

The generation format (text, so every model kind and tokenizer can use it; LFPT5 adds a new
token per task, which would grow the embedding table of a frozen backbone):

    input  "__gen__ <task name>"
    target "<the example's prompt> __ans__ <the example's answer>"

A generated text is kept as a pseudo example when it has exactly one answer marker, a
non-empty prompt before it and an answer after it that is one of the task's labels (for a
classification task; any non-empty answer otherwise), as LFPT5's generation keeps only
samples whose answer is a known label.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from cl_runner.streams.task import Example

GEN_MARKER = "__gen__"
ANSWER_MARKER = "__ans__"


def task_marker(task_name: str) -> str:
    return f"{GEN_MARKER} {task_name}"


def generation_example(example: Example, task_name: str, tok: Any = None, max_length: Optional[int] = None) -> Example:
    """The example as a generation target after its task's marker. With a tokenizer and a
    length, the example's prompt is cut at its end so that marker, prompt, answer marker and
    answer fit `max_length` tokens (the label must survive a cut: a sample without it is
    thrown away)."""
    tail = f" {ANSWER_MARKER} {example.answer}"
    prompt = example.prompt
    if tok is not None and max_length is not None:
        # bos + marker + (prompt) + tail + eos within max_length
        room = max_length - len(tok.encode(task_marker(task_name))) - len(tok.encode(tail)) - 2
        ids = tok.encode(prompt)
        if len(ids) > room:
            prompt = tok.decode(ids[:max(room, 0)])
    return Example(prompt=task_marker(task_name), answer=f"{prompt}{tail}", task=example.task)


def parse_generated(text: str, task_name: str, labels: Optional[list[str]]) -> Optional[Example]:
    """A generated text -> a pseudo example of the task, or None when it is unusable."""
    parts = text.split(ANSWER_MARKER)
    if len(parts) != 2:
        return None
    prompt, answer = parts[0].strip(), parts[1].strip()
    if prompt.startswith(task_marker(task_name)):  # a model that echoes its marker
        prompt = prompt[len(task_marker(task_name)):].strip()
    if not prompt or not answer:
        return None
    if labels is not None and answer not in labels:
        return None
    return Example(prompt=prompt, answer=answer, task=task_name)


def pseudo_quota(new_examples: int, ratio: float, earlier_tasks: int) -> list[int]:
    """Pseudo examples to make of each earlier task: ceil(ratio * new_examples) in all (LAMOL's
    gamma), split as evenly as possible, the earlier tasks getting the remainder."""
    if earlier_tasks <= 0:
        return []
    total = math.ceil(ratio * new_examples - 1e-9)
    base, extra = divmod(total, earlier_tasks)
    return [base + (1 if k < extra else 0) for k in range(earlier_tasks)]


@torch.no_grad()
def generate_texts(model: torch.nn.Module, collate: Any, prompts: list[str], max_new_tokens: int, *,
                   sample: bool, top_k: int, temperature: float, seed: int, batch_size: int) -> list[str]:
    """The model's continuations of `prompts` (eval mode, seeded: the same texts on every
    process and after a resume). Greedy when `sample` is False."""
    tok = collate.tok
    was_training = model.training
    model.eval()
    texts: list[str] = []
    devices = [torch.device(collate.device)] if str(collate.device).startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = [Example(prompt=p, answer="") for p in prompts[start:start + batch_size]]
                inputs = collate.prompts(chunk, room=max_new_tokens)
                kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)
                if sample:
                    kwargs.update(do_sample=True, top_k=top_k, temperature=temperature, top_p=None)
                else:
                    kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                out = model.generate(**inputs, **kwargs)
                if collate.kind == "causal":
                    out = out[:, inputs["input_ids"].shape[1]:]
                for row in out.tolist():
                    start_id = getattr(getattr(model, "config", None), "decoder_start_token_id", None)
                    if collate.kind == "seq2seq" and row and row[0] == start_id:
                        row = row[1:]
                    if tok.eos_token_id in row:
                        row = row[:row.index(tok.eos_token_id)]
                    texts.append(tok.decode(row).strip())
    finally:
        model.train(was_training)
    return texts
