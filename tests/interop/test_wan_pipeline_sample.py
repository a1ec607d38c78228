"""`sora-dist sample --from` a diffusers Wan pipeline folder (a tiny random one, saved as
downloaded ones are): the transformer imported, the pipeline's own text encoder and VAE, the
empty prompt's states for guidance, Wan's sampling settings, no training run needed."""

import json

import numpy as np
import pytest
import torch
from pretrained import save_tokenizer
from wan_reference import make_wan, save_wan

from sora_dist.cli import main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from diffusers import AutoencoderKLWan
    from transformers import T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("wan-pipeline")
    save_wan(make_wan(torch.float32), root / "transformer")
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                     latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]).save_pretrained(root / "vae")
    vocab = save_tokenizer(root / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=vocab, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, pad_token_id=0,
                            eos_token_id=1)).save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"], "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5TokenizerFast"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    return root


def test_sample_from_a_wan_pipeline_folder(pipeline, tmp_path):
    from sora_dist.data.encoders import TextEncoder
    from sora_dist.sample import load_pipeline

    out = tmp_path / "t2v"
    assert main(["sample", "--from", str(pipeline), "--prompt", "a red ball moves left", "--samples", "1", "--out", str(out),
                 "--frames", "2", "--size", "4", "6", "--diffusion.sample_steps=2", "--video-format", ".gif"]) == 0
    latents = np.load(out / "latents.npy")
    assert latents.shape == (1, 4, 2, 4, 6) and np.isfinite(latents).all()
    assert (out / "sample-0.gif").stat().st_size > 0  # decoded by the pipeline's own VAE
    assert json.loads((out / "request.json").read_text())["prompt"] == "a red ball moves left"

    class Cpu:
        torch_device = torch.device("cpu")

    cfg, model, manifest, _ = load_pipeline(pipeline, Cpu(), [])
    # Wan's sampling settings, the pipeline's VAE normalization, its text encoder's empty prompt for guidance
    assert (cfg.diffusion.shift, cfg.diffusion.guidance_scale, tuple(cfg.train.sample_shape)) == (5.0, 5.0, (21, 60, 104))
    assert manifest.latents_std == [1.5, 0.5, 2.0, 1.0] and manifest.compression == {"temporal": 4, "spatial": 8}
    empty, _ = TextEncoder(str(pipeline), "text_encoder", "tokenizer", 512).encode([""])[0]
    assert torch.equal(model.empty_caption[: len(empty)], torch.from_numpy(empty.astype(np.float32)))
    # the imported weights are the folder's: the same prediction as diffusers' model on the same input
    wan = make_wan(torch.float32)
    x, t = torch.randn(1, 4, 3, 6, 10), torch.tensor([500.0])
    text = torch.randn(1, 5, 16)
    ours = model(x, t, text, torch.ones(1, 5, dtype=torch.bool))
    padded = torch.cat([text, torch.zeros(1, 512 - 5, 16)], 1)
    theirs = wan(x, t, padded, return_dict=False)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_pipeline_needs_a_prompt_and_all_its_parts(pipeline, tmp_path, caplog):
    assert main(["sample", "--from", str(pipeline), "--samples", "1", "--out", str(tmp_path / "x")]) == 2
    assert "is a pretrained pipeline, with no dataset to take a caption from: pass --prompt" in caplog.text
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(pipeline, broken)
    shutil.rmtree(broken / "vae")
    assert main(["sample", "--from", str(broken), "--prompt", "x", "--out", str(tmp_path / "y")]) == 2
    assert "is a Wan pipeline folder without vae/" in caplog.text


def test_image_to_video_equals_wans_ti2v_pipeline(pipeline, tmp_path):
    """Wan 2.2 TI2V conditioning (the first latent frame given, at timestep 0 per token) through
    diffusers' WanImageToVideoPipeline(expand_timesteps=True), on the same noise and time grid,
    equals `sora-dist sample --image` with per-frame timesteps."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image
    from transformers import AutoTokenizer, T5EncoderModel

    from sora_dist.diffusion.schedules import shift_time

    steps, seed, prompt = 4, 7, "a red ball moves left"
    image = tmp_path / "first.png"
    rng = np.random.default_rng(0)
    Image.fromarray(np.kron(rng.integers(0, 255, (6, 10, 3)), np.ones((8, 8, 1))).astype(np.uint8)).save(image)  # 80 x 48 px
    out = tmp_path / "ours"
    assert main(["sample", "--from", str(pipeline), "--prompt", prompt, "--image", str(image), "--frames", "3", "--size", "6", "10", "--samples", "1",
                 "--seed", str(seed), "--out", str(out), "--diffusion.sample_steps=4", "--video-format", ".gif"]) == 0
    ours = torch.from_numpy(np.load(out / "latents.npy"))

    grid = shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), 5.0)[:-1].tolist()

    class OurGrid(FlowMatchEulerDiscreteScheduler):  # the pipeline asks for N steps; give it our shifted grid
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=grid, device=device)

    pipe = WanImageToVideoPipeline(
        tokenizer=AutoTokenizer.from_pretrained(pipeline / "tokenizer"), text_encoder=T5EncoderModel.from_pretrained(pipeline / "text_encoder"),
        vae=AutoencoderKLWan.from_pretrained(pipeline / "vae"), scheduler=OurGrid(shift=1.0),
        transformer=WanTransformer3DModel.from_pretrained(pipeline / "transformer"), expand_timesteps=True)
    noise = torch.randn(1, 4, 3, 6, 10, generator=torch.Generator().manual_seed(seed))
    with Image.open(image) as picture:
        theirs = pipe(image=picture.convert("RGB"), prompt=prompt, negative_prompt="", height=48, width=80, num_frames=9,
                      num_inference_steps=steps, guidance_scale=5.0, latents=noise, output_type="latent").frames
    assert ours.shape == theirs.shape == (1, 4, 3, 6, 10)
    # Our media and prompts arrive as a dataset stores them, in float16 (relative rounding 2^-11);
    # diffusers keeps float32: the given frame agrees to that rounding, and so does the sample.
    torch.testing.assert_close(ours[:, :, 0], theirs[:, :, 0].float(), rtol=1e-3, atol=1e-3)
    print("max difference", (ours - theirs).abs().max().item(), "of", theirs.abs().max().item())
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-3, atol=1e-3)


def test_an_image_conditioned_pipeline_is_refused_in_one_line(pipeline, tmp_path, capsys, caplog):
    """Wan 2.1 I2V reads CLIP image tokens that sampling does not provide yet: one line, exit 2,
    before anything is built."""
    import logging
    import shutil

    caplog.set_level(logging.ERROR, logger="sora_dist")

    root = tmp_path / "i2v-pipeline"
    shutil.copytree(pipeline, root, ignore=shutil.ignore_patterns("transformer"))
    save_wan(make_wan(torch.float32, variant="i2v"), root / "transformer")
    assert main(["sample", "--from", str(root), "--prompt", "a red ball", "--samples", "1", "--out", str(tmp_path / "out")]) == 2
    said = [line for line in capsys.readouterr().err.splitlines() if line.strip()] + [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(said) == 1 and "CLIP image tokens" in said[0] and "wan2.2-ti2v-5b" in said[0], said
