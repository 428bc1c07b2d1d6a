#!/bin/bash
# HEALTHCHECK wrapper: `watcher healthcheck` as the watcher user, whoever docker runs it as, pointed
# at the bundled clamd's unix socket when that clamd runs here (docker exec does not inherit the
# CLAMAV_SOCKET the entrypoint sets for its children).
# Exit 0 when the daemon runs and clamd answers PING; otherwise 1 with one line saying why.
set -euo pipefail
# shellcheck source=docker/scripts/lib.sh
. /usr/local/lib/watcher-image/lib.sh

if [[ $(id -u) == 0 ]]; then
    exec setpriv --reuid=watcher --regid=watcher --init-groups --inh-caps=-all "$0" "$@"
fi
if [[ -z "${CLAMAV_SOCKET:-}" ]] && local_clamd_wanted; then
    export CLAMAV_SOCKET=/run/clamav/clamd.sock
fi

if watcher --help 2>/dev/null | grep -qw healthcheck; then
    exec timeout 25 watcher healthcheck
fi

# Interim, for package versions without `watcher healthcheck`: the same two facts, checked here.
if ! pgrep -u "$(id -u)" -f '^/opt/watcher/bin/python[0-9.]* /opt/watcher/bin/watcher run' >/dev/null; then
    echo "watcher daemon is not running"
    exit 1
fi
if truthy "${VIRUS_SCANNING_ENABLED:-true}" && ! clamd_ping; then
    echo "clamd does not answer PING at ${CLAMAV_SOCKET:-${CLAMAV_HOST:-127.0.0.1}:${CLAMAV_PORT:-3310}}"
    exit 1
fi
echo "ok"
