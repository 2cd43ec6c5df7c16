"""The Grafana dashboard and the alert rules only use metrics the ops server really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mesh.ops.metrics import MeshCollector

DASHBOARDS = Path(__file__).resolve().parents[2] / "ops" / "dashboards"


def exposed(client) -> set[str]:
    registry = CollectorRegistry()
    registry.register(MeshCollector(client))
    text = generate_latest(registry).decode()
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return names


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bmesh_[a-z_]+\b", text))


def test_every_metric_the_dashboard_queries_is_exposed(client):
    dashboard = json.loads((DASHBOARDS / "grafana-mesh.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    missing = referenced(exprs) - exposed(client)
    assert referenced(exprs) and not missing, missing


def test_every_metric_an_alert_rule_uses_is_exposed(client):
    rules = (DASHBOARDS / "prometheus-alerts.yml").read_text()
    exprs = " ".join(re.findall(r"expr: (.+)", rules))
    missing = referenced(exprs) - exposed(client)
    assert referenced(exprs) and not missing, missing
