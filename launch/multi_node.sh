#!/usr/bin/env bash
# Many nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 MASTER_ADDR=node0 launch/multi_node.sh --config configs/dit_1b.yaml \
#       --parallel.tp=2 --parallel.sp_ulysses=4
# MASTER_ADDR: a host every node reaches (the rendezvous store runs there).
# JOB_ID: any string shared by the nodes of one job (defaults to a fixed id).
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-sora-dist}
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  -m sora_dist.train "$@"
