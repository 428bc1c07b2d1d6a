#!/bin/bash
# `make compose-test`: the README's compose stacks brought up for real, as a user would, with the
# official Docker Compose CLI against podman's Docker-compatible API (this machine has no Docker
# engine). Two stacks, one after the other:
#
#   bundled   docker-compose.yml                                      (clamd inside the scanner)
#   external  docker-compose.yml + docker-compose.external-clamd.yml  (clamd in its own service)
#
# Overrides change only what this machine lacks: tests/compose/no-internet.yml (no definitions
# download: the entrypoint's test-signature fallback) on both, and for `external`
# tests/compose/clamav-standin.yml (a local stand-in for the official clamav/clamav image, which
# cannot be pulled). Images are built beforehand by the Makefile (WATCHER_IMAGE, APP_IMAGE,
# CLAMAV_STANDIN_IMAGE); the app is published on a free host port (APP_PORT).
#
# For each stack: `up -d --wait` (every service healthy); a clean file and EICAR uploaded through
# the app's published port, with the answers checked; the clean file downloaded byte for byte;
# EICAR in `watcher quarantine list` inside the scanner; archives clamd cannot look into are not
# delivered, and clamd itself reports them (its clamd.conf is in effect); the hardening (clamd unreachable from the app, users, capabilities, read-only roots);
# the scanner stopped (exit 0), an upload made while it is down, the scanner started: that upload
# delivered and nothing earlier lost; `down -v`. Containers, volumes and networks are removed and
# the podman service stopped however the test ends.
#
# This machine only: podman runs health checks from systemd timers, and there is no systemd here,
# so the test runs each container's own health check command (`podman healthcheck run`) every
# 2 s while a stack is up, which is what the engine's timer would do.
set -euo pipefail

COMPOSE=${COMPOSE:?COMPOSE: path of the docker-compose binary}
PODMAN=${PODMAN:-podman}
export WATCHER_IMAGE=${WATCHER_IMAGE:-localhost/watcher:dev}
export APP_IMAGE=${APP_IMAGE:-localhost/watcher-example-app:dev}
export CLAMAV_STANDIN_IMAGE=${CLAMAV_STANDIN_IMAGE:-localhost/watcher-clamav-standin:bookworm}
UP_TIMEOUT_S=${UP_TIMEOUT_S:-180}
DELIVERY_TIMEOUT_S=${DELIVERY_TIMEOUT_S:-120}
# STACKS="bundled" or "external" runs one of the two (both by default).

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
t0=$(date +%s)
work=$(mktemp -d /tmp/watcher-compose.XXXXXX)
passed=0
project=""
health_pid=""
service_pid=""

say() { echo "compose-test [$(($(date +%s) - t0))s]: $*"; }
ok() {
    passed=$((passed + 1))
    say "ok - $*"
}

dc() { "$COMPOSE" -p "$project" "${files[@]}" "$@"; }

# What a failure needs to be understood: states, the last log lines, and the known causes named.
diagnose() {
    [[ -n "$project" ]] || return 0
    echo "----- docker compose ps -a -----"
    dc ps -a 2>&1 || true
    echo "----- docker compose logs (last 40 lines per service) -----"
    dc logs --no-color --tail 40 2>&1 | cut -c1-600 || true
    dc logs --no-color scanner >"$work/scanner.log" 2>&1 || true
    if grep -q 'Invalid cross-device link' "$work/scanner.log"; then
        echo "DIAGNOSIS: the scanner cannot deliver across mounts: link()/rename() between the" \
            "uploads, processed and quarantine volumes fail with EXDEV (issue 13, point 1)."
    fi
}

fail() {
    say "FAIL - $*"
    diagnose
    echo "compose-test: $passed passed, 1 failed"
    exit 1
}

stop_health_driver() {
    if [[ -n "$health_pid" ]]; then
        kill "$health_pid" 2>/dev/null || true
        wait "$health_pid" 2>/dev/null || true
        health_pid=""
    fi
}

