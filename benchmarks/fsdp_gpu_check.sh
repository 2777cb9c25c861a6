#!/usr/bin/env bash
# PPO under FSDP2 on GPUs through `accelerate launch --use_fsdp --fsdp_version 2`: the checks the CPU test makes.
#
#   bash benchmarks/fsdp_gpu_check.sh            # from the repository root, in its environment (torch with CUDA)
#
# On every visible GPU (1 GPU: FSDP with one shard; 2+: real sharding, NCCL) it runs the tiny-model PPO of
# tests/ppo/test_fsdp.py (`test_ppo_under_fsdp2_on_gpus_through_accelerate_launch`): 4 updates straight; the same
# run stopped after 2 (checkpoint with accelerate's sharded state) and resumed in fresh processes from other initial
# weights; a DDP run of the same global batch. It asserts: each process holds ~1/world of the policy and critic,
# every process gathers the same whole weights, resumed == uninterrupted (weights and history, exactly, with
# deterministic kernels), and FSDP == DDP within 1e-5. A few minutes at most (mostly process start-up).
#
# On a CPU-only machine the test is skipped; tests/ppo/test_fsdp.py runs FSDP2 on two CPU processes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" - <<'EOF'
import accelerate, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), accelerate {accelerate.__version__}, "
      f"transformers {transformers.__version__}")
assert torch.cuda.is_available(), "no CUDA device visible: this check needs a GPU"
for i in range(torch.cuda.device_count()):
    print(f"GPU {i}: {torch.cuda.get_device_name(i)}")
EOF
export CUBLAS_WORKSPACE_CONFIG=:4096:8   # deterministic cuBLAS, so that resume can equal the straight run exactly
start=$(date +%s)
"$PY" -m pytest tests/ppo/test_fsdp.py -k "gpus or does_not_drive" -v -p no:cacheprovider -rs "$@"
echo "fsdp_gpu_check: passed in $(( $(date +%s) - start )) s"
