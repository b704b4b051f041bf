"""Worker (under torchrun, 2 processes): whether a send on nccl_emulated's data groups
completes before its receive is posted (NCCL's rule, which the emulation takes from gloo's
protocol). On wpipe's streams F0 and F2 (rank 0 to rank 1), rank 0 sends one message each and
waits for the data's send: on F0 while rank 1 has not posted the receive (it never does),
on F2 while rank 1 waits for it. Rank 0 prints whether each completed within a second."""
from datetime import timedelta

import torch
import torch.distributed as dist

import wpipe
from wpipe.runtime.distributed import connect
from wpipe.schedule import Topology
from wpipe.trace import Recorder


def completes(links, key) -> bool:
    """Send message `key`; whether its tensors' send completes within a second."""
    links.send(key, (torch.ones(4),))
    data_send = links.in_flight[-1][0]
    try:
        data_send.wait(timedelta(seconds=1))
    except RuntimeError:
        return False
    return True


if __name__ == "__main__":
    torch.set_num_threads(1)
    wpipe.init_distributed(timeout_s=60, p2p_backend="nccl_emulated")
    cfg = wpipe.PipelineConfig(method="wpipe", pipeline_depth=2, p2p_backend="nccl_emulated", timeout_s=30)
    links = connect(cfg, Topology.from_config(cfg), Recorder(False))
    unposted, posted = ("F", 0, 0), ("F", 2, 0)
    if dist.get_rank() == 0:
        before = completes(links, unposted)
        dist.barrier()                  # rank 1 now waits for the message on F2
        after = completes(links, posted)
        print(f"completed before its receive was posted: {before}; once posted: {after}", flush=True)
    else:
        links.expect([posted])
        dist.barrier()
        links.recv(posted, "3F0")
    dist.barrier()
