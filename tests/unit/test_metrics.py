"""CL metrics on small matrices whose values are worked out by hand in the comments.

Rows: 0 = before training, i = after task i. Columns: tasks 1..T.
"""
import json
import math

import numpy as np
import pytest

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

# Three tasks a, b, c.
R3 = [
    [0.2, 0.1, 0.3],  # before
    [0.8, 0.2, 0.4],  # after a
    [0.6, 0.9, 0.5],  # after b
    [0.7, 0.6, 1.0],  # after c
]
NAMES = ["a", "b", "c"]


def test_acc_is_mean_of_last_row():
    # (0.7 + 0.6 + 1.0) / 3
    assert average_accuracy(R3) == pytest.approx(2.3 / 3)


def test_accuracy_curve():
    # ACC_1 = 0.8; ACC_2 = (0.6 + 0.9) / 2 = 0.75; ACC_3 = 2.3 / 3
    assert accuracy_curve(R3) == pytest.approx([0.8, 0.75, 2.3 / 3])


def test_average_incremental_accuracy():
    assert average_incremental_accuracy(R3) == pytest.approx((0.8 + 0.75 + 2.3 / 3) / 3)


def test_backward_transfer():
    # ((0.7 - 0.8) + (0.6 - 0.9)) / 2 = -0.2
    assert backward_transfer(R3) == pytest.approx(-0.2)


def test_forward_transfer():
    # ((R[1,b] - R[0,b]) + (R[2,c] - R[0,c])) / 2 = ((0.2 - 0.1) + (0.5 - 0.3)) / 2 = 0.15
    assert forward_transfer(R3) == pytest.approx(0.15)


def test_forgetting_of_one_task():
    assert forgetting(R3, 1, 2) == pytest.approx(0.8 - 0.6)
    assert forgetting(R3, 1, 3) == pytest.approx(0.8 - 0.7)  # best so far was 0.8
    assert forgetting(R3, 2, 3) == pytest.approx(0.9 - 0.6)


def test_average_forgetting_and_per_task():
    # (0.1 + 0.3) / 2
    assert average_forgetting(R3) == pytest.approx(0.2)
    per_task = forgetting_per_task(R3, NAMES)
    assert list(per_task) == NAMES
    assert per_task["a"] == pytest.approx(0.1) and per_task["b"] == pytest.approx(0.3)
    assert per_task["c"] is None


def test_learning_accuracy():
    # diagonal (0.8 + 0.9 + 1.0) / 3
    assert learning_accuracy(R3) == pytest.approx(0.9)


def test_forgetting_differs_from_minus_bwt():
    # Task a improves while b is learned (0.5 -> 0.9), then drops to 0.6.
    R = [
        [0.1, 0.1, 0.1],
        [0.5, 0.1, 0.1],
        [0.9, 0.8, 0.1],
        [0.6, 0.7, 0.9],
    ]
    # BWT compares with the diagonal: ((0.6 - 0.5) + (0.7 - 0.8)) / 2 = 0
    assert backward_transfer(R) == pytest.approx(0.0, abs=1e-12)
    # F compares with the best: ((0.9 - 0.6) + (0.8 - 0.7)) / 2 = 0.2
    assert average_forgetting(R) == pytest.approx(0.2)
    assert forgetting(R, 1, 3) == pytest.approx(0.3)


def test_forgetting_ignores_rows_before_the_task_was_learned():
    # Task b scores 0.9 before it is learned (row 1) and 0.5 after learning it: that
    # early 0.9 is not "forgotten".
    R = [
        [0.0, 0.0],
        [1.0, 0.9],
        [1.0, 0.5],
    ]
    assert forgetting(R, 1, 2) == pytest.approx(0.0)


