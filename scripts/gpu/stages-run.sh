#!/usr/bin/env bash
# The chat and quantize stages on the lent H100 (the `device` tool), through the project's own code
# (llama3_ops.stages.chat / .quantize with a LocalRemote): run from the repo root there, with the
# lmdeploy 0.18 wheelhouse carried as .whl (../shared/device/prepare-lmdeploy-wheels.sh) and $OUT set.
#
#   scripts/gpu/stages-run.sh [--dry-run] [PHASE...]      phases: setup chat quantize chat4bit llava summary
#                                                         (default: all but llava, in that order)
# Environment knobs:
#   WORK=.gpu-work   CALIB_SAMPLES=128   CALIB_SEQLEN=1024   SESSION_LEN=512   CACHE=0.01
#
# What it does:
#   setup     install the wheelhouse into /tmp/site, link /tmp/site/bin/python (the "env" the stages
#             probe), make the Llama-3-8B-shaped checkpoint (real config and tokenizer, random bf16)
#   chat      `lmdeploy chat MODEL --backend pytorch --cache-max-entry-count $CACHE --session-len ...`
#             through chat_session.sh: one question on stdin, then `exit`; nvidia-smi peak memory
#   quantize  lmdeploy's auto_awq with the offline calibration (pydoc text, 128 x 1024, w4 g128)
#             as the `quantize` service, into MODEL_4bit (atomic, marker file)
#   chat4bit  the same chat with the 4-bit model (0.18's PyTorch engine: Triton AWQ kernels; the
#             TurboMind extension is not carried: it is built for CUDA 12, the machine has CUDA 13)
#   llava     `fab llava`'s code (llama3_ops.stages.llava --local) on a LLaVA-Llama-3-8B-shaped
#             checkpoint (transformers format, random weights: llama3_ops.lab.llava_checkpoint) and a
#             generated PNG, through lmdeploy's pipeline
#   summary   $OUT/stages-summary.json (every phase's exit status, seconds, GPU memory, AWQ marker)
# Logs: $OUT/stages-<phase>.log. Budget: about 6-7 minutes on an H100 (engine starts ~50 s each,
# quantization ~2-3 min); CALIB_SAMPLES=32 shortens the calibration if needed.
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
PHASES=${*:-setup chat quantize chat4bit summary}
WORK=${WORK:-.gpu-work}
OUT=${OUT:-$WORK/out}
MODEL=$PWD/$WORK/Meta-Llama-3-8B-Instruct
LLAVA=$PWD/$WORK/llava-llama-3-8b-v1_1-hf
SITE=/tmp/site
CALIB_SAMPLES=${CALIB_SAMPLES:-128}
CALIB_SEQLEN=${CALIB_SEQLEN:-1024}
SESSION_LEN=${SESSION_LEN:-512}
CACHE=${CACHE:-0.01}
RES=$WORK/stages
PY=${PYTHON:-python3}
export PYTHONPATH=$SITE:$PWD/src PYTHONUNBUFFERED=1 PATH=$SITE/bin:$PATH
ENV_ARGS=(--env "$SITE/bin" --setenv "PYTHONPATH=$PYTHONPATH")
QUESTION="Please introduce yourself."

PHASE_LOG=$OUT/stages-
PHASES_JSONL=$RES/phases.jsonl
# shellcheck source=phases.sh
source "$(dirname "$0")/phases.sh"

