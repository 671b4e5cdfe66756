"""Where a run's time and memory go, phase by phase: off unless a profiler turns it on.

The loop and the strategies mark their phases (`with phase("backward"):`,
`with phase("svd_orthogonal/svd"):`); while `recording()` is active each phase's calls,
seconds and peak memory are summed into a `PhaseTable`, otherwise `phase` costs one
attribute lookup. `scripts/profile_strategy.py` prints the tables.

Peak memory per phase: on CUDA the allocator's peak since the phase began; on CPU the
process's resident-set high-water mark (VmHWM), which Linux lets a process reset by writing
5 to /proc/self/clear_refs; where neither works the phase's peak is left unknown (None).
Phases nest: an inner phase's time is also counted in the outer one's, and resetting the
high-water mark for an inner phase loses nothing, because the outer phase keeps the maximum
of what it saw before the inner one and what the inner one reports.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


@dataclass
class PhaseStats:
    calls: int = 0
    seconds: float = 0.0
    peak_bytes: Optional[int] = None
    parent: Optional[str] = None  # the phase it first ran inside (None: at the top)

    def add(self, seconds: float, peak: Optional[int]) -> None:
        self.calls += 1
        self.seconds += seconds
        if peak is not None:
            self.peak_bytes = peak if self.peak_bytes is None else max(self.peak_bytes, peak)


@dataclass
class PhaseTable:
    """name -> PhaseStats, in the order the phases first ran."""

    phases: dict[str, PhaseStats] = field(default_factory=dict)

    def stats(self, name: str) -> PhaseStats:
        return self.phases.setdefault(name, PhaseStats())

    def as_dict(self) -> dict[str, dict]:
        return {name: {"calls": s.calls, "seconds": s.seconds, "peak_bytes": s.peak_bytes, "parent": s.parent}
                for name, s in self.phases.items()}


class _Recorder:
    def __init__(self) -> None:
        self.table: Optional[PhaseTable] = None
        self.device: Optional[torch.device] = None
        self.open_peaks: list[int] = []  # the peak seen so far by each open phase, outermost first
        self.open_names: list[str] = []


_RECORDER = _Recorder()


def _cuda(device: Optional[torch.device]) -> bool:
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


def _reset_peak(device: Optional[torch.device]) -> None:
    if _cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:  # not Linux, or not allowed: the high-water mark then spans the run
        pass


def current_peak_bytes(device: Optional[torch.device] = None) -> Optional[int]:
    """The peak since the last reset: CUDA allocated bytes, or the process's VmHWM."""
    if _cuda(device):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _sync(device: Optional[torch.device]) -> None:
    # Without it a CUDA phase would be charged only for launching its kernels.
    if _cuda(device):
        torch.cuda.synchronize(device)


_NOT_RECORDING = contextlib.nullcontext()


def phase(name: str) -> contextlib.AbstractContextManager:
    """Count the enclosed work as phase `name` while a recording is active; otherwise a
    shared no-op context (the training step enters a dozen phases: no generator each)."""
    return _NOT_RECORDING if _RECORDER.table is None else _recorded(name)


@contextlib.contextmanager
def _recorded(name: str) -> Iterator[None]:
    recorder = _RECORDER
    device = recorder.device
    _sync(device)
    if recorder.open_peaks:  # the outer phase keeps what it saw before this one resets
        seen = current_peak_bytes(device)
        if seen is not None:
            recorder.open_peaks[-1] = max(recorder.open_peaks[-1], seen)
    _reset_peak(device)
    stats = recorder.table.stats(name)
    if stats.calls == 0 and stats.parent is None and recorder.open_names:
        stats.parent = recorder.open_names[-1]
    recorder.open_peaks.append(0)
    recorder.open_names.append(name)
    started = time.perf_counter()
    try:
        yield
    finally:
        _sync(device)
        seconds = time.perf_counter() - started
        seen = current_peak_bytes(device)
        peak = recorder.open_peaks.pop()
        recorder.open_names.pop()
        peak = None if seen is None else max(peak, seen)
        recorder.table.stats(name).add(seconds, peak)
        if recorder.open_peaks and peak is not None:
            recorder.open_peaks[-1] = max(recorder.open_peaks[-1], peak)


@contextlib.contextmanager
def recording(device: Optional[torch.device] = None) -> Iterator[PhaseTable]:
    """Record every `phase` entered inside into the yielded table."""
    if _RECORDER.table is not None:
        raise RuntimeError("phases.recording() is already active; one recording at a time")
    table = PhaseTable()
    _RECORDER.table, _RECORDER.device, _RECORDER.open_peaks, _RECORDER.open_names = table, device, [], []
    try:
        yield table
    finally:
        _RECORDER.table, _RECORDER.device, _RECORDER.open_peaks, _RECORDER.open_names = None, None, [], []


def is_recording() -> bool:
    return _RECORDER.table is not None
