#!/usr/bin/env bash
# `make run`: a local clamd under ./var, then `watcher run` on ./var/uploads. Ctrl-C stops both.
#
# The daemon's configuration is written to ./var/watcher.toml and the daemon reads it through
# WATCHER_CONFIG, so `export WATCHER_CONFIG=var/watcher.toml` in another shell makes every
# `watcher` command (scan, healthcheck, quarantine, ...) use the same directories and clamd.
# Environment variables still win over the file, for the daemon as for the commands.
#
#   VAR_DIR=DIR             everything under DIR instead of ./var
#   FRESHCLAM_ON_START=false  no download attempt: the test signatures at once (offline)
set -euo pipefail
VAR="$(realpath -m -- "${VAR_DIR:-$(dirname "$0")/../var}")"
cd "$(dirname "$0")/.."
mkdir -p "$VAR"/{uploads,processed,quarantine,state,run,log,clamav/db,clamav/tmp}

render() { sed -e "s#@VAR@#$VAR#g" -e "s#@OWNER@#$(id -un)#g" "$1" > "$2"; }
render config/clamd.conf "$VAR/clamd.conf"
render config/freshclam.conf "$VAR/freshclam.conf"

# A TOML basic string: backslashes and quotes escaped; control characters have no place in
# these paths.
toml_string() {
  if [[ $1 == *[[:cntrl:]]* ]]; then
    echo "run-local: refusing a path with a control character: ${1@Q}" >&2
    exit 1
  fi
  local s=${1//\\/\\\\}
  printf '"%s"' "${s//\"/\\\"}"
}

db="$VAR/clamav/db"
# The update job: this freshclam, then RELOAD of the clamd below (docs/jobs.md).
update_command="freshclam --config-file=$(printf '%q' "$VAR/freshclam.conf")"
{
  echo "# Written by \`make run\` (scripts/run-local.sh) at each start: the configuration its"
  echo "# daemon runs with. \`export WATCHER_CONFIG=<this file>\` gives it to every command."
  echo "# Every setting: docs/configuration.md."
  echo "uploads_dir = $(toml_string "$VAR/uploads")"
  echo "processed_dir = $(toml_string "$VAR/processed")"
  echo "quarantine_dir = $(toml_string "$VAR/quarantine")"
  echo "state_dir = $(toml_string "$VAR/state")"
  echo "clamav_socket = $(toml_string "$VAR/run/clamd.sock")"
  echo "definitions_dir = $(toml_string "$db")"
  echo "update_command = $(toml_string "$update_command")"
  echo 'settle_s = "1s"'
  echo 'http_addr = "127.0.0.1:9090"'
} > "$VAR/watcher.toml.tmp"
mv "$VAR/watcher.toml.tmp" "$VAR/watcher.toml"

if ! compgen -G "$db/*.c[vl]d" > /dev/null; then
  downloaded=false
  if [ "${FRESHCLAM_ON_START:-true}" != false ]; then
    echo "watcher: downloading virus definitions with freshclam…" >&2
    timeout 120 freshclam --config-file="$VAR/freshclam.conf" --datadir="$db" >&2 && downloaded=true
  fi
  if [ "$downloaded" = false ]; then
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

echo "watcher: configuration in $VAR/watcher.toml; in another shell: export WATCHER_CONFIG=$(printf '%q' "$VAR/watcher.toml")" >&2
WATCHER_CONFIG="$VAR/watcher.toml" .venv/bin/watcher run
