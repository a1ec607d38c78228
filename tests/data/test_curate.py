"""``sora-dist curate`` on videos made here with known content: hard cuts at known frames, squares
moving at known speeds, rendered text, a re-encoded duplicate, and broken files. Checked from the
outside: the clip list, the report and the per-file records."""

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from videos import hard_cuts, moving_square, resized, smooth_scene, text_frames, write_audio_only, write_variable_rate, write_video

from sora_dist.cli import main
from sora_dist.data.clips import read_clip_list, read_span
from sora_dist.data.curate import CurateConfig, run_curate
from sora_dist.data.scores import find_cuts, hash_distance, near_duplicates
from sora_dist.errors import ConfigError
from warm_ranks import run_ranks

CUT_LENGTHS = [40, 56, 48]  # cuts at frames 40 and 96
SPEEDS = [0.5, 1.0, 2.0, 4.0]


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    write_video(root / "cuts.mp4", hard_cuts(CUT_LENGTHS, [(200, 40, 40), (40, 200, 40), (40, 40, 200)]))
    for speed in SPEEDS:
        write_video(root / f"square-{speed}.mp4", moving_square(speed))
    write_video(root / "text.mp4", text_frames("OPEN 24 HOURS"))
    write_video(root / "plain.mp4", text_frames(""))
    write_video(root / "scene.mp4", smooth_scene(1))
    write_video(root / "scene_small.mp4", resized(smooth_scene(1), 48, 84))  # re-encoded at another size
    write_video(root / "short.mp4", moving_square(1.0, frames=12))  # half a second
    (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    good = (root / "cuts.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "zero.mp4").write_bytes(b"")
    write_audio_only(root / "audio.mp4")
    write_variable_rate(root / "phone.mp4", moving_square(1.0, frames=60))
    from PIL import Image

    Image.fromarray(text_frames("SALE -50%", frames=1)[0]).save(root / "poster.png")  # images are one-frame clips
    Image.fromarray(smooth_scene(5, frames=1)[0]).save(root / "still.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return root


BAD = {"corrupt.mp4": "unreadable", "truncated.mp4": "unreadable", "zero.mp4": "empty", "audio.mp4": "no video stream", "short.mp4": "too short",
       "phone.mp4": "variable frame rate", "broken.png": "unreadable"}


def curate(raw, out, **settings):
    return run_curate(CurateConfig(inputs=[str(raw)], out=str(out), min_seconds=1.0, **settings))


@pytest.fixture(scope="module")
def curated(raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("curated") / "clips.jsonl"
    report = curate(raw, out)
    stages, rows = read_clip_list(out)
    return out, report, stages, {Path(r["path"]).name + f"#{r['scene']}": r for r in rows}


def records(out: Path) -> dict[str, dict]:
    folder = out.with_name(out.name + ".parts")
    return {json.loads(p.read_text())["path"].split("/")[-1]: json.loads(p.read_text()) for p in folder.glob("source-*.json")}


def test_scene_cuts_land_on_the_right_frame(curated):
    out, _, _, clips = curated
    assert records(out)["cuts.mp4"]["cuts"] == [40, 96]
    # trim_frames=1 drops the frame either side of each cut; spans are [start, end)
    assert [(clips[f"cuts.mp4#{k}"]["start_frame"], clips[f"cuts.mp4#{k}"]["end_frame"]) for k in range(3)] == [(0, 39), (41, 95), (97, 144)]
    # the times a span is read back by are those frames' own: every decoded frame is of its scene's colour
    second = clips["cuts.mp4#1"]
    frames = [f for _, f in read_span(second["path"], second["start_time"], second["end_time"])]
    assert len(frames) == second["frames"] == 54
    assert all(f[..., 1].mean() > 150 and f[..., 0].mean() < 90 for f in frames)


def test_no_trim_and_no_split(raw, tmp_path):
    out = tmp_path / "clips.jsonl"
    curate(raw / "cuts.mp4", out, trim_frames=0)
    assert [(r["start_frame"], r["end_frame"]) for r in read_clip_list(out)[1]] == [(0, 40), (40, 96), (96, 144)]
    out = tmp_path / "whole.jsonl"
    curate(raw / "cuts.mp4", out, split=False, max_seconds=4.0)  # 144 frames at 24 fps: two clips of 72
    assert [(r["start_frame"], r["end_frame"]) for r in read_clip_list(out)[1]] == [(0, 72), (72, 144)]


def test_a_fast_pan_is_not_a_cut():
    changes = np.array([0.0] + [35.0 + (i % 3) for i in range(40)])  # every frame changes a lot
    assert find_cuts(changes, threshold=20, ratio=3, min_gap=6) == []
    changes[20] = 200.0
    assert find_cuts(changes, threshold=20, ratio=3, min_gap=6) == [20]


def test_motion_ranks_clips_by_their_true_speed(curated):
    motions = [curated[3][f"square-{speed}.mp4#0"]["scores"]["motion"] for speed in SPEEDS]
    assert motions == sorted(motions) and len(set(motions)) == len(motions)
    # flow in frame widths per second: speed (px/frame) * 24 fps / 128 px, times the square's share of the frame
    ratios = np.array(motions) / np.array(SPEEDS)
    assert ratios.max() / ratios.min() < 1.5, motions
    assert curated[3]["plain.mp4#0"]["scores"]["motion"] < motions[0] / 10


def test_text_area_finds_the_text(curated):
    clips = curated[3]
    assert clips["text.mp4#0"]["scores"]["text_area"] > 0.05
    assert clips["plain.mp4#0"]["scores"]["text_area"] == 0.0
    assert all(clips[f"square-{s}.mp4#0"]["scores"]["text_area"] == 0.0 for s in SPEEDS)


def test_images_are_one_frame_clips_with_every_score_but_motion(curated):
    poster, still = curated[3]["poster.png#0"], curated[3]["still.jpg#0"]
    assert (poster["kind"], poster["frames"], poster["width"], poster["height"]) == ("image", 1, 192, 96)
    assert "motion" not in poster["scores"] and poster["scores"]["text_area"] > 0.05 and still["scores"]["text_area"] == 0.0
    assert still["scores"]["brightness"] > 0 and still["scores"]["sharpness"] > 0 and len(set(still["hash"])) == 1


def test_bad_files_and_the_duplicate_are_dropped_with_their_reasons(curated):
    out, report, stages, clips = curated
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped_files"]}
    assert skipped == BAD
    assert report["files_skipped"] == {reason: list(BAD.values()).count(reason) for reason in set(BAD.values())}
    assert report["clips_dropped"] == {"duplicate": 1}
    duplicate = report["dropped_clips"][0]
    by_id = {c["id"]: name for name, c in clips.items()}
    assert by_id[duplicate["of"]] == "scene.mp4#0" and "scene_small.mp4#0" not in clips
    assert report["clips_kept"] == len(clips) == 3 + len(SPEEDS) + 3 + 2
    # the header records every setting and the counts; the picture exists
    assert stages[0]["stage"] == "curate" and stages[0]["settings"]["scene_threshold"] == 20.0
    assert stages[0]["counts"]["clips_kept"] == len(clips)
    assert out.with_suffix(".report.png").stat().st_size > 10_000


def test_near_duplicates_match_brute_force():
    rng = random.Random(0)
    base = [[rng.getrandbits(64) for _ in range(3)] for _ in range(40)]
    hashes = []
    for value in base:  # each base hash, and a copy with a few bits flipped
        hashes.append(value)
        copy = list(value)
        for _ in range(rng.randrange(0, 20)):
            copy[rng.randrange(3)] ^= 1 << rng.randrange(64)
        hashes.append(copy)
    for bits in (0, 6, 12):
        found = near_duplicates(hashes, bits)
        kept: list[int] = []
        expected = {}
        for i, h in enumerate(hashes):
            match = next((k for k in kept if hash_distance(hashes[k], h) <= bits), None)
            if match is None:
                kept.append(i)
            else:
                expected[i] = match
        assert set(found) == set(expected), bits
        assert all(hash_distance(hashes[i], hashes[j]) <= bits for i, j in found.items())


def test_thresholds_rerun_only_the_selection(raw, curated, tmp_path):
    out, *_ = curated
    copy = tmp_path / "clips.jsonl"
    import shutil

    shutil.copytree(out.with_name(out.name + ".parts"), copy.with_name(copy.name + ".parts"))
    before = {p.name: p.stat().st_mtime_ns for p in copy.with_name(copy.name + ".parts").glob("source-*.json")}
    report = curate(raw, copy, max_text_area=0.05, min_motion=0.01)
    after = {p.name: p.stat().st_mtime_ns for p in copy.with_name(copy.name + ".parts").glob("source-*.json")}
    assert before == after  # nothing decoded again
    every = [c for r in records(copy).values() for c in r.get("clips", [])]
    slow = lambda c: c["scores"].get("motion", 1.0) < 0.01  # noqa: E731 - an image has no motion: it passes
    expected = Counter("motion < 0.01" if slow(c) else "text_area > 0.05" for c in every if slow(c) or c["scores"]["text_area"] > 0.05)
    assert expected == {"motion < 0.01": 5, "text_area > 0.05": 1}  # the cuts' scenes, text, plain; the poster
    assert report["clips_dropped"] == {**expected, "duplicate": 1}
    assert {Path(r["path"]).name for r in read_clip_list(copy)[1]} == {f"square-{s}.mp4" for s in SPEEDS} | {"scene.mp4", "still.jpg"}
    # the text clip, moving little, fails the motion threshold first; alone, the text-area threshold drops it
    report = curate(raw, copy, max_text_area=0.05)
    assert report["clips_dropped"] == {"text_area > 0.05": 2, "duplicate": 1}  # the text video and the poster


def test_an_interrupted_job_resumes_without_redoing_files(raw, curated, tmp_path):
    out, *_ = curated
    import shutil

    copy = tmp_path / "clips.jsonl"
    parts = copy.with_name(copy.name + ".parts")
    shutil.copytree(out.with_name(out.name + ".parts"), parts)
    lost = sorted(parts.glob("source-*.json"))[3]
    lost.unlink()
    before = {p.name: p.stat().st_mtime_ns for p in parts.glob("source-*.json")}
    curate(raw, copy)
    after = {p.name: p.stat().st_mtime_ns for p in parts.glob("source-*.json")}
    assert set(after) - set(before) == {lost.name} and all(after[k] == v for k, v in before.items())
    assert read_clip_list(copy)[1] == read_clip_list(out)[1]
    with pytest.raises(ConfigError, match="other settings"):
        curate(raw, copy, scene_threshold=30.0)


def test_three_ranks_write_the_same_list_as_one(raw, curated, tmp_path):
    out = tmp_path / "clips.jsonl"
    result = run_ranks(3, ["-m", "sora_dist.cli", "curate", str(raw), "--out", str(out), "--min-seconds", "1", "--write-clips",
                           str(tmp_path / "clips")], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = read_clip_list(out)[1]
    assert [{k: v for k, v in r.items() if k != "clip_path"} for r in rows] == read_clip_list(curated[0])[1]
    # --write-clips: each kept video clip as an mp4 of its own frames, written by the three ranks (images stay as they are)
    written = sorted((tmp_path / "clips").glob("*.mp4"))
    assert [p.stem for p in written] == sorted(r["id"] for r in rows if r.get("kind") != "image") and len(written) == len(rows) - 2
    second = next(r for r in rows if Path(r["path"]).name == "cuts.mp4" and r["scene"] == 1)
    assert len(list(read_span(second["clip_path"]))) == second["frames"]


def test_bad_command_lines_stop_in_one_line(raw, tmp_path, caplog):
    assert main(["curate", str(raw), "--out", str(tmp_path / "x.txt")]) == 2
    assert main(["curate", str(tmp_path / "nothing-*.mp4"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert main(["curate", str(raw), "--out", str(tmp_path / "y.jsonl"), "--aesthetic-clip", "x"]) == 2
    err = caplog.text
    assert "must be a .jsonl file" in err and "no input files found" in err and "needs both --aesthetic-clip" in err
    assert "Traceback" not in err


def save_aesthetic_model(folder: Path, head_out: int = 1) -> tuple[Path, Path]:
    """A tiny CLIP vision tower with its projection (8 features), and a head of two linear layers."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=28, patch_size=14, projection_dim=8)).save_pretrained(folder / "clip")
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(folder / "clip")
    head = {"layers.0.weight": torch.randn(4, 8), "layers.0.bias": torch.randn(4), "layers.2.weight": torch.randn(head_out, 4),
            "layers.2.bias": torch.full((head_out,), 5.0)}
    save_file(head, folder / "head.safetensors")
    return folder / "clip", folder / "head.safetensors"


def test_aesthetic_score_from_a_clip_model_and_head(raw, tmp_path):
    clip, head = save_aesthetic_model(tmp_path)
    inputs = [str(raw / f"square-{s}.mp4") for s in SPEEDS] + [str(raw / "text.mp4"), str(raw / "scene.mp4")]
    out = tmp_path / "clips.jsonl"
    run_curate(CurateConfig(inputs=inputs, out=str(out), min_seconds=1.0, text_area=False, aesthetic_clip=str(clip), aesthetic_head=str(head)))
    scores = [r["scores"]["aesthetic"] for r in read_clip_list(out)[1]]
    assert len(scores) == 6 and len(set(scores)) > 1
    middle = sorted(scores)[3]
    report = run_curate(CurateConfig(inputs=inputs, out=str(out), min_seconds=1.0, text_area=False, aesthetic_clip=str(clip),
                                     aesthetic_head=str(head), min_aesthetic=middle))
    assert report["clips_dropped"] == {f"aesthetic < {middle:g}": 3}
    assert sorted(r["scores"]["aesthetic"] for r in read_clip_list(out)[1]) == sorted(scores)[3:]
    _, bad_head = save_aesthetic_model(tmp_path / "bad", head_out=2)
    with pytest.raises(ConfigError, match="expected linear layers ending in one output"):
        run_curate(CurateConfig(inputs=inputs, out=str(tmp_path / "bad.jsonl"), aesthetic_clip=str(clip), aesthetic_head=str(bad_head)))


def test_encode_reads_exactly_the_span(curated):
    from sora_dist.data.media import Bucket, read_clip

    for scene, channel in ((0, 0), (1, 1), (2, 2)):  # red, green, blue scenes
        clip = curated[3][f"cuts.mp4#{scene}"]
        read = read_clip(clip["path"], [Bucket(9, 32, 48)], 12.0, (clip["start_time"], clip["end_time"]))
        means = read.frames.reshape(-1, 3).mean(0)
        assert means.argmax() == channel and means[channel] > 150, (scene, means)
        assert read.meta["span"] == [clip["start_time"], clip["end_time"]] and read.meta["frame_times"][0] == 0.0
