#!/bin/bash
# The stand-in's entrypoint, doing what the official image's /init does on start (as root), minus
# freshclam, which cannot reach ClamAV's mirrors here: the preloaded test signatures are used.
set -euo pipefail
install -d -o clamav -g clamav -m 0775 /run/clamav
chown -R clamav:clamav /var/lib/clamav
echo "clamav stand-in: no freshclam (no network); databases: $(cd /var/lib/clamav && echo *)"
rm -f /tmp/clamd.sock /run/clamav/clamd.sock
exec clamd --foreground
