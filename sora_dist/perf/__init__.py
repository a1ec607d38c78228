"""Performance: the benchmarks (training step, kernels, checkpoints, loader, collectives, scaling
sweeps) and the performance model with its layout planner. Each benchmark is a module with its
own ``main`` so that it runs under torchrun as ``python -m sora_dist.perf.<name>``."""
