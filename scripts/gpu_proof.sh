#!/usr/bin/env bash
# Prove a CUDA machine in one command: GPU tests, the demo in bf16, bench-train / bench-kernels /
# bench-loader, with a markdown table and JSON of every number (date, GPU, driver, torch, CUDA).
#   scripts/gpu_proof.sh OUT_DIR [--parts tests demo train kernels loader] [--small]
# On a machine without network, put the wheels the image lacks in .whl/ first (webdataset and
# braceexpand for torch images; see docs/benchmarks.md, "GPU proof"): they are installed to a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:?usage: scripts/gpu_proof.sh OUT_DIR [sora-dist gpu-proof options]}
shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/sora-dist-wheels .whl/*.whl
  export PYTHONPATH=/tmp/sora-dist-wheels${PYTHONPATH:+:$PYTHONPATH}
fi
# The checkout itself, without touching the image's torch: no dependencies, no build isolation.
python3 -m pip install -q --no-deps --no-build-isolation -e .
export PYTHONUNBUFFERED=1
python3 -m sora_dist.cli gpu-proof --out "$out_dir" "$@"
