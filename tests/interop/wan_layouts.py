"""Run inside equivalence_worker.py's torchrun (no launch of its own): a tiny diffusers Wan folder
imported by every rank of a parallel layout (each rank reading its own shards' slices), then one
forward and backward, against diffusers' own model in one process. Returns, per layout, dtype and
variant (text-to-video, and FLF2V: image tokens with their position table, I2V's keys and values,
more channels read than predicted), the relative differences of the loss and of all parameter
gradients."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from sora_dist.config import ParallelConfig
from sora_dist.interop.load import load_wan
from sora_dist.interop.wan import tensor_maps, to_ours
from sora_dist.models import VideoDiT
from sora_dist.parallel import apply_fsdp, apply_model_parallel, build_mesh, materialize, resolve_dims
from wan_reference import diffusers_in_float64, image_tokens, inputs, make_wan, our_config, save_wan, wan_image, wan_inputs

# 3 heads of 12 channels where nothing splits heads: FSDP's row shards then cut a head in two, and
# a rank reads part of a head's permuted rows. 4 heads where TP or Ulysses give each rank whole heads.
LAYOUTS = {
    2: {"fsdp2": dict(), "tp2": dict(tp=2), "ulysses2": dict(sp_ulysses=2), "ring2": dict(sp_ring=2)},
    4: {"tp2_ulysses2": dict(tp=2, sp_ulysses=2), "fsdp2_tp2": dict(tp=2), "fsdp2_ulysses2": dict(sp_ulysses=2)},
}


def heads_for(layout: dict) -> int:
    return 4 if layout.get("tp", 1) * layout.get("sp_ulysses", 1) > 1 else 3
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}
VARIANTS = ("t2v", "flf2v")


def reference(dtype, heads: int, variant: str):
    """diffusers' loss (the mean of output x weight) and its gradients in our layout."""
    wan = make_wan(dtype, variant=variant, num_attention_heads=heads)
    cfg = our_config(wan)
    x, t, text, mask = inputs(cfg, dtype)
    image = image_tokens(cfg, dtype)
    weight = torch.randn(x.shape[0], cfg.predicted_channels, *x.shape[2:], generator=torch.Generator().manual_seed(5), dtype=dtype)
    with diffusers_in_float64() if dtype == torch.float64 else torch.enable_grad():
        out = wan(*wan_inputs(cfg, x, t, text, mask), encoder_hidden_states_image=wan_image(cfg, image), return_dict=False)[0]
        loss = (out * weight).mean()
        loss.backward()
    params = dict(wan.named_parameters())
    shapes = {m.ours: m for m in tensor_maps(cfg)}
    grads = {}
    with torch.device("meta"):
        ours_shapes = {n: tuple(p.shape) for n, p in VideoDiT(cfg).named_parameters()}
    for name, tmap in shapes.items():
        grads[name] = to_ours(params[tmap.theirs].grad, tmap, ours_shapes[name])
    return cfg, (x, t, text, mask, image, weight), loss.item(), grads


def imported_run(folder, cfg, batch, layout: dict, world_size: int, dtype):
    parallel = ParallelConfig(**layout)
    dims = resolve_dims(parallel, world_size, cfg)
    mesh = build_mesh(dims, "cpu")
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = VideoDiT(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    apply_model_parallel(model, parallel, dims, mesh)
    apply_fsdp(model, mesh, dims, None, parallel.reshard_after_forward)
    materialize(model, torch.device("cpu"))
    load_wan(model, folder)
    x, t, text, mask, image, weight = batch
    per_rank = x.shape[0] // dims.dp
    rows = slice(mesh["dp"].get_local_rank() * per_rank, (mesh["dp"].get_local_rank() + 1) * per_rank)
    image = None if image is None else image[rows]
    loss = (model(x[rows], t[rows], text[rows], mask[rows], image=image) * weight[rows]).mean()
    (loss * dims.sp).backward()  # the SP ranks' gradients are averaged with the DP ranks'
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss)
    grads = {}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        grads[name] = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
    return global_loss.item() / world_size, grads


def check_layouts(work_dir, world_size: int) -> dict:
    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    results = {}
    head_counts = sorted({heads_for(lay) for lay in LAYOUTS[world_size].values()})
    for (dtype_name, dtype), heads, variant in [(d, h, v) for d in DTYPES.items() for h in head_counts for v in VARIANTS]:
        folder = work_dir / f"wan_{variant}_{dtype_name}_{heads}heads"
        if dist.get_rank() == 0:
            save_wan(make_wan(dtype, variant=variant, num_attention_heads=heads), folder, max_shard_size="20KB")  # many files, an index
        dist.barrier()
        cfg, batch, ref_loss, ref_grads = reference(dtype, heads, variant)
        for name, layout in LAYOUTS[world_size].items():
            if heads_for(layout) != heads:
                continue
            try:
                loss, grads = imported_run(folder, cfg, batch, layout, world_size, dtype)
            except Exception as err:  # report, so the test names the layout
                results[f"{name}/{dtype_name}/{variant}"] = {"error": f"{type(err).__name__}: {err}"}
                continue
            ours_all = torch.cat([grads[n].flatten() for n in ref_grads])
            ref_all = torch.cat([g.flatten() for g in ref_grads.values()])
            results[f"{name}/{dtype_name}/{variant}"] = {"loss": abs(loss - ref_loss) / abs(ref_loss), "grad": rel(ours_all, ref_all)}
    return results
