"""A checkpoint folder on disk: which files it holds, proof that their bytes are the ones written,
and reading it back without running any code it carries.

``COMPLETE``, written last, is a JSON manifest: the step and, for every other file of the folder,
its size and CRC-32 (zlib's, as zip and torch.save use per record: 3.9 GB/s on this machine's
core, against 1.4 for SHA-256; it finds damage, while what a crafted file could do is stopped by
the reader below). The checksums of the DCP shard files are taken while they are written (each
rank checksums the bytes of its own files as they stream to disk, so it costs no extra read); the
small files rank 0 writes, and DeepSpeed's files, are checksummed right after they are written.

Reading back never unpickles anything but what DCP's metadata holds: ``.metadata`` goes through an
unpickler that admits only DCP's metadata classes, torch sizes, dtypes and layouts, and paths;
DCP's non-tensor items load with ``torch.load(weights_only=True)``, as its tensors already do.
Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint._nested_dict import set_element

from sora_dist.errors import CheckpointError

COMPLETE = "COMPLETE"
METADATA = ".metadata"
READ_CHUNK = 8 * 2**20
OVERLAP_BYTES = 1 * 2**20  # writes at least this large are checksummed beside the write, not before it
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sora-dist-checkpoint-hash")  # one for the process

# What DCP's .metadata pickles (torch 2.8-2.13): its dataclasses, torch.Size, dtypes, layouts, paths.
_DCP_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def _admitted(module: str, name: str) -> bool:
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return name in _DCP_CLASSES.get(module, ())


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, stream, path: Path):
        super().__init__(stream)
        self.path = path

    def find_class(self, module: str, name: str):
        if not _admitted(module, name):
            raise CheckpointError(f"{self.path} refers to {module}.{name}, which DCP metadata never holds: refused unread "
                                  "(a crafted or foreign file; loading it could run code)")
        return super().find_class(module, name)


def read_metadata(folder: Path) -> Metadata:
    """A checkpoint's DCP metadata, read with the restricted unpickler."""
    path = Path(folder) / METADATA
    try:
        with open(path, "rb") as stream:
            metadata = _MetadataUnpickler(stream, path).load()
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to parse is a damaged file
        raise CheckpointError(f"{path} is unreadable ({type(err).__name__}: {err})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with the restricted metadata unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(Path(self.path))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with its non-tensor items (LR schedule, counters) read as weights only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@contextlib.contextmanager
def weights_only_loads(admitted: list[type]):
    """Every ``torch.load`` inside, whatever its caller asks, loads weights only (PyTorch's
    TORCH_FORCE_WEIGHTS_ONLY_LOAD), admitting ``admitted`` classes beside tensors: for readers
    that are not ours (DeepSpeed's loads with weights_only=False)."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(admitted):
            yield
    finally:
        if previous is None:
            del os.environ[FORCE_WEIGHTS_ONLY]
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


class _HashingStream:
    """A file being written, checksumming every byte on its way to the file (DCP writes each file
    front to back: ``torch.save`` streams into it). A large write is checksummed on ``hasher``'s
    thread while it goes to disk: both let go of the GIL (bench-checkpoint measures what is left)."""

    def __init__(self, stream, hasher: ThreadPoolExecutor):
        self._stream, self._hasher = stream, hasher
        self.crc = 0
        self.size = 0

    def _update(self, view: memoryview) -> None:
        self.crc = zlib.crc32(view, self.crc)

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.size += view.nbytes
        if view.nbytes < OVERLAP_BYTES:
            self._update(view)
            return self._stream.write(view)
        summed = self._hasher.submit(self._update, view)
        try:
            return self._stream.write(view)
        finally:
            summed.result()  # in order, and before the caller may reuse the buffer

    def checksum(self) -> dict:
        return {"bytes": self.size, "crc32": f"{self.crc:08x}"}

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _HashingFileSystem(FileSystem):
    def __init__(self):
        self.digests: dict[str, dict] = {}
        self._lock = threading.Lock()  # DCP may write with several threads

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream, _HASHER)
            yield hashing
        with self._lock:
            self.digests[Path(path).name] = hashing.checksum()

    def rename(self, path, new_path) -> None:
        super().rename(path, new_path)
        with self._lock:
            if Path(path).name in self.digests:
                self.digests[Path(new_path).name] = self.digests.pop(Path(path).name)


class HashingWriter(FileSystemWriter):
    """DCP's file writer that records the size and CRC-32 of every file it writes (``digests``)."""

    def __init__(self, path):
        super().__init__(path)
        self.fs = _HashingFileSystem()

    @property
    def digests(self) -> dict[str, dict]:
        return dict(self.fs.digests)


def file_digest(path: Path) -> dict:
    """Size and CRC-32 of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as stream:
        while chunk := stream.read(READ_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def files_of(folder: Path) -> list[str]:
    """Every file of a checkpoint folder but the manifest, as paths relative to it."""
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def write_manifest(folder: Path, step: int, digests: dict[str, dict]) -> None:
    missing = set(files_of(folder)) - set(digests)
    assert not missing, f"files of {folder} without a digest: {sorted(missing)}"
    (Path(folder) / COMPLETE).write_text(json.dumps({"step": step, "files": digests}, indent=0, sort_keys=True))


def read_manifest(folder: Path) -> dict[str, dict]:
    """name -> {bytes, crc32} from a checkpoint's COMPLETE; CheckpointError if it has none."""
    path = Path(folder) / COMPLETE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {COMPLETE} marker (the save was interrupted)")
    try:
        files = json.loads(path.read_text())["files"]
        assert all(isinstance(v["bytes"], int) and isinstance(v["crc32"], str) for v in files.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError, AttributeError):
        raise CheckpointError(f"{folder}: {COMPLETE} is not a file manifest (damaged, or written by a version without checksums)") from None
    return files


def size_problem(folder: Path) -> Optional[str]:
    """Why ``folder`` is not a complete checkpoint by its manifest and file sizes (cheap), or None."""
    try:
        files = read_manifest(folder)
    except CheckpointError as err:
        return str(err).removeprefix(f"{folder}: ")
    for name, expected in files.items():
        path = Path(folder) / name
        actual = path.stat().st_size if path.is_file() else -1
        if actual != expected["bytes"]:
            what = "missing" if actual < 0 else f"{actual} bytes, written as {expected['bytes']}"
            return f"{name} is {what}"
    return None


def verify_share(folder: Path, rank: int = 0, world_size: int = 1) -> list[str]:
    """Hash this rank's share of the checkpoint's files against the manifest (rank 0 also reads
    the metadata with the restricted unpickler); the problems found, one line each."""
    folder = Path(folder)
    problem = size_problem(folder)
    if problem is not None:
        return [problem]
    files = read_manifest(folder)
    problems = []
    for name in sorted(files)[rank::world_size]:
        if file_digest(folder / name)["crc32"] != files[name]["crc32"]:
            problems.append(f"{name} does not match its checksum (its bytes changed after the save)")
    if rank == 0 and METADATA in files:
        try:
            read_metadata(folder)
        except CheckpointError as err:
            problems.append(str(err))
    return problems
