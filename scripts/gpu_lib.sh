# Shared by scripts/gpu_session.sh and scripts/gpu_measure.sh (sourced, not run): the
# environment, the clock against BUDGET_S, and `step`, which runs one command with a deadline.
# Expects OUT, W and BUDGET_S to be set.
mkdir -p "$W" "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PY:-python3}
P="$PY -m purifier.cli"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(el) )); }
log() { echo "[$(el)s] $*" | tee -a "$W/timeline.txt"; }
# step NAME SECONDS CMD...: a step with a deadline; its log in $W/NAME.log
step() {
  local name=$1 secs=$2; shift 2
  if [ "$secs" -le 5 ]; then log "SKIP $name (no time left)"; return 0; fi
  log "start $name (limit ${secs}s)"
  timeout --kill-after=5 "$secs" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc"
  return $rc
}
