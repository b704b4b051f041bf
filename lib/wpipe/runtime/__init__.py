"""The runtime: torch and torch.distributed.

    distributed   process groups and devices (init_distributed, create_groups, the warm-up)
    transport     point-to-point links with receives posted ahead where safe, and timeouts
    emulation     p2p_backend nccl_emulated: gloo links under NCCL's host-visible rules
    loopback      a transport without peers (probe mode)
    wire          message metadata and reduced-precision casts
    precision     autocast policy, fp16 loss scaler and its agreement across ranks
    versions      weight versions of one partition
    engine        Pipeline: the interpreter of one device's op list
    reference     the single-process oracle the engine must equal
"""
