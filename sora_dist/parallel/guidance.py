"""CFG-parallel classifier-free guidance: the conditional and unconditional halves of a guided
step on the two ranks of a group (the mesh's dp_replicate dimension when sampling), each
running the model on its half, then exchanging outputs so that both hold the guided result."""

from __future__ import annotations

import torch
import torch.distributed as dist


def cfg_parallel(model, text: torch.Tensor, text_mask: torch.Tensor, scale: float, group):
    """The guided denoiser of ``sora_dist.diffusion.guided``, with the two halves on the two
    ranks of ``group`` (rank 0 conditional, rank 1 unconditional)."""
    assert dist.get_world_size(group) == 2, "CFG-parallel splits guidance over exactly 2 ranks"
    conditional = dist.get_rank(group) == 0
    mask = text_mask if conditional else torch.zeros_like(text_mask)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(x, t, text, mask).float().contiguous()
        halves = [torch.empty_like(out) for _ in range(2)]
        dist.all_gather(halves, out, group=group)
        cond, uncond = halves
        return uncond + scale * (cond - uncond)

    return denoise