def test_summarize_keys_and_values():
    s = summarize(R3, NAMES)
    assert set(s) == {"ACC", "BWT", "FWT", "forgetting", "forgetting_per_task", "LA", "ACC_per_step", "AIA"}
    assert s["ACC"] == pytest.approx(2.3 / 3)
    assert s["BWT"] == pytest.approx(-0.2)
    assert s["FWT"] == pytest.approx(0.15)
    assert s["forgetting"] == pytest.approx(0.2)
    assert s["LA"] == pytest.approx(0.9)
    assert s["ACC_per_step"] == pytest.approx([0.8, 0.75, 2.3 / 3])
    assert s["forgetting_per_task"]["c"] is None
    assert all(isinstance(v, float) for v in (s["ACC"], s["BWT"], s["FWT"], s["LA"], s["AIA"]))


def test_single_task_has_no_bwt_fwt_forgetting():
    s = summarize([[0.3], [0.9]], ["only"])
    assert s["ACC"] == pytest.approx(0.9) and s["LA"] == pytest.approx(0.9)
    assert s["ACC_per_step"] == pytest.approx([0.9]) and s["AIA"] == pytest.approx(0.9)
    assert s["BWT"] is None and s["FWT"] is None and s["forgetting"] is None
    assert s["forgetting_per_task"] == {"only": None}
    text = json.dumps(s, allow_nan=False)  # null, never NaN
    assert '"BWT": null' in text and '"forgetting": null' in text


def test_run_in_progress_gives_none_not_nan():
    # Tasks a done; b and c not yet trained.
    R = [
        [0.2, 0.1, 0.3],
        [0.8, 0.2, 0.4],
        [None, None, None],
        [math.nan, math.nan, math.nan],
    ]
    s = summarize(R, NAMES)
    assert s["ACC_per_step"][0] == pytest.approx(0.8)
    assert s["ACC_per_step"][1:] == [None, None]
    for key in ("ACC", "BWT", "FWT", "forgetting", "LA", "AIA"):
        assert s[key] is None, key
    assert forgetting(R, 1, 2) is None
    json.dumps(s, allow_nan=False)


def test_missing_upper_triangle_only_affects_fwt():
    # Only seen tasks evaluated: no scores on future tasks, no base row.
    R = [[None, None, None]] + [[v if j < i else None for j, v in enumerate(row)] for i, row in enumerate(R3[1:], 1)]
    assert forward_transfer(R) is None
    assert average_accuracy(R) == pytest.approx(2.3 / 3)
    assert backward_transfer(R) == pytest.approx(-0.2)
    assert average_forgetting(R) == pytest.approx(0.2)
    assert accuracy_curve(R) == pytest.approx([0.8, 0.75, 2.3 / 3])


def test_accepts_numpy_arrays():
    assert average_accuracy(np.array(R3)) == pytest.approx(2.3 / 3)


def test_shape_is_validated():
    with pytest.raises(ValueError, match=r"\(T\+1\) x T accuracy matrix.*got shape \(3, 3\)"):
        average_accuracy([[0.1] * 3] * 3)
    with pytest.raises(ValueError, match=r"\(T\+1\) x T.*got shape \(3,\)"):
        summarize([0.1, 0.2, 0.3], NAMES)
    with pytest.raises(ValueError, match=r"\(T\+1\) x T"):
        accuracy_matrix([[0.1, 0.2], [0.3]])  # ragged
    with pytest.raises(ValueError, match=r"\(T\+1\) x T"):
        accuracy_matrix(np.zeros((1, 0)))


def test_scores_must_be_on_unit_scale():
    with pytest.raises(ValueError, match=r"R\[1, 0\] = 80 is outside \[0, 1\].*divide percentages by 100"):
        average_accuracy([[0.1], [80.0]])


def test_forgetting_indices_are_checked():
    for j, k in [(3, 3), (0, 2), (2, 1), (1, 4)]:
        with pytest.raises(ValueError, match="1 <= j < k <= T = 3"):
            forgetting(R3, j, k)


def test_task_names_are_checked():
    with pytest.raises(ValueError, match="2 names but R has T = 3"):
        summarize(R3, ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        summarize(R3, ["a", "a", "b"])
