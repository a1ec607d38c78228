import io
import itertools
import json
import logging
import subprocess
import sys
import tarfile
import threading
import time
from collections import Counter

import numpy as np
import torch
import pytest

from sora_dist.config import DataConfig
from sora_dist.data import LatentLoader, Sample, ShardWriter, batch_size_for, read_manifest
from sora_dist.data.format import MANIFEST_NAME
from sora_dist.data.loader import run_ahead
from sora_dist.errors import DataError

PATCH = (1, 2, 2)


def make_samples(n, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(1, 4, 6), (3, 4, 4), (2, 6, 4)]
    out = []
    for i in range(n):
        shape = shapes[i % len(shapes)]
        text_len = 2 + i % 5
        out.append(Sample(
            key=f"k{i:05d}",
            latent=rng.standard_normal((3, *shape)).astype(np.float16),
            text=rng.standard_normal((text_len, 8)).astype(np.float16),
            meta={"caption": f"caption {i}"},
        ))
    return out


def write_dataset(path, samples, per_shard=5):
    with ShardWriter(path, samples_per_shard=per_shard, vae="test-vae") as writer:
        for s in samples:
            writer.write(s)
    return path


def loader(path, **overrides):
    settings = {"num_workers": 0, "shuffle_buffer": 4, "tokens_per_batch": 48, "max_batch_size": 3, **overrides}
    cfg = DataConfig(path=str(path), **settings)
    return LatentLoader(cfg, PATCH)


def all_batches(ld, epoch=0):
    return list(ld.epoch_batches(epoch))


def test_round_trip_preserves_every_array_and_caption(tmp_path):
    samples = make_samples(23)
    write_dataset(tmp_path / "ds", samples)
    manifest = read_manifest(tmp_path / "ds")
    assert manifest.num_samples == 23 and len(manifest.shards) == 5
    assert manifest.shapes == {"1x4x6": 8, "3x4x4": 8, "2x6x4": 7}
    assert (manifest.latent_channels, manifest.text_dim, manifest.vae) == (3, 8, "test-vae")
    by_key = {s.key: s for s in samples}
    seen = 0
    for batch in all_batches(loader(tmp_path / "ds")):
        assert batch.latents.dtype == batch.text.dtype == torch.float16  # as stored, until .to(device)
        batch = batch.to(torch.device("cpu"))
        assert batch.latents.dtype == batch.text.dtype == torch.float32
        for i, key in enumerate(batch.keys):
            original = by_key[key]
            np.testing.assert_array_equal(batch.latents[i].numpy(), original.latent.astype(np.float32))
            length = int(batch.text_mask[i].sum())
            assert length == original.text.shape[0]
            np.testing.assert_array_equal(batch.text[i, :length].numpy(), original.text.astype(np.float32))
            assert (batch.text[i, length:] == 0).all()  # padding is zero and masked
            assert batch.captions[i] == original.meta["caption"]
            seen += 1
    assert seen == 23


def test_batches_hold_one_shape_and_follow_the_token_budget(tmp_path):
    write_dataset(tmp_path / "ds", make_samples(60))
    ld = loader(tmp_path / "ds")
    sizes = Counter()
    for batch in all_batches(ld):
        shape = tuple(batch.latents.shape[2:])
        full = batch_size_for(shape, PATCH, ld.cfg)
        assert len(batch.keys) <= full
        sizes[(shape, len(batch.keys) == full)] += 1
    # (1,4,6) -> 6 tokens -> 8 by budget, capped at 3; (3,4,4) -> 12 tokens -> 4, capped at 3; (2,6,4) -> 12 -> 3.
    assert batch_size_for((1, 4, 6), PATCH, ld.cfg) == 3
    assert batch_size_for((3, 4, 4), PATCH, DataConfig(tokens_per_batch=48, max_batch_size=64)) == 4
    # Each bucket of 20 samples gives six full batches and one partial batch at the epoch's end.
    assert all(sizes[(shape, True)] == 6 and sizes[(shape, False)] == 1 for shape in [(1, 4, 6), (3, 4, 4), (2, 6, 4)])


