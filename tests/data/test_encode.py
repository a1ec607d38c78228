"""The encoder end to end: tiny randomly initialized diffusers VAEs (image and video kinds) and
transformers text encoders, saved to folders and loaded with from_pretrained as real ones are;
generated mp4 / webm / mov / png / jpg inputs of several aspect ratios, plus corrupt, empty,
too-short and caption-less ones; encoding on 1 and 2 ranks, resuming, decoding, and training on
the result."""

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from pretrained import CAPTIONS

from sora_dist.data import read_manifest
from sora_dist.data.decode import decode_dataset, iter_samples
from sora_dist.data.encode import REPORT_NAME, EncodeConfig, run_encode
from sora_dist.data.encoders import VideoVAE
from sora_dist.data.media import Bucket, SkipInput, check_buckets, choose_bucket, list_inputs
from sora_dist.errors import ConfigError
from warm_ranks import run_ranks

BUCKETS = ["1x32x32", "1x32x48", "1x48x32", "9x32x32", "9x32x48", "9x48x32"]


# ---------------------------------------------------------------------------------------------
# Inputs


def write_video(path: Path, frames: int, width: int, height: int, codec: str, fps: int = 24) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        container.start_encoding()  # the header is written even when no frame follows
        for i in range(frames):
            image = np.full((height, width, 3), 40, np.uint8)
            image[:, (3 * i) % width : (3 * i) % width + 6] = (220, 60, 30)  # a bar moving right
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_image(path: Path, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(width * height)
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)


