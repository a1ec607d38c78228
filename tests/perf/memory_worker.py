"""Run by test_model.py under torchrun, one launch per world size: for each layout named on the
command line (its --parallel overrides, comma-separated; "" for the default), build it on the real
build path, take one training step with a batch of 2 per data-parallel rank, and report each rank's
parameter, gradient and AdamW-moment bytes, its saved activations (saved-tensor accounting of one
forward) and the matmul FLOPs of one forward and backward (torch's FLOP counter), for comparison
with the performance model. Rank 0 writes {layout: [one report per rank]} to the output file."""

import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from sora_dist import device as device_lib
from sora_dist.build import build_stack, start_distributed, stop_distributed
from sora_dist.config import load_config, resolve_model_config
from sora_dist.kernels import set_attention_backend
from sora_dist.parallel.mesh import local_bytes
from sora_dist.console import exit_process

# Uneven on purpose: head_dim 12 and null_text's single row do not divide over 4 FSDP ranks.
MODEL = ["--model.hidden_size=48", "--model.depth=2", "--model.num_heads=4"]
LATENT, TEXT_LEN, IN_CHANNELS, TEXT_DIM = (4, 16, 16), 8, 4, 24


def saved_activation_bytes(model, *inputs) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters (sharded, or
    gathered by FSDP for the forward) excluded. An in-flight collective's output cannot show its
    storage yet: it counts by its size."""
    seen = {}

    def pack(tensor):
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return tensor  # a weight or a view of one (linear saves weight.t())
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        try:
            key, size = local.untyped_storage().data_ptr(), local.untyped_storage().nbytes()
        except (AssertionError, RuntimeError):
            key, size = id(local), local.numel() * local.element_size()
        seen[key] = max(seen.get(key, 0), size)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    return sum(seen.values()), out


def training_flops(engine, *inputs) -> int:
    """Matmul FLOPs this rank runs for one forward and backward, counted by torch on the reference
    attention backend (plain matmuls: the counter does not see CPU SDPA's fused kernel). The
    gradients are dropped afterwards. Under TP the counter sees DTensor ops at their global
    shapes, so there the count is not this rank's."""
    set_attention_backend("reference")
    try:
        with FlopCounterMode(display=False) as counter:
            engine.backward(engine.model(*inputs).float().pow(2).mean())
    finally:
        set_attention_backend("sdpa")
    engine.model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def measure(overrides: list[str], dev, world_size: int, rank: int) -> dict:
    cfg = load_config(None, [*MODEL, "--optim.ema_decay=0", *overrides])
    stack = build_stack(cfg, dev, resolve_model_config(cfg.model, IN_CHANNELS, TEXT_DIM), world_size)
    batch = 2  # per data-parallel rank
    g = torch.Generator().manual_seed(stack.dp_rank)
    x = torch.randn(batch, IN_CHANNELS, *LATENT, generator=g)
    inputs = (x, torch.rand(batch, generator=g) * 1000, torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g), torch.ones(batch, TEXT_LEN, dtype=torch.bool))
    flops = training_flops(stack.engine, *inputs)
    activations, out = saved_activation_bytes(stack.engine.model, *inputs)
    stack.engine.backward(out.float().pow(2).mean() * stack.dims.sp)
    grads = local_bytes(p.grad for p in stack.model.parameters() if p.grad is not None)
    stack.engine.step(lambda norm: None)
    moments = [v for state in stack.optimizer.state.values() for k, v in state.items() if k in ("exp_avg", "exp_avg_sq")]
    return {"rank": rank, "parameters": local_bytes(stack.model.parameters()), "gradients": grads,
            "optimizer": local_bytes(moments), "activations": activations, "flops": flops}


def main():
    out_path, layouts = sys.argv[1], sys.argv[2:]
    dev = device_lib.detect("cpu")
    world_size, rank = start_distributed(dev)
    results = {}
    for layout in layouts:
        reports = [None] * world_size
        torch.distributed.all_gather_object(reports, measure([o for o in layout.split(",") if o], dev, world_size, rank))
        results[layout] = reports
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