teardown_stack() {
    stop_health_driver
    [[ -n "$project" ]] || return 0
    dc down -v --remove-orphans --timeout 60 >"$work/down.log" 2>&1 || cat "$work/down.log" >&2
    project=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    teardown_stack
    if [[ -n "$service_pid" ]]; then
        kill "$service_pid" 2>/dev/null || true
        wait "$service_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- podman's Docker API, configured for this machine -------------------------------------------
# runc: crun refuses this VM's hybrid cgroups. Lower ulimits: podman's defaults exceed the hard
# limits here and the VM has no CAP_SYS_RESOURCE.
cat >"$work/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=4096:4096", "nproc=2000:2000"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$work/containers.conf
"$PODMAN" system service --time=0 "unix://$work/podman.sock" >"$work/podman-service.log" 2>&1 &
service_pid=$!
export DOCKER_HOST=unix://$work/podman.sock
for _ in $(seq 100); do
    [[ $(curl -s --unix-socket "$work/podman.sock" http://d/_ping 2>/dev/null) == OK ]] && break
    kill -0 "$service_pid" 2>/dev/null || fail "podman system service exited: $(cat "$work/podman-service.log")"
    sleep 0.1
done
say "podman API at $DOCKER_HOST; $("$COMPOSE" version)"

# --- what is uploaded ------------------------------------------------------------------------------
# EICAR is assembled here, so that no file in the repository is itself EICAR.
# shellcheck disable=SC2016 # literal dollar signs
eicar_head='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR'
# shellcheck disable=SC2016
eicar_tail='-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
printf '%s%s' "$eicar_head" "$eicar_tail" >"$work/eicar.com"
head -c 200000 /dev/urandom >"$work/report.bin"
head -c 50000 /dev/urandom >"$work/while-down.bin"
# Archives clamd cannot look into completely: a zip nest deeper than MaxRecursion (17) around a
# harmless file, and an encrypted zip. clamd says OK for both unless AlertExceedsMax and
# AlertEncrypted are on.
python3 - "$work/nest.zip" <<'PY'
import io, sys, zipfile
data, name = b"harmless text at the bottom\n", "bottom.txt"
for level in range(20):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(name, data)
    data, name = buf.getvalue(), f"level{level}.zip"
open(sys.argv[1], "wb").write(data)
PY
printf 'nothing secret\n' >"$work/inner.txt"
(cd "$work" && zip -q -P not-a-secret encrypted.zip inner.txt)

# --- helpers ---------------------------------------------------------------------------------------
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs each container's health check every 2 s, as the engine's timer would (see the top).
drive_health() {
    local c
    while :; do
        for c in $("$PODMAN" ps -q --filter "label=com.docker.compose.project=$project"); do
            "$PODMAN" healthcheck run "$c" >/dev/null 2>&1 || true
        done
        sleep 2
    done
}

# upload FILE NAME -> sets `status` (HTTP) and `body` (JSON); curl as in the README.
upload() {
    local out
    out=$(curl -sS --max-time 90 -w '\n%{http_code}' --data-binary "@$1" \
        "http://127.0.0.1:$APP_PORT/upload?name=$2") || fail "curl upload of $2 failed: $out"
    status=${out##*$'\n'}
    body=${out%$'\n'*}
}

# json EXPRESSION: evaluates a Python expression over the JSON `body` (as `b`) and prints it.
json() { python3 -c 'import json, sys; b = json.loads(sys.argv[2]); print(eval(sys.argv[1]))' "$1" "$body"; }

# expect_upload FILE NAME STATUS STATE: the app's answer to the upload; sets `id`.
expect_upload() {
    upload "$1" "$2"
    local state
    state=$(json 'b["verdict"]["state"]')
    [[ "$status" == "$3" && "$state" == "$4" ]] ||
        fail "upload $2: HTTP $status, verdict '$state'; expected $3 $4. Answer: $body"
    id=$(json 'b["id"]')
}

# expect_download ID FILE: GET /files/ID returns the bytes of FILE.
expect_download() {
    local code
    code=$(curl -sS --max-time 30 -o "$work/download" -w '%{http_code}' \
        "http://127.0.0.1:$APP_PORT/files/$1") || fail "curl download of $1 failed"
    [[ "$code" == 200 ]] || fail "GET /files/$1: HTTP $code: $(head -c 300 "$work/download")"
    cmp -s "$work/download" "$2" || fail "GET /files/$1: the bytes differ from what was uploaded"
}

# expect_quarantined FILE: `watcher quarantine list --json`, run in the scanner as the watcher
# user, holds an entry with FILE's sha256.
expect_quarantined() {
    local sha listing
    sha=$(sha256sum <"$1" | cut -d' ' -f1)
    listing=$(dc exec -T -u watcher scanner watcher quarantine list --json) ||
        fail "watcher quarantine list failed: $listing"
    python3 - "$sha" "$listing" <<'PY' || fail "no quarantine entry with sha256 $sha in: $listing"
import json, sys
sys.exit(0 if any(e.get("sha256") == sys.argv[1] for e in json.loads(sys.argv[2])) else 1)
PY
}

# wait_healthy SERVICE: its container reports `healthy` (health checks driven by drive_health).
wait_healthy() {
    local waited=0 cid state
    cid=$(dc ps -q "$1")
    until state=$("$PODMAN" inspect --format '{{.State.Health.Status}}' "$cid" 2>/dev/null) &&
        [[ "$state" == healthy ]]; do
        ((waited >= UP_TIMEOUT_S)) && fail "$1 not healthy within ${UP_TIMEOUT_S}s (state: ${state:-?})"
        sleep 1
        waited=$((waited + 1))
    done
}

# --- the checks, for one stack ---------------------------------------------------------------------
check_uploads() { # stack
    expect_upload "$work/report.bin" report.bin 201 clean
    report_id=$id
    ok "$1: clean upload answered 201, verdict clean ($report_id)"
    expect_download "$report_id" "$work/report.bin"
    ok "$1: GET /files/$report_id returns the uploaded bytes"
    expect_upload "$work/eicar.com" eicar.com 422 infected
    ok "$1: EICAR upload answered 422, verdict infected"
    expect_quarantined "$work/eicar.com"
    ok "$1: EICAR listed by \`docker compose exec -u watcher scanner watcher quarantine list\`"
    upload "$work/nest.zip" nest.zip
    [[ "$status" == 422 ]] || fail "20-level zip nest: HTTP $status, expected 422 (AlertExceedsMax): $body"
    ok "$1: a zip nest deeper than MaxRecursion is not delivered (422, $(json 'b["verdict"]["state"]'))"
}

# clamd_says TARGET FILE: clamd's own answer for FILE (INSTREAM), asked from inside the scanner as
# the watcher user; TARGET is the unix socket's path or host:port. The watcher looks into ZIPs
# itself, so this is what shows the clamd.conf in effect (AlertEncrypted, AlertExceedsMax).
clamd_says() {
    dc exec -T -u watcher scanner python3 -c '
import socket, sys
target = sys.argv[1]
if target.startswith("/"):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(target)
else:
    host, port = target.rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=30)
data = sys.stdin.buffer.read()
s.sendall(b"zINSTREAM\0" + len(data).to_bytes(4, "big") + data + bytes(4))
reply = b""
while not reply.endswith(b"\0"):
    chunk = s.recv(4096)
    if not chunk:
        break
    reply += chunk
print(reply.rstrip(b"\0").decode())
' "$1" <"$2"
}

check_encrypted() { # stack clamd-target
    upload "$work/encrypted.zip" encrypted.zip
    [[ "$status" == 422 ]] || fail "encrypted zip: HTTP $status, expected 422: $body"
    ok "$1: an encrypted zip is not delivered (422, $(json 'b["verdict"]["state"]'))"
    local said
    said=$(clamd_says "$2" "$work/encrypted.zip") || fail "INSTREAM to clamd at $2: $said"
    [[ "$said" == *"Heuristics.Encrypted"*FOUND ]] || fail "clamd at $2 says '$said' for an encrypted zip: AlertEncrypted is not on"
    said=$(clamd_says "$2" "$work/nest.zip") || fail "INSTREAM to clamd at $2: $said"
    [[ "$said" == *"Heuristics.Limits.Exceeded"*FOUND ]] || fail "clamd at $2 says '$said' for a 20-level zip nest: AlertExceedsMax is not on"
    ok "$1: clamd itself (at $2) reports the encrypted zip and the zip nest (AlertEncrypted, AlertExceedsMax)"
}

# From the app container: the watcher's API answers, clamd does not, anywhere.
check_app_isolation() { # stack clamd-host...
    local stack=$1 out
    shift
    # shellcheck disable=SC2016 # JavaScript, not shell
    out=$(dc exec -T app node -e '
const net = require("node:net");
const targets = process.argv.slice(1);
let left = targets.length;
for (const host of targets) {
  const s = net.connect({ host, port: 3310, timeout: 3000 });
  const done = (what) => { console.log(`${host}:3310 ${what}`); s.destroy(); if (--left === 0) process.exit(0); };
  s.on("connect", () => done("CONNECTED"));
  s.on("timeout", () => done("timeout"));
  s.on("error", (e) => done(e.code));
}' -- "$@" 2>&1) || fail "node in the app container: $out"
    grep -q CONNECTED <<<"$out" && fail "the app container reaches clamd: $out"
    ok "$stack: the app container cannot reach clamd over TCP ($(tr '\n' ' ' <<<"$out"))"
    out=$(dc exec -T app find / -type s -not -path '/proc/*' -not -path '/sys/*' 2>/dev/null || true)
    [[ -z "$out" ]] || fail "unix sockets visible in the app container: $out"
    ok "$stack: no unix socket in the app container (clamd's is in the scanner's own tmpfs)"
    out=$(dc exec -T app node -e \
        'fetch("http://scanner:9090/readyz").then(r => r.text()).then(t => console.log(t))' 2>&1) ||
        fail "the app container cannot reach the watcher's /readyz: $out"
    grep -q '"ready": *true' <<<"$out" || fail "scanner /readyz from the app: $out"
    body=$(curl -sS --max-time 10 "http://127.0.0.1:$APP_PORT/healthz")
    [[ $(json 'b["scanner"]') == ready ]] || fail "app /healthz: $body"
    ok "$stack: the app reaches the watcher's API (/readyz ready; its own /healthz says scanner ready)"
}

# Every process: uid, effective capabilities, no_new_privs; clamd and the watcher as expected.
check_processes() { # stack clamd-expected(yes|no)
    local raw procs clamav_uid
    # "name uid capeff no_new_privs" per process (processes may vanish while being read).
    raw=$(dc exec -T scanner bash -c 'grep -E "^(Name|Uid|CapEff|NoNewPrivs):" /proc/[0-9]*/status' || true)
    procs=$(python3 - "$raw" <<'PY'
import collections, sys
procs = collections.defaultdict(dict)
for line in sys.argv[1].splitlines():
    path, key, value = line.split(":", 2)
    procs[path][key] = value.split()[0]
for p in procs.values():
    if len(p) == 4:
        print(p["Name"], p["Uid"], p["CapEff"], p["NoNewPrivs"])
PY
)
    [[ -n "$procs" ]] || fail "cannot list the scanner's processes: $raw"
    say "$1: scanner processes (name uid CapEff NoNewPrivs): $(sort -u <<<"$procs" | paste -sd ';' -)"
    clamav_uid=$(dc exec -T scanner id -u clamav)
    if [[ "$2" == yes ]]; then
        awk -v u="$clamav_uid" '$1 == "clamd" && $2 == u {f = 1} END {exit !f}' <<<"$procs" ||
            fail "clamd does not run as clamav (uid $clamav_uid): $procs"
    fi
    awk '$1 ~ /^watcher/ && $2 == 1000 {f = 1} END {exit !f}' <<<"$procs" || fail "no watcher process as uid 1000: $procs"
    # Only the root supervisor (tini, the entrypoint) holds capabilities: SETUID, SETGID, KILL.
    awk '$2 != 0 && $3 != "0000000000000000" {bad = 1} $4 != 1 {bad = 1} END {exit bad}' <<<"$procs" ||
        fail "a process with capabilities or without no_new_privs: $procs"
    ok "$1: $([[ "$2" == yes ]] && echo "clamd as clamav, ")the watcher as uid 1000; no capability outside the root supervisor; no_new_privs everywhere"
    # clamd's user cannot change what the watcher trusts, nor read the data.
    local dir
    for dir in /var/lib/watcher /var/lib/clamav /data/quarantine /data/uploads /data/processed; do
        dc exec -T -u clamav scanner touch "$dir/.clamd-probe" 2>/dev/null &&
            fail "clamd's user can write $dir"
    done
    dc exec -T -u clamav scanner ls /data/quarantine >/dev/null 2>&1 && fail "clamd's user can list the quarantine"
    # ... while it can write where it must (its temporary files), so the refusals above are real.
    dc exec -T -u clamav scanner touch /tmp/.clamd-probe || fail "the clamav user cannot write /tmp"
    dc exec -T -u watcher scanner touch /var/lib/watcher/.probe || fail "the watcher user cannot write its state"
    dc exec -T -u watcher scanner rm /var/lib/watcher/.probe
    ok "$1: the clamav user can write neither state, allowlist, definitions nor data, nor list the quarantine"
    dc exec -T -u watcher scanner touch /opt/watcher/.probe 2>/dev/null && fail "scanner root filesystem writable"
    dc exec -T app touch /app/.probe 2>/dev/null && fail "app root filesystem writable"
    ok "$1: read-only root filesystems in both containers"
}

# Stop the scanner (graceful, exit 0), upload while it is down, start it: the upload is delivered,
# and what was delivered and quarantined before is still there.
check_restart() { # stack
    local cid code pending_pid
    cid=$(dc ps -q scanner)
    dc stop scanner >/dev/null 2>&1 || fail "docker compose stop scanner"
    code=$("$PODMAN" inspect --format '{{.State.ExitCode}}' "$cid")
    [[ "$code" == 0 ]] || fail "scanner exit code $code after docker compose stop, expected 0"
    ok "$1: docker compose stop scanner: exit 0"
    # The app stores the upload (logging upload.stored with its id), then waits up to
    # VERDICT_WAIT_S (30 s) for a verdict; the scanner is started once the upload is stored.
    (upload "$work/while-down.bin" while-down.bin && echo "HTTP $status") >"$work/pending.out" &
    pending_pid=$!
    local down_id="" waited=0 state=""
    until [[ -n "$down_id" ]]; do
        ((waited >= 300)) && fail "no upload.stored line for while-down.bin in the app's log"
        sleep 0.1
        waited=$((waited + 1))
        down_id=$(dc logs --no-color app | grep -o '"event":"upload.stored","id":"[^"]*-while-down.bin"' |
            tail -1 | sed 's/.*"id":"//; s/"$//')
    done
    dc start scanner >/dev/null 2>&1 || fail "docker compose start scanner"
    wait_healthy scanner
    ok "$1: docker compose start scanner: healthy again"
    wait "$pending_pid" || fail "upload while the scanner was down failed"
    say "$1: the upload made while the scanner was down was answered: $(cat "$work/pending.out")"
    waited=0
    until [[ "$state" == clean ]]; do
        ((waited >= DELIVERY_TIMEOUT_S)) && fail "upload made while the scanner was down: verdict '$state' after ${waited}s"
        body=$(curl -sS --max-time 10 "http://127.0.0.1:$APP_PORT/files/$down_id/verdict")
        state=$(json 'b["verdict"]["state"]')
        [[ "$state" == clean ]] || sleep 1
        waited=$((waited + 1))
    done
    expect_download "$down_id" "$work/while-down.bin"
    ok "$1: the upload made while the scanner was down is delivered after the restart, byte for byte"
    expect_download "$report_id" "$work/report.bin"
    expect_quarantined "$work/eicar.com"
    ok "$1: after the restart the earlier clean file is still served and EICAR still quarantined"
}

run_stack() { # stack compose-files...
    local stack=$1
    shift
    files=()
    local f
    for f in "$@"; do files+=(-f "$f"); done
    project="watcher-ct-$stack-$$"
    APP_PORT=$(free_port)
    export APP_PORT
    say "$stack: docker compose -p $project ${files[*]} up -d --no-build --wait (app on :$APP_PORT)"
    drive_health &
    health_pid=$!
    dc up -d --no-build --wait --wait-timeout "$UP_TIMEOUT_S" >"$work/up.log" 2>&1 ||
        fail "$stack: docker compose up --wait: $(tail -n 20 "$work/up.log")"
    ok "$stack: every service up and healthy"

    check_uploads "$stack"
    if [[ "$stack" == external ]]; then
        check_encrypted "$stack" clamav:3310
        check_app_isolation "$stack" scanner clamav
        local pong
        pong=$(dc exec -T scanner bash -c 'exec 3<>/dev/tcp/clamav/3310; printf "zPING\0" >&3; head -c 4 <&3') ||
            fail "the scanner cannot reach the external clamd: $pong"
        [[ "$pong" == PONG ]] || fail "external clamd answered '$pong' to PING"
        ok "$stack: the scanner reaches the external clamd (PONG)"
        check_processes "$stack" no
    else
        check_encrypted "$stack" /run/clamav/clamd.sock
        check_app_isolation "$stack" scanner
        check_processes "$stack" yes
    fi
    check_restart "$stack"

    local volumes
    dc down -v --timeout 60 >"$work/down.log" 2>&1 || fail "docker compose down -v: $(cat "$work/down.log")"
    stop_health_driver
    volumes=$("$PODMAN" volume ls -q --filter "label=com.docker.compose.project=$project")
    [[ -z "$volumes" && -z $("$PODMAN" ps -aq --filter "label=com.docker.compose.project=$project") ]] ||
        fail "left after down -v: $volumes"
    project=""
    ok "$stack: docker compose down -v: no container or volume left"
}

for stack in ${STACKS:-bundled external}; do
    case "$stack" in
        bundled) run_stack bundled docker-compose.yml tests/compose/no-internet.yml ;;
        external)
            run_stack external docker-compose.yml docker-compose.external-clamd.yml \
                tests/compose/no-internet.yml tests/compose/clamav-standin.yml
            ;;
        *) fail "unknown stack '$stack' in STACKS (bundled, external)" ;;
    esac
done
say "done in $(($(date +%s) - t0))s"
echo "compose-test: $passed passed, 0 failed"
