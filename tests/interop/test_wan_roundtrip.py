"""Import a diffusers Wan folder with checkpoint.init_from, fine-tune it with the trainer, export the
checkpoint with `sora-dist export --format diffusers`, and load the export with diffusers; and
the one-line refusals of folders that are not the configured Wan model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from sora_dist import trainer  # noqa: E402
from sora_dist.build import build_single_device_model, frozen_base_reader  # noqa: E402
from sora_dist.checkpoint import load_weights_for_export, newest_complete  # noqa: E402
from sora_dist.cli import main  # noqa: E402
from sora_dist.config import load_config  # noqa: E402
from sora_dist.errors import SoraDistError  # noqa: E402
from sora_dist.interop.load import load_wan  # noqa: E402
from wan_reference import difference_from_diffusers, empty_model, inputs, make_wan, our_config, save_wan, wan_inputs  # noqa: E402

REPO = Path(__file__).parents[2]
# The tiny Wan of wan_reference with the synthetic data's 32-wide captions and 4 latent channels.
WAN_MODEL = ["--model.hidden_size=36", "--model.depth=2", "--model.num_heads=3", "--model.ffn_dim=50", "--model.in_channels=4",
             "--model.text_dim=32"]


EMPTY_PROMPT = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float16)  # a text encoder's states for ""


@pytest.fixture(scope="module")
def finetuned(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    wan = make_wan(torch.float32, text_dim=32)
    save_wan(wan, root / "pipeline" / "transformer", max_shard_size="20KB")
    data = root / "data"  # the synthetic data, with the empty prompt's states recorded as `encode` does
    shutil.copytree(synthetic_dir, data)
    np.save(data / "empty_caption.npy", EMPTY_PROMPT)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "empty_caption": "empty_caption.npy"}))
    # The shipped 1.3B fine-tuning config, its model shrunk to the tiny Wan (the preset's options stay).
    cfg = load_config(REPO / "configs" / "wan2.1_t2v_1.3b.yaml", [
        f"--data.path={data}", f"--train.out_dir={root / 'run'}", "--data.num_workers=0", "--train.max_minutes=0",
        "--logging.tensorboard=false", "--train.steps=6", "--logging.log_every=1", "--checkpoint.every_steps=6",
        "--checkpoint.async_save=false", "--optim.warmup_steps=1", "--optim.lr=1e-3", "--train.sample_shape=[2,8,8]",
        "--parallel.activation_checkpointing=none", f"--checkpoint.init_from={root / 'pipeline'}", *WAN_MODEL])
    summary = trainer.train(cfg)
    return root, wan, summary


def test_an_imported_wan_fine_tunes_and_exports_to_diffusers(finetuned):
    from diffusers import WanTransformer3DModel

    root, wan, summary = finetuned
    assert summary["steps"] == 6 and torch.isfinite(torch.tensor(summary["last_loss"]))
    from safetensors.torch import load_file

    empty = load_file(root / "run" / "model.safetensors")["empty_caption"]  # the dataset's empty prompt, zero-padded
    assert torch.equal(empty[:3], torch.from_numpy(EMPTY_PROMPT.astype(np.float32))) and not empty[3:].any()
    checkpoint = newest_complete(root / "run" / "checkpoints")
    assert main(["export", str(checkpoint), "--format", "diffusers", "--dtype", "fp32", "--raw", "--shard-gib", "0.00002",
                 "--out", str(root / "export")]) == 0
    assert json.loads((root / "export" / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert len(list((root / "export").glob("*.safetensors"))) > 3  # written file by file, with an index

    saved = load_config(checkpoint / "config.yaml")
    ours = build_single_device_model(saved, 4, 32, torch.device("cpu"))
    load_weights_for_export(checkpoint, ours, ema=False)
    exported = WanTransformer3DModel.from_pretrained(root / "export")  # fp32 files, loaded as they are
    original = dict(wan.named_parameters())
    moved = [name for name, p in exported.named_parameters() if not torch.equal(p, original[name])]
    assert moved, "fine-tuning changed no weight"
    assert difference_from_diffusers(ours, exported) <= 1e-5
    x, t, text, mask = inputs(ours.cfg, torch.float32)


    # Sampling: our Euler sampler with guidance against the same Euler steps on diffusers' model,
    # whose unconditional half is fed the empty prompt as Wan's pipeline feeds a negative prompt.
    from sora_dist.config import DiffusionConfig
    from sora_dist.diffusion.objectives import FlowObjective
    from sora_dist.diffusion.samplers import euler_sample, guided
    from sora_dist.diffusion.schedules import shift_time

    scale, steps, shift = 5.0, 4, 3.0
    objective = FlowObjective(DiffusionConfig(shift=shift), ours.cfg.patch_size)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    ours.load_state_dict({**ours.state_dict(), "empty_caption": load_file(root / "run" / "model.safetensors")["empty_caption"]})
    with torch.no_grad():
        sampled = euler_sample(objective, guided(ours, text, mask, scale), noise, steps)
        empty = torch.from_numpy(EMPTY_PROMPT.astype(np.float32))[None].expand(x.shape[0], -1, -1)
        _, _, cond_text = wan_inputs(ours.cfg, x, t, text, mask)
        _, _, uncond_text = wan_inputs(ours.cfg, x, t, empty, torch.ones(empty.shape[:2], dtype=torch.bool))
        times = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()
        z = noise
        for t_now, t_next in zip(times[:-1], times[1:]):
            timestep = torch.full((z.shape[0],), t_now * 1000)
            cond = exported(z, timestep, cond_text, return_dict=False)[0]
            uncond = exported(z, timestep, uncond_text, return_dict=False)[0]
            z = z + (t_next - t_now) * (uncond + scale * (cond - uncond))
    assert ((sampled - z).norm() / z.norm()).item() <= 1e-5


def test_export_with_a_base_writes_a_pipeline_folder(finetuned, tmp_path):
    root, _, _ = finetuned
    base = tmp_path / "base"
    (base / "vae").mkdir(parents=True)
    (base / "vae" / "config.json").write_text("{}")
    (base / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
                                                        "vae": ["diffusers", "AutoencoderKLWan"]}))
    checkpoint = newest_complete(root / "run" / "checkpoints")
    out = tmp_path / "pipeline"
    assert main(["export", str(checkpoint), "--format", "diffusers", "--base", str(base), "--out", str(out)]) == 0
    assert (out / "transformer" / "config.json").is_file() and (out / "vae").resolve() == (base / "vae").resolve()
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanPipeline"


@pytest.fixture
def folder_and_model(tmp_path):
    wan = make_wan(torch.float32)
    model = empty_model(our_config(wan), torch.float32)
    model.init_weights()
    return save_wan(wan, tmp_path / "wan", max_shard_size="20KB"), model


def test_a_folder_that_is_not_wan_is_refused(folder_and_model):
    folder, model = folder_and_model
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(SoraDistError, match="FluxTransformer2DModel"):
        load_wan(model, folder)


def test_another_variant_than_the_model_is_refused(folder_and_model):
    folder, model = folder_and_model
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ffn_dim": 64}))
    with pytest.raises(SoraDistError, match="ffn_dim=64"):
        load_wan(model, folder)


def test_a_truncated_file_is_refused_before_anything_loads(folder_and_model):
    folder, model = folder_and_model
    before = {name: p.clone() for name, p in model.state_dict().items()}
    victim = sorted(folder.glob("*.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(SoraDistError, match=f"{victim.name} is truncated"):
        load_wan(model, folder)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_a_missing_or_extra_tensor_is_named(folder_and_model):
    folder, model = folder_and_model
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    moved = index["weight_map"].pop("blocks.1.ffn.net.2.weight")
    index_path.write_text(json.dumps(index))
    with pytest.raises(SoraDistError, match=r"blocks\.1\.ffn\.net\.2\.weight \(shape \[36, 50\]\) is missing"):
        load_wan(model, folder)
    index["weight_map"]["blocks.1.ffn.net.2.weight"] = moved
    index["weight_map"]["blocks.1.attn2.add_k_proj.weight"] = moved
    index_path.write_text(json.dumps(index))
    with pytest.raises(SoraDistError, match=r"attn2\.add_k_proj\.weight"):
        load_wan(model, folder)


def train_lora(root: Path, run: Path, steps: int, lora: list[str], base: Path | None = None) -> Path:
    """A LoRA fine-tune of the fixture's imported Wan (or of ``base``) with the shipped 1.3B config; its run folder."""
    trainer.train(load_config(REPO / "configs" / "wan2.1_t2v_1.3b.yaml", [
        f"--data.path={root / 'data'}", f"--train.out_dir={run}", "--data.num_workers=0", "--train.max_minutes=0",
        "--logging.tensorboard=false", f"--train.steps={steps}", "--logging.log_every=1", f"--checkpoint.every_steps={steps}",
        "--checkpoint.async_save=false", "--optim.warmup_steps=1", "--optim.lr=1e-2", "--train.sample_shape=[2,8,8]",
        "--parallel.activation_checkpointing=none", f"--checkpoint.init_from={base or root / 'pipeline'}", *lora, *WAN_MODEL]))
    return run


