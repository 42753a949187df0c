#!/usr/bin/env bash
# The front door on the lent GPU machine: the user's own commands, over real SSH, with the bundle's
# controller on the same machine. Run from the repo root there, carrying .frontdoor (made here by
# scripts/gpu/prepare-front-door.sh):
#
#   scripts/gpu/front-door.sh [PHASE...]     default: sshd checkpoint provision serve bench down
#
#   sshd        Debian's OpenSSH on 127.0.0.1:2222 (root key, a known_hosts file), the inventory for it
#   checkpoint  the Llama-3-8B-shaped checkpoint (real config and tokenizer, random bf16 weights) + manifest
#   provision   ansible-playbook -i INV site.yml twice (profile host, offline, the model from that
#               checkpoint as a verified symlink source); the second run must report changed=0
#   serve       fab -H gpu serve --detach (time to ready; its settings from the GPU table, warmed before
#               "ready"), fab -H gpu status, one question via fab client
#   bench       warm-up, then nox's bench (python -m llama3_ops.bench online) through the tunnel and direct,
#               alternating, at concurrency 256 and 512
#   warmbench   right after serve: the bench through the tunnel with no warm-up of its own, twice at
#               concurrency 512 (is fab serve's warm-up enough: the first run within 3% of the second?),
#               then once with the bench's default warm-up
#   sweep       python -m llama3_ops.lab.sweep over the inventory's host: the no-flag default, then each of
#               $SWEEP_POINTS (space-separated K=V[,K=V] points), each served with --restart, warmed, benched
#               through the tunnel at c=512 and sampled on the host (~2 min a point); -> $RES/sweep/sweep.json
#   down        fab -H gpu down; nothing may be left listening on 23333
#
# Every phase has a time limit; each one's console log, the recaps and the bench JSONs go to $WORK/fd,
# packed into $OUT/front-door.tgz after every phase (DEADLINE_S=N: phases are cut to end 25 s before N
# seconds, the device call's limit, so the pack always happens). The phases can be split over several calls (the
# machine keeps its state between calls made within its warm time). DRY=1 prints the commands only.
set -uo pipefail
DRY=${DRY:-0}
FD=${FD:-$PWD/.frontdoor}
WORK=${WORK:-/root/front-door}
RES=$WORK/fd  # packed into $OUT/front-door.tgz (the device tool brings back at most 8 files)
PORT=2222
S=/opt/sshd-root
MODEL_SRC=${MODEL_SRC:-/root/model-src/Meta-Llama-3-8B-Instruct}
WORKLOAD=gpu/sharegpt-2000-seed0.json
# the PyTorch engine (TurboMind's build is CUDA 12; the image has CUDA 13); no tuning flag: fab serve's own
SETTINGS=${SETTINGS:---backend pytorch}
PROVISION_RUNS=${PROVISION_RUNS:-1 2}  # "1": one site.yml run (a second, changed=0, was shown on 2026-12-04)
INV=$WORK/inventory.yml
PHASES=${*:-sshd checkpoint provision serve bench down}
[ "${1:-}" = __one ] && PHASES=""
[ "$DRY" = 1 ] || mkdir -p "$RES" "$WORK"
PHASES_JSONL=$RES/phases.jsonl
PHASE_LOG=$RES/
# shellcheck source=phases.sh
source "$(dirname "$0")/phases.sh"
export PYTHONUNBUFFERED=1 PATH="$S/wrap:/tmp/ctl/bin:$PATH" PYTHONPATH="/tmp/ctl:$PWD/src" \
  LLAMA3_INVENTORY="$INV" ANSIBLE_CONFIG="$PWD/ansible.cfg"
FAB=(fab -r "$PWD" -H gpu)
PY=$(command -v python3)

pack() { mkdir -p "${OUT:-/tmp/out}"; tar czf "${OUT:-/tmp/out}/front-door.tgz" -C "$WORK" fd 2>/dev/null || true; }
limit() { local s=$1; shift; timeout -k 10 "$s" "$@"; }
gpu_sampler() {  # gpu_sampler FILE: nvidia-smi every 2 s until killed; prints its pid
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,memory.total --format=csv -l 2 > "$1" 2>&1 &
  echo $!
}

