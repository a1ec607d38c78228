"""Attention and fused kernels, installed as ``sora_dist.kernels``.

Every attention in the model calls ``attention()``; the backend is chosen once at start-up
with ``set_attention_backend`` (the trainer does this from the device and the config). Ring
attention takes the same backend's per-block kernels from ``block_kernels()``.
"""

import sys

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: only when a checkout's root is on sys.path (``python -m``
    # run from it puts the working directory there), and then this folder would hide the installed
    # ``kernels`` distribution (Hugging Face's, which transformers 5.25 requires and imports). Give way to it.
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _spec = importlib.machinery.PathFinder.find_spec(__name__, [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout])
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ folder is sora_dist.kernels)", name=__name__)
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _installed  # what the import statement hands back
    _spec.loader.exec_module(_installed)
else:
    from sora_dist.kernels.attention import (
        BACKENDS,
        attention,
        attention_varlen,
        block_kernels,
        get_attention_backend,
        select_attention_backend,
        set_attention_backend,
    )

    __all__ = ["BACKENDS", "attention", "attention_varlen", "block_kernels", "get_attention_backend", "select_attention_backend", "set_attention_backend"]
