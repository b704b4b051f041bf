"""Process groups and devices of a run: torch.distributed's side of the topology.

`create_groups` is the only place that makes process groups, and every rank calls it with
the same arguments so that the groups are created in the same order everywhere
(torch.distributed requires it). The arithmetic (which rank holds what) is
`wpipe.schedule.topology.Topology`.

Communicators are created up front, in one global order (docs/nccl.md): `connect` uses
every stream's data group and every data-parallel group once (`warm_up`), so that no first
message waits for its communicator's creation, which NCCL makes a meeting of all its
members. The GPU is not bound to the process group (`device_id`), which would create them
eagerly too: with a bound device, torch makes every rank that is not a member of a new
group take part in an NCCL communicator split, also for the gloo groups this module
makes, whose members do not, and new_group then hangs (pytorch#145376).
"""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CommError
from ..schedule import comms
from ..schedule.topology import Topology
from ..trace import Recorder, common_origin
from .emulation import EmulatedLinks, EmulatedMean
from .transport import Links, Place
from .updates import GradientMean
from .watchdog import Watchdog
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


def create_groups(topology: Topology, rank: int, backend: str, p2p_backend: str | None = None,
                  timeout_s: float | None = None) -> Groups:
    """Create every group on every rank, in the same order; keep this rank's. Stream data
    groups use `p2p_backend` (resolved: nccl, gloo or nccl_emulated, whose data groups are
    gloo groups of their own; None: the run's backend). Each group gets `timeout_s` (NCCL's
    watchdog then follows the run's timeout) and a description naming it (the watchdog's
    logs say which stream), where the installed torch takes them."""
    p2p_backend = p2p_backend or backend
    replica, device = topology.coordinates(rank)
    dp_group = None
    if topology.data_parallel > 1:
        for d in range(topology.depth):
            ranks = [topology.rank_of(r, d) for r in range(topology.data_parallel)]
            group = _new_group(ranks, backend, timeout_s, f"wpipe data-parallel, device {d}")
            if d == device:
                dp_group = group
    streams = {}
    for r in range(topology.data_parallel):
        for kind, partition, a, b in topology.streams():
            src, dst = topology.rank_of(r, a), topology.rank_of(r, b)
            name = f"wpipe stream {kind}{partition} (rank {src} -> {dst})"
            # Groups of their own: messages of different streams never queue behind each
            # other (and with NCCL, two ranks sending to each other on one communicator
            # deadlock).
            control = _new_group([src, dst], "gloo", timeout_s, f"{name}, control")
            data = (control if p2p_backend == "gloo" else
                    _new_group([src, dst], "gloo" if p2p_backend == "nccl_emulated" else p2p_backend, timeout_s,
                               f"{name}, data"))
            if rank in (src, dst):
                streams[(kind, partition)] = (src, dst, control, data)
    return Groups(dp_group, streams)


def _new_group(ranks: list[int], backend: str, timeout_s: float | None, description: str):
    """dist.new_group with the timeout and description, where this torch accepts them."""
    accepted = inspect.signature(dist.new_group).parameters
    kwargs = {"backend": backend}
    if timeout_s is not None and "timeout" in accepted:
        kwargs["timeout"] = timedelta(seconds=timeout_s)
    if "group_desc" in accepted:
        kwargs["group_desc"] = description
    return dist.new_group(ranks, **kwargs)