@pytest.mark.parametrize("num_workers, dp_size", [(0, 1), (2, 1), (2, 2), (1, 3)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(tmp_path, num_workers, dp_size):
    write_dataset(tmp_path / "ds", make_samples(40), per_shard=4)
    keys = Counter()
    for rank in range(dp_size):
        cfg = DataConfig(path=str(tmp_path / "ds"), num_workers=num_workers, shuffle_buffer=8, tokens_per_batch=48, max_batch_size=3)
        rank_keys = [k for b in LatentLoader(cfg, PATCH, dp_rank=rank, dp_size=dp_size).epoch_batches(0) for k in b.keys]
        assert rank_keys, f"rank {rank} got nothing"
        keys.update(rank_keys)
    assert keys == Counter(f"k{i:05d}" for i in range(40))


def test_more_data_parallel_ranks_than_shards_is_a_clear_error(tmp_path):
    write_dataset(tmp_path / "ds", make_samples(12), per_shard=4)  # 3 shards
    with pytest.raises(DataError, match=r"has 3 shards but the run has 4 data-parallel ranks.*--samples-per-shard 3"):
        LatentLoader(DataConfig(path=str(tmp_path / "ds")), PATCH, dp_rank=3, dp_size=4)


def test_workers_beyond_the_ranks_shards_are_not_started(tmp_path):
    """2 ranks x 3 workers over 4 shards: each rank starts 2 workers, and every sample still
    arrives exactly once."""
    write_dataset(tmp_path / "ds", make_samples(16), per_shard=4)
    keys = Counter()
    for rank in range(2):
        ld = loader(tmp_path / "ds", num_workers=3)
        ld = LatentLoader(ld.cfg, PATCH, dp_rank=rank, dp_size=2)
        assert ld.workers == 2
        keys.update(k for b in ld.epoch_batches(0) for k in b.keys)
    assert keys == Counter(f"k{i:05d}" for i in range(16))


def test_a_rank_whose_shards_yield_nothing_stops_instead_of_spinning(tmp_path):
    root = write_dataset(tmp_path / "ds", make_samples(8), per_shard=4)
    for shard in root.glob("shard-*.tar"):
        shard.write_bytes(b"")
    stream = iter(loader(root))
    with pytest.raises(DataError, match=r"rank 0 read no sample in epoch 0 .*shard-00000"):
        next(stream)


def test_worker_batches_leave_shared_memory_on_the_loader_thread(tmp_path):
    write_dataset(tmp_path / "ds", make_samples(12), per_shard=4)
    for batch in loader(tmp_path / "ds", num_workers=2).epoch_batches(0):
        assert not (batch.latents.is_shared() or batch.text.is_shared() or batch.text_mask.is_shared())


def test_pinned_batches_when_asked(tmp_path, monkeypatch):
    write_dataset(tmp_path / "ds", make_samples(12), per_shard=4)
    pinned_on = []

    def pin(tensor):  # a CPU-only torch cannot pin: record which thread asked, and copy
        pinned_on.append(threading.current_thread().name)
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    cfg = DataConfig(path=str(tmp_path / "ds"), num_workers=0, shuffle_buffer=4, tokens_per_batch=48, max_batch_size=3)
    batches = list(LatentLoader(cfg, PATCH, pin_memory=True).epoch_batches(0))
    assert len(pinned_on) == 3 * len(batches) and set(pinned_on) == {"sora-dist-loader"}


def test_run_ahead_keeps_order_raises_the_producers_error_and_stops_when_abandoned():
    assert list(run_ahead(iter(range(50)), depth=3, stage=lambda x: 2 * x)) == [2 * x for x in range(50)]

    def failing():
        yield 1
        raise KeyError("shard gone")

    stream = run_ahead(failing(), depth=2)
    assert next(stream) == 1
    with pytest.raises(KeyError, match="shard gone"):
        next(stream)

    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    before = set(threading.enumerate())
    stream = run_ahead(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    (thread,) = set(threading.enumerate()) - before
    stream.close()
    assert not thread.is_alive()  # close() waits for it
    assert len(produced) <= 3 + 2 + 2  # taken, queued, and at most one in hand when it stopped


ABANDON = """
import sys
from sora_dist.config import DataConfig
from sora_dist.data import LatentLoader

def train_a_little(path):
    cfg = DataConfig(path=path, num_workers=2, shuffle_buffer=4, tokens_per_batch=48, max_batch_size=3)
    batches = iter(LatentLoader(cfg, (1, 2, 2)))
    next(batches), next(batches)  # mid-epoch: workers and the loader thread are busy

train_a_little(sys.argv[1])
"""


@pytest.mark.parametrize("attempt", range(3))  # the hang it guards against was a race
def test_a_process_that_abandons_a_worker_stream_exits(tmp_path, attempt):
    write_dataset(tmp_path / "ds", make_samples(60), per_shard=5)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", ABANDON, str(tmp_path / "ds")], check=True, timeout=60)
    assert time.perf_counter() - started < 30


def test_epochs_reshuffle(tmp_path):
    write_dataset(tmp_path / "ds", make_samples(40), per_shard=4)
    ld = loader(tmp_path / "ds")
    first = [k for b in all_batches(ld, 0) for k in b.keys]
    second = [k for b in all_batches(ld, 1) for k in b.keys]
    assert sorted(first) == sorted(second) and first != second


# --- bad input -------------------------------------------------------------------------------


def add_members(shard, members):
    """Append raw members to an existing (closed) tar shard."""
    with tarfile.open(shard, "a") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def npy(array, allow_pickle=False):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def good_members(key, latent=None, meta_shape=None):
    latent = np.zeros((3, 1, 4, 6), np.float16) if latent is None else latent
    return {
        f"{key}.latent.npy": npy(latent),
        f"{key}.text.npy": npy(np.zeros((2, 8), np.float16)),
        f"{key}.json": json.dumps({"latent_shape": meta_shape or list(latent.shape)}).encode(),
    }


def bump_manifest(root, shard_name, extra):
    """Keep the manifest consistent with samples appended to a shard."""
    path = root / MANIFEST_NAME
    raw = json.loads(path.read_text())
    for shard in raw["shards"]:
        if shard["name"] == shard_name:
            shard["samples"] += extra
    raw["shapes"]["1x4x6"] += extra
    path.write_text(json.dumps(raw))


CORRUPTIONS = {
    "garbage-npy": lambda key: {**good_members(key), f"{key}.latent.npy": b"not a numpy file"},
    "pickled-npy": lambda key: {**good_members(key), f"{key}.latent.npy": npy(np.array([{"evil": 1}], dtype=object), allow_pickle=True)},
    "nan-latent": lambda key: good_members(key, latent=np.full((3, 1, 4, 6), np.nan, np.float16)),
    "shape-mismatch": lambda key: good_members(key, meta_shape=[3, 1, 4, 7]),
    "bad-json": lambda key: {**good_members(key), f"{key}.json": b"{not json"},
    "missing-text": lambda key: {k: v for k, v in good_members(key).items() if not k.endswith("text.npy")},
    "wrong-channels": lambda key: good_members(key, latent=np.zeros((5, 1, 4, 6), np.float16)),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_sample_is_skipped_counted_and_named(tmp_path, kind, caplog):
    root = write_dataset(tmp_path / "ds", make_samples(10))
    add_members(root / "shard-000001.tar", CORRUPTIONS[kind]("bad00001"))
    bump_manifest(root, "shard-000001.tar", 1)
    ld = loader(root)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in all_batches(ld) for k in b.keys]
    assert sorted(keys) == [f"k{i:05d}" for i in range(10)]  # everything else still arrives
    assert ld.skipped == 1
    assert "shard-000001.tar sample bad00001" in caplog.text


def test_a_corrupt_sample_is_done_with_in_the_data_position(tmp_path):
    """A resume never goes back to an epoch for a sample that was skipped as corrupt."""
    root = write_dataset(tmp_path / "ds", make_samples(10))
    add_members(root / "shard-000001.tar", CORRUPTIONS["garbage-npy"]("bad00001"))
    bump_manifest(root, "shard-000001.tar", 1)
    ld = loader(root)
    for batch in ld.epoch_batches(0):
        ld.mark_consumed(batch)
    assert ld.skipped == 1 and ld.state_dict()["consumed"][0].all()


def test_stop_mode_raises_with_the_path(tmp_path):
    root = write_dataset(tmp_path / "ds", make_samples(10))
    add_members(root / "shard-000000.tar", CORRUPTIONS["garbage-npy"]("bad00001"))
    bump_manifest(root, "shard-000000.tar", 1)
    with pytest.raises(DataError, match=r"data.on_corrupt=stop.*shard-000000.tar sample bad00001"):
        all_batches(loader(root, on_corrupt="stop"))


def test_truncated_shard_is_reported_and_the_rest_streams(tmp_path, caplog):
    root = write_dataset(tmp_path / "ds", make_samples(20))
    shard = root / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    ld = loader(root)
    with caplog.at_level(logging.WARNING):
        keys = [k for b in all_batches(ld) for k in b.keys]
    assert set(keys) >= {f"k{i:05d}" for i in range(20) if not 10 <= i < 15}  # the other shards are whole
    assert ld.skipped >= 1 and "shard-000002.tar" in caplog.text


def test_manifest_problems_name_the_file(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*sora-dist make-synthetic"):
        read_manifest(tmp_path / "nowhere")
    root = write_dataset(tmp_path / "ds", make_samples(10))
    manifest = root / MANIFEST_NAME
    good = manifest.read_text()

    manifest.unlink()
    with pytest.raises(DataError, match=rf"{manifest} is missing"):
        read_manifest(root)
    manifest.write_text("{broken")
    with pytest.raises(DataError, match=rf"{manifest} is not valid JSON"):
        read_manifest(root)
    raw = json.loads(good)
    del raw["text_dim"]
    manifest.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"lacks the keys \['text_dim'\]"):
        read_manifest(root)
    raw = json.loads(good)
    raw["shapes"]["1x4x6"] += 1
    manifest.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"inconsistent: its shape histogram counts 11 samples but its shards hold 10"):
        read_manifest(root)
    manifest.write_text(good)
    (root / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match=r"lists shard-000001.tar, but .*shard-000001.tar is missing"):
        read_manifest(root)


def test_writer_rejects_mixed_widths_and_dotted_keys(tmp_path):
    with pytest.raises(DataError, match="has 4 latent channels and text width 8; this dataset has 3 and 8"):
        with ShardWriter(tmp_path / "ds") as writer:
            writer.write(make_samples(1)[0])
            writer.write(Sample("x1", np.zeros((4, 1, 2, 2), np.float16), np.zeros((1, 8), np.float16), {}))
    with pytest.raises(DataError, match="must not contain '.'"):
        with ShardWriter(tmp_path / "ds2") as writer:
            writer.write(Sample("a.b", np.zeros((3, 1, 2, 2), np.float16), np.zeros((1, 8), np.float16), {}))


def test_synthetic_dataset_mixes_images_and_clips(synthetic_dir):
    manifest = read_manifest(synthetic_dir)
    frames = Counter(int(key.split("x")[0]) for key in manifest.shapes)
    assert frames[1] >= 2 and sum(v for k, v in frames.items() if k > 1) >= 2  # several image and clip shapes
    aspect = {tuple(map(int, k.split("x")[1:])) for k in manifest.shapes}
    assert any(h > w for h, w in aspect) and any(h < w for h, w in aspect)
    batch = next(iter(loader(synthetic_dir, tokens_per_batch=4096, max_batch_size=8)))
    assert batch.latents.shape[1] == 4 and batch.text.shape[2] == 32
