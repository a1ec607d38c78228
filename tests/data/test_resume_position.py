"""The loader's resumable position over long sequences of resumes, on one process: every sample of
an epoch arrives exactly once whatever mix of exact replays (same data settings) and skipping
resumes (changed settings) the run goes through, and an epoch with samples left is never left
behind."""

import random
from collections import Counter

import numpy as np
import pytest

from sora_dist.checkpoint.state import decode_data_state, encode_data_state
from sora_dist.config import DataConfig
from sora_dist.data import LatentLoader, make_synthetic

PATCH = (1, 2, 2)
SAMPLES = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("resume") / "d", SAMPLES, seed=1, samples_per_shard=8)


def new_loader(dataset, shuffle_buffer):
    cfg = DataConfig(path=str(dataset), num_workers=0, shuffle_buffer=shuffle_buffer, tokens_per_batch=512, max_batch_size=3)
    return LatentLoader(cfg, PATCH)


def train(loader, batches, seen, stream=None):
    """Take ``batches`` optimizer steps of one batch each, recording (epoch, position) as trained;
    returns the position as a checkpoint stores it, and the stream to go on with."""
    stream = stream or iter(loader)
    for _ in range(batches):
        batch = next(stream)
        loader.mark_consumed(batch)
        seen.update((batch.epoch, uid) for uid in batch.uids)
    return encode_data_state(loader.state_dict()), stream


@pytest.mark.parametrize("seed", range(12))
def test_every_sample_once_per_epoch_over_random_resumes(dataset, seed):
    rng = random.Random(seed)
    seen, state, modes = Counter(), None, []
    for _ in range(rng.randint(3, 6)):  # each run is killed after its checkpoint; the next resumes from it
        loader = new_loader(dataset, shuffle_buffer=rng.choice([4, 16]))  # a changed setting: the stream changes
        if state is not None:
            modes.append(loader.load_state_dict(decode_data_state(state, SAMPLES)))
        state, stream = train(loader, rng.randint(1, 25), seen)
    while max(epoch for epoch, _ in seen) < 2:  # the last run finishes epochs 0 and 1
        _, stream = train(loader, 5, seen, stream)
    for epoch in (0, 1):
        assert sorted(uid for e, uid in seen if e == epoch) == list(range(SAMPLES)), (epoch, modes)
    assert all(count == 1 for count in seen.values())


def test_an_epoch_with_samples_left_is_resumed_before_the_next(dataset):
    """A position whose epoch 0 has holes while its ranks are in epoch 1 (as a lost sample would
    leave it) resumes in epoch 0 and trains exactly the holes first."""
    loader = new_loader(dataset, shuffle_buffer=4)
    seen = Counter()
    state = decode_data_state(train(loader, 40, seen)[0], SAMPLES)
    assert loader.epoch >= 1
    assert 0 not in state["consumed"]  # a finished epoch is forgotten...
    holes = [3, 17, 40]
    state["consumed"][0] = np.ones(SAMPLES, dtype=bool)  # ...unless it has samples left
    state["consumed"][0][holes] = False
    fresh = new_loader(dataset, shuffle_buffer=4)
    assert fresh.load_state_dict(state) == "skip" and fresh.epoch == 0
    first = []
    for batch in fresh:
        if batch.epoch != 0:
            break
        first += batch.uids
    assert sorted(first) == holes


def test_finished_epochs_are_forgotten(dataset):
    loader = new_loader(dataset, shuffle_buffer=4)
    train(loader, 60, Counter())
    state = loader.state_dict()
    assert min(state["consumed"]) == min(epoch for epoch, _ in state["rank_epoch_batches"])
    assert all(np.asarray(mask).dtype == bool for mask in state["consumed"].values())
