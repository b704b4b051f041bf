"""Plan how an ordered list of blocks is cut into contiguous partitions.

Pure: returns index ranges; building the modules happens in the model code (cv/, nlp/).
"""
import itertools


def uniform(num_blocks: int, num_partitions: int) -> list[range]:
    """Equal counts, the remainder going one each to the last partitions.

    This is the released runtime's rule: 10 blocks into 4 partitions -> sizes 2, 2, 3, 3.
    """
    _check_counts(num_blocks, num_partitions)
    base, extra = divmod(num_blocks, num_partitions)
    sizes = [base + (1 if i >= num_partitions - extra else 0) for i in range(num_partitions)]
    return _ranges(sizes)


def balanced(weights: list[float], num_partitions: int) -> list[range]:
    """Contiguous cut minimising the heaviest partition's total weight (e.g. parameter counts).

    Exact: binary search on the bottleneck over the block weights, greedy feasibility check.
    Among cuts with the same bottleneck, the greedy fill from the back is taken.
    """
    num_blocks = len(weights)
    _check_counts(num_blocks, num_partitions)
    if any(w < 0 for w in weights):
        raise ValueError("block weights must be >= 0")
    # A segment's weight is always a difference of these prefix sums, in the candidates and
    # in the greedy check alike: float sums depend on the order of the additions, and a
    # candidate summed one way could fail a check summed the other way.
    prefix = list(itertools.accumulate(weights, initial=0))
    candidates = sorted({prefix[j] - prefix[i] for i in range(num_blocks)
                         for j in range(i + 1, num_blocks + 1)})
    lo, hi = 0, len(candidates) - 1
    while lo < hi:  # smallest bottleneck for which a cut exists
        mid = (lo + hi) // 2
        if _cut_from_back(prefix, num_partitions, candidates[mid]) is not None:
            hi = mid
        else:
            lo = mid + 1
    return _ranges(_cut_from_back(prefix, num_partitions, candidates[lo]))


def _cut_from_back(prefix, num_partitions, limit):
    """Greedy from the last block: fill each partition up to `limit`, keeping one block
    for every partition still to fill. `prefix[i]` is the weight of blocks 0..i-1.
    Returns sizes, or None when `limit` is too small."""
    sizes, i = [], len(prefix) - 1
    for left in range(num_partitions, 0, -1):
        size = 0
        while i - size > left - 1 and (size == 0 or prefix[i] - prefix[i - size - 1] <= limit):
            size += 1
        if prefix[i] - prefix[i - size] > limit:
            return None
        sizes.append(size)
        i -= size
    return sizes[::-1] if i == 0 else None


def _check_counts(num_blocks: int, num_partitions: int) -> None:
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_blocks < num_partitions:
        raise ValueError(
            f"cannot cut {num_blocks} blocks into {num_partitions} partitions: every "
            f"partition needs at least one block (use a deeper model or fewer partitions)")


def _ranges(sizes: list[int]) -> list[range]:
    out, start = [], 0
    for size in sizes:
        out.append(range(start, start + size))
        start += size
    return out
