"""A checkpoint's bytes are verified and never run code: the manifest's checksums are those of the
files on disk; a damaged checkpoint (bytes flipped, a tensor renamed in its metadata, a crafted
metadata that would run code) is named and the one before it resumed; when none loads, the run
stops with one line naming each; ``sora-dist checkpoint verify`` checks a folder offline."""

import io
import json
import logging
import pickle
from pathlib import Path

import pytest
import torch

from sora_dist.checkpoint.files import COMPLETE, SafeLoadPlanner, file_digest, read_manifest, read_metadata, verify_share
from sora_dist.cli import main
from sora_dist.errors import CheckpointError

REPO = Path(__file__).parents[2]


def train_args(data_dir, out_dir, steps, *extra):
    return [
        "train", "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data_dir}", f"--train.out_dir={out_dir}",
        "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0", "--logging.tensorboard=false",
        "--optim.warmup_steps=2", "--logging.log_every=1", "--train.sample_at_end=false", "--train.sample_every=0",
        "--checkpoint.resume=auto", "--checkpoint.every_steps=4", "--checkpoint.keep_last=0", f"--train.steps={steps}", *extra,
    ]


@pytest.fixture(scope="module")
def trained(synthetic_dir, tmp_path_factory):
    """A run with checkpoints at steps 4 and 8 (blocking) and 12 (asynchronous)."""
    out = tmp_path_factory.mktemp("integrity")
    assert main(train_args(synthetic_dir, out, 8)) == 0
    assert main(train_args(synthetic_dir, out, 12, "--checkpoint.async_save=true")) == 0
    return out


def copy_run(trained, tmp_path):
    import shutil

    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def resign(checkpoint, name):
    """Record the file's current bytes in the manifest: damage a checksum cannot see."""
    manifest = json.loads((checkpoint / COMPLETE).read_text())
    manifest["files"][name] = file_digest(checkpoint / name)
    (checkpoint / COMPLETE).write_text(json.dumps(manifest))


def resume(synthetic_dir, run, caplog, steps=13):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sora_dist"):
        code = main(train_args(synthetic_dir, run, steps))
    return code, caplog.text


def test_every_file_is_in_the_manifest_with_the_checksum_of_its_bytes(trained):
    for step in (4, 8, 12):
        checkpoint = trained / "checkpoints" / f"step-{step}"
        files = read_manifest(checkpoint)
        on_disk = {str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file() and p.name != COMPLETE}
        assert set(files) == on_disk and {".metadata", "__0_0.distcp", "data.json", "rng.json", "config.yaml"} <= on_disk
        for name, entry in files.items():
            assert file_digest(checkpoint / name) == entry, (step, name)  # hashed as written, async included
        assert verify_share(checkpoint) == []


def test_flipped_bytes_in_a_shard_fall_back_to_the_checkpoint_before(synthetic_dir, trained, tmp_path, caplog):
    run = copy_run(trained, tmp_path)
    shard = run / "checkpoints" / "step-12" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2 : len(data) // 2 + 64])
    shard.write_bytes(bytes(data))  # same size: only the checksum can tell
    code, log = resume(synthetic_dir, run, caplog)
    assert code == 0
    assert f"checkpoint {shard.parent} is damaged: __0_0.distcp does not match its checksum" in log
    assert f"resumed from {run / 'checkpoints' / 'step-8'} at step 8" in log


def test_a_tensor_renamed_in_the_metadata_falls_back_to_the_checkpoint_before(synthetic_dir, trained, tmp_path, caplog):
    run = copy_run(trained, tmp_path)
    newest = run / "checkpoints" / "step-12"
    metadata = (newest / ".metadata").read_bytes()
    assert b"model.x_embedder.weight" in metadata
    (newest / ".metadata").write_bytes(metadata.replace(b"model.x_embedder.weight", b"model.x_embedder.weighs"))
    resign(newest, ".metadata")  # consistent bytes, wrong contents: the load itself must fail and say so
    code, log = resume(synthetic_dir, run, caplog)
    assert code == 0
    assert f"checkpoint {newest} is damaged: " in log and "model.x_embedder.weight" in log.split("is damaged: ")[1].splitlines()[0]
    assert f"resumed from {run / 'checkpoints' / 'step-8'} at step 8" in log


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_a_crafted_metadata_is_refused_without_running_it(synthetic_dir, trained, tmp_path, caplog):
    run = copy_run(trained, tmp_path)
    newest, marker = run / "checkpoints" / "step-12", tmp_path / "pwned"
    (newest / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    resign(newest, ".metadata")
    with pytest.raises(CheckpointError, match=r"\.metadata refers to pathlib\.Path\.touch, which DCP metadata never holds: refused"):
        read_metadata(newest)
    code, log = resume(synthetic_dir, run, caplog)
    assert code == 0 and f"resumed from {run / 'checkpoints' / 'step-8'} at step 8" in log
    assert "refused unread" in log
    assert not marker.exists()  # nothing it carried ran


def test_non_tensor_items_load_as_weights_only(tmp_path):
    """DCP's default planner unpickles the LR schedule and counters with any globals; ours does not."""
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    buffer.seek(0)
    planner = SafeLoadPlanner()
    planner.flatten_state_dict = False
    planner.state_dict = {}

    class Item:
        class dest_index:
            fqn = "scheduler.last_epoch"

    with pytest.raises(pickle.UnpicklingError):
        planner.load_bytes(Item, buffer)
    assert not marker.exists()


def test_when_no_checkpoint_loads_the_run_stops_naming_each(synthetic_dir, trained, tmp_path, caplog):
    run = copy_run(trained, tmp_path)
    for step in (4, 8, 12):
        (run / "checkpoints" / f"step-{step}" / "data.json").write_text("{}")
    code, log = resume(synthetic_dir, run, caplog)
    assert code == 2
    line = next(line for line in log.splitlines() if "CheckpointError" in line)
    assert f"no checkpoint in {run / 'checkpoints'} loads: step-12: data.json is 2 bytes" in line
    assert "step-8: " in line and "step-4: " in line and "checkpoint.resume=none" in line


def test_checkpoint_verify_names_the_damaged_ones(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert capsys.readouterr().out.count(" ok ") == 3
    (run / "checkpoints" / "step-8" / "rng.json").write_text("x" * (run / "checkpoints" / "step-8" / "rng.json").stat().st_size)
    assert main(["checkpoint", "verify", str(run / "checkpoints")]) == 2
    out = capsys.readouterr().out
    assert "step-8         DAMAGED  rng.json does not match its checksum" in out and out.count(" ok ") == 2
