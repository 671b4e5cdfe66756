"""Evaluation batches go through longest first; the predictions come back in the caller's order."""
from types import SimpleNamespace

import torch

from cl_runner.evaluation import predict as predict_module
from cl_runner.streams.task import Example, Task


def test_batches_are_length_sorted_and_predictions_keep_the_callers_order(monkeypatch):
    prompts = ["bb", "a", "dddd", "ccc", "eeeee", "f"]
    examples = [Example(prompt=p, answer=f"answer of {p}") for p in prompts]
    batches = []

    def fake_classify(model, collator, chunk):
        batches.append([e.prompt for e in chunk])
        return [e.answer for e in chunk]

    monkeypatch.setattr(predict_module, "_classify", fake_classify)
    model = torch.nn.Linear(1, 1)
    model.train()
    out = predict_module.predict(model, SimpleNamespace(kind="classifier"), Task(name="t", train=[], test=examples),
                                 examples, decoding=None, batch_size=4)
    assert out == [e.answer for e in examples]
    assert batches == [["eeeee", "dddd", "ccc", "bb"], ["a", "f"]]  # ties ("a", "f") keep their order
    assert model.training  # the model's mode is given back


def test_length_order_of_no_examples_is_empty():
    assert predict_module.length_order([]) == []
