"""``sora-dist caption`` end to end: a tiny random LLaVA through the transformers auto classes,
and a stand-in OpenAI-compatible server, on clips that ``curate`` found in videos made here.
The captions are meaningless; checked are the batching, the frames each clip sends, stripping,
score words, failures, resumption, the records and two ranks against one."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from language_stand_ins import StandInServer
from videos import hard_cuts, moving_square, write_video

from sora_dist.data.caption import CaptionConfig, clean_caption, run_caption, score_words
from sora_dist.data.clips import read_clip_list, write_clip_list
from sora_dist.data.curate import CurateConfig, run_curate
from sora_dist.errors import ConfigError, DataError
from warm_ranks import run_ranks

REPLY = "The video shows a red square moving right on a dark background."


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Seven clips: three scenes of a cut video and four moving squares."""
    root = tmp_path_factory.mktemp("caption-raw")
    write_video(root / "cuts.mp4", hard_cuts([30, 30, 30], [(200, 40, 40), (40, 200, 40), (40, 40, 200)]))
    for speed in (0.5, 1, 2, 4):
        write_video(root / f"square-{speed}.mp4", moving_square(speed, frames=30))
    out = root / "clips.jsonl"
    run_curate(CurateConfig(inputs=[str(root)], out=str(out), min_seconds=1.0, text_area=False))
    return out


def caption(clips, out, model, **settings):
    fields = dict(frames=3, frame_size=64, batch_size=3, workers=2, max_new_tokens=6, chunk_size=2, device="cpu", score_words=["motion"])
    return run_caption(CaptionConfig(input=str(clips), out=str(out), model=str(model), **{**fields, **settings}))


def test_clean_caption_strips_the_usual_openings():
    assert clean_caption("The video shows a dog running.") == "A dog running."
    assert clean_caption('  "In this video, the camera pans over a city."') == "The camera pans over a city."
    assert clean_caption("This clip depicts: two cats") == "Two cats"
    assert clean_caption("The video begins with a sunrise") == "A sunrise"
    assert clean_caption("A video game character jumps") == "A video game character jumps"  # not an opening
    assert clean_caption("The video shows") == ""
    assert score_words({"motion": 0.0005, "aesthetic": 6.0}, ["motion", "aesthetic"]) == "Motion: static. Aesthetic: very good."
    assert score_words({"motion": 0.2}, ["motion", "aesthetic"]) == "Motion: very fast."


def test_a_local_vlm_captions_every_clip(clips, tiny_vlm, tmp_path):
    out = tmp_path / "captioned.jsonl"
    report = caption(clips, out, tiny_vlm)
    stages, rows = read_clip_list(out)
    _, source = read_clip_list(clips)
    assert [s["stage"] for s in stages] == ["curate", "caption"] and stages[1]["settings"]["frames"] == 3
    assert [r["id"] for r in rows] == [c["id"] for c in source] and len(rows) == 7  # the input's order, every clip
    for row, clip in zip(rows, source):
        assert row["caption"].endswith(score_words(clip["scores"], ["motion"])) and len(row["caption"]) > len("Motion: fast.")
        assert {k: v for k, v in row.items() if k != "caption"} == clip  # the rest of the row is untouched
    assert report["captioned"] == 7 and report["failed"] == 0
    assert report["clips_per_second"] > 0 and 0 <= report["wait_share"] <= 1 and report["seconds"]["decode"] > 0


def test_a_server_gets_each_clips_frames_and_its_answer_is_cleaned(clips, tmp_path):
    with StandInServer(lambda body: REPLY) as server:
        report = caption(clips, tmp_path / "out.jsonl", server.url, frames=4, concurrency=3)
    rows = read_clip_list(tmp_path / "out.jsonl")[1]
    assert report["captioned"] == 7 and len(server.requests) == 7
    assert all(r["caption"].startswith("A red square moving right on a dark background. Motion: ") for r in rows)
    request = server.requests[0]
    assert request["model"] == "stand-in-vlm" and request["max_tokens"] == 6
    assert request["messages"][0]["content"].startswith("Describe this video")
    images = [c for c in request["messages"][1]["content"] if c["type"] == "image_url"]
    assert len(images) == 4 and all(i["image_url"]["url"].startswith("data:image/jpeg;base64,") for i in images)
    # --fps: frames per second of each clip (these last 1.2-1.25 s), at most --frames
    with StandInServer(lambda body: REPLY) as server:
        caption(clips, tmp_path / "fps.jsonl", server.url, frames=4, fps=2.0)
    assert sorted(sum(c["type"] == "image_url" for c in r["messages"][1]["content"]) for r in server.requests) == [2] * 7


def test_an_interrupted_job_resumes_without_redoing_clips(clips, tmp_path):
    out = tmp_path / "out.jsonl"
    with StandInServer(lambda body: REPLY) as server:
        caption(clips, out, server.url)
        parts = out.with_name(out.name + ".parts")
        lost = parts / "chunk-000002.json"  # clips 4 and 5
        lost.unlink()
        first = read_clip_list(out)[1]
        caption(clips, out, server.url)
    assert len(server.requests) == 7 + 2
    assert read_clip_list(out)[1] == first and lost.is_file()
    with pytest.raises(ConfigError, match="other settings"):
        caption(clips, out, "http://127.0.0.1:9/v1", frames=5)


