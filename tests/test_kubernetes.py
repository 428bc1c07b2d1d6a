"""The Kubernetes manifests (deploy/kubernetes) render, validate, and say only what the daemon
understands: `kubectl kustomize` builds each overlay, every object validates against the
Kubernetes schemas (kubernetes-validate, offline), every container is hardened, and every env
name, port, probe path and metric name is one the daemon (or the image, or the example app)
accepts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from watcher.settings import Settings, _env_name

ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZE = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("sidecar", "scanner-tier")
# The oldest Kubernetes the manifests are for (policy/v1, autoscaling/v2 are GA since 1.23;
# kubernetes-validate ships schemas from 1.25) and the newest it knows.
VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
WATCHER_IMAGE = "watcher"
DAEMON_PATHS = {"/healthz", "/readyz", "/metrics"}  # watcher/ops/api.py answers these
GiB = 1024**3


@cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    assert shutil.which("kubectl"), "kubectl is missing: `make test-deps` installs it"
    built = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZE / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return tuple(doc for doc in yaml.safe_load_all(built.stdout) if doc)


def pod_specs(objects: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield obj["metadata"]["name"], obj["spec"]["template"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    spec = template["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def image_name(container: dict[str, Any]) -> str:
    return str(container["image"]).rsplit("/", 1)[-1].split(":")[0].split("@")[0]


def named(objects: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_renders_and_every_object_validates_against_the_schemas(
    overlay: str,
) -> None:
    objects = render(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ConfigMap", "ServiceAccount"} <= kinds
    if overlay == "scanner-tier":
        assert {
            "Service",
            "PodDisruptionBudget",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PersistentVolumeClaim",
        } <= kinds
    for version in VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_catches_a_wrong_field() -> None:
    """What makes the test above able to fail: an unknown field is refused in strict mode."""
    (deployment, *_) = [o for o in render("sidecar") if o["kind"] == "Deployment"]
    broken = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_with_a_read_only_root_and_no_capability(
    overlay: str,
) -> None:
    for name, template in pod_specs(render(overlay)):
        pod = template["spec"]
        assert pod.get("automountServiceAccountToken") is False, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in containers(template):
            where = f"{name}/{c['name']}"
            sc = c.get("securityContext", {})
            non_root = sc.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot"))
            uid = sc.get("runAsUser", pod["securityContext"].get("runAsUser"))
            assert non_root is True and uid not in (None, 0), where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("capabilities") == {"drop": ["ALL"]}, where
            assert "memory" in c.get("resources", {}).get("limits", {}), where


def settings_names() -> set[str]:
    return {_env_name(field) for field in Settings.model_fields}


def image_knobs() -> set[str]:
    """The container image's own variables, as docker/scripts/entrypoint.sh documents them."""
    header = (ROOT / "docker" / "scripts" / "entrypoint.sh").read_text().split("set -euo")[0]
    return set(re.findall(r"^#\s+([A-Z][A-Z0-9_]+)=", header, re.MULTILINE))


def app_env_names() -> set[str]:
    server = (ROOT / "examples" / "node-app" / "server.js").read_text()
    return set(re.findall(r"process\.env\.([A-Z0-9_]+)", server))


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def runs_the_daemon(container: dict[str, Any]) -> bool:
    return image_name(container) == WATCHER_IMAGE and container.get("args") == ["watcher", "run"]


