"""The unit of a stream: one task with train and test examples, a scorer and labels."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One record. `prompt` is the full model input (instruction included); `answer` the
    target text. For classification tasks `answer` is the label string."""

    prompt: str
    answer: str
    task: str = ""


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]
    scorer: str = "exact_match"
    # Label strings for classification-style tasks (O-LoRA); None for free generation.
    labels: list[str] | None = None
    # Generation budget for this task's answers at evaluation time.
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        if not self.test:
            raise ValueError(f"task '{self.name}': the test split is empty; a task needs test examples to be scored")


@dataclass
class TaskStream:
    name: str
    tasks: list[Task] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self):
        return iter(self.tasks)

    def __getitem__(self, i: int) -> Task:
        return self.tasks[i]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tasks]
