#!/bin/sh
# llama3-ops, `fab chat`: run `lmdeploy chat` in this terminal and report the GPU memory it held,
# as the course does by running nvidia-smi beside it.
#
#   sh chat_session.sh REPORT_JSON BIN_DIR -- COMMAND [ARG...]
#
# nvidia-smi samples memory.used every 500 ms in the background while COMMAND runs in the
# foreground (it keeps the terminal, so the chat is interactive). When COMMAND ends, the peak per
# GPU, the value before the start and the difference go to REPORT_JSON and to stdout. The exit
# status is COMMAND's. Ctrl-C reaches only COMMAND (lmdeploy ends the chat); the report still follows.
set -u
report=$1
bin=$2
shift 2
[ "${1:-}" = "--" ] && shift
PATH="$bin:$PATH"
export PATH
mkdir -p "$(dirname "$report")"
q=--query-gpu=index,name,memory.used,memory.total
fmt=--format=csv,noheader,nounits
poller=""
have_smi=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi "$q" "$fmt" >"$report.before" 2>/dev/null; then
  have_smi=1
  nvidia-smi "$q" "$fmt" -lms 500 >"$report.samples" 2>/dev/null &
  poller=$!
fi
stop_poller() {
  if [ -n "$poller" ]; then
    kill "$poller" 2>/dev/null
    wait "$poller" 2>/dev/null
    poller=""
  fi
}
trap stop_poller EXIT HUP TERM
trap : INT
start=$(date +%s)
"$@"
rc=$?
end=$(date +%s)
stop_poller
if [ "$have_smi" = 1 ]; then
  awk -F', ' -v rc="$rc" -v secs=$((end - start)) -v report="$report" '
    function jstr(s) { gsub(/\\/, "\\\\", s); gsub(/"/, "\\\"", s); return "\"" s "\"" }
    FNR == NR { before[$1] = $3 + 0; next }
    NF >= 4 && $3 ~ /^[0-9]+$/ {
      if (!($1 in peak) || $3 + 0 > peak[$1]) peak[$1] = $3 + 0
      total[$1] = $4 + 0; name[$1] = $2; n[$1]++
    }
    END {
      printf "{\"rc\": %d, \"seconds\": %d, \"gpus\": [", rc, secs > report
      sep = ""
      for (i in peak) {
        printf "%s{\"index\": %d, \"name\": %s, \"before_mib\": %d, \"peak_mib\": %d, \"total_mib\": %d, \"samples\": %d}", \
          sep, i, jstr(name[i]), before[i], peak[i], total[i], n[i] > report
        sep = ", "
        printf "[llama3-ops] GPU %s (%s): peak %d MiB in use of %d MiB while the chat ran (%+d MiB over the %d MiB before it; %d samples)\n", \
          i, name[i], peak[i], total[i], peak[i] - before[i], before[i], n[i]
      }
      printf "]}\n" > report
    }' "$report.before" "$report.samples"
else
  printf '{"rc": %d, "seconds": %d, "gpus": [], "note": "no nvidia-smi on this host"}\n' \
    "$rc" $((end - start)) >"$report"
  echo "[llama3-ops] no nvidia-smi on this host: GPU memory not reported"
fi
rm -f "$report.before" "$report.samples"
exit "$rc"