def test_lora_fine_tuning_trains_the_adapters_alone_and_exports_merged(finetuned, tmp_path):
    """lora.rank > 0: the imported base stays as it was, the adapters train, and the export folds
    them in (W + alpha / rank * B A): diffusers computes what our adapted model does."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file

    root, wan, _ = finetuned
    run = train_lora(root, tmp_path / "lora", 4, ["--lora.rank=4", "--lora.alpha=8", "--lora.targets=[attn.to_q, attn.to_k, cross_attn.to_v, mlp.fc1]"])
    final = load_file(run / "model.safetensors")
    imported = empty_model(our_config(wan), torch.float32)
    load_wan(imported, root / "pipeline")
    from sora_dist.models.lora import base_name, is_adapter

    base = {base_name(name): tensor for name, tensor in final.items() if not is_adapter(name)}
    for name, param in imported.named_parameters():
        assert torch.equal(base[name], param), name  # frozen
    assert final["blocks.0.attn.to_q.lora_B.default.weight"].abs().max() > 0  # trained from zero
    assert "blocks.0.attn.to_v.lora_A.default.weight" not in final  # only the targets carry adapters

    checkpoint = newest_complete(run / "checkpoints")  # the adapters alone: export reads the base from checkpoint.init_from
    assert main(["export", str(checkpoint), "--format", "diffusers", "--dtype", "fp32", "--raw", "--out", str(tmp_path / "export")]) == 0
    ours = adapted_from_checkpoint(checkpoint)
    assert difference_from_diffusers(ours, WanTransformer3DModel.from_pretrained(tmp_path / "export")) <= 1e-5


def adapted_from_checkpoint(checkpoint: Path):
    """A LoRA checkpoint's model in one process: the adapters from the checkpoint, the base from the run's init_from."""
    cfg = load_config(checkpoint / "config.yaml")
    ours = build_single_device_model(cfg, 4, 32, torch.device("cpu"))
    base = frozen_base_reader(cfg, ours.cfg, {name: t.shape for name, t in ours.state_dict().items()})
    load_weights_for_export(checkpoint, ours, ema=False, base=base)
    return ours


def test_a_lora_checkpoint_whose_base_is_gone_is_refused_in_one_line(finetuned, tmp_path, caplog):
    """The checkpoint holds the adapters alone: without the base it was trained on, export stops
    with one line naming the missing folder, and reading it without a base names the problem."""
    import logging

    root, _, _ = finetuned
    base = shutil.copytree(root / "pipeline", tmp_path / "base")
    checkpoint = newest_complete(train_lora(root, tmp_path / "lora", 1, ["--lora.rank=2", "--lora.targets=[attn.to_q]"], base) / "checkpoints")
    ours = build_single_device_model(load_config(checkpoint / "config.yaml"), 4, 32, torch.device("cpu"))
    with pytest.raises(SoraDistError, match="holds LoRA adapters without their frozen base"):
        load_weights_for_export(checkpoint, ours, ema=False)
    base.rename(tmp_path / "moved")
    caplog.set_level(logging.ERROR, logger="sora_dist")
    assert main(["export", str(checkpoint), "--format", "diffusers", "--out", str(tmp_path / "export")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and f"{base}, the weights this LoRA run started from" in errors[0], errors


def test_lora_adapters_export_alone_in_diffusers_lora_format(finetuned, tmp_path):
    """--lora-only: the adapters as diffusers' load_lora_adapter reads them; on the imported Wan
    model they compute what our adapted model does."""
    from diffusers import WanTransformer3DModel

    root, _, _ = finetuned
    run = train_lora(root, tmp_path / "lora", 3, ["--lora.rank=4", "--lora.alpha=2", "--lora.targets=[attn.to_q, attn.to_k, attn.proj, cross_attn.to_v, mlp.fc2]"])
    checkpoint = newest_complete(run / "checkpoints")
    assert main(["export", str(checkpoint), "--format", "diffusers", "--lora-only", "--dtype", "fp32", "--raw",
                 "--out", str(tmp_path / "adapters")]) == 0
    ours = adapted_from_checkpoint(checkpoint)
    theirs = WanTransformer3DModel.from_pretrained(root / "pipeline" / "transformer")
    before = difference_from_diffusers(ours, theirs)
    theirs.load_lora_adapter(str(tmp_path / "adapters" / "pytorch_lora_weights.safetensors"), prefix="transformer")
    assert difference_from_diffusers(ours, theirs) <= 1e-5 < before  # the adapters made the difference
