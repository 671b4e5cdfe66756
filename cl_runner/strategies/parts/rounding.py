"""Rounding shared by strategies that size things from ratios (HFT's halves, SVD ranks)."""
from __future__ import annotations

import math


def round_half_up(x: float) -> int:
    """0.5 rounds up (Python's round() rounds half to even: round(2.5) == 2)."""
    return math.floor(x + 0.5)
