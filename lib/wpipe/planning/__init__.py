"""Planning: what a configuration costs before it runs. Above the pure side (wpipe.schedule);
of the runtime it uses only runtime.memory, so that blocks are measured by the engine's rule.

    partition   cut a chain of blocks into contiguous partitions (pure)
    blockcost   per-block bytes, FLOPs, kernels, seconds (pure data)
    measure     measure blocks in this process (torch)
    hardware    machine presets (network_conf/hardware/*.yaml)
    optimes     op times: curves fitted to measured points (network_conf/profiles), FLOP model, measured
    costmodel   a configuration's per-device memory and samples/s
    evaluate    one fully specified configuration evaluated (the one entry point)
    plan        every configuration on G devices, ranked
    compare     best WPipe / best 2BW split into factors
    calibrate   fit the simulator to a traced run
"""
