"""Process groups and devices of a run: torch.distributed's side of the topology.

`create_groups` is the only place that makes process groups, and every rank calls it with
the same arguments so that the groups are created in the same order everywhere
(torch.distributed requires it). The arithmetic (which rank holds what) is
`wpipe.schedule.topology.Topology`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..schedule.topology import Topology
from ..trace import Recorder, common_origin
from .transport import Links, Place
from .updates import GradientMean
from .wire import Wire


@dataclass
class Groups:
    """data_parallel: the group of this rank's device position across replicas (None
    when D = 1). streams[(kind, partition)] = (source rank, destination rank, control
    group, data group) for each stream this rank sends or receives: every stream has
    groups of its own, for headers and metadata (always gloo, on CPU) and for tensors
    (the run's backend), so that each is one FIFO whose order is the order in which both
    ends handle its messages."""
    data_parallel: object | None
    streams: dict[tuple[str, int], tuple[int, int, object, object]]


def create_groups(topology: Topology, rank: int, backend: str, p2p_backend: str | None = None) -> Groups:
    """Create every group on every rank, in the same order; keep this rank's. Stream data
    groups use `p2p_backend` (resolved: nccl or gloo; None: the run's backend)."""
    p2p_backend = p2p_backend or backend
    replica, device = topology.coordinates(rank)
    dp_group = None
    if topology.data_parallel > 1:
        for d in range(topology.depth):
            ranks = [topology.rank_of(r, d) for r in range(topology.data_parallel)]
            group = dist.new_group(ranks, backend=backend)
            if d == device:
                dp_group = group
    streams = {}
    for r in range(topology.data_parallel):
        for kind, partition, a, b in topology.streams():
            src, dst = topology.rank_of(r, a), topology.rank_of(r, b)
            # Groups of their own: messages of different streams never queue behind each
            # other (and with NCCL, two ranks sending to each other on one communicator
            # deadlock).
            control = dist.new_group([src, dst], backend="gloo")
            data = control if p2p_backend == "gloo" else dist.new_group([src, dst], backend=p2p_backend)
            if rank in (src, dst):
                streams[(kind, partition)] = (src, dst, control, data)
    return Groups(dp_group, streams)


def connect(cfg, topology: Topology, trace: Recorder) -> Links:
    """This rank's transport over the process group torch.distributed was initialised with
    (N x D ranks, `init_distributed`): its place and device, the groups of every stream and
    of its replicas (`create_groups`), and with `cfg.trace` a time origin common to every
    rank's events (trace.common_origin). A collective: call on every rank."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "wpipe.init_distributed() before building a Pipeline")
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"world size is {dist.get_world_size()} but pipeline_depth {topology.depth} "
                         f"x data_parallel {topology.data_parallel} = {topology.world_size}: launch "
                         f"{topology.world_size} processes or change the two fields")
    backend = dist.get_backend()
    _, p2p_backend = resolve_backends(backend, cfg.p2p_backend)
    rank = dist.get_rank()
    replica, device_index = topology.coordinates(rank)
    device = run_device(backend, cfg.p2p_backend)
    groups = create_groups(topology, rank, backend, p2p_backend)
    mean = None
    if groups.data_parallel is not None:
        # gloo carries CUDA tensors only through CPU buffers: the flat copy is made there.
        replicas = [topology.rank_of(r, device_index) for r in range(topology.data_parallel)]
        mean = GradientMean(groups.data_parallel, replicas, torch.device("cpu") if backend == "gloo" else device,
                            rank, cfg.timeout_s)
    links = Links(Place(rank, replica, device_index, device), groups.streams, cfg.timeout_s, trace,
                  Wire(cfg.wire_dtype), stage=p2p_backend == "gloo" and device.type == "cuda",
                  p2p_backend=p2p_backend, mean=mean)
    if cfg.trace:
        trace.set_origin(common_origin())
    return links


def resolve_backends(backend: str | None, p2p_backend: str = "auto") -> tuple[str, str]:
    """(process-group backend, point-to-point backend) of a run. backend None: nccl with
    CUDA, unless p2p_backend is gloo (ranks may share a GPU: no NCCL at all), else gloo.
    p2p_backend auto: the process group's backend."""
    import torch

    backend = backend or ("nccl" if torch.cuda.is_available() and p2p_backend != "gloo" else "gloo")
    return backend, backend if p2p_backend == "auto" else p2p_backend


def run_device(backend: str, p2p_backend: str = "auto"):
    """The device this rank computes on: its GPU (LOCAL_RANK modulo the GPU count, so that
    ranks share GPUs when there are fewer) when CUDA is available and the run asks for it
    (backend nccl, or p2p_backend set explicitly), else the CPU; backend gloo with
    p2p_backend auto runs on the CPU."""
    import os

    import torch

    if torch.cuda.is_available() and (backend == "nccl" or p2p_backend != "auto"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(backend: str | None = None, timeout_s: float = 300.0, p2p_backend: str = "auto") -> str:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with the backends of `resolve_backends`, and
    select this rank's GPU when it computes on one (`run_device`). Returns the backend."""
    import os
    from datetime import timedelta

    import torch

    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with torchrun "
                           f"(e.g. torchrun --nproc_per_node=2 script.py)")
    backend, p2p = resolve_backends(backend, p2p_backend)
    if "nccl" in (backend, p2p):
        if not torch.cuda.is_available():
            raise RuntimeError("backend nccl (or p2p_backend nccl) needs CUDA, which is not available here: "
                               "use gloo")
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if local > torch.cuda.device_count():
            raise RuntimeError(f"NCCL needs one GPU per rank: {local} ranks on this node, "
                               f"{torch.cuda.device_count()} GPU(s); set p2p_backend gloo (and backend "
                               f"gloo or null) to share GPUs")
    device = run_device(backend, p2p_backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's static rendezvous (--master_addr/--master_port) keeps one store
            # across --max-restarts: without a prefix per attempt, the restarted ranks
            # would read the dead ranks' addresses and wait for them.
            store = dist.PrefixStore(f"attempt{restart}", dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                is_master=False, timeout=timedelta(seconds=timeout_s)))
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                    world_size=int(os.environ["WORLD_SIZE"]), timeout=timedelta(seconds=timeout_s))
        else:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return backend
