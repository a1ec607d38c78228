"""Run by torchrun from test_equivalence.py: for each parallel layout, two SGD steps of a tiny DiT
on a video batch, an image batch and a batch whose token count does not divide the SP degree
and whose timesteps differ per latent frame (so SP ranks hold parts of frames), compared with a
single-process run of the same model and batches on every rank.

Writes {layout: {batch: {"loss": .., "grad": .., "param": .., "norm": ..}}} (max relative errors)
to the JSON path given as the first argument (rank 0); under "_wan_import", a diffusers Wan folder
imported on each layout against diffusers (tests/interop/wan_layouts.py).
"""

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from sora_dist.build import stop_distributed
from sora_dist.config import ParallelConfig
from sora_dist.models import DiTConfig, VideoDiT
from sora_dist.console import exit_process
from sora_dist.parallel import (
    TorchEngine,
    apply_ddp,
    apply_deepspeed,
    apply_fsdp,
    apply_model_parallel,
    build_mesh,
    materialize,
    resolve_dims,
)

CFG = DiTConfig(in_channels=4, text_dim=16, hidden_size=64, depth=2, num_heads=4, patch_size=(1, 2, 2))
MODELS = {"base": CFG, "all_heads_qk_norm": replace(CFG, qk_norm_scope="all_heads"), "lora": CFG}  # a layout's "model" names one
LORA_RANK = 4  # "lora": adapters on every block layer (the base frozen), A and B both random
GLOBAL_BATCH = 4
LR, CLIP = 0.5, 0.05
# name: (latent shape, one timestep per frame); 32, 15 and 27 tokens
BATCHES = {"video": ((2, 8, 8), False), "image": ((1, 6, 10), False), "odd_per_frame_t": ((3, 6, 6), True)}

LAYOUTS = {
    2: {
        "fsdp": dict(),
        "hsdp": dict(dp_replicate=2),
        "ddp": dict(engine="ddp"),
        "tp2": dict(tp=2),
        "tp2_all_heads_qk_norm": dict(tp=2, model="all_heads_qk_norm"),
        "tp2_lora": dict(tp=2, model="lora"),
        "ulysses2": dict(sp_ulysses=2),
        "ring2": dict(sp_ring=2),
        "zero1": dict(engine="deepspeed", zero_stage=1),
        "zero2": dict(engine="deepspeed", zero_stage=2),
        "zero3": dict(engine="deepspeed", zero_stage=3),
    },
    4: {
        "fsdp": dict(),
        "hsdp": dict(dp_replicate=2),
        "ddp": dict(engine="ddp"),
        "ulysses2_ring2": dict(sp_ulysses=2, sp_ring=2),
        "tp2_ulysses2": dict(tp=2, sp_ulysses=2),
        "tp2_ulysses2_all_heads_qk_norm": dict(tp=2, sp_ulysses=2, model="all_heads_qk_norm"),
        "fsdp2_tp2": dict(tp=2),
        "fsdp2_tp2_lora": dict(tp=2, model="lora"),
        "fsdp2_ulysses2": dict(sp_ulysses=2, activation_checkpointing="full"),
        "fsdp2_ring2": dict(sp_ring=2, activation_checkpointing="selective"),
        "ring4": dict(sp_ring=4),
        "ulysses4": dict(sp_ulysses=4),
        "ddp2_ulysses2": dict(engine="ddp", sp_ulysses=2),
        "zero2_ulysses2": dict(engine="deepspeed", zero_stage=2, sp_ulysses=2),
        "zero3_ulysses2": dict(engine="deepspeed", zero_stage=3, sp_ulysses=2),
    },
}


