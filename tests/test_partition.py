"""Cut plans: `uniform` (the released runtime's rule) and `balanced` (exact bottleneck),
checked against literal sizes and a brute force over every cut."""
import itertools
import random

import pytest

from wpipe.planning.partition import balanced, uniform


def sizes(ranges) -> list[int]:
    return [len(r) for r in ranges]


def assert_plan(ranges, num_blocks: int, num_partitions: int):
    """Contiguous, non-empty, in order, and every block in exactly one partition."""
    assert len(ranges) == num_partitions
    assert all(isinstance(r, range) and r.step == 1 and len(r) >= 1 for r in ranges), ranges
    assert [i for r in ranges for i in r] == list(range(num_blocks)), ranges


def heaviest(weights, ranges) -> float:
    return max(sum(weights[r.start:r.stop]) for r in ranges)


def brute_force(weights, num_partitions: int) -> float:
    """The smallest heaviest partition over all contiguous cuts into non-empty parts."""
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), num_partitions - 1):
        bounds = (0, *cuts, n)
        worst = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


# --------------------------------------------------------------------------- uniform

@pytest.mark.parametrize("num_blocks, num_partitions, expected", [
    (10, 4, [2, 2, 3, 3]),          # docs/design.md §2.3: remainder to the LAST ones
    (11, 4, [2, 3, 3, 3]),
    (13, 4, [3, 3, 3, 4]),
    (7, 3, [2, 2, 3]),
    (8, 4, [2, 2, 2, 2]),
    (5, 5, [1, 1, 1, 1, 1]),
    (6, 1, [6]),
    (1, 1, [1]),
    (98, 16, [6] * 14 + [7] * 2),   # BERT-96 plus embeddings and head on 2N = 16 partitions
])
def test_uniform_sizes(num_blocks, num_partitions, expected):
    plan = uniform(num_blocks, num_partitions)
    assert sizes(plan) == expected
    assert_plan(plan, num_blocks, num_partitions)


def test_uniform_covers_every_block_once_and_is_even():
    for num_blocks in range(1, 25):
        for num_partitions in range(1, num_blocks + 1):
            plan = uniform(num_blocks, num_partitions)
            assert_plan(plan, num_blocks, num_partitions)
            got = sizes(plan)
            assert got == sorted(got) and got[-1] - got[0] <= 1, (num_blocks, num_partitions, got)


def test_uniform_rejects_fewer_blocks_than_partitions():
    with pytest.raises(ValueError, match=r"cannot cut 3 blocks into 4 partitions: every partition "
                                         r"needs at least one block \(use a deeper model or fewer"):
        uniform(3, 4)
    with pytest.raises(ValueError, match=r"num_partitions must be >= 1, got 0"):
        uniform(3, 0)


# --------------------------------------------------------------------------- balanced

def test_balanced_matches_brute_force_on_integer_weights():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        weights = [rng.randint(0, 20) for _ in range(n)]
        plan = balanced(weights, k)
        assert_plan(plan, n, k)
        assert heaviest(weights, plan) == brute_force(weights, k), (weights, k, sizes(plan))


def test_balanced_matches_brute_force_on_float_weights():
    # Profiled times are floats: a segment's sum depends on the order of the additions, so
    # the search must compare like with like (this once crashed on [0.1, 0.6, 0.2], k = 1).
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        weights = [rng.choice([0.1, 0.2, 0.3, 0.6, 0.7, rng.random()]) for _ in range(n)]
        plan = balanced(weights, k)
        assert_plan(plan, n, k)
        assert heaviest(weights, plan) == pytest.approx(brute_force(weights, k), rel=1e-12), (weights, k)
    assert sizes(balanced([0.1, 0.6, 0.2], 1)) == [3]


@pytest.mark.parametrize("weights, num_partitions, expected", [
    ([1, 1, 1, 1, 8], 2, [4, 1]),
    ([8, 1, 1, 1, 1], 2, [1, 4]),
    ([5, 1, 1, 1, 1, 1, 5], 3, [1, 5, 1]),
    ([1, 2, 3, 4, 5, 6], 3, [3, 2, 1]),       # 6 | 9 | 6 would need 1+2+3 | 4+5 | 6
])
def test_balanced_literal_cuts(weights, num_partitions, expected):
    plan = balanced(weights, num_partitions)
    assert heaviest(weights, plan) == brute_force(weights, num_partitions)
    assert sizes(plan) == expected


def test_balanced_handles_zero_weights():
    plan = balanced([0, 0, 0, 5, 0], 3)
    assert_plan(plan, 5, 3)
    assert heaviest([0, 0, 0, 5, 0], plan) == 5
    for k in range(1, 6):                     # all zero: any non-empty cut, still complete
        plan = balanced([0] * 5, k)
        assert_plan(plan, 5, k)
        assert heaviest([0] * 5, plan) == 0
    plan = balanced([0, 7, 0, 0, 7, 0], 2)
    assert heaviest([0, 7, 0, 0, 7, 0], plan) == 7


def test_balanced_errors():
    with pytest.raises(ValueError, match=r"cannot cut 2 blocks into 3 partitions: every partition needs"):
        balanced([1, 2], 3)
    with pytest.raises(ValueError, match=r"num_partitions must be >= 1, got 0"):
        balanced([1, 2], 0)
    with pytest.raises(ValueError, match=r"block weights must be >= 0"):
        balanced([1, -2, 3], 2)
