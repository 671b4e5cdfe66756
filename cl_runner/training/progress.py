"""How a task's training progress is shown: tqdm's bar on a terminal, plain lines elsewhere.

A bar redraws itself with carriage returns, and a file keeps every redraw (a SLURM log,
`cl-run > log 2>&1`: hundreds of KB of frames). So the bar is drawn only when stderr, where
tqdm writes, is a terminal; otherwise one line goes to stdout every 10% of the task's steps
or every 30 s, whichever comes first. trainer.progress_bar=false shows neither.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

from tqdm.auto import tqdm

from cl_runner.reporting.formatting import format_duration

LINE_EVERY_FRACTION = 0.1  # of the task's steps
LINE_EVERY_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether a progress bar would be seen as one (stderr is a terminal)."""
    return sys.stderr.isatty()


class TaskProgress:
    """Progress of one task's optimizer steps, `first_step` (a resumed task) to `steps`."""

    def __init__(self, label: str, steps: int, first_step: int, enabled: bool, terminal: Optional[bool] = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.label, self.steps, self.first_step = label, steps, first_step
        terminal = on_terminal() if terminal is None else terminal
        self.bar = tqdm(total=steps, initial=first_step, desc=label, leave=False, dynamic_ncols=True,
                        disable=not (enabled and terminal))
        self.lines = enabled and not terminal
        self.every = max(1, math.ceil(steps * LINE_EVERY_FRACTION))
        self.clock = clock
        self.started = self.last_line = clock()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        """Optimizer step `step` (1-based) is done; `loss` is the smoothed loss, `tokens`
        the step's training tokens."""
        self.tokens += tokens
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.3f}")
        if not self.lines or step >= self.steps:  # the task's own summary line follows the last step
            return
        now = self.clock()
        if step % self.every and now - self.last_line < LINE_EVERY_SECONDS:
            return
        self.last_line = now
        print(self.line(step, loss, now - self.started), flush=True)

    def line(self, step: int, loss: float, elapsed: float) -> str:
        done = step - self.first_step  # in this session
        rate = self.tokens / elapsed if elapsed > 0 else 0.0
        eta = (self.steps - step) * elapsed / done if done else None
        return (f"[cl-run] {self.label}: step {step}/{self.steps} ({100 * step / self.steps:.0f}%)  loss {loss:.4f}  "
                f"{rate:,.0f} tokens/s  ETA {format_duration(eta)}")

    def close(self) -> None:
        self.bar.close()
