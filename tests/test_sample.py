"""``sora-dist sample``: every application through the command line on a short run trained with
the mask strategy, the given frames held exactly, seeds, clear errors for bad input, and
``torchrun -m sora_dist.sample`` with CFG-parallel equal to one process."""


import numpy as np
import pytest

from sora_dist.cli import main
from sora_dist.data.synthetic import render
from tests.test_train import short_config
from sora_dist import trainer
from warm_ranks import run_ranks

PROMPT = "a large red blob moving right"


@pytest.fixture(scope="module")
def run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("apps")
    trainer.train(short_config(synthetic_dir, out, "--train.steps=10", "--train.sample_at_end=false", "--train.sample_every=5",
                               "--train.sample_prompts=[a small red blob moving up, a large green blob still]", "--train.sample_shape=[3,8,8]",
                               "--diffusion.sample_steps=2", "--logging.tensorboard=true"))
    return out


def test_a_run_samples_its_prompts_and_an_image_to_video_case_every_n_steps(run, synthetic_dir):
    from sora_dist.sample import first_video_frame
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for step in (5, 10):
        folder = run / "samples" / f"step-{step}"
        names = sorted(p.name for p in folder.glob("*.npy"))
        assert names == ["0-text_to_video.npy", "1-text_to_video.npy", "2-image_to_video.npy"]
        assert (folder / "frames.png").stat().st_size > 1000
    _, first = first_video_frame(str(synthetic_dir))
    i2v = np.load(run / "samples" / "step-5" / "2-image_to_video.npy")
    assert i2v.shape[1] == 3 and np.array_equal(i2v[:, :1], first.numpy())
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [5, 10]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    clip = render("red", "small", "right", (6, 8, 8), np.random.default_rng(0)).astype(np.float32)
    paths = {"clip": clip, "first": clip[:, 0], "head": clip[:, :2], "tail": clip[:, 4:], "wide": np.zeros((4, 2, 8, 12), np.float32),
             "rgb": np.zeros((3, 1, 8, 8), np.float32)}
    for name, array in paths.items():
        np.save(folder / f"{name}.npy", array)
    return {name: str(folder / f"{name}.npy") for name in paths}, clip


def sample(run, out, *args):
    code = main(["sample", "--from", str(run), "--prompt", PROMPT, "--samples", "2", "--out", str(out), "--diffusion.sample_steps=3", *args])
    return code, (np.load(out / "latents.npy") if code == 0 else None)


def test_applications_hold_their_given_frames(run, clips, tmp_path):
    paths, clip = clips
    _, i2v = sample(run, tmp_path / "i2v", "--image", paths["first"], "--frames", "4")
    assert i2v.shape == (2, 4, 4, 8, 8) and np.array_equal(i2v[:, :, 0], np.broadcast_to(clip[:, 0], (2, 4, 8, 8)))
    _, forward = sample(run, tmp_path / "fwd", "--extend", paths["clip"], "--context", "3", "--frames", "2")
    assert forward.shape[2] == 5 and np.array_equal(forward[0, :, :3], clip[:, 3:])
    _, backward = sample(run, tmp_path / "bwd", "--extend", paths["clip"], "--direction", "backward", "--context", "2", "--frames", "3")
    assert backward.shape[2] == 5 and np.array_equal(backward[1, :, 3:], clip[:, :2])
    _, connect = sample(run, tmp_path / "con", "--connect", paths["head"], paths["tail"], "--frames", "2")
    assert connect.shape[2] == 6 and np.array_equal(connect[0, :, :2], clip[:, :2]) and np.array_equal(connect[0, :, 4:], clip[:, 4:])
    _, image = sample(run, tmp_path / "t2i", "--frames", "1", "--size", "6", "10")
    assert image.shape == (2, 4, 1, 6, 10)
    assert (tmp_path / "t2i" / "frames.png").stat().st_size > 1000 and (tmp_path / "con" / "request.json").is_file()


def test_edit_stays_closer_to_its_clip_the_lower_the_strength(run, clips, tmp_path):
    paths, clip = clips
    distance = {}
    # 10 steps, so that a strength of 0.1 is one step: at the demo's timestep shift of 3 the edit
    # starts from t = 0.25 (a strength rounds up to whole steps of the shifted schedule).
    for strength in ("0.1", "0.5", "1.0"):
        _, edited = sample(run, tmp_path / strength, "--edit", paths["clip"], "--strength", strength, "--diffusion.sample_steps=10")
        assert edited.shape == (2, *clip.shape)
        distance[strength] = np.abs(edited - clip).mean()
    assert distance["0.1"] < distance["0.5"] < distance["1.0"], distance
    assert distance["0.1"] < 0.5 * distance["1.0"], distance


