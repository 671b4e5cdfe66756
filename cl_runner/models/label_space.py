"""The class layout of an encoder classifier's head over a whole stream.

`label_string` (default): one class per distinct label string, shared by every task that
uses that string (QQP, BoolQA and WiC all answer True/False). `per_task`: each task gets
its own block of classes. Either way a task is scored, and trained, only over its own
labels, so the head's layout never tells the model which answer is right.
"""
from __future__ import annotations

from cl_runner.streams.task import TaskStream


class LabelSpace:
    def __init__(self, stream: TaskStream, sharing: str = "label_string") -> None:
        if sharing not in ("label_string", "per_task"):
            raise ValueError(f"model.head_sharing: {sharing!r}; choose label_string or per_task")
        self.sharing = sharing
        self.classes: list[tuple[str, str]] = []  # (owner, label); owner "" when shared
        self._index: dict[tuple[str, str], int] = {}
        self._task_labels: dict[str, list[str]] = {}
        for task in stream:
            if not task.labels:
                raise ValueError(
                    f"task '{task.name}' has no label set, but model.kind=classifier needs one; "
                    "use a causal or seq2seq model for generative tasks")
            self._task_labels[task.name] = list(task.labels)
            for label in task.labels:
                key = ("" if sharing == "label_string" else task.name, label)
                if key not in self._index:
                    self._index[key] = len(self.classes)
                    self.classes.append(key)

    def __len__(self) -> int:
        return len(self.classes)

    def class_id(self, task: str, label: str) -> int:
        key = ("" if self.sharing == "label_string" else task, label)
        if key not in self._index:
            raise ValueError(f"task '{task}': label {label!r} is not one of {self._task_labels.get(task)}")
        return self._index[key]

    def task_class_ids(self, task: str) -> list[int]:
        return [self.class_id(task, label) for label in self._task_labels[task]]

    def label_of(self, class_id: int) -> str:
        return self.classes[class_id][1]