GOOD = {  # name -> expected bucket
    "wide.mp4": "9x32x48", "tall.webm": "9x48x32", "square.mov": "9x32x32",
    "wide.png": "1x32x48", "tall.jpg": "1x48x32", "square.webp": "1x32x32",
}
BAD = {  # name -> reason in the report
    "corrupt.mp4": "unreadable", "zero.mp4": "unreadable", "short.mp4": "too short",
    "uncaptioned.png": "missing caption", "truncated.png": "unreadable", "noframes.mp4": "empty",
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "wide.mp4", 24, 64, 40, "libx264")
    write_video(root / "tall.webm", 24, 40, 66, "libvpx-vp9")
    write_video(root / "square.mov", 30, 48, 48, "mpeg4")
    write_image(root / "wide.png", 90, 60)
    write_image(root / "tall.jpg", 50, 80)
    write_image(root / "square.webp", 33, 35)
    write_video(root / "short.mp4", 4, 64, 40, "libx264")  # 4 frames: shorter than every video bucket
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "zero.mp4").write_bytes(b"")
    write_video(root / "noframes.mp4", 0, 64, 40, "libx264")  # a valid container holding no frames
    write_image(root / "uncaptioned.png", 40, 40)
    write_image(root / "truncated.png", 64, 64)
    data = (root / "truncated.png").read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    for i, name in enumerate(sorted(set(GOOD) | set(BAD) - {"uncaptioned.png"})):
        (root / name).with_suffix(".txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    return root


def config(inputs, models, out, **overrides):
    fields = dict(input=str(inputs), out=str(out), vae=str(models / "image_vae"), text_encoder=str(models / "t5"),
                  buckets=BUCKETS, fps=12, samples_per_shard=4, batch_size=3, device="cpu")
    return EncodeConfig(**{**fields, **overrides})


def samples_by_source(out):
    return {Path(s.meta["source"]).name: s for s in iter_samples(out)}


@pytest.fixture(scope="module")
def encoded(inputs, models, tmp_path_factory):
    out = tmp_path_factory.mktemp("encoded")
    return out, run_encode(config(inputs, models, out))


def test_encode_keeps_good_inputs_at_their_aspect_ratio(encoded):
    out, report = encoded
    samples = samples_by_source(out)
    assert set(samples) == set(GOOD)
    for name, sample in samples.items():
        bucket = Bucket.parse(GOOD[name])
        assert sample.meta["bucket"] == GOOD[name]
        # image VAE per frame, 2x spatial: (C, F, H/2, W/2)
        assert sample.latent.shape == (4, bucket.frames, bucket.height // 2, bucket.width // 2)
        assert sample.latent.dtype == np.float16 and np.isfinite(sample.latent).all()
        assert sample.text.shape[1] == 16 and 1 < sample.text.shape[0] <= 16  # real tokens only
        assert sample.pooled is None  # T5 has no pooled output
        assert sample.meta["caption"] in CAPTIONS
    video = samples["wide.mp4"].meta
    assert video["fps"] == 12 and video["source_fps"] == 24 and len(video["frame_times"]) == 9
    assert video["frame_times"][:3] == pytest.approx([0, 1 / 12, 2 / 12], abs=1e-3)  # every other source frame
    manifest = read_manifest(out)
    assert manifest.num_samples == len(GOOD) and manifest.latent_channels == 4 and manifest.text_dim == 16
    assert manifest.compression == {"temporal": 1, "spatial": 2} and manifest.scaling_factor == pytest.approx(0.18215)
    assert sum(manifest.shapes.values()) == len(GOOD)


def test_bad_inputs_are_reported_not_fatal(encoded):
    out, report = encoded
    assert report["kept"] == len(GOOD) and report["skipped"] == len(BAD)
    on_disk = json.loads((out / REPORT_NAME).read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in on_disk["skipped_inputs"]}
    assert reasons == BAD
    assert all(s["detail"] for s in on_disk["skipped_inputs"])
    assert on_disk["by_reason"] == {"unreadable": 3, "too short": 1, "missing caption": 1, "empty": 1}


def test_video_vae_clip_text_and_decode_round_trip(inputs, models, tmp_path):
    out = tmp_path / "wan"
    cfg = config(inputs, models, out, vae=str(models / "pipeline"), vae_subfolder="vae", text_encoder=str(models / "pipeline"),
                 text_encoder_subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    run_encode(cfg)
    manifest = read_manifest(out)
    assert manifest.compression == {"temporal": 4, "spatial": 8}
    assert manifest.latents_mean == pytest.approx([0.1, -0.2, 0.3, 0.0]) and manifest.latents_std == pytest.approx([1.5, 0.5, 2.0, 1.0])
    samples = samples_by_source(out)
    assert samples["wide.mp4"].latent.shape == (4, 3, 4, 6)  # 1 + 8/4 latent frames, 32x48 / 8
    assert samples["wide.png"].latent.shape == (4, 1, 4, 6)
    assert samples["wide.mp4"].pooled.shape == (24,) and samples["wide.mp4"].text.shape[1] == 24  # CLIP: pooled vector

    vae = VideoVAE(str(models / "pipeline"), "vae")
    written = decode_dataset(out, vae, tmp_path / "decoded", num=len(GOOD))
    shapes = {}
    for path in written:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        shapes[samples_by_key(out)[path.stem]] = (len(frames), *frames[0].shape)
    for name, bucket in GOOD.items():
        b = Bucket.parse(bucket)
        assert shapes[name] == (b.frames, b.height, b.width, 3), name


def samples_by_key(out):
    return {s.key: Path(s.meta["source"]).name for s in iter_samples(out)}


def test_latent_normalization_round_trips(models):
    vae = VideoVAE(str(models / "pipeline"), "vae")
    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 24, 3), dtype=np.uint8)
    latent = vae.encode(frames)
    raw = vae.model.encode((torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1)[None]).latent_dist.mode()[0]
    mean, std = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(-1, 1, 1, 1), torch.tensor([1.5, 0.5, 2.0, 1.0]).view(-1, 1, 1, 1)
    np.testing.assert_allclose(latent, ((raw - mean) / std).numpy(), atol=2e-3, rtol=2e-3)
    assert vae.decode(latent).shape == (5, 16, 24, 3)


def test_restart_skips_finished_chunks(inputs, models, tmp_path):
    out = tmp_path / "resume"
    run_encode(config(inputs, models, out))
    first = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    (out / "_encode" / "chunk-000001.json").unlink()  # as if the job died while writing chunk 1
    (out / "shard-000001.tar").unlink()
    report = run_encode(config(inputs, models, out))
    again = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.tar")}
    assert set(again) == set(first) and report["kept"] == len(GOOD)
    assert again["shard-000000.tar"][0] == first["shard-000000.tar"][0]  # not rewritten
    assert again["shard-000001.tar"][1] == first["shard-000001.tar"][1]  # rewritten, same bytes
    with pytest.raises(ConfigError, match="other settings or inputs .*buckets"):
        run_encode(config(inputs, models, out, buckets=["1x32x32", "9x32x32"]))


def test_two_ranks_write_the_same_dataset_and_it_trains(inputs, models, encoded, tmp_path):
    out = tmp_path / "two"
    result = run_ranks(2, ["-m", "sora_dist.cli", "encode", "--input", str(inputs), "--out", str(out), "--vae", str(models / "image_vae"),
                           "--text-encoder", str(models / "t5"), "--buckets", *BUCKETS, "--fps", "12", "--samples-per-shard", "4",
                           "--batch-size", "3", "--device", "cpu"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"kept {len(GOOD)}, skipped {len(BAD)}" in result.stderr
    one, two = samples_by_source(encoded[0]), samples_by_source(out)
    assert set(one) == set(two)
    for name in one:  # the workers run 1 thread, this process 2: equal up to fp16 rounding
        np.testing.assert_allclose(one[name].latent.astype(np.float32), two[name].latent, rtol=5e-3, atol=1e-4)
        np.testing.assert_allclose(one[name].text.astype(np.float32), two[name].text, rtol=5e-3, atol=1e-4)
    assert read_manifest(out).shards == read_manifest(encoded[0]).shards

    from sora_dist import trainer
    from sora_dist.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "demo.yaml", [
        f"--data.path={out}", f"--train.out_dir={tmp_path / 'run'}", "--data.num_workers=0", "--data.synthetic_if_missing=false",
        "--model.hidden_size=32", "--model.depth=1", "--train.steps=4", "--train.max_minutes=0", "--train.sample_at_end=false",
        "--logging.tensorboard=false", "--logging.log_every=1", "--optim.warmup_steps=1",
    ])
    summary = trainer.train(cfg)
    assert summary["steps"] == 4 and np.isfinite(summary["last_loss"])

    # A prompt no sample has goes through the text encoder the manifest names (the tokenizer
    # knows its words from other captions), and the latents through the dataset's VAE:
    # a [4, 8, 8] latent -> 4 frames of 16x16.
    from sora_dist.cli import main

    manifest = read_manifest(out)
    assert (manifest.text_encoder, manifest.max_text_length) == (str(models / "t5"), 256)
    # The empty prompt's states, for models whose dropped captions are the empty prompt (Wan).
    from sora_dist.data.encoders import TextEncoder

    expected, _ = TextEncoder(str(models / "t5")).encode([""])[0]
    assert manifest.empty_caption == "empty_caption.npy" and np.array_equal(np.load(out / manifest.empty_caption), expected)
    prompt = "a blue ball grows on grass"
    assert prompt not in CAPTIONS
    samples = tmp_path / "samples"
    assert main(["sample", "--from", str(tmp_path / "run"), "--prompt", prompt, "--samples", "1", "--out", str(samples),
                 "--video-format", ".gif", "--train.sample_shape=[4,8,8]", "--diffusion.sample_steps=2"]) == 0
    from PIL import Image

    with Image.open(samples / "sample-0.gif") as gif:
        assert (gif.n_frames, gif.size) == (4, (16, 16))
    assert json.loads((samples / "request.json").read_text())["prompt"] == prompt
    # Image-to-video from a picture: resized and cropped like `encode` does, then the dataset's VAE.
    image = tmp_path / "first.png"
    write_image(image, 40, 24)
    assert main(["sample", "--from", str(tmp_path / "run"), "--prompt", prompt, "--samples", "1", "--out", str(tmp_path / "i2v"),
                 "--image", str(image), "--frames", "3", "--size", "8", "8", "--diffusion.sample_steps=2"]) == 0
    assert np.load(tmp_path / "i2v" / "latents.npy").shape == (1, 4, 3, 8, 8)
    assert (tmp_path / "i2v" / "sample-0.mp4").stat().st_size > 0
    # Editing a video file: its first 3 frames at the sampled size, through the same VAE.
    assert main(["sample", "--from", str(tmp_path / "run"), "--prompt", prompt, "--samples", "1", "--out", str(tmp_path / "edit"),
                 "--edit", str(inputs / "square.mov"), "--frames", "3", "--size", "8", "8", "--strength", "0.5",
                 "--diffusion.sample_steps=2"]) == 0
    assert np.load(tmp_path / "edit" / "latents.npy").shape == (1, 4, 3, 8, 8)


# ---------------------------------------------------------------------------------------------
# Pieces


def test_bucket_choice():
    buckets = sorted(Bucket.parse(b) for b in BUCKETS + ["17x32x48"])
    assert choose_bucket(buckets, 1920, 1080, None) == Bucket(1, 32, 48)  # images: 1-frame buckets only
    assert choose_bucket(buckets, 1080, 1920, 100) == Bucket(9, 48, 32)
    assert choose_bucket(buckets, 1920, 1080, 100) == Bucket(17, 32, 48)  # the longest that fits
    assert choose_bucket(buckets, 1920, 1080, 12) == Bucket(9, 32, 48)
    assert choose_bucket(buckets, 500, 480, 12) == Bucket(9, 32, 32)
    with pytest.raises(SkipInput, match="too short"):
        choose_bucket(buckets, 1920, 1080, 8)
    with pytest.raises(ConfigError, match="FRAMESxHEIGHTxWIDTH"):
        Bucket.parse("33x256")
    with pytest.raises(ConfigError, match="1 \\+ k\\*4 frames"):
        check_buckets([Bucket(8, 32, 32)], spatial=8, temporal=4, causal=True)
    with pytest.raises(ConfigError, match="multiples of the VAE's spatial compression 8"):
        check_buckets([Bucket(1, 36, 32)], spatial=8, temporal=4, causal=True)


def test_manifest_inputs_csv_and_jsonl(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "list.csv").write_text("path,caption\nclips/a.mp4,a cat\n/abs/b.png,\n")
    (tmp_path / "list.jsonl").write_text('{"path": "clips/a.mp4", "caption": "a cat"}\n\n{"path": "c.webm"}\n')
    csv_items, jsonl_items = list_inputs(tmp_path / "list.csv"), list_inputs(tmp_path / "list.jsonl")
    assert [(Path(i.path), i.caption) for i in csv_items] == [(tmp_path / "clips/a.mp4", "a cat"), (Path("/abs/b.png"), "")]
    assert [(Path(i.path), i.caption) for i in jsonl_items] == [(tmp_path / "clips/a.mp4", "a cat"), (tmp_path / "c.webm", "")]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(ConfigError, match="bad.jsonl line 1"):
        list_inputs(tmp_path / "bad.jsonl")
    with pytest.raises(ConfigError, match="must be a folder"):
        list_inputs(tmp_path / "list.txt")
