# Sourced by the device scripts (stages-run.sh, finetune-run.sh): logging and one-phase runs.
# The sourcing script sets DRY (1: print only), PHASE_LOG (a prefix: PHASE_LOG<phase>.log) and
# PHASES_JSONL (one {"phase", "rc", "seconds"} line per command).

log() { echo "[$(date +%T)] $*"; }

# run PHASE CMD...: print it; unless dry, run it with its output appended to the phase's log, and
# record its exit status and seconds.
run() {
  local phase=$1; shift
  echo "+ $(printf '%q ' "$@")"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc
  "$@" 2>&1 | tee -a "$PHASE_LOG$phase.log"
  rc=${PIPESTATUS[0]}
  printf '{"phase": "%s", "rc": %d, "seconds": %d}\n' "$phase" "$rc" $((SECONDS - t0)) >> "$PHASES_JSONL"
  log "$phase: exit $rc after $((SECONDS - t0)) s"
  return "$rc"
}

# python_wrapper BIN_DIR PYTHON [SITE]: BIN_DIR/python, a script that runs PYTHON (with SITE first on
# PYTHONPATH when given). A wrapper, not a symlink: the interpreter's own site-packages stay visible
# (venv detection does not follow symlinks). This is the "env" whose BIN/python the stages probe.
python_wrapper() {
  local bin=$1 py=$2 site=${3:-}
  mkdir -p "$bin" || return
  if [ -n "$site" ]; then
    printf '#!/bin/sh\nPYTHONPATH=%s${PYTHONPATH:+:$PYTHONPATH} exec %s "$@"\n' "$site" "$py" > "$bin/python"
  else
    printf '#!/bin/sh\nexec %s "$@"\n' "$py" > "$bin/python"
  fi
  chmod +x "$bin/python"
}

# host_json LMDEPLOY_BIN LLAMA3_BIN MODEL_DIR: the host contract (~/llama3-course/host.json) as provisioning
# writes it, for a machine these side-door scripts set up by hand (the front door runs site.yml instead).
host_json() {
  mkdir -p "$HOME/llama3-course" || return
  printf '{"profile": "device", "user": "%s", "course_dir": "%s/llama3-course", "model_dir": "%s",
 "model_stamp": "%s.stamp", "envs": {"lmdeploy": "%s", "llama3": "%s"}, "offline": true,
 "service_manager": "none"}\n' "$(id -un)" "$HOME" "$3" "$3" "$1" "$2" > "$HOME/llama3-course/host.json"
}
