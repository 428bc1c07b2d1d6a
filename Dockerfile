# syntax=docker/dockerfile:1
# watcher: upload-scanning sidecar (clamd + `watcher run`) on Debian bookworm.
# ClamAV and Python 3.11 come from Debian, so their security fixes arrive with a rebuild.
#
#   docker build -t watcher .        (here: `make image`, which uses podman)

ARG DEBIAN_IMAGE=debian:bookworm-slim

########################################################################################################
# Build stage: the virtualenv with the package and its dependencies. Nothing of this stage but
# /opt/watcher reaches the final image (no pip cache, no build tools, no sources).
FROM ${DEBIAN_IMAGE} AS build

# Versions are not pinned on purpose: bookworm only ships security fixes, and pinning would make the
# build fail each time a fix supersedes the pinned version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/watcher

WORKDIR /src
# .dockerignore lets only pyproject.toml, README*, LICENSE*, watcher/ and the docker/ configs through.
COPY . /src
# The dependencies' versions are bounded in pyproject.toml, not here.
# Behind a TLS-intercepting proxy, pass its CA bundle as a build secret (never a layer):
#   --secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt   (`make image` does this)
# hadolint ignore=DL3013
RUN --mount=type=secret,id=pip_ca \
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \
    && /opt/watcher/bin/pip install --no-cache-dir /src \
    && /opt/watcher/bin/pip uninstall -y --no-cache-dir pip setuptools \
    && /opt/watcher/bin/python -m compileall -q /opt/watcher/lib \
    && /opt/watcher/bin/watcher --version

########################################################################################################
FROM ${DEBIAN_IMAGE}

# The app container that shares the uploads/processed volumes should run with the same uid
# (the official node image's `node` user is 1000).
ARG WATCHER_UID=1000
ARG WATCHER_GID=1000

# clamav-daemon (clamd) and clamav-freshclam, python3 for the venv, tini as PID 1.
# Debian's clamav packages create the `clamav` user and a freshclam service we never start; their
# default configs are replaced below. Versions unpinned: see the build stage.
# Two users: clamd runs as `clamav` and owns nothing it could change (the definitions, the state and
# the data belong to `watcher`; with FILDES clamd needs no file access at all). `watcher` is in the
# `clamav` group only to reach clamd's socket (mode 0660). /run/clamav is 1777 like /tmp: whichever
# user clamd runs as creates its socket there (a tmpfs under the compose file's read-only root).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates clamav-daemon clamav-freshclam python3 tini \
    && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old \
    && groupadd --gid "${WATCHER_GID}" watcher \
    && useradd --uid "${WATCHER_UID}" --gid watcher --groups clamav --home-dir /var/lib/watcher \
        --no-create-home --shell /usr/sbin/nologin watcher \
    && rm -rf /var/lib/clamav/* /var/log/clamav /run/clamav \
    && mkdir -p /data/uploads /data/processed /data/quarantine /var/lib/watcher /var/lib/clamav \
        /var/log/watcher /usr/local/lib/watcher-image \
    && install -d -m 1777 /run/clamav \
    && chown watcher:watcher /data/uploads /data/processed /data/quarantine /var/lib/watcher \
        /var/lib/clamav /var/log/watcher \
    && chmod 0700 /data/quarantine

COPY --from=build /opt/watcher /opt/watcher
COPY docker/clamav/clamd.conf docker/clamav/freshclam.conf /etc/clamav/
COPY docker/scripts/lib.sh /usr/local/lib/watcher-image/lib.sh
COPY docker/scripts/entrypoint.sh /usr/local/bin/docker-entrypoint
COPY docker/scripts/healthcheck.sh /usr/local/bin/watcher-healthcheck

ENV PATH=/opt/watcher/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    WATCHER_UPLOADS_DIR=/data/uploads \
    WATCHER_PROCESSED_DIR=/data/processed \
    WATCHER_QUARANTINE_DIR=/data/quarantine \
    WATCHER_STATE_DIR=/var/lib/watcher \
    WATCHER_LOG_FORMAT=json \
    WATCHER_HTTP_ADDR=0.0.0.0:9090 \
    CLAMAV_HOST=127.0.0.1 \
    CLAMAV_PORT=3310 \
    VIRUS_SCANNING_ENABLED=true

# 9090: the watcher's HTTP endpoint, reachable on the compose network only (not published). clamd
# listens on its unix socket only: it has no authentication, so nothing outside the container may
# reach it (an external clamd is another service: docker-compose.external-clamd.yml).
EXPOSE 9090

# Numeric, so orchestrators can verify it is not root (Kubernetes runAsNonRoot). Started this way,
# clamd runs as `watcher` too (logged as clamd.same_user). docker-compose.yml starts the container as
# root with only SETUID, SETGID and KILL, so that the entrypoint can run clamd as `clamav` and the
# watcher as `watcher`; neither keeps any capability.
USER ${WATCHER_UID}:${WATCHER_GID}
WORKDIR /var/lib/watcher

# The start period covers the first definitions download (~250 MB) plus clamd loading them.
HEALTHCHECK --interval=30s --timeout=30s --start-period=10m --retries=3 \
    CMD ["/usr/local/bin/watcher-healthcheck"]

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/docker-entrypoint"]
CMD ["run"]
