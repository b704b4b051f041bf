"""Planning: what a configuration costs before it runs.

    partition   cut a chain of blocks into contiguous partitions (pure)
    blockcost   per-block bytes, FLOPs, kernels, seconds (pure data)
    measure     measure blocks in this process (torch)
    hardware    machine presets (network_conf/hardware/*.yaml)
    costmodel   a configuration's per-device memory and samples/s
    plan        every configuration on G devices, ranked
    calibrate   fit the simulator to a traced run
"""
