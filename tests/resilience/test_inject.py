"""The chaos suite's small disk at the file-writing seam (used where no tmpfs can be mounted):
writes past its size fail as a full disk's do, and the free space it reports is what is left."""

import builtins
import errno
import io
import shutil

import pytest

from sora_dist.resilience.inject import small_disk_functions


def test_a_write_past_the_small_disk_fails_with_enospc(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    quota_open, usage = small_disk_functions(disk, 10_000)
    monkeypatch.setattr(io, "open", quota_open)
    monkeypatch.setattr(builtins, "open", quota_open)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    (disk / "a").write_bytes(b"x" * 5000)  # pathlib writes through io.open
    (disk / "b.json").write_text("x" * 1000)  # text too
    assert shutil.disk_usage(disk).free == 4000 and shutil.disk_usage(disk).total == 10_000
    with pytest.raises(OSError) as raised:
        with open(disk / "c", "wb") as f:
            f.write(b"y" * 5000)
    assert raised.value.errno == errno.ENOSPC
    (tmp_path / "elsewhere").write_bytes(b"z" * 50_000)  # other folders are not on the small disk
    assert shutil.disk_usage(tmp_path).free > 10_000
