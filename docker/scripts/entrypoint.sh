#!/bin/bash
# Entrypoint of the watcher image; tini is PID 1 and runs this.
#
#   run (default)            first start (directories, definitions), then clamd + `watcher run`,
#                            supervised: if either exits, the other is stopped and the container exits
#                            with its status, so the restart policy restarts both together.
#   scan|healthcheck|update-definitions|--version|...   `watcher ARGS` as the watcher user
#   anything else            executed as given (e.g. `bash`)
#
# Started as root (docker-compose.yml does, with only SETUID, SETGID and KILL), it runs clamd as
# `clamav` and everything else as `watcher`, and stays root only to supervise them. clamd then owns
# nothing it could change (definitions, state, allowlist, data), and neither child keeps any
# capability. Given CAP_CHOWN (e.g. for bind mounts owned by someone else) it also hands the data
# directories to `watcher`. Started as `watcher` (the image's default USER) it cannot switch users:
# clamd runs as `watcher` too, logged as clamd.same_user. Either way the directories are checked as
# `watcher`, and the first that is not writable is named.
#
# Container-only knobs (no WATCHER_ prefix: those belong to the daemon's settings):
#   START_CLAMD=auto|true|false   auto: start the local clamd unless scanning is disabled or
#                                 CLAMAV_HOST names another host and no CLAMAV_SOCKET is set
#   FRESHCLAM_ON_START=true       download definitions at start when no official ones are present
#   FRESHCLAM_RETRIES=3, FRESHCLAM_RETRY_DELAY=30 (seconds, doubled after each failure),
#   FRESHCLAM_TIMEOUT=900         per attempt
#   FRESHCLAM_CONFIG=/etc/clamav/freshclam.conf
#   DEFINITIONS_FALLBACK=test     without official definitions: `test` runs with the bundled test
#                                 signatures (logged loudly), `fail` exits so the restart policy
#                                 tries the download again later (nothing is scanned meanwhile)
#   CLAMD_START_TIMEOUT=300       seconds to wait for clamd to answer PING (official databases
#                                 take ~30-60 s to load on 2 cores)
set -euo pipefail

# shellcheck source=docker/scripts/lib.sh
. /usr/local/lib/watcher-image/lib.sh

readonly RUN_AS=watcher
readonly CLAMD_USER=clamav
readonly CLAMD_CONF=/etc/clamav/clamd.conf
readonly FRESHCLAM_CONF=${FRESHCLAM_CONFIG:-/etc/clamav/freshclam.conf}
readonly CLAMAV_DB=/var/lib/clamav
readonly CLAMD_RUN=/run/clamav
readonly LOG_DIR=/var/log/watcher
uploads=${WATCHER_UPLOADS_DIR:-/data/uploads}
processed=${WATCHER_PROCESSED_DIR:-/data/processed}
quarantine=${WATCHER_QUARANTINE_DIR:-/data/quarantine}
state=${WATCHER_STATE_DIR:-/var/lib/watcher}

is_root() { [[ $(id -u) == 0 ]]; }

# Sets the array `prefix` to what runs a command as user $1: its uid, gid and /etc/group groups,
# and no capabilities (the uid change clears them; no-new-privileges keeps them cleared). Empty
# when not root: everything then runs as the current user.
set_prefix() {
    prefix=()
    if is_root; then
        prefix=(setpriv --reuid="$1" --regid="$1" --init-groups --inh-caps=-all
            env HOME="$(getent passwd "$1" | cut -d: -f6)")
    fi
}

drop_privileges() {
    set_prefix "$RUN_AS"
    exec "${prefix[@]}" "$@"
}

