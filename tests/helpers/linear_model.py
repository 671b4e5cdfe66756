"""A linear model with hand-checkable loss gradients, for the gradient-projection
strategies' unit tests (gem, agem, ogd).

y_hat = w1 x1 + w2 x2 with w1, w2 separate parameters (two tensors, so per-tensor rules
show); an example's prompt is "x1,x2", its answer y; loss = mean (y_hat - y)^2, so one
example's gradient is 2 (y_hat - y) (x1, x2).
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from torch import nn

from cl_runner.strategies.base import StrategyContext
from cl_runner.streams.task import Example, Task, TaskStream


class Linear2(nn.Module):
    def __init__(self, w1: float = 0.0, w2: float = 0.0) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor([w1]))
        self.w2 = nn.Parameter(torch.tensor([w2]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w1 * x[:, 0] + self.w2 * x[:, 1]


def collate(examples: list[Example]) -> dict[str, torch.Tensor]:
    x = torch.tensor([[float(v) for v in e.prompt.split(",")] for e in examples])
    return {"x": x, "y": torch.tensor([float(e.answer) for e in examples])}


def mse(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return (model(batch["x"]) - batch["y"]).pow(2).mean()


def ex(x1: float, x2: float, y: float) -> Example:
    return Example(f"{x1},{x2}", str(y))


def stream(*train: list[Example]) -> TaskStream:
    return TaskStream("s", [Task(f"t{i}", list(e), list(e)) for i, e in enumerate(train)])


def build(cls, config_cls, model: nn.Module, tasks: TaskStream, **options):
    strategy = cls(OmegaConf.structured(config_cls(**options)))
    strategy.setup(StrategyContext(
        accelerator=Accelerator(cpu=True), model=model, stream=tasks, model_kind="classifier", model_family="test",
        seed=0, trainer=SimpleNamespace(lr=1e-3, batch_size=2), loss_fn=mse, collate=collate))
    return strategy


def set_grad(model: Linear2, g1: float, g2: float) -> None:
    model.w1.grad = torch.tensor([g1])
    model.w2.grad = torch.tensor([g2])


def grad(model: Linear2) -> list[float]:
    return [float(model.w1.grad), float(model.w2.grad)]
