import random

import pytest

from cl_runner.streams.sampling import EndlessShuffle


def test_every_pass_is_a_permutation_and_passes_differ():
    draw = EndlessShuffle(5, rng=random.Random(0))
    passes = [[draw.next() for _ in range(5)] for _ in range(4)]
    assert all(sorted(p) == list(range(5)) for p in passes)
    assert len({tuple(p) for p in passes}) > 1
    assert draw.passes == 4


def test_seed_of_pass_makes_each_pass_independent_of_the_others():
    a = EndlessShuffle(7, seed_of_pass=lambda e: f"s:{e}")
    first_two = [a.next() for _ in range(14)]
    b = EndlessShuffle(7, seed_of_pass=lambda e: f"s:{e}")
    assert [b.next() for _ in range(14)] == first_two
    order = list(range(7))
    random.Random("s:1").shuffle(order)
    assert first_two[7:] == order  # pass 1 is its own seed's shuffle, taken in order


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least one"):
        EndlessShuffle(0, rng=random.Random(0))
    with pytest.raises(ValueError, match="exactly one"):
        EndlessShuffle(3)
