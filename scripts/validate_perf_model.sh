#!/usr/bin/env bash
# Validate the performance model on this machine (docs/planner.md, "Validation"):
# calibrate on 1 process, measure the links on 2 and 4 gloo ranks (4 bench-comm runs), then
# predict and measure 12 layouts of a small model on 1, 2 and 4 ranks, each 3 times round robin.
#   scripts/validate_perf_model.sh OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/validate_perf_model.sh OUT_DIR}
mkdir -p "$out"
export OMP_NUM_THREADS=1  # one core per rank; the model knows the host's cores are shared
model=(--preset debug --model.hidden_size=256 --model.depth=4 --model.num_heads=8)
comm=(-m sora_dist.perf.bench_comm --max-bytes 16M --iters 10 --skew-bursts-ms 10 25 100 400 --skew-rounds 5 --preset debug --model.hidden_size=256 --model.num_heads=8)
sora-dist calibrate "${model[@]}" --latent 4 32 32 --batches 1 2 4 --out "$out/calib.json"
python -m torch.distributed.run --standalone --nproc-per-node 2 "${comm[@]}" --parallel.sp_ring=2 --json "$out/comm2.json"
python -m torch.distributed.run --standalone --nproc-per-node 2 "${comm[@]}" --parallel.tp=2 --json "$out/comm2tp.json"
python -m torch.distributed.run --standalone --nproc-per-node 4 "${comm[@]}" --parallel.sp_ring=4 --json "$out/comm4.json"
python -m torch.distributed.run --standalone --nproc-per-node 4 "${comm[@]}" --parallel.sp_ring=2 --parallel.tp=2 --json "$out/comm4x2.json"
sora-dist bench-scaling "${model[@]}" --latent 4 32 32 --global-batch 4 --steps 3 --warmup 2 --repeats 3 \
  --calibration "$out/calib.json" "$out/comm2.json" "$out/comm2tp.json" "$out/comm4.json" "$out/comm4x2.json" --out "$out" \
  --layouts 1 2 "2:--parallel.engine=ddp" "2:--parallel.sp_ulysses=2" "2:--parallel.sp_ring=2" "2:--parallel.tp=2" \
            4 "4:--parallel.engine=ddp" "4:--parallel.dp_replicate=2" "4:--parallel.sp_ulysses=4" "4:--parallel.sp_ring=4" \
            "4:--parallel.tp=2 --parallel.sp_ulysses=2"
