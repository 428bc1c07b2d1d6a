#!/bin/bash
# Runs INSIDE the image as root (copied in and started by tests/image/smoke.sh):
#   - the entrypoint as in production (tini, root start -> ownership fix -> drop to `watcher`),
#     with freshclam failing (mirror unreachable) and falling back to the bundled test signatures;
#   - an EICAR file, a zip holding EICAR and two clean files dropped into uploads the way an app
#     does it (as uid 1000, one written in place, others written to an ignored temp name and renamed);
#   - checks: EICAR and the zip end in quarantine and nowhere else, the clean files in processed
#     byte for byte, `watcher healthcheck` passes, clamd answers on its unix socket only (no TCP),
#     clamd runs as `clamav` and cannot write what the watcher trusts, the watcher as `watcher`, no
#     compiler in the image, and SIGTERM stops everything with exit 0; started as uid 1000, clamd
#     runs as uid 1000 and says so (clamd.same_user).
set -uo pipefail

export FRESHCLAM_RETRIES=${FRESHCLAM_RETRIES:-2} FRESHCLAM_RETRY_DELAY=1 FRESHCLAM_TIMEOUT=60
# Hermetic: the image's real freshclam.conf, but its mirror is a closed port on loopback, so the
# download fails the same way with or without internet access (and fast: one attempt per run).
export FRESHCLAM_CONFIG=/tmp/smoke/freshclam.conf
READY_TIMEOUT=${READY_TIMEOUT:-180}
OUTCOME_TIMEOUT=${OUTCOME_TIMEOUT:-90}
# The EICAR test string, assembled here so that no file in the repository is itself EICAR.
# shellcheck disable=SC2016 # literal dollar signs
EICAR='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR'
# shellcheck disable=SC2016
EICAR+='-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
work=/tmp/smoke
log=$work/container.log
uploads=${WATCHER_UPLOADS_DIR:-/data/uploads}
processed=${WATCHER_PROCESSED_DIR:-/data/processed}
quarantine=${WATCHER_QUARANTINE_DIR:-/data/quarantine}
t0=$(date +%s)
pass=0

mkdir -p "$work"
sed -e 's|^DatabaseMirror .*|DatabaseMirror http://127.0.0.1:9|' -e 's|^MaxAttempts .*|MaxAttempts 1|' \
    /etc/clamav/freshclam.conf >"$FRESHCLAM_CONFIG"
chmod 0644 "$FRESHCLAM_CONFIG"
say() { echo "scenario [$(($(date +%s) - t0))s]: $*"; }
ok() {
    pass=$((pass + 1))
    say "ok - $*"
}
fail() {
    say "FAIL - $*"
    echo "----- container output (last 80 lines) -----"
    tail -n 80 "$log" 2>/dev/null
    echo "----- uploads / processed / quarantine -----"
    find "$uploads" "$processed" "$quarantine" -ls 2>/dev/null | head -50
    [[ -n "${pid:-}" ]] && kill -TERM "$pid" 2>/dev/null
    sleep 2
    exit 1
}
# Runs a command as the app would: uid/gid 1000, like the example app's `node` user.
as_app() { setpriv --reuid=1000 --regid=1000 --clear-groups "$@"; }

# Processes started by this scenario (descendants of $1) as "pid uid name args".
descendants() {
    python3 - "$1" <<'PY'
import os, sys
root = int(sys.argv[1])
procs = {}
for p in os.listdir("/proc"):
    if not p.isdigit():
        continue
    try:
        status = open(f"/proc/{p}/status").read()
        cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        continue
    fields = dict(l.split(":", 1) for l in status.splitlines() if ":" in l)
    procs[int(p)] = (int(fields["PPid"]), fields["Uid"].split()[0], cmd.strip())
seen, todo = set(), [root]
while todo:
    cur = todo.pop()
    for pid, (ppid, uid, cmd) in procs.items():
        if ppid == cur and pid not in seen:
            seen.add(pid)
            todo.append(pid)
            print(pid, uid, cmd)
PY
}

wait_for_log() { # pattern timeout
    local waited=0
    until grep -q -- "$1" "$log" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || fail "container exited while waiting for $1"
        ((waited >= $2)) && fail "no $1 within $2s"
        sleep 1
        waited=$((waited + 1))
    done
}

