#!/usr/bin/env bash
# Source before launching on Ascend NPUs:  source launch/ascend_env.sh
# CANN's environment (compiler, runtime, HCCL) must be loaded before torch_npu is imported.
CANN_HOME=${CANN_HOME:-/usr/local/Ascend/ascend-toolkit}
if [[ -f "$CANN_HOME/set_env.sh" ]]; then
  # shellcheck disable=SC1091
  source "$CANN_HOME/set_env.sh"
else
  echo "ascend_env.sh: $CANN_HOME/set_env.sh not found; set CANN_HOME to your CANN install" >&2
fi
export SORA_DIST_DEVICE=npu
# Collective timeouts (seconds): first steps compile operators and can be slow.
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
# Let the caching allocator grow segments instead of fragmenting on variable-size video batches.
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
# Which NPUs this node uses (the NPU counterpart of CUDA_VISIBLE_DEVICES).
export ASCEND_RT_VISIBLE_DEVICES=${ASCEND_RT_VISIBLE_DEVICES:-0,1,2,3,4,5,6,7}