def connect(cfg, topology: Topology, trace: Recorder) -> Links:
    """This rank's transport over the process group torch.distributed was initialised with
    (N x D ranks, `init_distributed` or the caller's own): its place and device (selected,
    also when the caller made the process group), the groups of every stream and of its
    replicas (`create_groups`), over NCCL the warm-up of every communicator (`warm_up`),
    and with `cfg.trace` a time origin common to every rank's events (trace.common_origin).
    A collective: call on every rank."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun and call "
                           "wpipe.init_distributed() before building a Pipeline")
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"world size is {dist.get_world_size()} but pipeline_depth {topology.depth} "
                         f"x data_parallel {topology.data_parallel} = {topology.world_size}: launch "
                         f"{topology.world_size} processes or change the two fields")
    backend = dist.get_backend()
    _, p2p_backend = resolve_backends(backend, cfg.p2p_backend)
    if p2p_backend == "nccl_emulated" and backend != "gloo":
        raise ValueError(f"p2p_backend nccl_emulated runs on gloo, but the process group's backend is {backend}: "
                         f"initialise it with gloo (wpipe.init_distributed does)")
    rank = dist.get_rank()
    replica, device_index = topology.coordinates(rank)
    device = run_device(backend, cfg.p2p_backend)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    groups = create_groups(topology, rank, backend, p2p_backend, cfg.timeout_s)
    emulated, lazy = p2p_backend == "nccl_emulated", cfg.communicators == "lazy"
    watchdog = Watchdog(rank, cfg.timeout_s)    # deadlines of what the GPU stream waits for
    mean = None
    if groups.data_parallel is not None:
        # gloo carries CUDA tensors only through CPU buffers: the flat copy is made there.
        replicas = [topology.rank_of(r, device_index) for r in range(topology.data_parallel)]
        args = (groups.data_parallel, replicas, torch.device("cpu") if backend == "gloo" else device, rank,
                cfg.timeout_s, watchdog)
        mean = EmulatedMean(*args) if emulated else GradientMean(*args)
    posting = "ahead" if p2p_backend == "gloo" else "taken"     # over NCCL: transport.py says why
    # What the engine proves each call under: NCCL's rules at their worst, with the warm-up
    # and this posting (nothing under lazy creation, where wpipe deadlocks).
    rules = comms.GLOO if p2p_backend == "gloo" else None if lazy else replace(comms.NCCL, posting=posting)
    common = dict(trace=trace, wire=Wire(cfg.wire_dtype), stage=p2p_backend != "nccl" and device.type == "cuda",
                  p2p_backend=p2p_backend, mean=mean, posting=posting, rules=rules, watchdog=watchdog)
    place = Place(rank, replica, device_index, device)
    if emulated:
        links = EmulatedLinks(place, groups.streams, cfg.timeout_s, **common)
    else:
        links = Links(place, groups.streams, cfg.timeout_s, **common)
    if p2p_backend != "gloo" and not lazy:
        warm_up(links, mean)
    if cfg.trace:
        trace.set_origin(common_origin())
    return links


def warm_up(links: Links, mean: GradientMean | None) -> None:
    """Use every communicator of the data path once, in one global order: each stream's
    data group in `Topology.streams()` order (`Links.warm_up`), then the data-parallel
    group by an all-reduce of one element. A collective: call on every rank."""
    links.warm_up()
    if mean is not None:
        reduction = mean.start([torch.zeros(1, device=links.device)])
        try:
            reduction.work.wait(mean.timeout)
        except Exception as error:
            raise CommError(f"rank {links.rank}, start-up: the warm-up all-reduce of the data-parallel group over "
                            f"ranks {mean.ranks} did not complete within {mean.timeout.total_seconds():g} s. "
                            f"Likely cause: one of those ranks stopped; its own log says why.") from error


def resolve_backends(backend: str | None, p2p_backend: str = "auto") -> tuple[str, str]:
    """(process-group backend, point-to-point backend) of a run. backend None: nccl with
    CUDA, unless p2p_backend is gloo (ranks may share a GPU: no NCCL at all) or
    nccl_emulated (gloo under NCCL's rules), else gloo. p2p_backend auto: the process
    group's backend."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and p2p_backend not in ("gloo", "nccl_emulated") else "gloo"
    return backend, backend if p2p_backend == "auto" else p2p_backend


def run_device(backend: str, p2p_backend: str = "auto"):
    """The device this rank computes on: its GPU (LOCAL_RANK modulo the visible GPU count,
    so that ranks share GPUs when there are fewer; GPU 0 when the launcher made one GPU
    visible to each rank) when CUDA is available and the run asks for it (backend nccl, or
    p2p_backend set explicitly), else the CPU; backend gloo with p2p_backend auto runs on
    the CPU."""
    if torch.cuda.is_available() and (backend == "nccl" or p2p_backend != "auto"):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def nvidia_devices() -> str | None:
    """What shows NVIDIA GPUs on this node, whether or not torch can use them:
    "/dev/nvidia0", "nvidia-smi" (it lists a GPU), or None."""
    if Path("/dev/nvidia0").exists():
        return "/dev/nvidia0"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            if subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0:
                return "nvidia-smi"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


def cuda_unusable(backend: str | None, cuda_available: bool, found: str | None) -> str | None:
    """Why a run must not go on, or None: the node has NVIDIA GPUs (`found`, from
    nvidia_devices) but torch cannot use CUDA, so it would train on the CPU without a word,
    unless backend gloo was asked for."""
    if backend == "gloo" or cuda_available or found is None:
        return None
    build = (f"this torch ({torch.__version__}) is built without CUDA: install a CUDA build of torch"
             if torch.version.cuda is None else
             f"the likely cause is an NVIDIA driver older than the CUDA {torch.version.cuda} this torch "
             f"({torch.__version__}) was built for (nvidia-smi shows the driver's CUDA version): install a "
             f"torch built for that CUDA, or a newer driver")
    return (f"this node has NVIDIA GPUs ({found}) but torch.cuda.is_available() is false, so the run would "
            f"train on the CPU: {build}; or pass --backend gloo to run on the CPU")


def gpus_shared(local_ranks: int, visible_gpus: int, cuda_visible_devices: str | None) -> str | None:
    """Why NCCL cannot run with `local_ranks` ranks on this node, or None: they would share
    GPUs. One GPU visible to each rank (its launcher set CUDA_VISIBLE_DEVICES per rank, as
    Slurm's --gpus-per-task=1 does) is one GPU per rank; NCCL itself refuses two ranks on
    one GPU should that be wrong."""
    per_rank = visible_gpus == 1 and bool(cuda_visible_devices) and "," not in cuda_visible_devices
    if local_ranks <= visible_gpus or per_rank:
        return None
    return (f"NCCL needs one GPU per rank: {local_ranks} ranks on this node, {visible_gpus} GPU(s) visible; set "
            f"p2p_backend gloo (and backend gloo or null) to share GPUs")


def init_distributed(backend: str | None = None, timeout_s: float = 300.0, p2p_backend: str = "auto") -> str:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT), with the backends of `resolve_backends`, and
    select this rank's GPU when it computes on one (`run_device`). Refuses a node whose
    GPUs torch cannot use (`cuda_unusable`) and ranks that would share a GPU under NCCL
    (`gpus_shared`). Returns the backend."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: launch with torchrun "
                           f"(e.g. torchrun --nproc_per_node=2 script.py)")
    available = torch.cuda.is_available()
    problem = cuda_unusable(backend, available, None if available or backend == "gloo" else nvidia_devices())
    if problem:
        raise RuntimeError(problem)
    backend, p2p = resolve_backends(backend, p2p_backend)
    if "nccl" in (backend, p2p):
        if not available:
            raise RuntimeError("backend nccl (or p2p_backend nccl) needs CUDA, which is not available here: "
                               "use gloo, or p2p_backend nccl_emulated to run under NCCL's rules on gloo")
        shared = gpus_shared(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count(),
                             os.environ.get("CUDA_VISIBLE_DEVICES"))
        if shared:
            raise RuntimeError(shared)
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