def make_batch(shape, seed, per_frame_t=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(GLOBAL_BATCH, 4, *shape, generator=g)
    t = torch.rand(GLOBAL_BATCH, *CFG.grid(shape)[:1] if per_frame_t else (), generator=g) * 1000
    text = torch.randn(GLOBAL_BATCH, 5, 16, generator=g)
    mask = torch.ones(GLOBAL_BATCH, 5, dtype=torch.bool)
    mask[1, 2:] = False
    mask[3, 4:] = False
    target = torch.randn(GLOBAL_BATCH, 4, *shape, generator=g)
    return x, t, text, mask, target


def build(model_name: str) -> VideoDiT:
    model = VideoDiT(MODELS[model_name])
    if model_name == "lora":
        from sora_dist.models.lora import TARGETS, add_lora

        add_lora(model, LORA_RANK, 2.0 * LORA_RANK, list(TARGETS))
    return model


def initial_state(model_name: str):
    torch.manual_seed(0)
    model = build(model_name)
    with torch.no_grad():  # random everywhere: zero-initialized layers would hide mistakes
        for p in model.parameters():
            p.normal_(0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


def clean(name):
    for junk in ("_checkpoint_wrapped_module.", "module."):
        name = name.replace(junk, "")
    return name


def full(t):
    return t.full_tensor() if isinstance(t, DTensor) else t


def reference_run(model_name, state, batches):
    model = build(model_name)
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses, grads, norms = [], None, []
    for x, t, text, mask, target in batches:
        loss = F.mse_loss(model(x, t, text, mask), target)
        loss.backward()
        if grads is None:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP).item())
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, norms, {n: p.detach().clone() for n, p in model.named_parameters()}


def parallel_run(model_name, cfg, dims, mesh, state, batches, world_size):
    model = build(model_name)
    model.load_state_dict(state)
    apply_model_parallel(model, cfg, dims, mesh)
    if dims.engine == "fsdp":
        apply_fsdp(model, mesh, dims, None, cfg.reshard_after_forward)
    if dims.engine == "deepspeed":
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        engine = apply_deepspeed(model, opt, sched, mesh, cfg.zero_stage, CLIP, 1, bf16=False)
    else:
        wrapped = apply_ddp(model, mesh, torch.device("cpu")) if dims.engine == "ddp" else model
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        engine = TorchEngine(wrapped, model, opt, sched, CLIP, grad_accum=1)
    dp_rank, per_rank = mesh["dp"].get_local_rank(), GLOBAL_BATCH // dims.dp
    losses, grads, norms = [], None, []
    for x, t, text, mask, target in batches:
        rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        loss = F.mse_loss(engine.model(x[rows], t[rows], text[rows], mask[rows]), target[rows])
        engine.backward(loss * dims.sp)
        if grads is None:
            grads = {}
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if dims.engine == "deepspeed":
                    from deepspeed.utils import safe_get_full_grad

                    grads[clean(name)] = safe_get_full_grad(p).clone()
                else:
                    grads[clean(name)] = full(p.grad).clone()
        norms.append(engine.step(on_non_finite=lambda n: None))
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world_size)
    if dims.engine == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param

        params = {clean(n): safe_get_full_fp32_param(p).clone() for n, p in model.named_parameters()}
    else:
        params = {clean(n): full(p.detach()).clone() for n, p in model.named_parameters()}
    return losses, grads, norms, params


