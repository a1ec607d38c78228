"""A Wan model through the real trainer on real layouts: imported onto FSDP2 x Ulysses on 4 gloo
ranks (each rank reading its slices), fine-tuned until the loss falls, resumed onto 2 ranks, and
exported; diffusers loads the export and computes what our model computes."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from sora_dist.build import build_single_device_model  # noqa: E402
from sora_dist.checkpoint import load_weights_for_export, newest_complete  # noqa: E402
from sora_dist.cli import main  # noqa: E402
from sora_dist.config import load_config  # noqa: E402
from wan_reference import difference_from_diffusers, make_wan, save_wan  # noqa: E402
from warm_ranks import run_ranks

REPO = Path(__file__).parents[2]
EMPTY_PROMPT = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float16)


def train(nproc: int, args: list[str]) -> None:
    result = run_ranks(nproc, ["-m", "sora_dist.train", *args], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_multirank")
    wan = make_wan(torch.float32, num_attention_heads=4, text_dim=32)
    for p in wan.parameters():  # a pretrained-like start: small weights
        p.data.mul_(0.3)
    save_wan(wan, root / "wan", max_shard_size="20KB")
    data = root / "data"
    shutil.copytree(synthetic_dir, data)
    np.save(data / "empty_caption.npy", EMPTY_PROMPT)
    manifest = json.loads((data / "manifest.json").read_text())
    (data / "manifest.json").write_text(json.dumps({**manifest, "empty_caption": "empty_caption.npy"}))
    run = root / "run"
    common = ["--config", str(REPO / "configs" / "wan2.1_t2v_1.3b.yaml"), f"--data.path={data}", f"--train.out_dir={run}",
              "--data.num_workers=0", "--model.hidden_size=48", "--model.depth=2", "--model.num_heads=4", "--model.ffn_dim=50",
              "--model.in_channels=4", "--model.text_dim=32", "--train.max_minutes=0", "--logging.tensorboard=false",
              "--logging.log_every=1", "--optim.warmup_steps=1", "--optim.lr=3e-3", "--checkpoint.async_save=false",
              "--checkpoint.every_steps=10", "--parallel.activation_checkpointing=none", "--train.sample_at_end=false",
              "--fault.health_check=false", "--data.tokens_per_batch=1024", f"--checkpoint.init_from={root / 'wan'}"]
    train(4, [*common, "--train.steps=10", "--parallel.sp_ulysses=2"])  # FSDP2 over 2 x Ulysses 2
    before = losses(run)
    train(2, [*common, "--train.steps=12", "--parallel.sp_ulysses=2"])  # resumed onto 2 ranks: Ulysses 2
    lora, adapters = root / "lora", ["--lora.rank=4", "--lora.alpha=8", "--optim.lr=2e-2"]
    train(4, [*common, f"--train.out_dir={lora}", "--train.steps=10", "--parallel.sp_ulysses=2", *adapters])
    lora_before = losses(lora)
    train(2, [*common, f"--train.out_dir={lora}", "--train.steps=12", "--parallel.tp=2", *adapters])  # resumed onto TP 2
    return root, run, before, losses(run), lora_before


def test_an_imported_wan_fine_tunes_on_fsdp_and_ulysses_and_resumes_on_two_ranks(trained):
    _, run, before, after, _ = trained
    assert len(before) == 10 and np.mean(before[-3:]) < 0.8 * np.mean(before[:3]), before
    assert len(after) == 12 and after[:10] == before  # the resumed run appends its two steps
    assert newest_complete(run / "checkpoints").name == "step-12"


def test_lora_on_fsdp_and_ulysses_trains_the_adapters_alone_and_resumes_under_tensor_parallel(trained):
    from safetensors.torch import load_file

    from sora_dist.checkpoint.files import read_metadata
    from sora_dist.interop.load import load_wan
    from sora_dist.models.lora import base_name, is_adapter
    from wan_reference import empty_model, our_config

    root, run, _, _, lora_losses = trained
    assert len(lora_losses) == 10 and np.mean(lora_losses[-3:]) < 0.9 * np.mean(lora_losses[:3]), lora_losses
    resumed = losses(root / "lora")
    assert resumed[:10] == lora_losses and len(resumed) == 12 and np.isfinite(resumed).all()  # TP 2 on 2 ranks: two more steps
    # The checkpoints hold the adapters (weights, moments, EMA) and the buffers, never the frozen base.
    saved = set(read_metadata(newest_complete(root / "lora" / "checkpoints")).state_dict_metadata)
    assert any(".lora_A." in key for key in saved) and "model.empty_caption" in saved
    assert not [key for key in saved if ".base_layer." in key or key.endswith("mlp.fc2.weight")], sorted(saved)[:5]
    size = lambda folder: sum(f.stat().st_size for f in newest_complete(folder / "checkpoints").rglob("*") if f.is_file())  # noqa: E731
    # rank-4 adapters on 48-wide layers are a sixth of those layers (at 14B, rank 32 on 5120: 1.2%); with files' overheads, a third here
    assert size(root / "lora") < 0.5 * size(run), (size(root / "lora"), size(run))
    final = load_file(root / "lora" / "model.safetensors")
    imported = empty_model(our_config(make_wan(torch.float32, num_attention_heads=4, text_dim=32)), torch.float32)
    load_wan(imported, root / "wan")
    base = {base_name(name): tensor for name, tensor in final.items() if not is_adapter(name)}
    assert all(torch.equal(base[name], p) for name, p in imported.named_parameters())  # the base stayed frozen on every rank
    assert all(final[name].abs().max() > 0 for name in final if ".lora_B." in name)  # every adapter trained from zero


def test_the_resumed_fine_tune_exports_to_diffusers(trained):
    from diffusers import WanTransformer3DModel

    root, run, _, _, _ = trained
    checkpoint = newest_complete(run / "checkpoints")
    assert main(["export", str(checkpoint), "--format", "diffusers", "--dtype", "fp32", "--out", str(root / "export")]) == 0
    ours = build_single_device_model(load_config(checkpoint / "config.yaml"), 4, 32, torch.device("cpu"))
    load_weights_for_export(checkpoint, ours, ema=True)
    padded = torch.zeros(ours.empty_caption.shape)
    padded[: len(EMPTY_PROMPT)] = torch.from_numpy(EMPTY_PROMPT.astype(np.float32))
    assert torch.equal(ours.empty_caption, padded)  # the empty prompt went through both layouts' checkpoints
    assert difference_from_diffusers(ours, WanTransformer3DModel.from_pretrained(root / "export")) <= 1e-5
