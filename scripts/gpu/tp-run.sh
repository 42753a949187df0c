#!/usr/bin/env bash
# Issue 7: tensor parallelism on a two-GPU lent machine (nvidia-h200-x2), tp=1 against tp=2 in ONE
# call, offline (engine driver, as profile_throughput) and online (fab serve's code path + our client).
# Run from the repo root there with .whl carried (see device-run.sh). Every phase has a time limit
# and the results are packed into $OUT after each one, so a phase that overruns loses only itself.
#
#   NUM_PROMPTS=1000 CONC=256 scripts/gpu/tp-run.sh
set -uo pipefail
# NVLink multicast stays off (the lender's rule, KINDS.md), in this shell and in the served env.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# lmdeploy picks the ray executor for tp > 1 on CUDA; ray is not carried, its mp executor is.
export LMDEPLOY_EXECUTOR_BACKEND=mp
export WORK=${WORK:-.gpu-work}
D=scripts/gpu/device-run.sh
N=${NUM_PROMPTS:-1000}
C=${CONC:-256}
CACHE=${CACHE:-0.9}
TPS=${TPS:-1 2}
# The same variables, handed to the served environment.
ENVS=()
for v in NCCL_NVLS_ENABLE TORCH_SYMM_MEM_DISABLE_MULTICAST NVSHMEM_DISABLE_NVLS LMDEPLOY_EXECUTOR_BACKEND; do
  ENVS+=(--setenv "$v=${!v}")
done
t0=$(date +%s)
phase() {  # phase LIMIT_S CMD... : run, record rc and seconds, pack
  local lim=$1; shift; local s; s=$(date +%s)
  timeout -k 15 "$lim" "$@"; local rc=$?
  echo "[phase] rc=$rc $(( $(date +%s) - s ))s (t+$(( $(date +%s) - t0 ))s): $*" | tee -a "$WORK/results/phases.txt"
  "$D" pack >/dev/null 2>&1
}
$D setup || { $D pack; exit 1; }
{ nvidia-smi topo -m; python3 -c "import torch; print('torch sees', torch.cuda.device_count(), 'GPUs')"
  env | grep -E '^(NCCL_|TORCH_SYMM|NVSHMEM_|LMDEPLOY_)' | sort; } > "$WORK/results/topo.txt" 2>&1
cat "$WORK/results/topo.txt"
for tp in $TPS; do
  phase "${OFF_LIMIT:-170}" "$D" offline "tp$tp-c$C" --driver engine --tp "$tp" --concurrency "$C" \
    --cache-max-entry-count "$CACHE" --num-prompts "$N"
done
for tp in $TPS; do
  SETTINGS="--num-prompts $N --engine-setting tp=$tp --engine-setting max_batch_size=$C \
--engine-setting cache_max_entry_count=$CACHE" CONCURRENCY=$C \
  phase "${ON_LIMIT:-190}" "$D" serve "tp$tp" --tp "$tp" --max-batch-size "$C" --cache-max-entry-count "$CACHE" \
    --timeout 170 "${ENVS[@]}"
  python3 -m llama3_ops.stages.serve --local stop >/dev/null 2>&1 || true   # if the phase overran
done
echo "total $(( $(date +%s) - t0 ))s"
