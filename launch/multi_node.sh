#!/usr/bin/env bash
# Many nodes with torchrun's c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC=8 MASTER_ADDR=node0 launch/multi_node.sh --config configs/dit_1b.yaml \
#       --parallel.tp=2 --parallel.sp_ulysses=4
# Elastic: NNODES=2:4 lets the job run on 2 to 4 nodes. After a failure torchrun restarts the
# workers (MAX_RESTARTS times) on the nodes that are left; the trainer re-resolves its layout
# (data parallelism absorbs the change) and resumes from the newest complete checkpoint.
# MASTER_ADDR: a host every node reaches; the rendezvous store runs there, so it must outlive the
# others (a failure of that node ends the job: put it on your most reliable node).
# JOB_ID: any string shared by the nodes of one job (defaults to a fixed id).
set -euo pipefail
: "${NNODES:?set NNODES to the number of nodes, or MIN:MAX for an elastic range}"
: "${MASTER_ADDR:?set MASTER_ADDR to the rendezvous host}"
NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-29500}
JOB_ID=${JOB_ID:-sora-dist}
# torchrun hands its rendezvous store to the workers by default, the same store for every restart:
# a restarted worker can read a peer's address from the attempt before and fail to connect ("Gloo
# connectFullMesh failed ... Connection refused"; NCCL too). This gives each attempt a fresh store.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
# After a failure, wait LAST_CALL_TIMEOUT s for more nodes once the minimum has joined. A node
# whose agent stops answering is dropped after KEEP_ALIVE_INTERVAL x KEEP_ALIVE_MAX_ATTEMPT s
# (torch's defaults, 5 x 3): lower them to recover sooner from a dead node (see README, Fault tolerance).
RDZV_CONF="join_timeout=${JOIN_TIMEOUT:-600},last_call_timeout=${LAST_CALL_TIMEOUT:-30}"
RDZV_CONF+=",keep_alive_interval=${KEEP_ALIVE_INTERVAL:-5},keep_alive_max_attempt=${KEEP_ALIVE_MAX_ATTEMPT:-3}"
exec torchrun \
  --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$JOB_ID" --rdzv-conf "$RDZV_CONF" \
  --max-restarts "${MAX_RESTARTS:-3}" --monitor-interval "${MONITOR_INTERVAL:-5}" \
  -m sora_dist.train "$@"
