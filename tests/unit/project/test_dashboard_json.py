"""The Grafana dashboard (grafana/dashboards/ferryman.json) is well-formed: it parses, every panel has a title and
queries, every `$variable` is declared, panel ids are unique and every query goes to the `prometheus` datasource.

Whether the queries return data against real Ferryman metrics is tests/integration/test_dashboard.py's job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
GRAFANA = REPO / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ferryman.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
BUILTINS = {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
# $name, ${name}, ${name:format} and the deprecated [[name]].
VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]")


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    return str(query or variable.get("definition") or "")


def _used_variables(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in VARIABLE.finditer(text)}


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{path}.{key}", value
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return _dashboard()


def test_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "ferryman"
    assert dashboard["title"] == "Ferryman"
    assert dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None, "an exported id would clash on import; Grafana assigns one"


def test_every_panel_has_a_title_and_queries(dashboard: dict[str, Any]) -> None:
    problems = []
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            if not panel.get("title"):
                problems.append(f"row {panel.get('id')} has no title")
            continue
        title = panel.get("title") or ""
        if not title.strip():
            problems.append(f"panel {panel.get('id')} has no title")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{title!r} has no targets")
        for target in targets:
            if not str(target.get("expr", "")).strip():
                problems.append(f"{title!r} target {target.get('refId')} has no expr")
        ref_ids = [t.get("refId") for t in targets]
        if len(ref_ids) != len(set(ref_ids)):
            problems.append(f"{title!r} repeats a refId: {ref_ids}")
    assert not problems, "\n".join(problems)


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids: list[int] = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert all(isinstance(i, int) for i in ids), ids
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    assert not duplicates, f"duplicate panel ids: {duplicates}"


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard["panels"]:  # the top level; a collapsed row's panels are laid out when it opens
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, f"{panel['title']!r} is wider than the grid: {pos}"
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r} at {(x, y)}"
                cells[(x, y)] = panel["title"]


def test_every_variable_used_is_declared(dashboard: dict[str, Any]) -> None:
    declared = {v["name"] for v in dashboard["templating"]["list"]}
    texts = [(p["title"], t["expr"]) for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    texts += [(f"variable {v['name']}", _variable_query(v)) for v in dashboard["templating"]["list"]]
    undeclared = [
        f"{where}: ${name} in {text}"
        for where, text in texts for name in sorted(_used_variables(text)) if name not in declared | BUILTINS
    ]
    assert not undeclared, "\n".join(undeclared)
    used = set().union(*(_used_variables(text) for _, text in texts))
    assert declared <= used, f"declared but never used: {declared - used}"


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"service", "instance"}
    assert _variable_query(variables["service"]) == "label_values(ferryman_requests_total, service)"
    assert _variable_query(variables["instance"]) == (
        'label_values(ferryman_upstream_up{service=~"$service"}, exported_instance)'
    )
    for variable in variables.values():
        assert variable["type"] == "query"
        assert variable["multi"] is True and variable["includeAll"] is True
        assert variable["allValue"] == ".*"
        assert variable["datasource"] == DATASOURCE
        assert variable.get("definition") == _variable_query(variable)


SERVICE_LABELLED = ("requests_total", "request_duration_seconds", "upstream_duration_seconds",
                    "request_bytes_total", "response_bytes_total", "requests_in_flight", "upstream_instances",
                    "upstream_up", "upstream_ejections_total", "upstream_retries_total", "tcp_connections",
                    "tcp_connections_total", "tcp_bytes_total", "tcp_connect_duration_seconds")
SELECTOR = re.compile(r"\b(ferryman_\w+?)(?:_bucket|_sum|_count)?\b(\{[^}]*\})?")


def test_panels_filter_by_the_service_variable(dashboard: dict[str, Any]) -> None:
    """Every selector of a metric with a service label honours $service."""
    unfiltered = []
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            for match in SELECTOR.finditer(target["expr"]):
                name, selector = match.group(1), match.group(2) or ""
                if name.removeprefix("ferryman_") in SERVICE_LABELLED and 'service=~"$service"' not in selector:
                    unfiltered.append(f"{panel['title']!r}: {match.group(0)}")
    assert not unfiltered, "\n".join(unfiltered)


def test_upstream_up_uses_exported_instance(dashboard: dict[str, Any]) -> None:
    """Prometheus (honor_labels: false) stores ferryman_upstream_up's own `instance` label as `exported_instance`."""
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])
             if "ferryman_upstream_up" in t["expr"]]
    assert exprs, "no panel shows ferryman_upstream_up"
    for expr in exprs:
        assert 'exported_instance=~"$instance"' in expr, expr
        # The only other `instance` allowed is the variable: the target's label says nothing about the upstream.
        assert not re.search(r"(?<![\w$])instance\b", expr), expr


def test_every_datasource_is_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    assert "${DS_" not in DASHBOARD.read_text(), "use the provisioned uid, not an import input"
    assert "__inputs" not in dashboard
    wrong = []
    for path, value in _walk(dashboard):
        if not path.endswith(".datasource"):
            continue
        if path.startswith(".annotations") and value == {"type": "grafana", "uid": "-- Grafana --"}:
            continue  # Grafana's built-in annotations
        if value != DATASOURCE:
            wrong.append(f"{path}: {value!r}")
    assert not wrong, "\n".join(wrong)
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel.get("datasource") == DATASOURCE, panel["title"]
            assert all(t.get("datasource") == DATASOURCE for t in panel["targets"]), panel["title"]


def test_provisioning_files_agree_with_the_dashboard() -> None:
    datasource = (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    for line in ("uid: prometheus", "type: prometheus", "url: http://prometheus:9090", "access: proxy",
                 "isDefault: true", "name: Prometheus"):
        assert re.search(rf"^\s*-?\s*{re.escape(line)}\s*$", datasource, re.M), line
    provider = (GRAFANA / "provisioning" / "dashboards" / "ferryman.yml").read_text()
    assert re.search(r"^\s*path: /var/lib/grafana/dashboards\s*$", provider, re.M)
    assert re.search(r"^\s*folder: Ferryman\s*$", provider, re.M)
