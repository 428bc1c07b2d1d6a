#!/bin/bash
# Image smoke test (`make image-test`, after `make image`).
#
# There is no container engine here: the image's configuration is read with `podman image inspect`,
# and the scenario (tests/image/scenario.sh) runs inside a buildah working container in chroot
# isolation, as ONE `buildah run` call, because background processes do not outlive a call; it
# runs in its own network namespace (loopback only).
# Exits non-zero on any failure.
set -euo pipefail

IMAGE=${IMAGE:-localhost/watcher:dev}
PODMAN=${PODMAN:-podman}
here=$(cd "$(dirname "$0")" && pwd)
t0=$(date +%s)

passed=0
fail() {
    echo "image-test: FAIL: $*" >&2
    echo "image-test: $passed passed, 1 failed"
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
passed=4 # USER, entrypoint, HEALTHCHECK, interval
size=$(inspect '{{.Size}}')
echo "image-test: config ok (USER $user, tini entrypoint, HEALTHCHECK $health); size $((size / 1000000)) MB"

# --- the scenario inside the image -----------------------------------------------------------------
ctr=$(buildah from --pull-never "$IMAGE")
out=$(mktemp)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -f "$out"' EXIT
buildah copy --quiet --chown 0:0 "$ctr" "$here/scenario.sh" /tmp/smoke-scenario.sh >/dev/null
rc=0
# A private network namespace with only loopback: clamd's TCP 3310 and the watcher's HTTP port
# cannot collide with anything on the host, and nothing inside can reach out.
timeout --kill-after=10 "${IMAGE_TEST_TIMEOUT:-420}" \
    unshare --net bash -c 'ip link set lo up && exec "$@"' netns \
    buildah run --isolation chroot --user root "$ctr" -- bash /tmp/smoke-scenario.sh \
    > >(tee "$out") || rc=$?
sleep 0.2 # let tee finish
passed=$((passed + $(grep -c '^scenario \[[0-9]*s\]: ok - ' "$out")))
((rc == 0)) || fail "scenario failed (exit $rc)"
echo "image-test: done in $(($(date +%s) - t0))s"
echo "image-test: $passed passed, 0 failed"
