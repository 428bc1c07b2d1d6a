"""docs/alerting: the Prometheus and Loki rule files are valid and name only what watcher emits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from harness import ROOT
from harness.http_client import get
from watcher.events import CATALOG, alerted
from watcher.service import Service

PROMETHEUS_RULES = ROOT / "docs" / "alerting" / "prometheus-rules.yml"
LOKI_RULES = ROOT / "docs" / "alerting" / "loki-rules.yml"
LOGQL_CHECK = ROOT / "tests" / "logql" / "check.mjs"
Start = Callable[..., Service]


def rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (Debian's prometheus package; `make install`)")
    return tool


@pytest.mark.parametrize("path", [PROMETHEUS_RULES, LOKI_RULES], ids=["prometheus", "loki"])
def test_every_rule_is_an_alert_with_severity_summary_and_is_documented(path: Path) -> None:
    doc = (ROOT / "docs" / "alerting.md").read_text()
    for rule in rules(path):
        assert rule["alert"].startswith("Watcher") and rule["expr"].strip()
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]
        assert f"`{rule['alert']}`" in doc, f"{rule['alert']} is not described in alerting.md"


def test_prometheus_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(PROMETHEUS_RULES)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


# An alert, one series (a value a minute), the minute to evaluate, and the labels the alert
# must then carry beyond instance and severity (None: it must not fire).
LATE = 'watcher_events_total{instance="a",event="file.infected_late",level="ERROR"}'
SCENARIOS = [
    ("WatcherClamdDown", 'watcher_clamd_up{instance="a"}', "1 1 0 0 0 0", 1, None),
    ("WatcherClamdDown", 'watcher_clamd_up{instance="a"}', "1 1 0 0 0 0", 5, {}),
    ("WatcherInfectedFileSeen", 'watcher_files_total{instance="a",verdict="infected"}',
     "0 0 1 1", 3, {"verdict": "infected"}),
    ("WatcherLateDetection", LATE, "0 0 1 1", 3, {"event": "file.infected_late"}),
    ("WatcherOldestPendingTooOld", 'watcher_oldest_pending_seconds{instance="a"}',
     "0 400x8", 7, {}),
    ("WatcherOldestPendingTooOld", 'watcher_oldest_pending_seconds{instance="a"}',
     "0 100x8", 7, None),
    ("WatcherDefinitionsStale", 'watcher_definitions_stale{instance="a"}', "0 1x12", 12, {}),
    ("WatcherDeliveryFailing", 'watcher_delivery_failing{instance="a"}', "0 1x5", 4, {}),
    ("WatcherClamdUntrusted", 'watcher_clamd_trusted{instance="a"}', "1 0x5", 3, {}),
    ("WatcherClamdUntrusted", 'watcher_clamd_trusted{instance="a"}', "1 1x5", 3, None),
    ("WatcherDeliveryFailing", 'watcher_delivery_failing{instance="a"}', "0 1x5", 1, None),
    ("WatcherQuarantineGrowing", 'watcher_quarantine_files{instance="a"}', "0+1x70", 65, {}),
    ("WatcherVerdictStoreDown", 'watcher_verdict_store_up{instance="a"}', "1 0x7", 6, {}),
    ("WatcherVerdictStoreDown", 'watcher_verdict_store_up{instance="a"}', "1 0 0 1 1", 4, None),
    ("WatcherWebhookDeadLetters",
     'watcher_events_total{instance="a",event="webhook.dead",level="ERROR"}', "0 0 1 1", 3,
     {"event": "webhook.dead"}),
    ("WatcherWebhookDeadLetters",
     'watcher_events_total{instance="a",event="webhook.dead",level="ERROR"}', "0 0 0 0", 3, None),
]  # fmt: skip


@pytest.mark.parametrize(("alert", "series", "values", "at", "labels"), SCENARIOS)
def test_prometheus_alert_fires_on_its_series_and_only_then(
    tmp_path: Path, alert: str, series: str, values: str, at: int, labels: dict[str, str] | None
) -> None:
    rule = next(r for r in rules(PROMETHEUS_RULES) if r["alert"] == alert)
    expected = []
    if labels is not None:
        annotations = {
            k: v.replace("{{ $labels.instance }}", "a") for k, v in rule["annotations"].items()
        }
        expected.append(
            {
                "exp_labels": {"instance": "a", **rule["labels"], **labels},
                "exp_annotations": annotations,
            }
        )
    test = {
        "rule_files": [str(PROMETHEUS_RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": series, "values": values}],
                "alert_rule_test": [
                    {"eval_time": f"{at}m", "alertname": alert, "exp_alerts": expected}
                ],
            }
        ],
    }
    test_file = tmp_path / "test.yml"
    test_file.write_text(yaml.safe_dump(test))
    result = subprocess.run(
        [promtool(), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_rules_name_is_exported_by_metrics(start_daemon: Start) -> None:
    body = get(start_daemon(), "/metrics").body.decode()
    exported: set[str] = set()
    for family in text_string_to_metric_families(body):
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ("",))
        exported.update(family.name + suffix for suffix in suffixes)
    named = {
        name
        for rule in rules(PROMETHEUS_RULES)
        for name in re.findall(r"\bwatcher_[a-z_]+\b", rule["expr"])
    }
    assert named and named <= exported, sorted(named - exported)


def test_loki_rules_parse_with_grafanas_logql_grammar() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed")
    if not (LOGQL_CHECK.parent / "node_modules").is_dir():
        pytest.fail("tests/logql/node_modules missing: run `make install`")
    exprs = [rule["expr"] for rule in rules(LOKI_RULES)]
    result = subprocess.run(
        [node, str(LOGQL_CHECK)], input=json.dumps(exprs), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    parsed = json.loads(result.stdout)
    assert [p["error"] for p in parsed] == [None] * len(exprs), parsed
    assert all(p["top"] == "Expr" for p in parsed)


def named_events(path: Path) -> set[str]:
    """Events a rule file names (Loki: `| event="x"`; Prometheus: `event="x"` labels)."""
    named = set()
    for rule in rules(path):
        # Loki: `| event="x"` after `json event="event"`; Prometheus: `{..., event="x"}`.
        for match in re.findall(r'[|{,]\s*event=~?"([^"]+)"', rule["expr"]):
            named.update(match.split("|"))
    return named


def test_loki_rules_name_only_events_watcher_logs() -> None:
    named = named_events(LOKI_RULES)
    assert named, "no event filters found"
    assert named <= set(CATALOG), sorted(named - set(CATALOG))


def test_every_event_the_catalog_calls_alerted_is_alerted_on() -> None:
    """The catalog's `alerted` flag (metrics start those series at 0) matches the rules."""
    named = named_events(LOKI_RULES) | named_events(PROMETHEUS_RULES)
    flagged = {name for name, _ in alerted()}
    assert flagged <= named, sorted(flagged - named)
