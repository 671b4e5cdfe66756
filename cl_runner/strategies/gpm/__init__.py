"""gpm: Gradient Projection Memory (Saha et al. 2021).

strategy.py     the strategy (hooks, config, report)
basis.py        the basis update after a task (Eqs. 5-9), pure math on a Gram matrix
activations.py  the targets' input Gram matrices over a task's examples (forward hooks)
memory.py       the memory estimate for `cl-run dry_run=true`
The projection itself is svd_orthogonal's ProjectionGroups (cl_runner.ops), one-sided.
"""
from cl_runner.strategies.gpm.strategy import GPMConfig, GradientProjectionMemory

__all__ = ["GPMConfig", "GradientProjectionMemory"]
