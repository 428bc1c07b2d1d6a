#!/bin/bash
# HEALTHCHECK wrapper: `watcher healthcheck` as the watcher user, whoever docker runs it as.
# Exit 0 when the daemon runs and clamd answers PING; 1 with one line saying why otherwise.
set -euo pipefail
if [[ $(id -u) == 0 ]]; then
    exec setpriv --reuid=watcher --regid=watcher --init-groups --inh-caps=-all \
        timeout 25 watcher healthcheck
fi
exec timeout 25 watcher healthcheck
