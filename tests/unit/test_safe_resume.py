"""Checkpoints are plain data, read with torch.load(weights_only=True): a file holding any
other pickled object is refused (and never run), an unreadable one is passed over for the
one before it, and RNG states and strategy states survive the restricted loading."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from cl_runner.checkpoints.files import (
    CorruptCheckpointError,
    Progress,
    UnsafeCheckpointError,
    load_checkpoint,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(torch.rand(1))


def save(folder, task: int, step: int = 0, done: bool = False, keep: int = 3):
    progress = Progress(task=task, step=step, task_done=done, R=[[0.5, None], [None, None], [None, None]])
    return save_checkpoint(folder, progress, {"w": torch.full((3,), float(task * 10 + step))}, None, None,
                           {"seq_ft": {}, "replay": {"buffer": {0: [["p", "a", "t"]]}}}, keep=keep)


class RunsCode:
    """What a tampered checkpoint could hold: unpickling it calls os.system."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_rng_states_are_plain_data_and_restore_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = draws()
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # torch's own allow-list, nothing added
    draws()
    set_rng_state(loaded)
    assert draws() == expected


def test_a_checkpoint_written_with_numpys_array_state_still_resumes(tmp_path):
    """Checkpoints from before the plain RNG states hold numpy's state as an ndarray:
    exactly numpy's array-rebuilding types are allowed for it."""
    np.random.seed(5)
    payload = {"progress": {"task": 0}, "model": {}, "optimizer": None, "scheduler": None, "strategy": {},
               "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}}
    torch.save(payload, tmp_path / "task000_done.pt")
    expected = float(np.random.rand())
    set_rng_state(load_checkpoint(tmp_path / "task000_done.pt")["rng"])
    assert float(np.random.rand()) == expected


def test_a_pickled_object_is_refused_naming_the_file_and_never_run(tmp_path):
    folder = tmp_path / "checkpoints"
    save(folder, 0, done=True)
    marker = tmp_path / "ran"
    torch.save({"progress": {}, "model": {}, "optimizer": None, "scheduler": None, "strategy": RunsCode(marker),
                "rng": {}}, folder / "task001_done.pt")
    with pytest.raises(UnsafeCheckpointError) as err:
        load_latest_checkpoint(folder, say=pytest.fail)  # no fall-back past a tampered file
    message = str(err.value)
    assert "task001_done.pt" in message and "refused" in message and "system" in message, message
    assert "\n" not in message
    assert not marker.exists()


def test_a_truncated_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path):
    folder = tmp_path / "checkpoints"
    save(folder, 0, done=True)
    save(folder, 1, step=2)
    newest = save(folder, 1, done=True)
    newest.write_bytes(newest.read_bytes()[:1000])
    said = []
    path, payload = load_latest_checkpoint(folder, say=said.append)
    assert path.name == "task001_0000002.pt" and payload["progress"] == Progress(
        task=1, step=2, R=[[0.5, None], [None, None], [None, None]])
    assert payload["strategy"]["replay"]["buffer"] == {0: [["p", "a", "t"]]}
    assert len(said) == 1 and "task001_done.pt" in said[0] and "falling back" in said[0] and "task001_0000002.pt" in said[0]


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 10])
def test_an_unreadable_checkpoint_with_none_before_it_is_a_one_line_error(tmp_path, content):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "task000_done.pt").write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as err:
        load_latest_checkpoint(folder, say=pytest.fail)
    message = str(err.value)
    assert "task000_done.pt" in message and "no earlier checkpoint" in message and "\n" not in message, message


def test_a_file_that_is_no_cl_run_checkpoint_is_unreadable(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "task000_done.pt")
    with pytest.raises(CorruptCheckpointError, match="not a cl-run checkpoint"):
        load_checkpoint(tmp_path / "task000_done.pt")


def test_the_next_save_after_a_fall_back_drops_the_unreadable_file(tmp_path):
    folder = tmp_path / "checkpoints"
    save(folder, 0, done=True)
    save(folder, 1, step=2)
    bad = save(folder, 1, done=True)
    bad.write_bytes(b"")
    save(folder, 1, step=4)  # the resumed run moves on from task001_0000002
    assert sorted(p.name for p in folder.glob("*.pt")) == ["task000_done.pt", "task001_0000002.pt", "task001_0000004.pt"]


def test_replay_buffer_state_survives_weights_only_loading(tmp_path):
    from tests.unit.test_replay import after_two_tasks, make

    s = after_two_tasks(ratio=0.25)
    torch.save(s.state_dict(), tmp_path / "state.pt")
    resumed = make(ratio=0.25)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert resumed.buffer == s.buffer