# Whether this process may chown (CAP_CHOWN, bit 0 of the effective set).
can_chown() {
    local eff
    eff=$(awk '/^CapEff:/ {print $2}' /proc/self/status)
    (((16#$eff & 1) != 0))
}

# As root with CAP_CHOWN: create the directories and give them to the watcher user (only what is
# not already its own, so a large uploads volume costs one pass of stat calls, not a rewrite).
# Without it (the compose file grants none) nothing is tried: named volumes start out with the
# image's ownership, and the check as `watcher` that follows names any directory not writable.
fix_ownership() {
    local dir
    can_chown || return 0
    for dir in "$uploads" "$processed" "$quarantine" "$state" "$CLAMAV_DB" "$LOG_DIR"; do
        mkdir -p -- "$dir" 2>/dev/null || true
        find "$dir" -xdev \( ! -user "$RUN_AS" -o ! -group "$RUN_AS" \) \
            -exec chown -h "$RUN_AS:$RUN_AS" {} + 2>/dev/null || true
    done
    chmod 0700 "$quarantine" 2>/dev/null || true
    log INFO container.ownership "data directories owned by $RUN_AS"
}

# As the watcher user: every directory must exist and be writable; name the first that is not.
check_directories() {
    local dir dirs=("$uploads" "$processed" "$quarantine" "$state" "$LOG_DIR")
    if local_clamd_wanted; then
        dirs+=("$CLAMAV_DB" "$CLAMD_RUN")
    fi
    for dir in "${dirs[@]}"; do
        mkdir -p -- "$dir" 2>/dev/null || true
        if [[ ! -d "$dir" || ! -w "$dir" || ! -x "$dir" ]]; then
            log ERROR container.directory_not_writable \
                "$dir is not writable by uid $(id -u): chown it to $(id -u):$(id -g) or start the container once as root (user: \"0\") so the entrypoint fixes ownership"
            exit 78
        fi
    done
}

have_official_definitions() {
    compgen -G "$CLAMAV_DB/main.c[vl]d" >/dev/null && compgen -G "$CLAMAV_DB/daily.c[vl]d" >/dev/null
}

testsigs_dir() {
    python3 -c 'import importlib.resources as r; print(r.files("watcher") / "testsigs")' 2>/dev/null
}

# First start: official definitions with retries; without them, the bundled test signatures, loudly.
prepare_definitions() {
    local attempt=0 delay=${FRESHCLAM_RETRY_DELAY:-30} retries=${FRESHCLAM_RETRIES:-3}
    if ! have_official_definitions && truthy "${FRESHCLAM_ON_START:-true}"; then
        while ((attempt < retries)); do
            attempt=$((attempt + 1))
            log INFO definitions.download "no official definitions yet: freshclam attempt $attempt of $retries"
            if timeout "${FRESHCLAM_TIMEOUT:-900}" freshclam --config-file="$FRESHCLAM_CONF" --stdout; then
                break
            else
                log WARNING definitions.download_failed "freshclam attempt $attempt of $retries failed (exit $?)"
            fi
            if ((attempt < retries)); then
                sleep "$delay"
                delay=$((delay * 2))
            fi
        done
    fi

    local sigs
    if have_official_definitions; then
        # Official definitions detect the test files too; the test-only set is no longer needed.
        rm -f "$CLAMAV_DB"/watcher-test.*
        log INFO definitions.ready "official ClamAV definitions present in $CLAMAV_DB"
        return 0
    fi
    if [[ "${DEFINITIONS_FALLBACK:-test}" == fail ]]; then
        log CRITICAL definitions.missing "no official definitions and DEFINITIONS_FALLBACK=fail: exiting"
        exit 1
    fi
    sigs=$(testsigs_dir) || true
    if [[ -z "$sigs" ]] || ! compgen -G "$sigs/watcher-test.*" >/dev/null; then
        log CRITICAL definitions.missing "no official definitions and no bundled test signatures: clamd cannot start"
        exit 1
    fi
    cp -f "$sigs"/watcher-test.* "$CLAMAV_DB"/
    local i
    for i in 1 2 3; do
        log ERROR definitions.test_only \
            "NO OFFICIAL CLAMAV DEFINITIONS ($i/3): clamd runs with the bundled TEST signatures only (EICAR and clam.exe). Real malware is NOT detected until freshclam succeeds (the update job retries; check network access to the ClamAV mirrors)."
    done
}

# As root: clamd's socket directory, 1777 like /tmp, so that clamd can create its socket there
# as whichever user it runs as. Under the compose file's read-only root it is a fresh tmpfs, which
# engines make root-owned (podman 0755, whatever the tmpfs mode option says); root owns it, so
# the chmod needs no capability.
prepare_socket_dir() {
    mkdir -p -- "$CLAMD_RUN" 2>/dev/null || true
    chmod 1777 "$CLAMD_RUN" 2>/dev/null || true
}

# As `watcher`: the checks, then the definitions clamd will load (the watcher user owns them).
prepare() {
    check_directories
    if local_clamd_wanted; then
        prepare_definitions
    fi
}

# clamd as $CLAMD_USER when root, else as the current user; ready once `watcher` gets a PONG on
# the socket (root holds no DAC capability, so it could not connect itself).
start_clamd() {
    local waited=0 timeout=${CLAMD_START_TIMEOUT:-300} as_clamd
    set_prefix "$CLAMD_USER"
    as_clamd=("${prefix[@]}")
    if ! is_root; then
        log WARNING clamd.same_user \
            "started as uid $(id -u), not root: clamd runs as this user too, so a compromised clamd could change the definitions and the watcher's state. Start the container as root (docker-compose.yml does): clamd then runs as $CLAMD_USER"
    fi
    "${as_clamd[@]}" rm -f "$CLAMD_RUN/clamd.sock" 2>/dev/null || true
    log INFO clamd.starting "starting clamd as $CLAMD_USER"
    "${as_clamd[@]}" clamd --config-file="$CLAMD_CONF" &
    clamd_pid=$!
    until clamd_ping "${as_watcher[@]}"; do
        if ! kill -0 "$clamd_pid" 2>/dev/null; then
            wait "$clamd_pid" && rc=0 || rc=$?
            log CRITICAL clamd.exited "clamd exited during start-up (exit $rc)"
            exit 1
        fi
        if ((waited >= timeout)); then
            log CRITICAL clamd.start_timeout "clamd did not answer PING within ${timeout}s"
            kill -TERM "$clamd_pid" 2>/dev/null || true
            exit 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    log INFO clamd.ready "clamd answers PING on its unix socket after ${waited}s"
}

stop_child() { # pid name grace
    local pid=$1 name=$2 grace=$3 n=0
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    if ! kill -TERM "$pid" 2>/dev/null; then
        # Another user's process and no CAP_KILL: it stops with the container instead.
        log WARNING container.cannot_signal "cannot signal $name (no CAP_KILL): it stops with the container"
        return 0
    fi
    while kill -0 "$pid" 2>/dev/null; do
        if ((n >= grace * 10)); then
            log WARNING container.kill "$name did not stop within ${grace}s: SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
        n=$((n + 1))
    done
    wait "$pid" 2>/dev/null || true
}

shutdown() {
    local rc=$1
    trap - TERM INT QUIT HUP
    # The watcher first (it drains in-flight scans, which need clamd), then clamd.
    stop_child "${watcher_pid:-}" watcher "$(( ${WATCHER_SHUTDOWN_GRACE_S:-30} + 5 ))"
    stop_child "${clamd_pid:-}" clamd 10
    log INFO container.stopped "stopped (exit $rc)"
    exit "$rc"
}

main_run() {
    set_prefix "$RUN_AS"
    as_watcher=("${prefix[@]}")
    if local_clamd_wanted; then
        export CLAMAV_SOCKET=${CLAMAV_SOCKET:-$CLAMD_RUN/clamd.sock}
    fi
    if is_root; then
        fix_ownership
        prepare_socket_dir
        "${as_watcher[@]}" "$0" _prepare || exit $?
    else
        prepare
    fi
    log INFO container.starting "watcher image starting as uid $(id -u)"

    clamd_pid=""
    watcher_pid=""
    trap 'log INFO container.signal "stop requested"; shutdown 0' TERM INT QUIT HUP
    if local_clamd_wanted; then
        start_clamd
    else
        log INFO clamd.external "not starting a local clamd (scanning disabled or clamd at ${CLAMAV_HOST:-?}:${CLAMAV_PORT:-3310})"
    fi

    "${as_watcher[@]}" watcher run &
    watcher_pid=$!

    local rc=0 pids=("$watcher_pid")
    [[ -n "$clamd_pid" ]] && pids+=("$clamd_pid")
    wait -n "${pids[@]}" || rc=$?
    if ! kill -0 "$watcher_pid" 2>/dev/null; then
        log ERROR container.child_exited "watcher exited (exit $rc): stopping the container"
        watcher_pid=""
    else
        log ERROR container.child_exited "clamd exited (exit $rc): stopping the container"
        clamd_pid=""
        ((rc != 0)) || rc=1
    fi
    shutdown "$rc"
}

case "${1:-run}" in
    run)
        shift || true
        main_run "$@"
        ;;
    _prepare) # internal: run by `run` as the watcher user
        prepare
        ;;
    scan | healthcheck | update-definitions | --version | --help | -h)
        if local_clamd_wanted; then
            export CLAMAV_SOCKET=${CLAMAV_SOCKET:-$CLAMD_RUN/clamd.sock}
        fi
        drop_privileges watcher "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
