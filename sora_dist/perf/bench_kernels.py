"""Kernel benchmark: attention TFLOP/s per backend, fused elementwise kernels' GB/s against a copy
of the same bytes, and a full training step with the fused path on and off.

  sora-dist bench-kernels                                 # GPU/NPU: the real sizes
  sora-dist bench-kernels --small                         # CPU-sized (what CI runs)

On a GPU the defaults are head dims 64 and 128, sequence lengths 4k-64k, bf16, and a 1B-class
DiT step at 16k tokens; on CPU, ``--small`` shrinks everything to seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from sora_dist import device as device_lib
from sora_dist.console import CommandParser, exit_process, user_command
from sora_dist.kernels import BACKENDS, select_attention_backend, set_attention_backend
from sora_dist.kernels import fused


def _time(fn, device, repeats: int) -> float:
    """Median seconds of ``fn()`` after one warm-up call, device-synchronized."""
    fn()
    times = []
    for _ in range(repeats):
        device.synchronize()
        start = time.perf_counter()
        fn()
        device.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def attention_table(dev, dtype, head_dims, seq_lens, heads, repeats) -> list[dict]:
    backends = ["sdpa", select_attention_backend(dev.kind, torch.cuda.get_device_capability() if dev.kind == "cuda" else None)]
    rows = []
    for backend in dict.fromkeys(backends):
        set_attention_backend(backend)
        for head_dim in head_dims:
            for seq in seq_lens:
                q, k, v = (torch.randn(1, heads, seq, head_dim, device=dev.torch_device, dtype=dtype) for _ in range(3))
                seconds = _time(lambda: BACKENDS[backend](q, k, v, None), dev, repeats)
                rows.append({"backend": backend, "head_dim": head_dim, "seq": seq, "ms": seconds * 1e3, "tflops": 4 * heads * seq * seq * head_dim / seconds / 1e12})
    set_attention_backend("sdpa")
    return rows


def fused_table(dev, dtype, tokens, width, repeats) -> list[dict]:
    """Each op's bytes moved (inputs read + output written) per second, against torch's copy of
    the same number of bytes; the fused backend is the device's, the reference plain PyTorch."""
    g = torch.Generator(device=dev.torch_device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=dev.torch_device, dtype=dtype)  # noqa: E731
    heads = max(1, width // 128)
    x, y, vec = rand(1, tokens, width), rand(1, tokens, width), rand(1, width)
    xh = rand(1, heads, tokens, width // heads)
    angles = rand(tokens, width // heads // 2)
    cos, sin, w = angles.cos(), angles.sin(), rand(width // heads)
    ops = {
        "modulated_layer_norm": (lambda: fused.modulated_layer_norm(x, vec, vec), 2 * x.nbytes),
        "rms_norm (QK-norm)": (lambda: fused.rms_norm(xh, w), 2 * xh.nbytes),
        "rope": (lambda: fused.rope(xh, cos, sin), 2 * xh.nbytes + 2 * cos.nbytes),
        "gated_residual": (lambda: fused.gated_residual(x, vec, y), 3 * x.nbytes),
    }
    copy_gbs = 2 * x.nbytes / _time(lambda: x.clone(), dev, repeats) / 1e9
    chosen = fused.select_fused_backend(dev.kind)
    rows = []
    for backend in dict.fromkeys(["reference", chosen]):
        fused.set_fused_backend(backend)
        for name, (fn, nbytes) in ops.items():
            gbs = nbytes / _time(fn, dev, repeats) / 1e9
            rows.append({"backend": backend, "op": name, "gb_per_s": gbs, "of_copy": gbs / copy_gbs})
    fused.set_fused_backend("reference")
    return rows


def step_table(args) -> list[dict]:
    from sora_dist.perf.bench_train import benchmark, parse_args

    rows = []
    for kernels in ("reference", "auto"):
        bench, overrides = parse_args(["--preset", args.step_preset, "--latent", *map(str, args.step_latent), "--steps", str(args.repeats),
                                       "--warmup", "2", f"--model.fused_backend={kernels}"])
        result = benchmark(bench, overrides)
        rows.append({k: result[k] for k in ("fused", "step_s_median", "tflops_per_device", "mfu", "mem_peak_gib", "tokens_per_sample")})
    return rows


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    dev = device_lib.detect("auto")
    dtype = torch.float32 if dev.kind == "cpu" else torch.bfloat16
    if args.small:
        head_dims, seq_lens, heads, tokens, width, args.repeats = (64,), (256, 1024), 4, 2048, 256, 3
        args.step_preset, args.step_latent = "debug", [2, 16, 16]
    else:
        head_dims, seq_lens, heads, tokens, width, args.repeats = (64, 128), (4096, 16384, 65536), 16, 32768, 1536, 20
        args.step_preset, args.step_latent = "1B", [16, 64, 64]
    result = {
        "date": time.strftime("%Y-%m-%d"), "device": dev.name, "dtype": str(dtype),
        "attention": attention_table(dev, dtype, head_dims, seq_lens, heads, args.repeats),
        "fused": fused_table(dev, dtype, tokens, width, args.repeats),
        "step": step_table(args),
    }
    print(f"\nkernel benchmark, {result['date']}, {dev.name}, {dtype}")
    print("  attention (forward)      backend   head_dim     seq        ms   TFLOP/s")
    for r in result["attention"]:
        print(f"  {'':<24} {r['backend']:<9} {r['head_dim']:>8} {r['seq']:>7} {r['ms']:>9.2f} {r['tflops']:>9.2f}")
    print("  fused kernels            backend     op                       GB/s   of copy")
    for r in result["fused"]:
        print(f"  {'':<24} {r['backend']:<11} {r['op']:<22} {r['gb_per_s']:>8.1f} {r['of_copy']:>8.0%}")
    print("  training step            fused       tokens   step ms   TFLOP/s   MFU     peak GiB")
    for r in result["step"]:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"  {'':<24} {r['fused']:<11} {r['tokens_per_sample']:>6} {r['step_s_median'] * 1e3:>9.1f} {r['tflops_per_device']:>9.2f} {mfu:>6} {r.get('mem_peak_gib', 0):>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    exit_process(main())