[ "$DRY" = 1 ] || mkdir -p "$OUT" "$RES"
for phase in $PHASES; do
  case $phase in
    setup)
      log "setup"
      run setup "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
      # the env's "python" (chat/quantize probe BIN/python)
      run setup python_wrapper "$SITE/bin" "$(command -v "$PY" || echo "$PY")"
      run setup host_json "$SITE/bin" "$SITE/bin" "$MODEL"
      run setup nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      # fail here, not minutes later, if the wheelhouse lacks something the stages import
      run setup "$PY" -c "import lmdeploy, lmdeploy.cli.chat, lmdeploy.lite.apis.auto_awq, llama3_ops.stages.chat, \
llama3_ops.stages.quantize, llama3_ops.stages.llava; print('imports ok: lmdeploy', lmdeploy.__version__)" || {
        echo "missing packages: add them to .whl (requests urllib3 certifi charset-normalizer idna are the usual ones)"; exit 3; }
      needs_model=0
      case " $PHASES " in *" chat "*|*" quantize "*|*" chat4bit "*) needs_model=1 ;; esac
      if [ "$needs_model" = 1 ] && { [ "$DRY" = 1 ] || [ ! -f "$MODEL/config.json" ]; }; then
        run setup "$PY" -m llama3_ops.lab.checkpoint "$MODEL" --shape 8b --device cuda
      fi
      ;;
    chat)
      log "chat with the base model (fp16 weights, cache ratio $CACHE)"
      run chat "$PY" -m llama3_ops.stages.chat --local --model "$MODEL" --backend pytorch \
        --cache-max-entry-count "$CACHE" --session-len "$SESSION_LEN" "${ENV_ARGS[@]}" \
        --question "$QUESTION" --timeout 420 --json "$RES/chat-base.json"
      ;;
    quantize)
      log "quantize: auto_awq, offline calibration, $CALIB_SAMPLES x $CALIB_SEQLEN"
      run quantize "$PY" -m llama3_ops.stages.quantize --local --model "$MODEL" --calib-samples "$CALIB_SAMPLES" \
        --calib-seqlen "$CALIB_SEQLEN" "${ENV_ARGS[@]}" --force --timeout 480 --json "$RES/quantize.json"
      [ "$DRY" = 1 ] || cp "$HOME/.local/state/llama3-ops/logs/quantize.log" "$OUT/stages-quantize-service.log" 2>/dev/null
      [ "$DRY" = 1 ] || du -sh "${MODEL}_4bit" 2>&1 | tee -a "$OUT/stages-quantize.log"
      ;;
    chat4bit)
      log "chat with the 4-bit model"
      run chat4bit "$PY" -m llama3_ops.stages.chat --local --model "${MODEL}_4bit" --backend pytorch \
        --cache-max-entry-count "$CACHE" --session-len "$SESSION_LEN" "${ENV_ARGS[@]}" \
        --question "$QUESTION" --timeout 420 --json "$RES/chat-4bit.json"
      ;;
    llava)
      log "llava: LLaVA-Llama-3-8B-shaped checkpoint (random weights), one image, lmdeploy pipeline"
      if [ "$DRY" = 1 ] || [ ! -f "$LLAVA/config.json" ]; then
        run llava "$PY" -m llama3_ops.lab.llava_checkpoint "$LLAVA" --shape 8b --device cuda
      fi
      run llava "$PY" -c "from PIL import Image, ImageDraw; im = Image.new('RGB', (640, 480), (135, 206, 235)); \
d = ImageDraw.Draw(im); d.rectangle((0, 360, 640, 480), fill=(34, 139, 34)); d.ellipse((480, 40, 580, 140), fill=(255, 215, 0)); \
im.save('$RES/llava-input.png')"
      run llava "$PY" -m llama3_ops.stages.llava --local --model "$LLAVA" --image "$RES/llava-input.png" \
        --backend pytorch --max-new-tokens 64 --log-level "${LLAVA_LOG_LEVEL:-ERROR}" "${ENV_ARGS[@]}" --timeout 420 \
        --json "$RES/llava.json"
      [ "$DRY" = 1 ] || cp "$RES/llava.json" "$RES/llava-input.png" "$OUT/" 2>/dev/null
      ;;
    summary)
      run summary "$PY" - "$RES" "$OUT/stages-summary.json" "${MODEL}_4bit" <<'PY'
import json, pathlib, subprocess, sys
res, out, awq = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
def load(name):
    p = res / name
    return json.loads(p.read_text()) if p.exists() else None
phases = [json.loads(l) for l in (res / "phases.jsonl").read_text().splitlines()] if (res / "phases.jsonl").exists() else []
marker = awq / ".llama3-ops-awq.json"
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip()
summary = {"gpu": smi, "phases": phases, "chat_base": load("chat-base.json"), "quantize": load("quantize.json"),
           "awq_marker": json.loads(marker.read_text()) if marker.exists() else None,
           "chat_4bit": load("chat-4bit.json"), "llava": load("llava.json")}
try:
    import lmdeploy, torch, transformers
    summary["versions"] = {"lmdeploy": lmdeploy.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}
except Exception as exc:  # the summary must still be written
    summary["versions"] = {"error": repr(exc)}
out.write_text(json.dumps(summary, indent=2))
for key in ("chat_base", "chat_4bit"):
    mem = (summary[key] or {}).get("memory") or {}
    for g in mem.get("gpus", []):
        print(f"{key}: GPU {g['index']} peak {g['peak_mib']} MiB of {g['total_mib']} (+{g['peak_mib'] - g['before_mib']})")
print("phases:", ", ".join(f"{p['phase']}={p['rc']} ({p['seconds']} s)" for p in phases))
PY
      ;;
    *) echo "unknown phase $phase (setup chat quantize chat4bit llava summary)" >&2; exit 2 ;;
  esac
done
