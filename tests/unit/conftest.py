"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small matrices: extra threads only add synchronisation, which stalls badly when the
    machine is shared. A module opts in with pytestmark; restored for other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
