#!/usr/bin/env bash
# One node: torchrun with a standalone rendezvous.
#   NPROC=1 launch/single_node.sh --config configs/demo.yaml [--section.key=value ...]
# NPROC defaults to the visible GPUs (or NPUs), else 1. A failed or hung rank restarts the workers
# from the newest complete checkpoint, up to MAX_RESTARTS (default 3) times.
set -euo pipefail
# torchrun hands its rendezvous store to the workers by default, the same store for every restart:
# a restarted worker can read a peer's address from the attempt before and fail to connect ("Gloo
# connectFullMesh failed ... Connection refused"; NCCL too). This gives each attempt a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
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
exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "${MAX_RESTARTS:-3}" -m sora_dist.train "$@"
