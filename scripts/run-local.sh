#!/usr/bin/env bash
# `make run`: a local clamd under ./var, then `watcher run` on ./var/uploads. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
VAR="$PWD/var"
mkdir -p "$VAR"/{uploads,processed,quarantine,state,run,log,clamav/db,clamav/tmp}

render() { sed -e "s#@VAR@#$VAR#g" -e "s#@OWNER@#$(id -un)#g" "$1" > "$2"; }
render config/clamd.conf "$VAR/clamd.conf"
render config/freshclam.conf "$VAR/freshclam.conf"

db="$VAR/clamav/db"
if ! compgen -G "$db/*.c[vl]d" > /dev/null; then
  echo "watcher: downloading virus definitions with freshclam…" >&2
  if ! timeout 120 freshclam --config-file="$VAR/freshclam.conf" --datadir="$db" >&2; then
    cp watcher/testsigs/* "$db/"
    cat >&2 <<'BANNER'
##########################################################################################
#  NO VIRUS DEFINITIONS COULD BE DOWNLOADED: installed watcher's TEST signature set.     #
#  Detection is TEST-ONLY (EICAR and ClamAV's test files). Real malware WILL PASS.       #
#  Run freshclam (or `make run` again) where the ClamAV mirrors are reachable.           #
##########################################################################################
BANNER
  fi
fi

clamd_pid=""
cleanup() { [ -n "$clamd_pid" ] && kill "$clamd_pid" 2>/dev/null && wait "$clamd_pid" 2>/dev/null; true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
clamd -c "$VAR/clamd.conf" >/dev/null 2>&1 &
clamd_pid=$!
for _ in $(seq 300); do
  [ -S "$VAR/run/clamd.sock" ] && break
  kill -0 "$clamd_pid" 2>/dev/null || { echo "clamd failed to start; see $VAR/log/clamd.log" >&2; exit 1; }
  sleep 0.1
done

export WATCHER_UPLOADS_DIR="$VAR/uploads" WATCHER_PROCESSED_DIR="$VAR/processed" \
  WATCHER_QUARANTINE_DIR="$VAR/quarantine" WATCHER_STATE_DIR="$VAR/state" \
  CLAMAV_SOCKET="$VAR/run/clamd.sock" WATCHER_SETTLE_S="${WATCHER_SETTLE_S:-1s}"
# The update job: this freshclam, then RELOAD of the clamd above (docs/jobs.md).
export WATCHER_UPDATE_COMMAND="${WATCHER_UPDATE_COMMAND:-freshclam --config-file=$(printf '%q' "$VAR/freshclam.conf")}" \
  WATCHER_DEFINITIONS_DIR="$db"
.venv/bin/watcher run
