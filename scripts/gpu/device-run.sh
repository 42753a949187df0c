#!/usr/bin/env bash
# Runs the project's own GPU code paths on the lent H100 (the `device` tool): run from the repo
# root there, with the wheelhouse carried as .whl (see ../shared/device/README.md) and $OUT set.
#
#   scripts/gpu/device-run.sh setup            install wheels, make the 8B-shaped checkpoint
#   scripts/gpu/device-run.sh offline NAME ARGS...   one offline bench point (lmdeploy pipeline)
#   scripts/gpu/device-run.sh serve NAME ARGS...     fab serve's code path (local connection) + online bench
#   scripts/gpu/device-run.sh pack             tar the work dir into $OUT/results.tgz
set -euo pipefail
WORK=${WORK:-.gpu-work}
MODEL=$WORK/Meta-Llama-3-8B-Instruct
WORKLOAD=${WORKLOAD:-gpu/sharegpt-2000-seed0.json}
mkdir -p "$WORK/results"
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
log() { echo "[$(date +%T)] $*"; }
# GPU utilisation and memory once a second while a phase runs (is the GPU the limit?).
gpu_sampler() { nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 1 > "$1" 2>&1 & echo $!; }
# The busiest processes every 5 s for the whole phase (a single snapshot can fall into engine warm-up):
# each frame is a time line and the top 6 processes by CPU.
cpu_sampler() {
  top -b -d 5 -w 200 -o %CPU | awk '/^top -/ {print "--", $3; n = 0; next} /^ *PID/ {n = 1; next} n && n++ <= 6' \
    > "$1" 2>&1 & echo $!
}

case ${1:?phase} in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$WORK/results/gpu.txt"
    python3 -c "import torch, transformers, lmdeploy; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'lmdeploy', lmdeploy.__version__)" | tee -a "$WORK/results/gpu.txt"
    (command -v sshd || ls /usr/sbin/sshd || echo "no sshd") 2>&1 | tee -a "$WORK/results/gpu.txt"
    if [ ! -f "$MODEL/config.json" ]; then
      log "making the Llama-3-8B-shaped checkpoint (real config and tokenizer, random bf16 weights)"
      python3 -m llama3_ops.lab.checkpoint "$MODEL" --shape 8b --device cuda
    fi
    du -sh "$MODEL"
    # shellcheck source=phases.sh
    (source "$(dirname "$0")/phases.sh" && host_json /tmp/site/bin /tmp/site/bin "$MODEL") ;;
  offline)
    name=$2; shift 2
    log "offline $name: $*"
    sampler=$(gpu_sampler "$WORK/results/gpu-util-offline-$name.csv")
    cpus=$(cpu_sampler "$WORK/results/top-offline-$name.txt")
    python3 -m llama3_ops.bench offline --model "$MODEL" --backend pytorch --dataset "workload:$WORKLOAD" \
      --num-prompts 2000 --profile current --no-progress --out "$WORK/results/offline-$name" "$@" \
      2>&1 | tee "$WORK/results/offline-$name.log" | grep -vE "^\s*$" | tail -25 &
    pid=$!
    wait $pid
    kill "$sampler" "$cpus" 2>/dev/null || true ;;
  serve)
    name=$2; shift 2
    log "serve $name: $*"
    python3 -m llama3_ops.stages.serve --local up --engine lmdeploy --backend pytorch --model "$PWD/$MODEL" \
      --env /tmp/site/bin --setenv "PYTHONPATH=$PYTHONPATH" "$@" 2>&1 | tee "$WORK/results/serve-$name.log" | tail -5
    model_id=$(python3 -c "import json,urllib.request;print(json.load(urllib.request.urlopen('http://127.0.0.1:23333/v1/models'))['data'][0]['id'])")
    sampler=$(gpu_sampler "$WORK/results/gpu-util-online-$name.csv")
    for c in ${CONCURRENCY:-256 512}; do
      # Who uses the CPU during the run (engine process, API process, our client).
      cpus=$(cpu_sampler "$WORK/results/top-$name-c$c.txt")
      python3 -m llama3_ops.bench online --base-url http://127.0.0.1:23333 --model "$model_id" \
        --dataset "workload:$WORKLOAD" --num-prompts 2000 --concurrency "$c" --profile current --no-progress \
        --engine lmdeploy --backend pytorch --engine-version 0.18.0 --out "$WORK/results/online-$name-c$c" \
        $SETTINGS 2>&1 | tee "$WORK/results/online-$name-c$c.log" | grep -vE "^\s*$" | tail -20
      kill "$cpus" 2>/dev/null || true
    done
    kill "$sampler" 2>/dev/null || true
    cp "$HOME/.local/state/llama3-ops/logs/llm.log" "$WORK/results/server-$name.log" 2>/dev/null || true
    python3 -m llama3_ops.stages.serve --local stop 2>&1 | tail -2 ;;
  pack)
    tar czf "$OUT/results.tgz" -C "$WORK" results
    ls -la "$OUT" ;;
esac
