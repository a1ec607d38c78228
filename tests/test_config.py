import pytest

from sora_dist.config import Config, load_config, save_config
from sora_dist.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_file_and_overrides_in_order(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 2.0e-4\n  warmup_steps: 7\ntrain:\n  steps: 50\n")
    cfg = load_config(path, ["--optim.lr=3e-4", "train.seed=5"])
    assert cfg.optim.lr == 3e-4  # command line beats the file
    assert cfg.optim.warmup_steps == 7  # the file beats the default
    assert cfg.train.steps == 50 and cfg.train.seed == 5
    assert cfg.optim.betas == Config().optim.betas  # untouched default


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--model.patch_size=[1,4,4]", "--diffusion.shift=2.5"])
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_typo_names_the_key_and_suggests_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr'.*Did you mean 'optim.lr'"):
        load_config(write(tmp_path, "optim:\n  lrr: 1.0e-4\n"))
    with pytest.raises(ConfigError, match=r"unknown config key 'traim'.*Did you mean 'train'"):
        load_config(None, ["--traim.steps=3"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.steps=ten", r"train.steps='ten' must be an integer"),
        ("--optim.lr=fast", r"optim.lr='fast' must be a number"),
        ("--model.qk_norm=1", r"model.qk_norm=1 must be true or false"),
        ("--diffusion.objective=score", r"diffusion.objective='score' is not allowed: choose one of 'flow', 'ddpm'"),
        ("--model.patch_size=[1,2]", r"model.patch_size=\[1, 2\] must be a list of 3 values"),
        ("--train.sample_prompts=a red blob", r"train.sample_prompts='a red blob' must be a list, e.g. \['x'\]"),
        ("--train.sample_prompts=[a, 3]", r"train.sample_prompts\[1\]=3 must be a string"),
    ],
)
def test_wrong_types_name_key_value_and_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--model.num_heads=5"], r"model.num_heads=5 does not divide model.hidden_size=64: choose num_heads from"),
        (["--model.preset=huge"], r"model.preset='huge' is unknown: choose one of debug, S, B"),
        (["--optim.ema_decay=1.0"], r"optim.ema_decay=1.0 must be in \[0, 1\)"),
        (["--diffusion.sampler=ddim"], r"diffusion.sampler='ddim' does not go with diffusion.objective='flow'"),
        (["--model.hidden_size=48", "--model.num_heads=12"], r"head dimension .* = 4 must be even and at least 6"),
        (["--train.grad_accum=0"], r"train.grad_accum=0 must be at least 1"),
        (["--parallel.dp_shard=0"], r"parallel.dp_shard=0 must be >= 1 or -1"),
        (["--mask.image_to_video=-0.1"], r"mask.image_to_video=-0.1 must be a probability in \[0, 1\]"),
        (["--train.sample_every=-1"], r"train.sample_every=-1 must be >= 0"),
        (["--model.ffn_dim=0"], r"model.ffn_dim=0 must be positive \(or null for hidden_size x mlp_ratio\)"),
    ],
)
def test_impossible_values_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "optim: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"not of the form --section.key=value"):
        load_config(None, ["--steps=3"])
    with pytest.raises(ConfigError, match=r"'optim' must be a mapping"):
        load_config(write(tmp_path, "optim: 3\n"))


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)


def test_cluster_configs_save_and_resume():
    """A long run on a cluster must checkpoint: every real-size config saves on a clock and resumes."""
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/dit_*.yaml")):
        cfg = load_config(path)
        assert cfg.checkpoint.every_minutes > 0 and cfg.checkpoint.every_steps > 0, path
        assert cfg.checkpoint.resume == "auto" and cfg.checkpoint.async_save and cfg.checkpoint.keep_last >= 2, path
