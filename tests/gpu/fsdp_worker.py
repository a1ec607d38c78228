"""Run by test_cuda_training.py under torchrun (one process, one GPU): the accelerator paths that
CPU tests reach only through stand-ins. FSDP2 on a CUDA mesh with meta-device initialization
(DTensor's CUDA RNG) and the bf16-parameter / fp32-reduction policy; the process group's two
backends (nccl for CUDA tensors, gloo for the CPU tensors of the data position); a DCP save and
load. Writes what it saw as JSON."""

import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sora_dist import device as device_lib
from sora_dist.build import stop_distributed
from sora_dist.checkpoint import gather_to_rank0
from sora_dist.config import DataConfig, DiffusionConfig, ParallelConfig
from sora_dist.data import LatentLoader, make_synthetic
from sora_dist.diffusion import build_objective
from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.parallel import ParallelDims, build_mesh, parallelize
from sora_dist.console import exit_process


def train_steps(model, batch, steps, autocast):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    objective = build_objective(DiffusionConfig(caption_dropout=0.0), (1, 2, 2))
    losses = []
    for step in range(steps):
        g = torch.Generator(device="cuda").manual_seed(step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = objective.loss(model, *batch, g).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def main():
    dev = device_lib.detect("cuda")
    dist.init_process_group(dev.comm_backend)
    report = {"backend": dev.comm_backend}
    cfg = DiTConfig(in_channels=16, text_dim=64, hidden_size=256, depth=4, num_heads=4)
    mesh = build_mesh(ParallelDims(1, 1, 1, 1, 1, "fsdp"), "cuda")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    parallelize(model, ParallelConfig(), ParallelDims(1, 1, 1, 1, 1, "fsdp"), mesh, dev.torch_device, torch.bfloat16)
    report["all_dtensor"] = all(isinstance(p, DTensor) for p in model.parameters())
    whole = gather_to_rank0(model.state_dict())
    report["finite"] = all(bool(torch.isfinite(t).all()) for t in whole.values())
    q0, q1 = whole["blocks.0.attn.to_q.weight"], whole["blocks.1.attn.to_q.weight"]
    report["blocks_differ"] = not torch.equal(q0, q1)
    report["xavier_std_ratio"] = float(q0.std() / (2 / (256 + 256)) ** 0.5)

    plain = VideoDiT(cfg).cuda()
    plain.load_state_dict(whole)
    g = torch.Generator(device="cuda").manual_seed(1)
    batch = (torch.randn(2, 16, 4, 16, 16, generator=g, device="cuda"), torch.randn(2, 12, 64, generator=g, device="cuda"),
             torch.ones(2, 12, dtype=torch.bool, device="cuda"))
    report["fsdp_losses"] = train_steps(model, batch, 5, autocast=True)
    report["plain_losses"] = train_steps(plain, batch, 5, autocast=True)
    report["sharded_param_dtype"] = str(model.blocks[0].attn.to_q.weight.dtype)  # sharded fp32 master weights

    cuda_sum = torch.ones(3, device="cuda")
    dist.all_reduce(cuda_sum)
    data = make_synthetic(Path(tempfile.mkdtemp()) / "blobs", num_samples=16, seed=0, samples_per_shard=8)
    loader = LatentLoader(DataConfig(path=str(data), num_workers=0), (1, 2, 2), dp_rank=0, dp_size=1, pin_memory=True)
    first = next(iter(loader))
    report["pinned"] = bool(first.latents.is_pinned())
    loader.mark_consumed(first)
    state = loader.state_dict(mesh["dp"].get_group())  # CPU tensors through the gloo half
    report["consumed"] = int(sum(m.sum() for m in state["consumed"].values()))
    report["cuda_all_reduce"] = cuda_sum.tolist()
    Path(sys.argv[1]).write_text(json.dumps(report))
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
