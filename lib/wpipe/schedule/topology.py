"""Where things live: rank <-> (replica, device), partition -> device, message streams. Pure.

The rank layout fixes which global rank runs device d of replica r; the method fixes which
device holds partition p (`methods.device_of`). Process groups are made from this in
`wpipe.runtime.distributed.create_groups`.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import methods


@dataclass(frozen=True)
class Topology:
    method: str
    depth: int              # N
    data_parallel: int      # D
    rank_layout: str        # "pipeline_major" or "replica_major"

    @classmethod
    def from_config(cls, cfg) -> Topology:
        return cls(cfg.method, cfg.pipeline_depth, cfg.data_parallel, cfg.rank_layout)

    @property
    def world_size(self) -> int:
        return self.depth * self.data_parallel

    @property
    def num_partitions(self) -> int:
        return methods.num_partitions(self.method, self.depth)

    def rank_of(self, replica: int, device: int) -> int:
        if self.rank_layout == "pipeline_major":
            return replica * self.depth + device
        return device * self.data_parallel + replica

    def coordinates(self, rank: int) -> tuple[int, int]:
        """(replica, device) of a global rank."""
        if self.rank_layout == "pipeline_major":
            return divmod(rank, self.depth)
        device, replica = divmod(rank, self.data_parallel)
        return replica, device

    def device_of(self, partition: int) -> int:
        return methods.device_of(self.method, partition, self.depth)

    def partitions_of(self, device: int) -> list[int]:
        return [p for p in range(self.num_partitions) if self.device_of(p) == device]

    def rank_of_partition(self, partition: int, replica: int) -> int:
        return self.rank_of(replica, self.device_of(partition))

    def streams(self) -> list[tuple[str, int, int, int]]:
        """Every message stream between two devices, in a fixed order, as (kind,
        partition, source device, destination device): ("F", p) carries partition p's
        outputs to p+1, ("B", p) the gradients of partition p's inputs back to p-1
        (wpipe's wrap-around included). Streams within one device are not listed."""
        out = []
        for p in range(self.num_partitions - 1):
            a, b = self.device_of(p), self.device_of(p + 1)
            if a != b:
                out += [("F", p, a, b), ("B", p + 1, b, a)]
        return out
