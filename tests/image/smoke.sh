#!/bin/bash
# Image smoke test (`make image-test`, after `make image`).
#
# There is no container engine here: the image's configuration is read with `podman image inspect`,
# and the scenario (tests/image/scenario.sh) runs inside a buildah working container in chroot
# isolation, as ONE `buildah run` call, because background processes do not outlive a call.
# Exits non-zero on any failure.
set -euo pipefail

IMAGE=${IMAGE:-localhost/watcher:dev}
PODMAN=${PODMAN:-podman}
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s)

fail() {
    echo "image-test: FAIL: $*" >&2
    exit 1
}

# --- the image's configuration ---------------------------------------------------------------------
inspect() { "$PODMAN" image inspect --format "$1" "$IMAGE"; }
user=$(inspect '{{.Config.User}}')
[[ "$user" == 1000:1000 ]] || fail "image USER is '$user', expected 1000:1000 (watcher)"
entrypoint=$(inspect '{{json .Config.Entrypoint}}')
[[ "$entrypoint" == '["/usr/bin/tini","--","/usr/local/bin/docker-entrypoint"]' ]] ||
    fail "entrypoint is $entrypoint, expected tini first"
health=$(inspect '{{json .Config.Healthcheck}}')
grep -q 'watcher-healthcheck' <<<"$health" || fail "no HEALTHCHECK running watcher-healthcheck: $health"
interval=$(inspect '{{.Config.Healthcheck.Interval}}')
[[ "$interval" == 30s ]] || fail "HEALTHCHECK interval is $interval, expected 30s"
size=$(inspect '{{.Size}}')
echo "image-test: config ok (USER $user, tini entrypoint, HEALTHCHECK $health); size $((size / 1000000)) MB"

# --- the scenario inside the image -----------------------------------------------------------------
ctr=$(buildah from --pull-never "$IMAGE")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah copy --quiet --chown 0:0 "$ctr" "$here/scenario.sh" /tmp/smoke-scenario.sh >/dev/null
rc=0
timeout --kill-after=10 "${IMAGE_TEST_TIMEOUT:-420}" \
    buildah run --isolation chroot --user root "$ctr" -- bash /tmp/smoke-scenario.sh || rc=$?
((rc == 0)) || fail "scenario failed (exit $rc)"
echo "image-test: ok in $(($(date +%s) - t0))s"
