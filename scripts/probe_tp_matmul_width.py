"""How much slower per FLOP the TP plan's linear layers run at the width each rank keeps.

Under tensor parallelism every rank runs the plan's linear layers at 1/tp of their width
(``sora_dist.parallel.tensor.TP_PLAN``): the attention queries, keys and values and fc1 are
column-parallel (d -> d/tp, d -> m/tp), the output projections and fc2 row-parallel (d/tp -> d,
m/tp -> d). This times those shapes, forward and backward over the given tokens, at full width
and at each TP degree, and prints time per FLOP against full width (fastest of --repeats).

  OMP_NUM_THREADS=1 python scripts/probe_tp_matmul_width.py --preset debug --model.hidden_size=256 \\
      --model.depth=4 --model.num_heads=8 --tokens 4096
"""

from __future__ import annotations

import argparse
import time

import torch

from sora_dist import device as device_lib
from sora_dist.config import load_config, resolve_model_config
from sora_dist.perf import bench_train


def plan_linear_seconds(dev: device_lib.Device, hidden: int, mlp_hidden: int, tokens: int, tp: int, repeats: int) -> float:
    """Fastest forward and backward of one block's TP-split linear layers at 1/tp width."""
    shapes = [(hidden, hidden // tp)] * 4 + [(hidden // tp, hidden)] * 2 + [(hidden, mlp_hidden // tp), (mlp_hidden // tp, hidden)]
    layers = [torch.nn.Linear(i, o, device=dev.torch_device) for i, o in shapes]
    inputs = [torch.randn(tokens, i, device=dev.torch_device, requires_grad=True) for i, _ in shapes]
    best = float("inf")
    for _ in range(repeats):
        dev.synchronize()
        start = time.perf_counter()
        for layer, x in zip(layers, inputs):
            y = layer(x)
            y.backward(torch.ones_like(y))
        dev.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--tokens", type=int, default=4096, help="rows of every matmul (batch x tokens per sample)")
    parser.add_argument("--degrees", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=7)
    args, overrides = parser.parse_known_args()
    cfg = load_config(None, [f"--model.preset={args.preset}", *overrides])
    model = resolve_model_config(cfg.model, bench_train.IN_CHANNELS, bench_train.TEXT_DIM)
    dev = device_lib.detect("auto")
    full = plan_linear_seconds(dev, model.hidden_size, model.mlp_hidden, args.tokens, 1, args.repeats)
    print(f"hidden {model.hidden_size}, MLP {model.mlp_hidden}, {args.tokens} tokens, {dev.name}: full width {full * 1e3:.1f} ms")
    for tp in args.degrees:
        if model.num_heads % tp or model.mlp_hidden % tp:
            continue
        split = plan_linear_seconds(dev, model.hidden_size, model.mlp_hidden, args.tokens, tp, args.repeats)
        print(f"tp {tp}: {split * 1e3:.1f} ms, time per FLOP x{split * tp / full:.3f} of full width")


if __name__ == "__main__":
    main()