# --- static checks -----------------------------------------------------------------------------------
for cc in gcc cc c++ clang make; do
    command -v "$cc" >/dev/null && fail "compiler/build tool in the final image: $cc"
done
ok "no compiler in the final image"
version=$(watcher --version 2>&1) || fail "watcher --version: $version"
ok "watcher --version: $version"

# --- start as in production ----------------------------------------------------------------------
# tini -s: a subreaper, since tini is not PID 1 inside `buildah run`.
/usr/bin/tini -s -- /usr/local/bin/docker-entrypoint run >"$log" 2>&1 &
pid=$!
wait_for_log '"event": *"watcher.ready"' "$READY_TIMEOUT"
ok "watcher.ready after $(($(date +%s) - t0))s"

grep -q '"event": *"definitions.test_only".*"source": *"entrypoint"' "$log" ||
    fail "no loud definitions.test_only line from the entrypoint"
grep -c 'definitions.download_failed' "$log" | grep -qx "$FRESHCLAM_RETRIES" ||
    fail "expected $FRESHCLAM_RETRIES failed freshclam attempts"
ok "freshclam failed $FRESHCLAM_RETRIES times (mirror unreachable) and the test signatures were installed, loudly"
ls /var/lib/clamav/watcher-test.* >/dev/null 2>&1 || fail "test signatures not in /var/lib/clamav"

procs=$(descendants "$pid")
clamd_uid=$(awk '$3 ~ /(^|\/)clamd$/ {print $2}' <<<"$procs" | head -1)
watcher_uid=$(awk '$0 ~ / run$/ && $0 ~ /watcher/ && $0 !~ /docker-entrypoint/ {print $2}' <<<"$procs" | head -1)
clamav_uid=$(id -u clamav)
[[ "$clamd_uid" == "$clamav_uid" ]] ||
    fail "clamd uid is '${clamd_uid}', expected $clamav_uid (clamav). Processes: $procs"
[[ "$watcher_uid" == 1000 ]] || fail "watcher uid is '${watcher_uid}', expected 1000. Processes: $procs"
ok "started as root: clamd runs as clamav (uid $clamav_uid), 'watcher run' as uid 1000 (watcher)"
[[ $(stat -c %U "$quarantine") == watcher && $(stat -c %a "$quarantine") == 700 ]] ||
    fail "quarantine is not watcher-owned 0700"
ok "quarantine directory watcher-owned, mode 0700"
as_clamav() { setpriv --reuid=clamav --regid=clamav --init-groups "$@"; }
for dir in /var/lib/watcher /var/lib/clamav "$quarantine" "$uploads" "$processed"; do
    as_clamav touch "$dir/.clamd-probe" 2>/dev/null && fail "the clamav user can write $dir"
done
as_clamav ls "$quarantine" >/dev/null 2>&1 && fail "the clamav user can list the quarantine"
ok "the clamav user can write neither the state, the definitions nor the data, nor list the quarantine"

CLAMAV_SOCKET='' CLAMAV_HOST=127.0.0.1 CLAMAV_PORT=3310 bash -c '. /usr/local/lib/watcher-image/lib.sh; clamd_ping' &&
    fail "clamd answers PING on TCP 3310: it must listen on its unix socket only"
[[ $(stat -c '%U:%G %a' /run/clamav/clamd.sock) == "clamav:clamav 660" ]] ||
    fail "clamd's socket is $(stat -c '%U:%G %a' /run/clamav/clamd.sock), expected clamav:clamav 660"
ok "clamd listens on its unix socket only (clamav:clamav 0660), not on TCP 3310"
socket_ping() { CLAMAV_SOCKET=/run/clamav/clamd.sock "$@" bash -c '. /usr/local/lib/watcher-image/lib.sh; clamd_ping'; }
socket_ping setpriv --reuid=1000 --regid=1000 --init-groups || fail "the watcher user cannot PING clamd's socket"
socket_ping setpriv --reuid=1000 --regid=1000 --clear-groups &&
    fail "a uid-1000 process outside the clamav group reaches clamd's socket"
ok "clamd's socket answers the watcher user (clamav group) and refuses uid 1000 without that group"

hc=$(/usr/local/bin/watcher-healthcheck 2>&1) || fail "healthcheck failed: $hc"
ok "watcher-healthcheck exits 0 ($hc)"
hc=$(setpriv --reuid=1000 --regid=1000 --init-groups /usr/local/bin/watcher-healthcheck 2>&1) ||
    fail "healthcheck as the watcher user failed: $hc"
