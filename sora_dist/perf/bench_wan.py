"""Side by side: a training step (forward and backward) of the same Wan-shaped model with the
same weights and input, in sora_dist and in diffusers' ``WanTransformer3DModel``, in one process,
in alternating rounds.

  sora-dist bench-wan --json wan_speed.json                      # CPU-sized defaults
  sora-dist bench-wan --heads 12 --depth 30 --ffn 8960 --latent 21 60 104 --dtype bf16   # 1.3B at 32,760 tokens, GPU

diffusers builds a random model from a Wan config, which is saved and imported into sora_dist
(``checkpoint.init_from``'s loader), so both hold the same weights. The caption has
``--caption-tokens`` real tokens; diffusers gets it zero-padded to 512 as Wan's pipeline pads it,
sora_dist gets the tokens and their mask (it projects only the caption's rows and one zero token,
then attends to the same 512). Each round times one step of each,
the order alternating; the result is each side's median step and their ratio (diffusers' time
over ours: above 1 means sora_dist is faster), with the spread of the per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sora_dist import device as device_lib
from sora_dist.console import CommandParser, exit_process, positive_int, user_command
from sora_dist.interop.load import load_wan
from sora_dist.interop.wan import wan_model_options
from sora_dist.kernels import select_attention_backend, set_attention_backend
from sora_dist.kernels.fused import select_fused_backend, set_fused_backend
from sora_dist.models import DiTConfig, VideoDiT, train_flops
from sora_dist.perf.output import report_on_rank_zero

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def wan_config(args) -> dict:
    return {"patch_size": [1, 2, 2], "num_attention_heads": args.heads, "attention_head_dim": args.head_dim, "in_channels": 16,
            "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": args.ffn, "num_layers": args.depth,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None, "added_kv_proj_dim": None,
            "rope_max_seq_len": 1024}


def build_pair(args, dev):
    """(diffusers' model, ours with its weights), both on the device in the benchmark's dtype."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    theirs = WanTransformer3DModel(**wan_config(args))
    ours_cfg = DiTConfig(**wan_model_options(wan_config(args)))
    with tempfile.TemporaryDirectory() as folder:
        theirs.save_pretrained(folder)
        with torch.device("meta"):
            ours = VideoDiT(ours_cfg)
        ours.to_empty(device="cpu")
        load_wan(ours, Path(folder))
    dtype = DTYPES[args.dtype]
    return theirs.to(dev.torch_device, dtype), ours.to(dev.torch_device, dtype)


def make_inputs(cfg: DiTConfig, latent, caption_tokens: int, dtype, device):
    """(x, t, a caption of ``caption_tokens`` real tokens and its mask) for ours, and the same
    caption zero-padded to 512 tokens as Wan's pipeline gives it to diffusers."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_channels, *latent, generator=g).to(device, dtype)
    t = torch.tensor([500.0], device=device)
    text = torch.randn(1, caption_tokens, cfg.text_dim, generator=g).to(device, dtype)
    mask = torch.ones(1, caption_tokens, dtype=torch.bool, device=device)
    padded = torch.nn.functional.pad(text, (0, 0, 0, cfg.text_len - caption_tokens))
    return x, t, text, mask, padded


def step_seconds(run, dev) -> float:
    dev.synchronize()
    start = time.perf_counter()
    run()
    dev.synchronize()
    return time.perf_counter() - start


def benchmark(args) -> dict:
    dev = device_lib.detect(args.device)
    set_attention_backend(select_attention_backend(dev.kind, dev.capability))
    set_fused_backend(select_fused_backend(dev.kind))
    theirs, ours = build_pair(args, dev)
    x, t, text, mask, padded = make_inputs(ours.cfg, args.latent, args.caption_tokens, DTYPES[args.dtype], dev.torch_device)

    def ours_step():
        ours(x, t, text, mask).float().square().mean().backward()

    def theirs_step():
        theirs(x, t, padded, return_dict=False)[0].float().square().mean().backward()

    for _ in range(args.warmup):
        ours_step(), theirs_step()
    times = {"sora_dist": [], "diffusers": []}
    for i in range(args.rounds):
        order = [("sora_dist", ours_step), ("diffusers", theirs_step)]
        for name, run in order if i % 2 == 0 else order[::-1]:
            times[name].append(step_seconds(run, dev))
        print(f"bench-wan: round {i + 1}/{args.rounds}", flush=True)
    ratios = [b / a for a, b in zip(times["sora_dist"], times["diffusers"])]
    flops = train_flops(ours.cfg, tuple(args.latent), args.caption_tokens)
    peak = dev.peak_flops
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {"device": dev.name, "dtype": args.dtype, "tokens": ours.cfg.num_tokens(tuple(args.latent)), "caption_tokens": args.caption_tokens, "parameters": sum(p.numel() for p in ours.parameters()),
            "step_s": medians, "step_s_all": times, "speedup": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios),
            "mfu": {name: flops / s / peak for name, s in medians.items()} if peak else None}


def print_result(r: dict) -> None:
    print(f"{r['parameters'] / 1e6:.1f}M-parameter Wan-shaped model, {r['tokens']} tokens, a caption of {r['caption_tokens']} "
          f"tokens padded to 512, {r['dtype']} on {r['device']}")
    for name, seconds in r["step_s"].items():
        mfu = f"  MFU {r['mfu'][name]:.1%}" if r["mfu"] else ""
        print(f"  {name:<10} step (median) {seconds * 1e3:9.1f} ms{mfu}")
    print(f"  diffusers / sora_dist: {r['speedup']:.3f} (rounds {r['speedup_min']:.3f}-{r['speedup_max']:.3f}); above 1: sora_dist is faster")


@user_command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="sora-dist bench-wan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=positive_int, default=2)
    parser.add_argument("--head-dim", type=positive_int, default=128)
    parser.add_argument("--depth", type=positive_int, default=4)
    parser.add_argument("--ffn", type=positive_int, default=1024)
    parser.add_argument("--latent", type=positive_int, nargs=3, default=[4, 16, 16], metavar=("T", "H", "W"))
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--caption-tokens", type=positive_int, default=120, help="real caption tokens (of the 512 Wan pads to)")
    parser.add_argument("--rounds", type=positive_int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", default="", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    report_on_rank_zero(benchmark(args), print_result, args.json)
    return 0


if __name__ == "__main__":
    exit_process(main())
