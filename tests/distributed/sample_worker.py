"""Run by torchrun from test_sample_parallel.py: sample a tiny random DiT on every sampling layout
of the world size (CFG-parallel, Ulysses, ring, TP and their products) and compare with the
single-device sample of the same model, prompt, seed and given frames.

Writes {layout: max relative error} (or {"error": ...}) to the JSON path given as argv[1] (rank 0).
"""

import argparse
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

from sora_dist import device as device_lib
from sora_dist.applications import Request
from sora_dist.build import stop_distributed
from sora_dist.config import load_config
from sora_dist.diffusion import build_objective
from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.sample import generate, parallel_model, sampling_layout
from sora_dist.console import exit_process

CFG = DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=2, num_heads=4, patch_size=(1, 2, 2))
LAYOUTS = {
    2: {"cfg2": dict(cfg_parallel=True), "ulysses2": dict(sp_ulysses=2), "ring2": dict(sp_ring=2), "tp2": dict(tp=2)},
    4: {"cfg2_ulysses2": dict(cfg_parallel=True, sp_ulysses=2), "cfg2_ring2": dict(cfg_parallel=True, sp_ring=2),
        "ulysses2_ring2": dict(sp_ulysses=2, sp_ring=2), "ulysses4": dict(sp_ulysses=4), "tp2_ulysses2": dict(tp=2, sp_ulysses=2)},
}
# An image-to-video request of 3 x 6 x 10 latents: 45 tokens, which no SP degree divides, and
# per-frame timesteps (the given first frame is at t = 0).
SHAPE = (3, 6, 10)


def model_and_request():
    torch.manual_seed(0)
    model = VideoDiT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    first = torch.randn(4, 1, *SHAPE[1:], generator=torch.Generator().manual_seed(1))
    latents = torch.zeros(4, *SHAPE)
    latents[:, :1] = first
    request = Request("image_to_video", SHAPE, latents, torch.tensor([True, False, False]))
    return model, request


def sample_with(layout, dev, cfg, text):
    model, request = model_and_request()
    args = argparse.Namespace(**{"cfg_parallel": False, "sp_ulysses": 1, "sp_ring": 1, "tp": 1, **layout})
    dims, mesh = sampling_layout(args, model.cfg, dev) if layout else (None, None)
    model = parallel_model(model, args, dims, mesh)
    group = mesh["dp_replicate"].get_group() if dims is not None and dims.dp_replicate == 2 else None
    objective = build_objective(cfg.diffusion, CFG.patch_size)
    return generate(cfg, model, objective, text, request, num=2, seed=7, dev=dev, guidance_group=group, guidance=3.0)


def main():
    out_path = sys.argv[1]
    dev = device_lib.detect("cpu")
    dist.init_process_group("gloo")
    cfg = load_config(overrides=["--diffusion.sample_steps=4"])
    text = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    reference = sample_with({}, dev, cfg, text)
    results = {}
    for name, layout in LAYOUTS[dist.get_world_size()].items():
        try:
            out = sample_with(layout, dev, cfg, text)
            results[name] = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
        except Exception as err:  # report, so that the test names the layout
            results[name] = {"error": f"{type(err).__name__}: {err}"}
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
