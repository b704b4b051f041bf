"""One rule for giving each data-parallel replica its share of an epoch's samples."""
from __future__ import annotations


def replica_share(order, micro_batch_size: int, replica: int, num_replicas: int, drop_last: bool):
    """Replica `replica`'s samples, in order, from `order` (a 1-D array or tensor of sample
    indices: the epoch's order, the same on every rank). The order is dealt to the replicas
    in turn (its k-th sample to replica k mod R, as torch's DistributedSampler does), so the
    shards are disjoint. `drop_last`: the tail that cannot give every replica the same number
    of full micro-batches is dropped (training: every replica runs the same periods); else
    every sample is used once and a replica's last micro-batch may be short (evaluation)."""
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be an integer >= 1, got {micro_batch_size!r}")
    if not 0 <= replica < num_replicas:
        raise ValueError(f"replica {replica} is out of range for {num_replicas} replicas")
    used = len(order)
    if drop_last:
        used = used // (num_replicas * micro_batch_size) * num_replicas * micro_batch_size
        if used == 0:
            raise ValueError(f"{len(order)} samples cannot fill one micro-batch of {micro_batch_size} on each "
                             f"of {num_replicas} replicas: lower micro_batch_size or use more data")
    return order[:used][replica::num_replicas]
