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
