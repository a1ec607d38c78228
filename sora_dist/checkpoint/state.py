"""What a checkpoint holds, gathered from the live objects of a run, and the readers of its weights
outside a run (export, sampling)."""

from __future__ import annotations

import base64
import contextlib
import logging
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from sora_dist.checkpoint.files import SafeLoadPlanner, SafeReader, read_metadata
from sora_dist.errors import CheckpointError, ConfigError

log = logging.getLogger("sora_dist")

BITMAPS = ("consumed", "stream_skip")
"""The keys of LatentLoader.state_dict() that hold a bitmap per epoch."""


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if distributed() else 0


@contextlib.contextmanager
def single_process_ok():
    """DCP warns that it assumes one process when no process group exists: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def encode_data_state(state: dict) -> dict:
    """JSON form of LatentLoader.state_dict(): bitmaps packed and base64-encoded."""
    packed = {key: {str(e): base64.b64encode(np.packbits(m).tobytes()).decode() for e, m in state[key].items()} for key in BITMAPS}
    return {**state, **packed, "num_samples": int(len(next(iter(state["consumed"].values()), [])))}


def decode_data_state(raw: dict, num_samples: int) -> dict:
    if raw["num_samples"] and raw["num_samples"] != num_samples:
        raise ConfigError(f"the checkpoint's data position covers {raw['num_samples']} samples but the dataset has {num_samples}: resume with the same dataset")
    unpacked = {
        key: {int(e): np.unpackbits(np.frombuffer(base64.b64decode(b), dtype=np.uint8))[:num_samples].astype(bool) for e, b in raw[key].items()}
        for key in BITMAPS
    }
    return {**raw, **unpacked}


class TrainState:
    """What a checkpoint holds, gathered from the live objects of a run."""

    def __init__(self, model, optimizer, scheduler, ema, loader, generator, dp_rank: int, dp_group, world_size: int, deepspeed=None):
        self.model, self.optimizer, self.scheduler, self.ema = model, optimizer, scheduler, ema
        # LoRA: the frozen base never changes and is read again from checkpoint.init_from at every
        # start, so a checkpoint holds the adapters (with the buffers, optimizer, EMA, data position) alone.
        self.trainable_only = any(not p.requires_grad for p in model.parameters())
        self.loader, self.generator, self.deepspeed = loader, generator, deepspeed
        self.dp_rank, self.dp_group, self.world_size = dp_rank, dp_group, world_size
        self.step = 0
        self.samples = 0  # samples this data-parallel rank trained on (data.json has the global position)

    def counters(self) -> dict:
        return {"step": self.step, "samples": self.samples}

    def set_counters(self, counters: dict) -> None:
        self.step, self.samples = int(counters["step"]), int(counters["samples"])

    def dcp_state_dict(self) -> dict:
        payload = {
            "model": get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=self.trainable_only)),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "train": self.counters(),
        }
        if self.ema is not None:
            payload["ema"] = self.ema.shadow
        return payload

    def set_dcp_state_dict(self, payload: dict) -> None:
        set_model_state_dict(self.model, payload["model"], options=StateDictOptions(strict=not self.trainable_only))
        set_optimizer_state_dict(self.model, self.optimizer, payload["optim"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.set_counters(payload["train"])
        # "ema" was loaded in place into self.ema.shadow by dcp.load.

    def gather_rng(self) -> dict:
        """Every data-parallel rank's generator state (a collective)."""
        mine = self.generator.get_state().tolist()
        states = [None] * (dist.get_world_size() if distributed() else 1)
        if distributed():
            dist.all_gather_object(states, (self.dp_rank, mine))
        else:
            states = [(0, mine)]
        return {"world_size": self.world_size, "generators": {str(r): s for r, s in states}}

    def set_rng(self, saved: dict) -> bool:
        """Restore this rank's generator if the checkpoint has one for its data-parallel rank
        and the same number of ranks; else keep the fresh seed (a new layout draws anew)."""
        state = saved["generators"].get(str(self.dp_rank))
        if state is None or saved["world_size"] != self.world_size:
            return False
        self.generator.set_state(torch.tensor(state, dtype=torch.uint8))
        return True


def gather_to_rank0(tensors: dict[str, torch.Tensor]) -> Optional[dict[str, torch.Tensor]]:
    """Whole copies of ``tensors`` in rank 0's CPU memory, None on the other ranks. Sharded ones
    (DTensors) are gathered one at a time, a collective every rank must join, so an accelerator
    holds at most one whole tensor beyond its shards."""
    whole_on_rank0 = {}
    for name, tensor in tensors.items():
        whole = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if rank() == 0:
            whole_on_rank0[name] = whole.detach().to("cpu", copy=True).contiguous()
        del whole
    return whole_on_rank0 if rank() == 0 else None


def load_weights_for_export(path: Path, model: torch.nn.Module, ema: bool, base: Optional[Reader] = None) -> str:
    """Fill a single-device model from a DCP checkpoint (no process group needed); returns
    which weights were used ('ema' or 'model'). ``base``: see ``weight_reader``."""
    read, use = weight_reader(path, {name: t.shape for name, t in model.state_dict().items()}, ema, base)
    model.load_state_dict(read(list(model.state_dict())))
    return use


Reader = Callable[[list[str]], dict[str, torch.Tensor]]
"""names -> whole tensors."""


def weight_reader(path: Path, shapes: dict[str, torch.Size], ema: bool, base: Optional[Reader] = None) -> tuple[Reader, str]:
    """(read, which): ``read(names)`` loads those whole fp32 tensors alone from a DCP checkpoint
    (no process group needed), the EMA weights if asked and saved, else the raw ones ('ema' or
    'model'). Reading a few at a time bounds memory by their size, not the model's. A LoRA
    checkpoint holds no frozen base weight: those come from ``base`` (the run's checkpoint.init_from)."""
    saved = set(read_metadata(path).state_dict_metadata)
    has_ema = any(key.startswith("ema.") for key in saved)
    use = "ema" if ema and has_ema else "model"
    if ema and not has_ema:
        log.warning("%s has no EMA weights (optim.ema_decay was 0): exporting the raw weights", path)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        # Buffers (the empty-prompt states) have no EMA: they come from the model's state.
        target: dict[str, dict[str, torch.Tensor]] = {"ema": {}, "model": {}}
        frozen = [name for name in names if f"model.{name}" not in saved]
        if frozen and base is None:
            raise CheckpointError(f"{path} holds LoRA adapters without their frozen base ({frozen[0]}, ...): "
                                  "its run's checkpoint.init_from must still exist to read the base weights from")
        for name in names:
            if name not in frozen:
                target[use if f"{use}.{name}" in saved else "model"][name] = torch.empty(shapes[name])
        if target["model"] or target["ema"]:
            with single_process_ok():
                dcp.load({k: v for k, v in target.items() if v}, storage_reader=SafeReader(str(path)), planner=SafeLoadPlanner())
        return {**(base(frozen) if frozen else {}), **target["model"], **target["ema"]}

    return read, use