def test_the_same_seed_gives_the_same_clip(run, tmp_path):
    a, b, c = (sample(run, tmp_path / name, "--seed", seed)[1] for name, seed in (("a", "4"), ("b", "4"), ("c", "5")))
    assert np.array_equal(a, b) and not np.allclose(a, c)


@pytest.mark.parametrize("args, message", [
    (["--text-encoder", "/nonexistent/t5"], "could not be loaded.*--text-encoder"),
    (["--extend", "CLIP", "--context", "9"], "has 6 latent frames; 9 are needed"),
    (["--image", "RGB"], "shape \\[3, 1, 8, 8\\]; the model takes latents of 4 channels"),
    (["--connect", "HEAD", "WIDE"], "--connect clips differ in size"),
    (["--edit", "CLIP", "--strength", "1.5"], "must be in \\(0, 1\\]"),
    (["--edit", "CLIP", "--image", "FIRST"], "one application at a time"),
    (["--image", "/nonexistent/first.png"], "no VAE to encode media with"),
])
def test_bad_input_gets_a_clear_message(run, clips, tmp_path, caplog, args, message):
    paths, _ = clips
    args = [paths.get(a.lower(), a) for a in args]
    assert sample(run, tmp_path / "out", *args)[0] == 2
    assert caplog.records and __import__("re").search(message, caplog.records[-1].getMessage()), caplog.text


def test_help_documents_every_application(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--prompt", "--image", "--extend", "--direction", "--connect", "--edit", "--strength", "--frames 1", "--text-encoder",
                 "--cfg-parallel", "--sp-ulysses", "--sp-ring"):
        assert flag in text, flag


def test_no_flag_is_taken_by_torchrun():
    """torchrun's parser accepts abbreviations of its options anywhere on the line, so a sample
    flag that begins one of them (--run, --num) never reaches the script."""
    import argparse

    from torch.distributed.run import get_args_parser

    from sora_dist.sample import add_arguments

    torchrun = [o for action in get_args_parser()._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ours = [o for action in parser._actions for o in action.option_strings if o.startswith("--") and o != "--help"]
    assert not [(o, t) for o in ours for t in torchrun if t.startswith(o)]


def test_torchrun_cfg_parallel_sample_equals_one_process(run, tmp_path):
    args = ["--from", str(run), "--prompt", "a small blue blob moving left", "--samples", "2", "--frames", "2", "--seed", "3",
            "--diffusion.sample_steps=3", "--guidance", "2.0"]
    assert main(["sample", *args, "--out", str(tmp_path / "one")]) == 0
    result = run_ranks(2, ["-m", "sora_dist.sample", *args, "--out", str(tmp_path / "two"), "--cfg-parallel"], timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one, two = (np.load(tmp_path / name / "latents.npy") for name in ("one", "two"))
    np.testing.assert_allclose(two, one, rtol=1e-4, atol=1e-5)


def test_two_experts_switch_at_the_boundary():
    """Wan 2.2 A14B: the high-noise expert denoises the steps at or above the boundary."""
    import torch

    from sora_dist.models import DiTConfig, VideoDiT
    from sora_dist.sample import TwoExperts

    cfg = DiTConfig(in_channels=4, text_dim=8, hidden_size=32, depth=1, num_heads=2)
    experts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = VideoDiT(cfg)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.2)
        experts.append(model)
    high, low = experts
    both = TwoExperts(high, low, boundary=500.0)
    x, text, mask = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 3, 8), torch.ones(1, 3, dtype=torch.bool)
    with torch.no_grad():
        for t, expert in ((torch.tensor([900.0]), high), (torch.tensor([500.0]), high), (torch.tensor([100.0]), low),
                          (torch.tensor([[0.0, 700.0]]), high)):  # a given frame holds t = 0: the step's timestep decides
            assert torch.equal(both(x, t, text, mask), expert(x, t, text, mask))
        assert not torch.equal(high(x, torch.tensor([100.0]), text, mask), low(x, torch.tensor([100.0]), text, mask))


def test_sampling_with_a_second_expert_runs_both_runs(run, tmp_path):
    """The same run as both experts samples what it samples alone (the switch loses nothing)."""
    alone = sample(run, tmp_path / "alone", "--seed", "3")[1]
    paired = sample(run, tmp_path / "paired", "--seed", "3", "--low-noise-from", str(run), "--boundary", "500")[1]
    assert np.array_equal(alone, paired)
