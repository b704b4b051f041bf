"""The runtime: torch and torch.distributed.

    distributed   process groups and devices (init_distributed, create_groups)
    transport     point-to-point links with receives posted ahead and timeouts
    loopback      a transport without peers (probe mode)
    wire          message metadata and reduced-precision casts
    precision     autocast policy, fp16 loss scaler and its agreement across ranks
    versions      weight versions of one partition
    engine        Pipeline: the interpreter of one device's op list
    reference     the single-process oracle the engine must equal
"""
