"""Evaluation: item-level scorers and the continual-learning metrics of the matrix R."""
from cl_runner.evaluation.metrics import (
    accuracy_curve,
    accuracy_matrix,
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    forgetting,
    forgetting_per_task,
    forward_transfer,
    learning_accuracy,
    summarize,
)
from cl_runner.evaluation.scorers import SCORERS, get_scorer, score

__all__ = [
    "SCORERS",
    "accuracy_curve",
    "accuracy_matrix",
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "forgetting",
    "forgetting_per_task",
    "forward_transfer",
    "get_scorer",
    "learning_accuracy",
    "score",
    "summarize",
]