def sharded_bytes(world_size):
    """Per-rank parameter and AdamW-state bytes under FSDP over all ranks, and unsharded."""
    from sora_dist.parallel import local_bytes

    cfg = ParallelConfig()
    dims = resolve_dims(cfg, world_size, CFG)
    mesh = build_mesh(dims, "cpu")
    model = VideoDiT(CFG)
    total_params = local_bytes(model.parameters())
    apply_fsdp(model, mesh, dims, None, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, text, mask, target = make_batch(BATCHES["video"][0], 0)
    F.mse_loss(model(x[:1], t[:1], text[:1], mask[:1]), target[:1]).backward()
    opt.step()
    states = [v for state in opt.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    return {"params_full": total_params, "params_rank": local_bytes(model.parameters()),
            "optim_full": 2 * total_params, "optim_rank": local_bytes(states)}


def parameter_dtypes_under_bf16(world_size):
    """The dtype each module's parameters have in its forward under FSDP2 with bf16 parameters and
    autocast (the trainer's GPU setting), for a Wan-option model; the gradients' dtypes after."""
    cfg = replace(CFG, hidden_size=48, modulation="shared", text_context="padded", text_len=8, qk_norm_scope="all_heads")
    dims = resolve_dims(ParallelConfig(), world_size, cfg)
    with torch.device("meta"):
        model = VideoDiT(cfg)
    apply_fsdp(model, build_mesh(dims, "cpu"), dims, torch.bfloat16, True)
    materialize(model, torch.device("cpu"))
    seen = {}
    for name, module in model.named_modules():
        if name in ("x_embedder", "t_embedder", "time_proj", "blocks.0.scale_shift_table", "blocks.0.norm2", "blocks.0.attn.to_q",
                    "blocks.0.mlp.fc1", "final_layer.scale_shift_table", "final_layer.linear"):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: str(next(m.parameters()).dtype)}))
    x, t, text, mask, _ = make_batch(BATCHES["video"][0], 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x[:1], t[:1], text[:1], mask[:1])
    out.float().square().mean().backward()
    grads = {str(p.grad.dtype) for p in model.parameters()}
    return {"forward": seen, "grads": sorted(grads), "finite": bool(torch.isfinite(out.float()).all())}


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def main():
    out_path = sys.argv[1]
    only = set(sys.argv[2].split(",")) if len(sys.argv) > 2 else None
    dist.init_process_group("gloo")
    world_size = dist.get_world_size()
    torch.manual_seed(0)
    batches = {kind: [make_batch(shape, seed, per_frame_t) for seed in (1, 2)] for kind, (shape, per_frame_t) in BATCHES.items()}
    states, references = {}, {}  # per model, the same for every layout
    results = {}
    for name, layout in LAYOUTS[world_size].items():
        if only and name not in only:
            continue
        results[name] = {}
        layout = dict(layout)
        model_name = layout.pop("model", "base")
        model_cfg = MODELS[model_name]
        if model_name not in states:
            states[model_name] = initial_state(model_name)
            references[model_name] = {kind: reference_run(model_name, states[model_name], batches[kind]) for kind in BATCHES}
        cfg = ParallelConfig(**layout)
        dims = resolve_dims(cfg, world_size, model_cfg)
        mesh = build_mesh(dims, "cpu")  # one mesh (and its process groups) per layout, for every batch kind
        for kind in BATCHES:
            ref_losses, ref_grads, ref_norms, ref_params = references[model_name][kind]
            try:
                losses, grads, norms, params = parallel_run(model_name, cfg, dims, mesh, states[model_name], batches[kind], world_size)
            except Exception as err:  # report, so the test names the layout
                results[name][kind] = {"error": f"{type(err).__name__}: {err}"}
                continue
            results[name][kind] = {
                "loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                "norm": max(abs(a - b) / abs(b) for a, b in zip(norms, ref_norms)),
                "grad": max(rel(grads[n], g) for n, g in ref_grads.items()),
                "worst_grad": max(ref_grads, key=lambda n: rel(grads[n], ref_grads[n])),
                "param": max(rel(params[n], p) for n, p in ref_params.items()),
                "worst_param": max(ref_params, key=lambda n: rel(params[n], ref_params[n])),
            }
    if only is None or "_kept_in_fp32" in only:
        results["_kept_in_fp32"] = parameter_dtypes_under_bf16(world_size)
    if only is None or "_wan_import" in only:
        sys.path.insert(0, str(Path(__file__).parents[1] / "interop"))
        from wan_layouts import check_layouts

        results["_wan_import"] = check_layouts(Path(out_path).parent, world_size)
    bytes_rank = sharded_bytes(world_size)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, bytes_rank)
    results["_bytes"] = gathered
    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    stop_distributed()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    exit_process(main())
