"""Run by test_final_weights.py under torchrun: lay a model out as asked (FSDP2 or TP), gather its
weights for the end of a run, and report what each rank holds."""

import json
import sys

import torch

from sora_dist import device as device_lib
from sora_dist.build import build_single_device_model, build_stack, start_distributed, stop_distributed
from sora_dist.checkpoint import gather_to_rank0
from sora_dist.config import load_config, resolve_model_config
from sora_dist.console import exit_process


def main():
    cfg = load_config(None, ["--model.hidden_size=32", "--model.depth=2", "--model.num_heads=2", *sys.argv[2:]])
    dev = device_lib.detect("cpu")
    world_size, rank = start_distributed(dev)
    stack = build_stack(cfg, dev, resolve_model_config(cfg.model, 4, 8), world_size)
    gathered = gather_to_rank0(stack.model.state_dict())
    report = {"rank": rank, "gathered": gathered is not None}
    if gathered is not None:
        torch.manual_seed(cfg.train.seed)  # as build_stack does: the same initial weights
        reference = build_single_device_model(cfg, 4, 8, torch.device("cpu"))
        expected = reference.state_dict()
        report["devices"] = sorted({t.device.type for t in gathered.values()})
        report["keys_match"] = sorted(gathered) == sorted(expected)
        report["max_error"] = max(float((gathered[k] - expected[k]).abs().max()) for k in expected)
        report["local_is_sharded"] = any(v.shape != expected[k].shape for k, v in ((k, getattr(v, "_local_tensor", v)) for k, v in stack.model.state_dict().items()))
    with open(f"{sys.argv[1]}.{rank}.json", "w") as f:
        json.dump(report, f)
    stop_distributed()


if __name__ == "__main__":
    exit_process(main())
