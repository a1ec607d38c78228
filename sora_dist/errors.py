"""Error types for problems the user can fix. Internal invariants use ``assert``."""


class SoraDistError(Exception):
    """Base class: a message that tells the user what is wrong and how to fix it."""


class ConfigError(SoraDistError):
    """A config key, value or combination that cannot work."""


class DeviceError(SoraDistError):
    """The requested accelerator is missing or its software stack is broken."""


class DataError(SoraDistError):
    """A dataset folder, manifest or shard that cannot be read."""


class CorruptSampleError(DataError):
    """One sample inside a shard is unreadable or inconsistent with its metadata."""


class TrainingError(SoraDistError):
    """Training cannot continue (e.g. the loss became non-finite)."""


class CheckpointError(SoraDistError):
    """A checkpoint that cannot be written or read: damaged, crafted, or no room for it."""


class MissingDependencyError(SoraDistError):
    """An optional package the command needs is not installed."""


EXTRAS = {
    "encode": ("av", "PIL", "diffusers", "transformers"),
    "curate": ("av", "PIL", "cv2", "transformers"),
    "deepspeed": ("deepspeed",),
    "lora": ("peft",),
}
"""The project's optional extras (pyproject.toml) and the modules each provides."""


def require_extra(extra: str) -> None:
    """Raise MissingDependencyError with the install command if a module of ``extra`` is missing."""
    import importlib.util

    missing = [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed; this command needs the "
            f"[{extra}] extra: pip install -e '.[{extra}]' (from a checkout) or pip install 'sora-dist[{extra}]'"
        )
