"""Run by torchrun (or plain python for one rank) from test_checkpoint_reshard.py, on the trainer's
own build path.

  save OUT.pt  [overrides]: train, saving a checkpoint at the last step; dump the full model and
                            optimizer state and the dataset positions trained on (recorded here,
                            independently of the loader's own bookkeeping)
  load OUT.pt  [overrides]: build another layout, resume from the newest checkpoint, dump the full
                            state, then list the positions the loader yields for the rest of the epoch
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from sora_dist import device as device_lib
from sora_dist.checkpoint import gather_to_rank0
from sora_dist.config import load_config
from sora_dist.trainer import build_run, run_loop, stop_signals
from sora_dist.console import exit_process


def full_state(run) -> dict:
    options = StateDictOptions(full_state_dict=True)
    model = get_model_state_dict(run.model, options=options)
    flat = {f"model.{k}": v.detach().clone() for k, v in model.items()}
    if run.state.deepspeed is not None:  # DeepSpeed owns its optimizer state: weights only
        return flat
    optim = get_optimizer_state_dict(run.model, run.optimizer, options=options)
    for name, state in optim["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                flat[f"optim.{name}.{key}"] = value.detach().clone()
    if run.ema is not None:
        ema = gather_to_rank0(run.ema.shadow)
        flat.update({f"ema.{k}": v for k, v in (ema or {}).items()})
    return flat


def gather_positions(run, positions: list[int]) -> dict[int, list[int]]:
    """Positions per data-parallel rank (the ranks of one SP/TP group hold the same ones)."""
    if not dist.is_initialized():
        return {0: positions}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (run.state.dp_rank, positions))
    return dict(everyone)


def main():
    mode, out_path, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    dev = device_lib.detect("cpu")
    if world_size > 1:
        dist.init_process_group("gloo")
    cfg = load_config(None, overrides)
    run, _ = build_run(cfg, dev, world_size, rank)
    result = {}
    if mode == "save":
        trained = []
        mark = run.loader.mark_consumed
        run.loader.mark_consumed = lambda batch: (trained.extend(batch.uids), mark(batch))
        run.batches = iter(run.loader)
        with stop_signals() as stop:
            run_loop(run, stop)
        result["trained"] = gather_positions(run, trained)
    else:
        run.ckpt.resume(run.state)
        epoch, rest = run.loader.epoch, []
        for batch in run.loader:
            if batch.epoch != epoch:
                break
            rest.extend(batch.uids)
        result["rest"] = gather_positions(run, rest)
    result["state"] = full_state(run)
    result["step"] = run.state.step
    if rank == 0:
        torch.save(result, out_path)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_process(main())
