# shellcheck shell=bash
# Shared helpers for the image's scripts (sourced, not executed).

# One flat JSON line per event on stdout, like the watcher's own log lines:
#   {"time": ..., "level": ..., "event": ..., "message": ..., "source": "entrypoint"}
# Messages are fixed strings written in these scripts; quotes and backslashes are escaped anyway.
log() {
    local level=$1 event=$2 message=$3
    message=${message//\\/\\\\}
    message=${message//\"/\\\"}
    printf '{"time": "%s", "level": "%s", "event": "%s", "message": "%s", "source": "%s"}\n' \
        "$(date -u +%Y-%m-%dT%H:%M:%S.%3N+00:00)" "$level" "$event" "$message" "${LOG_SOURCE:-entrypoint}"
}

truthy() {
    case "${1,,}" in
        1 | true | yes | on) return 0 ;;
        *) return 1 ;;
    esac
}

# Whether this container runs its own clamd (see START_CLAMD in entrypoint.sh).
local_clamd_wanted() {
    truthy "${VIRUS_SCANNING_ENABLED:-true}" || return 1
    case "${START_CLAMD:-auto}" in
        true | yes | 1) return 0 ;;
        false | no | 0) return 1 ;;
    esac
    [[ -n "${CLAMAV_SOCKET:-}" ]] && return 0
    case "${CLAMAV_HOST:-127.0.0.1}" in
        127.0.0.1 | localhost | ::1) return 0 ;;
    esac
    return 1
}

# Send PING to clamd (unix socket if CLAMAV_SOCKET is set, else CLAMAV_HOST:CLAMAV_PORT); true on PONG.
# Arguments, if any, are a command prefix that runs the probe as another user (e.g. setpriv ...):
# only `watcher` and `clamav` may connect to the bundled clamd's socket, not a capability-less root.
clamd_ping() {
    "$@" python3 - <<'PY'
import os, socket, sys
path = os.environ.get("CLAMAV_SOCKET")
try:
    if path:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = path
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        target = (os.environ.get("CLAMAV_HOST", "127.0.0.1"), int(os.environ.get("CLAMAV_PORT", "3310")))
    s.settimeout(3)
    s.connect(target)
    s.sendall(b"zPING\0")
    reply = s.recv(64)
    s.close()
except OSError:
    sys.exit(1)
sys.exit(0 if reply.rstrip(b"\0\n") == b"PONG" else 1)
PY
}