def test_bad_clips_are_reported_and_bad_models_stop_before_any_work(clips, tmp_path):
    stages, rows = read_clip_list(clips)
    broken = tmp_path / "broken.jsonl"
    write_clip_list(broken, stages, [*rows[:2], {**rows[2], "path": str(tmp_path / "gone.mp4")}])
    with StandInServer(lambda body: REPLY) as server:
        report = caption(broken, tmp_path / "out.jsonl", server.url)
    assert report["failed"] == 1 and report["failures"][0]["path"].endswith("gone.mp4") and report["captioned"] == 2
    assert len(read_clip_list(tmp_path / "out.jsonl")[1]) == 2
    with StandInServer(lambda body: "  The video shows  ") as server, pytest.raises(DataError, match="no clip of .* got a caption"):
        caption(broken, tmp_path / "empty.jsonl", server.url)  # answers that are all opening
    assert json.loads((tmp_path / "empty.report.json").read_text())["empty_captions"] == 2
    with pytest.raises(ConfigError, match="does not answer"):
        caption(clips, tmp_path / "down.jsonl", "http://127.0.0.1:9/v1")
    with pytest.raises(ConfigError, match="could not be loaded as a vision-language model"):
        caption(clips, tmp_path / "missing.jsonl", tmp_path / "no-model")
    # neither claimed its output: the same command with a working model is not refused
    assert not (tmp_path / "down.jsonl.parts" / "job.json").exists()


def test_two_ranks_write_the_same_list_as_one(clips, tmp_path):
    with StandInServer(lambda body: f"The video shows {len(body['messages'][1]['content']) - 1} frames.") as server:
        one = caption(clips, tmp_path / "one.jsonl", server.url)
        result = run_ranks(2, ["-m", "sora_dist.cli", "caption", str(clips), "--out", str(tmp_path / "two.jsonl"), "--model", server.url,
                               "--frames", "3", "--frame-size", "64", "--chunk-size", "2", "--workers", "1", "--max-new-tokens", "6",
                               "--score-words", "motion"], timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert one["captioned"] == 7 and len(server.requests) == 14
    assert read_clip_list(tmp_path / "two.jsonl")[1] == read_clip_list(tmp_path / "one.jsonl")[1]
    assert json.loads((tmp_path / "two.report.json").read_text())["captioned"] == 7
    assert sorted(p.name for p in Path(tmp_path / "two.jsonl.parts").glob("chunk-*.json")) == [f"chunk-{i:06d}.json" for i in range(4)]
    shutil.rmtree(tmp_path / "two.jsonl.parts")


def test_a_killed_job_resumes_from_its_finished_chunks(clips, tmp_path):
    """SIGKILL from outside while answers are slow; the rerun asks only for unfinished chunks."""
    import signal
    import time

    def slow(body):
        time.sleep(0.3)
        return REPLY

    out = tmp_path / "out.jsonl"
    parts = out.with_name(out.name + ".parts")
    cmd = [sys.executable, "-m", "sora_dist.cli", "caption", str(clips), "--out", str(out), "--model", "", "--frames", "3",
           "--frame-size", "64", "--chunk-size", "2", "--workers", "0", "--concurrency", "1", "--max-new-tokens", "6", "--score-words", "motion"]
    with StandInServer(slow) as server:
        cmd[cmd.index("--model") + 1] = server.url
        job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not (parts / "chunk-000001.json").exists() and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        job.send_signal(signal.SIGKILL)
        job.wait()
        done = sorted(p.name for p in parts.glob("chunk-*.json"))
        asked = len(server.requests)
        assert done and len(done) < 4 and not out.exists(), done
        caption(clips, out, server.url, workers=0)
    rows = read_clip_list(out)[1]
    assert [r["id"] for r in rows] == [c["id"] for c in read_clip_list(clips)[1]]  # each clip once, in order
    redone = len(server.requests) - asked
    assert redone == 7 - 2 * len(done)  # only the clips of unfinished chunks were asked again


def test_an_image_in_the_list_is_captioned_from_its_one_frame(clips, tmp_path):
    from PIL import Image

    from sora_dist.data.curate import CurateConfig, run_curate

    Image.new("RGB", (90, 60), (200, 30, 30)).save(tmp_path / "red.png")
    listed = tmp_path / "images.jsonl"
    run_curate(CurateConfig(inputs=[str(tmp_path / "red.png")], out=str(listed), text_area=False))
    with StandInServer(lambda body: REPLY) as server:
        report = caption(listed, tmp_path / "out.jsonl", server.url, frames=4)
    [row] = read_clip_list(tmp_path / "out.jsonl")[1]
    assert report["captioned"] == 1 and row["kind"] == "image" and row["caption"] == "A red square moving right on a dark background."
    assert sum(c["type"] == "image_url" for c in server.requests[0]["messages"][1]["content"]) == 1