ok "watcher-healthcheck as the watcher user (docker compose exec -u watcher) exits 0"

# --- drop files the way an app does ---------------------------------------------------------------
printf '%s' "$EICAR" >"$work/eicar.com"
python3 - "$work/eicar.com" "$work/eicar.zip" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[2], "w", zipfile.ZIP_DEFLATED) as z:
    z.write(sys.argv[1], "docs/readme.com")
PY
head -c 300000 /dev/urandom >"$work/clean.bin"
printf 'just a plain text upload\n' >"$work/clean.txt"
chmod 0644 "$work"/*
# temp name (ignored by the watcher) then rename, as an app should
for f in eicar.com eicar.zip clean.bin; do
    as_app cp "$work/$f" "$uploads/.$f.part" || fail "cannot write into uploads as uid 1000"
    as_app mv "$uploads/.$f.part" "$uploads/$f"
done
# written in place
as_app cp "$work/clean.txt" "$uploads/clean.txt"
say "dropped eicar.com, eicar.zip, clean.bin, clean.txt"

contains_eicar() { grep -rlF 'EICAR-STANDARD-ANTIVIRUS-TEST-FILE' "$1" 2>/dev/null; }
quarantined_zip() { # a zip whose bytes equal ours, anywhere under quarantine
    local want f
    want=$(sha256sum <"$work/eicar.zip")
    while IFS= read -r -d '' f; do
        [[ $(sha256sum <"$f") == "$want" ]] && return 0
    done < <(find "$quarantine" -type f -print0)
    return 1
}
processed_copy() { # name -> path in processed with identical bytes
    local want f
    want=$(sha256sum <"$work/$1")
    while IFS= read -r -d '' f; do
        [[ $(sha256sum <"$f") == "$want" ]] && { echo "$f"; return 0; }
    done < <(find "$processed" -type f -print0)
    return 1
}

waited=0
while :; do
    # the daemon keeps its staging area (claims journal) in uploads/.watcher
    left=$(find "$uploads" -path "$uploads/.watcher" -prune -o -type f -print | wc -l)
    if ((left == 0)) && processed_copy clean.bin >/dev/null && processed_copy clean.txt >/dev/null &&
        contains_eicar "$quarantine" >/dev/null && quarantined_zip; then
        break
    fi
    ((waited >= OUTCOME_TIMEOUT)) && fail "files not delivered within ${OUTCOME_TIMEOUT}s"
    kill -0 "$pid" 2>/dev/null || fail "container exited while files were pending"
    sleep 1
    waited=$((waited + 1))
done
ok "all four files left uploads after ~${waited}s"
ok "eicar.com in quarantine: $(contains_eicar "$quarantine" | tr '\n' ' ')"
ok "eicar.zip (EICAR inside an archive) in quarantine"
[[ -z "$(contains_eicar "$processed")" ]] || fail "EICAR content found in processed"
if find "$processed" -type f -exec cmp -s "$work/eicar.zip" {} \; -print | grep -q .; then
    fail "eicar.zip found in processed"
fi
ok "no EICAR (plain or zipped) in processed"
ok "clean.bin in processed with identical bytes: $(processed_copy clean.bin)"
ok "clean.txt in processed with identical bytes: $(processed_copy clean.txt)"

hc=$(/usr/local/bin/watcher-healthcheck 2>&1) || fail "healthcheck failed after scanning: $hc"
ok "watcher-healthcheck still exits 0"

# --- the watcher's HTTP API on 0.0.0.0:9090 (what the app container uses) -----------------------------
http_get() { # path -> "STATUS BODY"
    python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen("http://127.0.0.1:9090" + sys.argv[1], timeout=10) as r:
        print(r.status, r.read().decode(errors="replace"))
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode(errors="replace"))
except OSError as e:
    print(0, e)
PY
}
r=$(http_get /healthz)
[[ $r == 200* ]] || fail "GET /healthz: $r"
ok "GET /healthz: 200"
r=$(http_get /readyz)
[[ $r == 200* ]] || fail "GET /readyz: $r"
ok "GET /readyz: 200"
r=$(http_get '/v1/files/clean.bin?wait=5')
grep -q '"state": *"clean"' <<<"$r" || fail "GET /v1/files/clean.bin: $r"
ok "GET /v1/files/clean.bin: state clean"
r=$(http_get '/v1/files/eicar.zip?wait=5')
grep -q '"state": *"infected"' <<<"$r" || fail "GET /v1/files/eicar.zip: $r"
ok "GET /v1/files/eicar.zip: state infected"
r=$(http_get /metrics)
grep -q '^watcher_files_total{verdict="infected"} 2' <<<"${r#200 }" || fail "GET /metrics: no watcher_files_total infected 2"
ok "GET /metrics: watcher_files_total{verdict=\"infected\"} 2"
n=$(setpriv --reuid=1000 --regid=1000 --clear-groups watcher quarantine list --json |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin)))') || fail "watcher quarantine list failed"
((n == 2)) || fail "watcher quarantine list: $n entries, expected 2"
ok "watcher quarantine list: 2 entries"

# --- definitions update in the image: freshclam -> RELOAD -> a new signature is live ----------------
# freshclam runs for real against a loopback "mirror" that serves one custom signature file.
marker="WATCHER-IMAGE-MARKER-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')"
mkdir -p "$work/mirror"
printf 'Watcher.Test.ImageMarker:0:*:%s\n' "$(printf %s "$marker" | od -An -tx1 | tr -d ' \n')" \
    >"$work/mirror/image-marker.ndb"
python3 -m http.server 8765 --bind 127.0.0.1 --directory "$work/mirror" >"$work/mirror.log" 2>&1 &
mirror_pid=$!
{
    grep -v '^DatabaseMirror\|^UpdateLogFile' /etc/clamav/freshclam.conf
    printf '%s\n' 'ExcludeDatabase main' 'ExcludeDatabase daily' 'ExcludeDatabase bytecode' \
        'DatabaseMirror http://127.0.0.1:9' 'DatabaseCustomURL http://127.0.0.1:8765/image-marker.ndb'
} >"$work/freshclam-local.conf"
chmod 0644 "$work/freshclam-local.conf"
sleep 0.5
rc=0
upd=$(setpriv --reuid=1000 --regid=1000 --init-groups env HOME=/var/lib/watcher \
    CLAMAV_SOCKET=/run/clamav/clamd.sock WATCHER_UPDATE_COMMAND="freshclam --config-file=$work/freshclam-local.conf --no-dns" \
    watcher update-definitions 2>&1) || rc=$?
kill "$mirror_pid" 2>/dev/null
((rc == 0)) || fail "watcher update-definitions: exit $rc: $(tail -n 15 <<<"$upd")"
[[ -f /var/lib/clamav/image-marker.ndb ]] || fail "freshclam did not install image-marker.ndb"
ok "watcher update-definitions: freshclam fetched a new signature, clamd reloaded (exit 0)"
printf 'hello %s\n' "$marker" >"$work/marked.txt"
chmod 0644 "$work/marked.txt"
as_app cp "$work/marked.txt" "$uploads/.marked.txt.part" && as_app mv "$uploads/.marked.txt.part" "$uploads/marked.txt"
waited=0
until grep -rqF "$marker" "$quarantine" 2>/dev/null; do
    ((waited >= OUTCOME_TIMEOUT)) && fail "file with the new signature's marker not quarantined"
    sleep 1
    waited=$((waited + 1))
done
grep -rqF "$marker" "$processed" && fail "file with the new signature's marker in processed"
ok "an upload matching the freshly loaded signature is quarantined"

# --- stop ----------------------------------------------------------------------------------------
kill -TERM "$pid"
waited=0
while kill -0 "$pid" 2>/dev/null; do
    ((waited >= 60)) && fail "still running 60s after SIGTERM"
    sleep 1
    waited=$((waited + 1))
done
wait "$pid"
rc=$?
((rc == 0)) || fail "exit status $rc after SIGTERM, expected 0"
grep -q '"event": *"container.stopped"' "$log" || fail "no container.stopped line"
[[ -z "$(descendants "$pid")" ]] || fail "processes left after stop"
ok "SIGTERM: watcher then clamd stopped, exit 0 after ${waited}s"
rc=0
hc=$(/usr/local/bin/watcher-healthcheck 2>&1) || rc=$?
((rc == 1)) || fail "healthcheck with nothing running: exit $rc, expected 1 ($hc)"
[[ $(wc -l <<<"$hc") == 1 ]] || fail "healthcheck failure is not one line: $hc"
ok "watcher-healthcheck with nothing running: exit 1, '$hc'"

# --- restart as the image's default user (uid 1000, no root step) on the same volumes --------------
log=$work/container2.log
setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/var/lib/watcher \
    /usr/bin/tini -s -- /usr/local/bin/docker-entrypoint run >"$log" 2>&1 &
pid=$!
wait_for_log '"event": *"watcher.ready"' "$READY_TIMEOUT"
grep -q '"event": *"container.ownership"' "$log" && fail "non-root start tried to fix ownership"
ok "restart as uid 1000 (the image's USER) on the same volumes: ready"
clamd_uid=$(descendants "$pid" | awk '$3 ~ /(^|\/)clamd$/ {print $2}' | head -1)
[[ "$clamd_uid" == 1000 ]] || fail "non-root start: clamd uid is '$clamd_uid', expected 1000"
grep -q '"level": *"WARNING", *"event": *"clamd.same_user"' "$log" || fail "no clamd.same_user warning"
ok "started as uid 1000, clamd runs as uid 1000 too and clamd.same_user says so"
as_app cp "$work/eicar.com" "$uploads/.again.com.part" && as_app mv "$uploads/.again.com.part" "$uploads/again.com"
waited=0
until [[ $(contains_eicar "$quarantine" | wc -l) -ge 2 ]]; do
    ((waited >= OUTCOME_TIMEOUT)) && fail "second EICAR not quarantined within ${OUTCOME_TIMEOUT}s"
    sleep 1
    waited=$((waited + 1))
done
ok "after the restart, a new EICAR upload is quarantined"
kill -TERM "$pid"
wait "$pid" || fail "exit status $? after SIGTERM (non-root run)"
ok "non-root run stopped with exit 0"

# --- a volume the watcher cannot write: refuse to start, and say which and how to fix ----------------
log=$work/container3.log
chown root:root "$processed"
rc=0
setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/var/lib/watcher \
    timeout 60 /usr/bin/tini -s -- /usr/local/bin/docker-entrypoint run >"$log" 2>&1 || rc=$?
chown watcher:watcher "$processed"
((rc == 78)) || fail "unwritable processed dir: exit $rc, expected 78"
grep -q "\"event\": *\"container.directory_not_writable\".*$processed" "$log" ||
    fail "no container.directory_not_writable line naming $processed"
ok "unwritable processed volume: exit 78 with a line naming it and the fix"

# --- DEFINITIONS_FALLBACK=fail: no official definitions -> exit instead of test-only scanning ---
log=$work/container5.log
rc=0
setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/var/lib/watcher DEFINITIONS_FALLBACK=fail \
    FRESHCLAM_RETRIES=1 timeout 60 /usr/bin/tini -s -- /usr/local/bin/docker-entrypoint run >"$log" 2>&1 || rc=$?
((rc == 1)) || fail "DEFINITIONS_FALLBACK=fail: exit $rc, expected 1"
grep -q '"event": *"definitions.missing"' "$log" || fail "no definitions.missing line"
grep -q '"event": *"watcher.ready"' "$log" && fail "DEFINITIONS_FALLBACK=fail started the watcher"
ok "DEFINITIONS_FALLBACK=fail: exit 1 without official definitions, nothing started"

# --- VIRUS_SCANNING_ENABLED=false: no clamd is started, the daemon says it delivers unscanned ------
log=$work/container4.log
setpriv --reuid=1000 --regid=1000 --clear-groups env HOME=/var/lib/watcher VIRUS_SCANNING_ENABLED=false \
    /usr/bin/tini -s -- /usr/local/bin/docker-entrypoint run >"$log" 2>&1 &
pid=$!
wait_for_log '"event": *"watcher.ready"' "$READY_TIMEOUT"
descendants "$pid" | awk '$3 ~ /(^|\/)clamd$/' | grep -q . && fail "clamd started although scanning is disabled"
grep -q '"event": *"watcher.scanning_disabled"' "$log" || fail "no watcher.scanning_disabled warning"
kill -TERM "$pid"
wait "$pid" || fail "exit status $? after SIGTERM (scanning disabled)"
ok "VIRUS_SCANNING_ENABLED=false: no clamd, watcher.scanning_disabled logged, clean stop"

say "all $pass checks passed"
