"""deploy/grafana/ivp.json and deploy/prometheus/alerts.yml: they parse, every query is
valid PromQL, and every metric a query names is one the recomputer or a gateway exports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Series Prometheus itself adds to every scrape target (not exported by ivp).
PROMETHEUS_OWN = {"up"}


def exported() -> set[str]:
    """Every series name the recomputer's and a gateway's registries expose."""
    from ivp.gateway.metrics import GatewayMetrics
    from ivp.recomputer.metrics import Metrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count"), "gauge": ("",), "stateset": ("",),
                "info": ("_info",)}
    names = set()
    for registry in (Metrics().registry, GatewayMetrics().registry):
        for family in registry.collect():
            names.update(family.name + s for s in suffixes[family.type])
    return names


def selectors(node: Any) -> Iterator[str]:
    """The metric names of every vector selector in a parsed PromQL expression."""
    if isinstance(node, promql_parser.VectorSelector):
        if node.name:
            yield node.name
        for m in node.matchers.matchers:
            if m.name == "__name__":
                yield m.value
        return
    if isinstance(node, promql_parser.MatrixSelector):
        yield from selectors(node.vector_selector)
        return
    for attr in ("expr", "lhs", "rhs", "param"):
        child = getattr(node, attr, None)
        if child is not None:
            yield from selectors(child)
    for arg in getattr(node, "args", None) or ():
        yield from selectors(arg)


def check(expr: str, names: set[str]) -> list[str]:
    """Problems with one query ([] = none)."""
    try:
        tree = promql_parser.parse(expr)
    except Exception as exc:  # the parser raises a plain ValueError-like error
        return [f"{expr!r} is not PromQL: {exc}"]
    used = list(selectors(tree))
    if not used:
        return [f"{expr!r} names no metric"]
    return [f"{expr!r} names {n!r}, which no ivp process exports" for n in used
            if n not in names and n not in PROMETHEUS_OWN]


def test_selectors_find_every_metric_of_a_query() -> None:
    tree = promql_parser.parse('histogram_quantile(0.9, sum by (le) (rate(a_bucket[5m]))) / '
                               'on() group_left b{x="1"} or {__name__="c"}')
    assert sorted(selectors(tree)) == ["a_bucket", "b", "c"]
    names = exported()
    assert check("ivp_nonexistent_total > 0", names) == [
        "'ivp_nonexistent_total > 0' names 'ivp_nonexistent_total', which no ivp process "
        "exports"]
    assert check("sum(", names)[0].startswith("'sum(' is not PromQL")
    assert {"ivp_open_alarms", "ivp_verdicts_total", "ivp_gateway_spool_depth",
            "ivp_verify_batch_seconds_bucket", "ivp_gateway_state"} <= names


def test_prometheus_alert_rules() -> None:
    doc = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    names = exported()
    problems = [p for r in rules for p in check(r["expr"], names)]
    assert problems == []
    for r in rules:
        assert r["alert"] and r["labels"]["severity"] in ("critical", "warning"), r
        assert r["annotations"]["summary"] and r["annotations"]["description"], r
    alerts = {r["alert"] for r in rules}
    # what the console's brief asks of them: any alarm, a silent gateway, audit failures,
    # a growing spool
    assert {"IvpOpenAlarm", "IvpGatewaySilent", "IvpAuditFailed", "IvpSpoolGrowing"} <= alerts
    assert len(alerts) == len(rules)


def test_grafana_dashboard() -> None:
    dash = json.loads((ROOT / "deploy" / "grafana" / "ivp.json").read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["schemaVersion"] >= 36
    names = exported()
    exprs = [t["expr"] for p in panels for t in p["targets"]]
    assert len(exprs) >= len(panels)
    assert [p for e in exprs for p in check(e, names)] == []
    used = {n for e in exprs for n in selectors(promql_parser.parse(e))}
    # the recomputer's open-alarm gauge and both sides' core series are on it
    assert {"ivp_open_alarms", "ivp_verdicts_total", "ivp_gateway_spool_depth",
            "ivp_gateway_state"} <= used
    for p in panels:
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]


@pytest.mark.parametrize("path", ["deploy/grafana/ivp.json", "deploy/prometheus/alerts.yml"])
def test_deploy_files_exist(path: str) -> None:
    assert (ROOT / path).stat().st_size > 0