def daemon_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings `watcher run` would build from exactly this environment."""
    with monkeypatch.context() as m:
        for key in list(os.environ):
            if key.startswith(("WATCHER_", "CLAMAV_")) or key == "VIRUS_SCANNING_ENABLED":
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        return Settings()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_env_name_port_and_path_is_one_the_daemon_accepts(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    accepted = settings_names() | image_knobs()
    daemons = 0
    for name, template in pod_specs(render(overlay)):
        annotations = template["metadata"].get("annotations", {})
        for c in containers(template):
            where = f"{name}/{c['name']}"
            env = env_of(c)
            if image_name(c) != WATCHER_IMAGE:
                assert set(env) <= app_env_names(), where  # the example app's own names
                continue
            assert set(env) <= accepted, f"{where}: {set(env) - accepted}"
            if not runs_the_daemon(c):
                continue
            daemons += 1
            try:
                settings = daemon_settings(env, monkeypatch)
            except ValidationError as err:
                pytest.fail(f"{where}: the daemon refuses its environment: {err}")
            assert settings.http_bind is not None
            http_port = settings.http_bind[1]
            ports = {p["name"]: p["containerPort"] for p in c["ports"]}
            assert ports == {"http": http_port}, where
            for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
                probe = c[kind]["httpGet"]
                assert probe["path"] in DAEMON_PATHS - {"/metrics"}, where
                assert probe["port"] in ("http", http_port), where
            assert c["readinessProbe"]["httpGet"]["path"] == "/readyz", where
            assert annotations["prometheus.io/port"] == str(http_port), where
            assert annotations["prometheus.io/path"] in DAEMON_PATHS, where
    assert daemons == 1


def test_the_api_answers_the_paths_the_manifests_probe() -> None:
    routes = (ROOT / "watcher" / "ops" / "api.py").read_text()
    for path in DAEMON_PATHS:
        assert f'path == b"{path}"' in routes


def test_the_autoscaler_reads_metrics_the_daemon_exports() -> None:
    exported = (ROOT / "watcher" / "ops" / "metrics.py").read_text()
    hpa = named(render("scanner-tier"), "HorizontalPodAutoscaler")["clamd"]
    names = [m["external"]["metric"]["name"] for m in hpa["spec"]["metrics"]]
    assert names == ["watcher_oldest_pending_seconds", "watcher_queue_depth"]
    rules = yaml.safe_load(
        (KUSTOMIZE / "overlays" / "scanner-tier" / "prometheus-adapter-rules.yaml").read_text()
    )
    adapted = [r["name"]["as"] for r in rules["rules"]["external"]]
    assert sorted(adapted) == sorted(names)
    for name in names:
        assert f'"{name}"' in exported


def clamd_conf(text: str) -> dict[str, str]:
    pairs = (line.split(None, 1) for line in text.splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2 and not p[0].startswith("#")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clamd_keeps_the_images_limits_and_alerts(overlay: str) -> None:
    """Every clamd.conf in the manifests is docker/clamav/clamd.conf but for its socket."""
    image = clamd_conf((ROOT / "docker" / "clamav" / "clamd.conf").read_text())
    sockets = {"LocalSocket", "LocalSocketMode", "FixStaleSocket", "TCPSocket", "TCPAddr"}
    confs = [cm["data"]["clamd.conf"] for cm in named(render(overlay), "ConfigMap").values()]
    assert confs
    for text in confs:
        conf = clamd_conf(text)
        for key in set(image) - sockets:
            assert conf.get(key) == image[key], key
        assert conf["AlertExceedsMax"] == "yes"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_clamd_memory_covers_a_reload_of_the_official_definitions(overlay: str) -> None:
    """~1.2 GB with the official definitions, twice that while a reload builds a new engine."""
    found = 0
    for _, template in pod_specs(render(overlay)):
        for c in template["spec"]["containers"]:
            if c.get("args", [""])[0] != "clamd":
                continue
            found += 1
            resources = c["resources"]
            assert memory_bytes(resources["requests"]["memory"]) >= 1.2e9
            assert memory_bytes(resources["limits"]["memory"]) >= 2 * 1.2e9
    assert found == 1


def memory_bytes(text: str) -> float:
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": GiB, "K": 1e3, "M": 1e6, "G": 1e9}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMG]i?)?", text)
    assert match, text
    return float(match.group(1)) * units.get(match.group(2) or "", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_reference_between_objects_resolves(overlay: str) -> None:
    objects = render(overlay)
    config_maps, claims = named(objects, "ConfigMap"), named(objects, "PersistentVolumeClaim")
    accounts = named(objects, "ServiceAccount")
    templates = dict(pod_specs(objects))
    for name, template in templates.items():
        spec = template["spec"]
        assert spec.get("serviceAccountName", "default") in {*accounts, "default"}, name
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for v in volumes.values():
            assert set(v) & {"emptyDir", "configMap", "persistentVolumeClaim"}, v
            assert len(set(v) - {"name"}) == 1, v  # one source, not a patch's leftover
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, v
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, v
        for c in containers(template):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}/{c['name']}: {mount}"

    def selects(selector: dict[str, str]) -> list[str]:
        return [
            n
            for n, t in templates.items()
            if selector.items() <= t["metadata"].get("labels", {}).items()
        ]

    for service in named(objects, "Service").values():
        (target,) = selects(service["spec"]["selector"])
        port_names = {p["name"] for c in containers(templates[target]) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, service["metadata"]["name"]
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for obj in named(objects, kind).values():
            key = "selector" if kind == "PodDisruptionBudget" else "podSelector"
            assert len(selects(obj["spec"][key]["matchLabels"])) == 1, obj["metadata"]["name"]
    deployments = named(objects, "Deployment")
    for hpa in named(objects, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in deployments


def test_the_scanner_tier_scans_over_tcp_with_the_pool_and_polls_the_shared_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    objects = render("scanner-tier")
    watcher = named(objects, "Deployment")["watcher"]
    (daemon,) = [c for c in containers(watcher["spec"]["template"]) if runs_the_daemon(c)]
    settings = daemon_settings(env_of(daemon), monkeypatch)
    assert settings.clamav_socket is None and settings.observer == "polling"
    headless = named(objects, "Service")[settings.clamav_host]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["ports"][0]["port"] == settings.clamav_port
    names = [c["name"] for c in containers(watcher["spec"]["template"])]
    assert names == ["watcher"]  # no clamd of its own
    claim = named(objects, "PersistentVolumeClaim")["watcher-data"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
