#!/bin/bash
# Build a stand-in for debian:bookworm-slim from Debian's own packages and import it into podman's
# local storage. Used by `make image` only when the base image is missing: on machines that cannot
# pull from a registry (no Docker Hub), this is how a fresh machine gets the base.
#
# The result mirrors the official slim image where it matters to the Dockerfile: minbase package set,
# the same apt sources (bookworm, bookworm-updates, bookworm-security, deb822 format), dpkg excludes
# for docs/man/locales, and apt's docker-clean hooks.
set -euo pipefail

tag=${1:-debian:bookworm-slim}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
podman=${PODMAN:-podman}

rootfs=$(mktemp -d /tmp/watcher-base.XXXXXX)
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT

echo "bootstrap-base: debootstrap --variant=minbase $suite into $rootfs (about a minute)" >&2
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"

# apt sources as in the official image (deb822), including updates and security.
rm -f "$rootfs/etc/apt/sources.list"
cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: $suite $suite-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security_mirror
Suites: $suite-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES

# The slim image's dpkg excludes and apt cleanup hooks (what makes it "slim").
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
DPKG
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
printf 'Acquire::Languages "none";\n' >"$rootfs/etc/apt/apt.conf.d/docker-no-languages"
printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"

# debootstrap installs the point release; the official image also carries the updates and
# security fixes published since. (The host's resolv.conf is still in place for this.)
echo "bootstrap-base: apt-get upgrade from $suite-updates and $suite-security" >&2
chroot "$rootfs" /bin/sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y -qq' \
    >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    exit 1
}
rm -f "$rootfs.log"

find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*/ \
    "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
# The host's resolver and hostname must not leak into the image.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

echo "bootstrap-base: importing as $tag" >&2
tar --numeric-owner -C "$rootfs" -c . |
    "$podman" import --change 'CMD ["bash"]' --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$tag" >/dev/null
"$podman" image inspect --format 'bootstrap-base: {{.Id}} {{.Size}} bytes' "$tag" >&2