sshd_up() {
  mkdir -p $S /run/sshd /root/.ssh && chmod 700 /root/.ssh
  for f in "$FD"/debs/*.deb; do dpkg -x "$f" $S; done
  for d in $S/usr/lib/x86_64-linux-gnu $S/lib/x86_64-linux-gnu; do  # the image's own library copy wins
    for f in "$d"/*.so.*; do [ -e "$f" ] || continue; b=$(basename "$f")
      if [ -e "/usr/lib/x86_64-linux-gnu/$b" ] || [ -e "/lib/x86_64-linux-gnu/$b" ]; then rm -f "$f"; fi; done; done
  local lib=$S/usr/lib/x86_64-linux-gnu:$S/lib/x86_64-linux-gnu t
  mkdir -p $S/wrap
  for t in ssh ssh-keygen scp sftp; do printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$lib" "$S/usr/bin/$t" > $S/wrap/$t; done
  printf '#!/bin/sh\nLD_LIBRARY_PATH=%s exec %s "$@"\n' "$lib" "$S/usr/sbin/sshd" > $S/wrap/sshd
  chmod +x $S/wrap/*
  id sshd >/dev/null 2>&1 || useradd -r -d /run/sshd -s /usr/sbin/nologin sshd
  [ -f $S/host_ed25519 ] || $S/wrap/ssh-keygen -q -t ed25519 -N '' -f $S/host_ed25519
  [ -f /root/.ssh/id_ed25519 ] || $S/wrap/ssh-keygen -q -t ed25519 -N '' -f /root/.ssh/id_ed25519
  grep -qF "$(cat /root/.ssh/id_ed25519.pub)" /root/.ssh/authorized_keys 2>/dev/null \
    || cat /root/.ssh/id_ed25519.pub >> /root/.ssh/authorized_keys
  chmod 600 /root/.ssh/authorized_keys
  printf 'Port %s\nListenAddress 127.0.0.1\nHostKey %s/host_ed25519\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nPidFile %s/sshd.pid\nMaxStartups 200:30:400\nMaxSessions 200\nSubsystem sftp %s/usr/lib/openssh/sftp-server\n' \
    "$PORT" "$S" "$S" "$S" > $S/sshd_config
  $S/wrap/sshd -t -f $S/sshd_config && setsid $S/wrap/sshd -f $S/sshd_config -E $S/sshd.log
  echo "[127.0.0.1]:$PORT $(cut -d' ' -f1,2 $S/host_ed25519.pub)" > $S/known_hosts
  ssh -p "$PORT" -i /root/.ssh/id_ed25519 -o UserKnownHostsFile=$S/known_hosts -o StrictHostKeyChecking=yes \
    -o BatchMode=yes root@127.0.0.1 'echo sshd answers as $(id -un) on $(hostname)'
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/ctl "$FD"/ctl/*.whl "$FD"/tok/*.whl
  "$PY" -c "import ansible, fabric, llama3_ops; print('controller: ansible-core', ansible.__version__, 'fabric', fabric.__version__)"
}

write_inventory() {
  "$PY" - "$INV" "$MODEL_SRC" "$FD/whl" "$PY" <<'PY'
import json, sys, yaml
inv, model, whl, py = sys.argv[1:]
manifest = json.load(open(model + ".manifest.json"))
host = {
    "ansible_host": "127.0.0.1", "ansible_port": 2222, "ansible_user": "root",
    "ansible_ssh_private_key_file": "/root/.ssh/id_ed25519",
    "ansible_ssh_common_args": "-o UserKnownHostsFile=/opt/sshd-root/known_hosts -o StrictHostKeyChecking=yes",
    "ansible_python_interpreter": py,
    "llama3_profile": "host", "llama3_offline": True, "llama3_python_env_wheelhouse": whl,
    "llama3_python_env_python": py, "llama3_python_env_only": ["lmdeploy"],
    "llama3_model_source": "symlink", "llama3_model_path": model, "llama3_model_manifest": manifest,
}
yaml.safe_dump({"llama3_hosts": {"hosts": {"gpu": host}}}, open(inv, "w"), sort_keys=False)
print("inventory", inv, "with", len(manifest), "manifest entries")
PY
}

checkpoint() {
  if [ ! -f "$MODEL_SRC/config.json" ]; then
    "$PY" -m llama3_ops.lab.checkpoint "$MODEL_SRC" --shape 8b --device cuda || return
  fi
  [ -f "$MODEL_SRC.manifest.json" ] || "$PY" - "$MODEL_SRC" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
out = {}
for name in sorted(os.listdir(d)):
    h = hashlib.sha256()
    with open(os.path.join(d, name), "rb") as fh:
        for chunk in iter(lambda: fh.read(16 << 20), b""):
            h.update(chunk)
    out[name] = h.hexdigest()
json.dump(out, open(d + ".manifest.json", "w"), indent=1)
print(len(out), "files hashed")
PY
  du -sh "$MODEL_SRC"
}

provision() {
  write_inventory || return
  local i
  for i in $PROVISION_RUNS; do
    ansible-playbook -i "$INV" site.yml 2>&1 | tee "$RES/site-run$i.log" | grep -E "^(PLAY RECAP|gpu |fatal|TASK \[llama3_preflight : Report)" -A1
    grep -E "^gpu " "$RES/site-run$i.log" | tail -1 > "$RES/recap-run$i.txt"
    grep -q "failed=0" "$RES/recap-run$i.txt" || { echo "site.yml run $i failed"; return 1; }
  done
  if [ -f "$RES/recap-run2.txt" ]; then
    grep -q "changed=0" "$RES/recap-run2.txt" || { echo "the second run changed something: not idempotent"; return 1; }
  fi
  ssh -p $PORT root@127.0.0.1 -o UserKnownHostsFile=$S/known_hosts cat llama3-course/host.json > "$RES/host.json"
}

serve() {
  local t0=$SECONDS
  "${FAB[@]}" serve $SETTINGS --detach --local-port 23334 2>&1 | tee "$RES/fab-serve.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || return 1
  echo "{\"fab_serve_ready_s\": $((SECONDS - t0))}" > "$RES/serve-ready.json"
  cp /root/.local/state/llama3-ops/run/llm.json "$RES/llm-service.json"
  "${FAB[@]}" status
  printf 'Who are you?\n/exit\n' | "${FAB[@]}" client
}

bench() {
  local id sampler c path url
  id=$("$PY" -c "import json,urllib.request;print(json.load(urllib.request.urlopen('http://127.0.0.1:23333/v1/models'))['data'][0]['id'])")
  sampler=$(gpu_sampler "$RES/gpu-bench.csv")
  common=(--model "$id" --dataset "workload:$WORKLOAD" --profile host --no-progress --engine lmdeploy
          --backend pytorch --engine-version 0.18.0 $(served_settings))
  # warm-up: the first run after a start is 12-15% slow (kernels still compiling)
  "$PY" -m llama3_ops.bench online --base-url http://127.0.0.1:23334 "${common[@]}" --num-prompts 512 \
    --concurrency 256 --out "$WORK/warmup" > "$RES/bench-warmup.log" 2>&1
  for c in ${CONCURRENCY:-256 512}; do
    for path in tunnel direct tunnel direct; do
      url=http://127.0.0.1:23333; [ $path = tunnel ] && url=http://127.0.0.1:23334
      "$PY" -m llama3_ops.bench online --base-url $url "${common[@]}" --num-prompts 2000 --concurrency $c \
        --out "$RES/bench-$path-c$c-$SECONDS" 2>&1 | tee -a "$RES/bench-$path-c$c.log" | grep -E "RPS|rps|status" | tail -3
    done
  done
  kill "$sampler" 2>/dev/null
  cp /root/.local/state/llama3-ops/logs/llm.log "$RES/server.log" 2>/dev/null
}

served_settings() {  # --engine-setting K=V for each setting fab serve chose (its service record on the host)
  "$PY" - <<'PY'
import json
s = json.load(open("/root/.local/state/llama3-ops/run/llm.json"))["settings"]
for k in ("max_batch_size", "cache_max_entry_count", "quant_policy", "max_prefill_token_num", "tp"):
    if s.get(k) not in (None, "None"):
        print(f"--engine-setting {k}={s[k]}")
PY
}

warmbench() {
  local id sampler i
  id=$("$PY" -c "import json,urllib.request;print(json.load(urllib.request.urlopen('http://127.0.0.1:23333/v1/models'))['data'][0]['id'])")
  sampler=$(gpu_sampler "$RES/gpu-warmbench.csv")
  # shellcheck disable=SC2207
  common=(--model "$id" --dataset "workload:$WORKLOAD" --profile host --no-progress --engine lmdeploy
          --backend pytorch --engine-version 0.18.0 $(served_settings) --num-prompts 2000 --concurrency 512)
  for i in 1 2; do
    "$PY" -m llama3_ops.bench online --base-url http://127.0.0.1:23334 "${common[@]}" --warmup 0 \
      --server-warmed --out "$RES/warmbench-run$i" 2>&1 \
      | tee -a "$RES/warmbench.log" | grep -E "RPS|rps|status" | tail -3
  done
  "$PY" -m llama3_ops.bench online --base-url http://127.0.0.1:23334 "${common[@]}" \
    --server-warmed --out "$RES/warmbench-run3-bench-warmup" 2>&1 \
    | tee -a "$RES/warmbench.log" | grep -E "RPS|rps|status" | tail -3
  kill "$sampler" 2>/dev/null
  cp /root/.local/state/llama3-ops/logs/llm.log "$RES/server.log" 2>/dev/null
  return 0
}

sweep() {
  local pts=() p
  for p in ${SWEEP_POINTS:-max_batch_size=1024 quant_policy=16 top_k=1}; do pts+=(--point "$p"); done
  sampler=$(gpu_sampler "$RES/gpu-sweep.csv")
  "$PY" -m llama3_ops.lab.sweep --inventory "$INV" --host-name gpu --backend pytorch --out "$RES/sweep" \
    --interval 2 "${pts[@]}" -- --dataset "workload:$WORKLOAD" --num-prompts 2000 --concurrency 512 \
    --profile host --no-progress --engine-version 0.18.0
  local rc=$?
  kill "$sampler" 2>/dev/null
  find "$RES/sweep" -name 'online-c*.json' -exec "$PY" -c "
import json, sys
for f in sys.argv[1:]:
    d = json.load(open(f)); d['per_request_dropped'] = len(d.pop('per_request', [])); json.dump(d, open(f, 'w'), indent=1)
" {} +
  return $rc
}

down() {
  "${FAB[@]}" down
  if "$PY" -c "import socket; s=socket.socket(); s.settimeout(1); exit(0 if s.connect_ex(('127.0.0.1', 23333)) else 1)"; then
    echo "nothing listens on 23333"
  else
    echo "something still listens on 23333"; return 1
  fi
}

sshd() { sshd_up; }

if [ "${1:-}" = __one ]; then  # one phase, in its own process (so `timeout` can end it whole)
  "$2"
  exit $?
fi
declare -A LIMITS=([sshd]=90 [checkpoint]=150 [provision]=300 [serve]=240 [bench]=420 [warmbench]=240 [sweep]=560 [down]=60)
for phase in $PHASES; do
  [ -n "${LIMITS[$phase]:-}" ] || { echo "unknown phase $phase (${!LIMITS[*]})" >&2; exit 2; }
  lim=${LIMITS[$phase]}
  # DEADLINE_S: the device call's own limit; each phase ends 25 s before it, so what it has is packed
  if [ -n "${DEADLINE_S:-}" ] && [ $((DEADLINE_S - SECONDS - 25)) -lt "$lim" ]; then lim=$((DEADLINE_S - SECONDS - 25)); fi
  [ "$lim" -gt 0 ] || { log "no time left for $phase (DEADLINE_S=$DEADLINE_S)"; break; }
  log "phase $phase (limit $lim s)"
  if [ "$DRY" = 1 ]; then echo "+ limit $lim $0 __one $phase"; continue; fi
  t0=$SECONDS
  limit "$lim" bash "$0" __one "$phase" > "$RES/$phase.log" 2>&1
  rc=$?
  tail -15 "$RES/$phase.log"
  printf '{"phase": "%s", "rc": %d, "seconds": %d}\n' "$phase" "$rc" $((SECONDS - t0)) >> "$PHASES_JSONL"
  log "$phase: exit $rc after $((SECONDS - t0)) s"
  pack
  [ "$rc" = 0 ] || { log "stopping after $phase failed"; break; }
done
[ "$DRY" = 1 ] && exit 0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RES/gpu.txt" 2>&1
pack
ls -la "${OUT:-/tmp/out}"
