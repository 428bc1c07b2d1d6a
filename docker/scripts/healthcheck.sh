#!/bin/bash
# HEALTHCHECK wrapper: `watcher healthcheck` as the watcher user, whoever docker runs it as.
# It reads the daemon's heartbeat in WATCHER_STATE_DIR (pid alive, heartbeat fresh) and PINGs the
# clamd the heartbeat names. Exit 0 healthy; 1 with one line saying why. The timeout is a backstop
# below the HEALTHCHECK's own.
set -euo pipefail
if [[ $(id -u) == 0 ]]; then
    exec setpriv --reuid=watcher --regid=watcher --init-groups --inh-caps=-all \
        timeout 25 watcher healthcheck
fi
exec timeout 25 watcher healthcheck
