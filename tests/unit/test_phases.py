"""training/phases.py: phases count nothing unless recording, nest, and see memory peaks."""
import time

import pytest

from cl_runner.training.phases import current_peak_bytes, is_recording, phase, recording


def test_phase_is_free_and_silent_outside_a_recording():
    assert not is_recording()
    with phase("forward"):
        pass
    with recording() as table:
        pass
    assert table.phases == {}


def test_phases_sum_calls_and_seconds_and_nest():
    with recording() as table:
        for _ in range(3):
            with phase("step"):
                with phase("step/inner"):
                    time.sleep(0.01)
    step, inner = table.phases["step"], table.phases["step/inner"]
    assert (step.calls, inner.calls) == (3, 3)
    assert inner.seconds >= 0.03
    assert step.seconds >= inner.seconds  # the inner phase's time is inside the outer one's
    assert not is_recording()


def test_one_recording_at_a_time():
    with recording():
        with pytest.raises(RuntimeError, match="already active"):
            with recording():
                pass


@pytest.mark.skipif(current_peak_bytes() is None, reason="no /proc/self/status VmHWM on this system")
def test_cpu_peak_sees_a_large_allocation_and_the_outer_phase_keeps_it():
    import numpy as np

    with recording() as table:
        with phase("outer"):
            with phase("big"):
                block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
                del block
            with phase("small"):
                pass
    big, small, outer = (table.phases[n].peak_bytes for n in ("big", "small", "outer"))
    if small >= big:  # the reset did not take (no clear_refs): peaks then span the process
        pytest.skip("this kernel does not reset VmHWM through /proc/self/clear_refs")
    assert big - small >= 48 * 2**20
    assert outer >= big


def test_a_phase_knows_the_phase_it_first_ran_in():
    with recording() as table:
        with phase("outer"):
            with phase("inner"):
                pass
        with phase("inner"):  # later calls elsewhere keep the first parent
            pass
    assert table.phases["inner"].parent == "outer" and table.phases["outer"].parent is None
    assert table.as_dict()["inner"]["parent"] == "outer"
