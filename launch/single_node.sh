#!/usr/bin/env bash
# One node: torchrun with a standalone rendezvous.
#   NPROC=1 launch/single_node.sh --config configs/demo.yaml [--section.key=value ...]
# NPROC defaults to the visible GPUs (or NPUs), else 1.
set -euo pipefail
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(python3 - <<'PY'
import torch
count = torch.cuda.device_count()
if not count:
    try:
        import torch_npu  # noqa: F401
        count = torch.npu.device_count()
    except Exception:
        count = 0
print(max(count, 1))
PY
)
fi
exec torchrun --standalone --nproc-per-node "$NPROC" -m sora_dist.train "$@"
