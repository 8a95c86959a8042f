"""The Grafana dashboard and its provisioning, checked offline with real tools.

- Grafana's own types: the dashboard JSON Schema and each panel plugin's
  options are generated from `@grafana/schema` (tests/tools) with
  ts-json-schema-generator, then enforced with `jsonschema`.
- Every PromQL expression goes through promtool's parser.
- Every metric and label an expression names is one the workers export (the
  registry `recon_stream.app.build_worker` assembles: ours plus FastStream's
  Kafka middleware); the alert rules are held to the same list.
- The layout is sound and every data source reference resolves, to the
  provisioned data source or to the dashboard's `datasource` variable.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider

from recon_stream.app import ROLES, build_worker
from recon_stream.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "recon-stream.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "recon-stream.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
COMPOSE = ROOT / "docker-compose.yml"
NODE_MODULES = ROOT / "tests" / "tools" / "node_modules"
GENERATOR = NODE_MODULES / "ts-json-schema-generator" / "bin" / "ts-json-schema-generator.js"
GRAFANA_TYPES = NODE_MODULES / "@grafana" / "schema" / "dist" / "types" / "raw"

# The prefix recon_stream.app gives FastStream's Kafka Prometheus middleware.
FASTSTREAM_PREFIX = "recon_faststream"
# Series Prometheus itself adds: per-target `up`, and the rule evaluator's ALERTS.
PROMETHEUS_SERIES = {"up": {"job", "instance"}, "ALERTS": {"alertname", "alertstate", "severity"}}
# Labels the scrape adds to every series (compose: static labels; Helm: relabelings,
# and the Prometheus Operator's `namespace` on every target of a ServiceMonitor).
TARGET_LABELS = {"job", "instance", "role", "namespace"}
# Grafana's built-in variables, substituted with values promtool accepts.
GRAFANA_GLOBALS = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "6h",
}
# The dashboard's own variables, substituted the same way.
VARIABLE_VALUES = {"datasource": "prometheus", "namespace": ".*", "job": ".+"}

# Units Grafana knows (packages/grafana-data/src/valueFormats/categories.ts)
# that this dashboard uses, and Grafana's custom-unit prefixes.
KNOWN_UNITS = {"none", "short", "percentunit", "s", "reqps", "cps", "ops", "wps"}
CUSTOM_UNIT_PREFIXES = ("count:", "suffix:", "prefix:", "si:")

# The panel plugins the dashboard may use, with the @grafana/schema types of
# their options and field config (None: the plugin has no custom field config).
PANEL_TYPES: dict[str, tuple[str, str | None]] = {
    "timeseries": ("TimeseriesOptions", "TimeseriesFieldConfig"),
    "stat": ("StatOptions", None),
    "gauge": ("GaugeOptions", None),
}

# One definition name per type: the generator names definitions after the
# type, and every panel's `Options` would otherwise collide.
SCHEMA_ENTRY_POINTS = """\
import type {{ Dashboard }} from "{raw}/dashboard/x/types.gen";
import type * as timeseries from "{raw}/composable/timeseries/panelcfg/x/types.gen";
import type * as stat from "{raw}/composable/stat/panelcfg/x/types.gen";
import type * as gauge from "{raw}/composable/gauge/panelcfg/x/types.gen";
export interface GrafanaDashboard extends Dashboard {{}}
export interface TimeseriesOptions extends timeseries.Options {{}}
export interface TimeseriesFieldConfig extends timeseries.FieldConfig {{}}
export interface StatOptions extends stat.Options {{}}
export interface GaugeOptions extends gauge.Options {{}}
"""


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `python3 tasks.py test` installs it")
    return path


@pytest.fixture(scope="session")
def grafana_schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """JSON Schema definitions generated from @grafana/schema's TypeScript types."""
    if not GENERATOR.exists() or not GRAFANA_TYPES.exists():
        pytest.fail("tests/tools/node_modules is missing; `python3 tasks.py test` runs npm ci")
    work = tmp_path_factory.mktemp("grafana-schema")
    entry = work / "schemas.ts"
    entry.write_text(SCHEMA_ENTRY_POINTS.format(raw=GRAFANA_TYPES.as_posix()))
    out = work / "schemas.json"
    result = subprocess.run(
        [tool("node"), GENERATOR, "--path", entry, "--type", "*", "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    schema: dict[str, Any] = json.loads(out.read_text())
    return schema


def validator(schema: dict[str, Any], definition: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator({**schema, "$ref": f"#/definitions/{definition}"})


def schema_errors(schema: dict[str, Any], definition: str, instance: Any) -> list[str]:
    errors = validator(schema, definition).iter_errors(instance)
    return [f"{'/'.join(map(str, e.absolute_path)) or '.'}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, and the panels inside collapsed rows."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in all_panels(dashboard) if p["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every query target."""
    return [
        (f"panel {p['id']} ({p['title']}) target {t['refId']}", t["expr"])
        for p in data_panels(dashboard)
        for t in p.get("targets", [])
    ]


def alert_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def substitute(expr: str) -> str:
    """The expression as Grafana sends it, with our variables' default values."""
    values = {**GRAFANA_GLOBALS, **VARIABLE_VALUES}

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"unknown variable ${name} in {expr!r}")
        return values[name]

    return VARIABLE.sub(value, expr)


# --- the metrics the workers export --------------------------------------------


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Exposed series name → label names, for every metric a worker can export:
    the registry of a worker running every role, built by the composition root
    (our `Metrics` and FastStream's Kafka middleware, `recon_faststream_*`)."""
    worker = build_worker(Settings(), ROLES, tracer_provider=TracerProvider())
    try:
        registry = worker.metrics.registry
        # prometheus_client keeps each collector's name, type and label names in
        # private attributes; its public API shows labels only once a child exists.
        collectors = set(registry._names_to_collectors.values())
    finally:
        asyncio.run(worker.mongo_client.close())
    series: dict[str, set[str]] = {}
    for collector in collectors:
        name, kind = collector._name, collector._type
        labels = set(collector._labelnames)
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "gauge":
            series[name] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        elif kind == "summary":
            series[name] = labels | {"quantile"}
            series[f"{name}_sum"] = labels
            series[f"{name}_count"] = labels
        else:
            raise AssertionError(f"{name}: metric type {kind} not handled here")
    assert any(name.startswith(FASTSTREAM_PREFIX) for name in series)
    return series


STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
METRIC_NAME = re.compile(r"\b(recon_[a-zA-Z0-9_]+)\b")


def metrics_in(expr: str) -> set[str]:
    """The series an expression selects: every recon_* name, every name before
    a `{` selector, and Prometheus' own series (string literals ignored)."""
    code = STRING.sub('""', expr)
    named = set(METRIC_NAME.findall(code))
    named |= {name for name, _ in SELECTOR.findall(code)}
    named |= {name for name in PROMETHEUS_SERIES if re.search(rf"\b{name}\b", code)}
    return named


def label_problems(expr: str, known: dict[str, set[str]]) -> list[str]:
    """Matchers and grouping labels that no series of the expression carries."""
    code = STRING.sub('""', expr)
    used = metrics_in(expr)
    problems = []
    for name, body in SELECTOR.findall(code):
        labels = known.get(name, set()) | TARGET_LABELS
        problems += [f"{name}{{{label}}}" for label in MATCHER.findall(body) if label not in labels]
    available = set().union(*(known.get(m, set()) for m in used)) | TARGET_LABELS
    for group in GROUPING.findall(code):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in available:
                problems.append(f"grouping label {label!r}")
    return problems


# --- the tests -----------------------------------------------------------------


def test_dashboard_matches_grafanas_dashboard_schema(
    dashboard: dict[str, Any], grafana_schema: dict[str, Any]
) -> None:
    assert schema_errors(grafana_schema, "GrafanaDashboard", dashboard) == []


def test_panel_options_match_their_plugins_schema(
    dashboard: dict[str, Any], grafana_schema: dict[str, Any]
) -> None:
    problems = []
    for panel in data_panels(dashboard):
        where = f"panel {panel['id']} ({panel['title']})"
        if panel["type"] not in PANEL_TYPES:
            problems.append(f"{where}: panel type {panel['type']!r} is not one we validate")
            continue
        options, field_config = PANEL_TYPES[panel["type"]]
        problems += [
            f"{where} options/{e}" for e in schema_errors(grafana_schema, options, panel["options"])
        ]
        custom = panel["fieldConfig"]["defaults"].get("custom")
        if field_config is None:
            if custom:
                problems.append(f"{where}: {panel['type']} panels have no custom field config")
            continue
        problems += [
            f"{where} fieldConfig.defaults.custom/{e}"
            for e in schema_errors(grafana_schema, field_config, custom or {})
        ]
        # Overrides set single custom properties, e.g. `custom.axisPlacement`.
        for override in panel["fieldConfig"]["overrides"]:
            for prop in override["properties"]:
                if prop["id"].startswith("custom.") and "value" in prop:
                    key = prop["id"].removeprefix("custom.")
                    found = schema_errors(grafana_schema, field_config, {key: prop["value"]})
                    problems += [f"{where} override {prop['id']}: {e}" for e in found]
    assert problems == []


def test_panel_units_are_grafana_units(dashboard: dict[str, Any]) -> None:
    units = []
    for panel in data_panels(dashboard):
        units.append((panel["id"], panel["fieldConfig"]["defaults"].get("unit", "none")))
        for override in panel["fieldConfig"]["overrides"]:
            units += [
                (panel["id"], p["value"]) for p in override["properties"] if p["id"] == "unit"
            ]
    unknown = [
        (panel, unit)
        for panel, unit in units
        if unit not in KNOWN_UNITS and not unit.startswith(CUSTOM_UNIT_PREFIXES)
    ]
    assert unknown == []


def test_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    placed = []
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["w"] > 0, panel["title"]
        assert pos["h"] > 0, panel["title"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["y"] >= 0, panel["title"]
        if panel["type"] == "row":
            assert (pos["x"], pos["w"], pos["h"]) == (0, 24, 1), panel["title"]
        placed.append((panel["title"], pos))
    overlaps = [
        (a, b)
        for i, (a, pa) in enumerate(placed)
        for b, pb in placed[i + 1 :]
        if pa["x"] < pb["x"] + pb["w"]
        and pb["x"] < pa["x"] + pa["w"]
        and pa["y"] < pb["y"] + pb["h"]
        and pb["y"] < pa["y"] + pa["h"]
    ]
    assert overlaps == []


def test_rows_group_the_panels_below_them(dashboard: dict[str, Any]) -> None:
    """Grafana assigns a panel to the row above it: rows come in order and
    every panel lies between its row and the next."""
    rows = [p for p in dashboard["panels"] if p["type"] == "row"]
    assert rows, "the dashboard has no rows"
    assert dashboard["panels"][0]["type"] == "row"
    tops = [row["gridPos"]["y"] for row in rows] + [float("inf")]
    assert tops[:-1] == sorted(tops[:-1])
    current = -1
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            current += 1
            continue
        assert tops[current] < panel["gridPos"]["y"], panel["title"]
        assert panel["gridPos"]["y"] + panel["gridPos"]["h"] <= tops[current + 1], panel["title"]
    assert all(not row["collapsed"] or row["panels"] for row in rows)


def test_every_data_source_reference_resolves(dashboard: dict[str, Any]) -> None:
    provisioned = {
        ds["uid"]: ds["type"] for ds in yaml.safe_load(DATASOURCES.read_text())["datasources"]
    }
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}

    def resolves(ref: dict[str, str]) -> bool:
        uid = ref.get("uid", "")
        match = re.fullmatch(r"\$\{(\w+)\}|\$(\w+)", uid)
        if match:
            variable = variables.get(match.group(1) or match.group(2))
            return (
                variable is not None
                and variable["type"] == "datasource"
                and variable["query"] == ref.get("type")
            )
        return provisioned.get(uid) == ref.get("type")

    references = [
        ("variable " + v["name"], v["datasource"]) for v in variables.values() if "datasource" in v
    ]
    for panel in data_panels(dashboard):
        references.append((f"panel {panel['id']}", panel["datasource"]))
        references += [
            (f"panel {panel['id']} {t['refId']}", t["datasource"]) for t in panel["targets"]
        ]
    unresolved = [(where, ref) for where, ref in references if not resolves(ref)]
    assert unresolved == []
    assert all(ref["type"] == "prometheus" for _, ref in references)
    # The variable defaults to the data source provisioned with the dashboard.
    assert variables["datasource"]["current"]["value"] in provisioned


def test_every_panel_queries_something(dashboard: dict[str, Any]) -> None:
    for panel in data_panels(dashboard):
        targets = panel.get("targets", [])
        assert targets, panel["title"]
        ref_ids = [t["refId"] for t in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in targets), panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"


def test_every_expression_parses_with_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    found = expressions(dashboard)
    assert found
    # promtool parses expressions in rule files: one recording rule each,
    # named after where the expression came from.
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": substitute(expr)}
        for i, (_, expr) in enumerate(found)
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool("promtool"), "check", "rules", path],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    legend = "\n".join(f"dashboard:panel_{i} = {where}" for i, (where, _) in enumerate(found))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{legend}"


def test_dashboard_and_alerts_use_only_exported_metrics_and_labels(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    known = exported | PROMETHEUS_SERIES
    problems = []
    for where, expr in expressions(dashboard) + alert_expressions():
        problems += [f"{where}: no such series {name}" for name in metrics_in(expr) - known.keys()]
        problems += [f"{where}: {p}" for p in label_problems(expr, known)]
    # Query variables: label_values(<series>, <label>).
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((\w+)(\{[^}]*\})?,\s*(\w+)\)", text)
        assert match, f"variable {variable['name']}: unexpected query {text!r}"
        series, selector, label = match.groups()
        if selector:
            problems += [
                f"variable {variable['name']}: {p}"
                for p in label_problems(series + selector, known)
            ]
        if series not in known or label not in known[series] | TARGET_LABELS:
            problems.append(f"variable {variable['name']}: no {series}{{{label}}}")
    assert problems == []


def test_dashboard_shows_every_domain_metric(
    dashboard: dict[str, Any], exported: dict[str, set[str]]
) -> None:
    """A metric nobody can see is one nobody will look at."""
    used = set().union(*(metrics_in(expr) for _, expr in expressions(dashboard)))
    families = {
        name.removesuffix("_total").removesuffix("_bucket")
        for name in exported
        if not name.startswith(FASTSTREAM_PREFIX)
    }
    shown = {name.removesuffix("_total").removesuffix("_bucket") for name in used}
    missing = {f for f in families if f not in shown and not f.endswith(("_sum", "_count"))}
    assert missing == set()


def test_the_metric_checks_would_catch_a_typo(exported: dict[str, set[str]]) -> None:
    """The regex-based checks above really look at names and labels."""
    known = exported
    assert metrics_in('sum(rate(recon_heartbeat_total{outcome="recon_x"}[5m]))') == {
        "recon_heartbeat_total"
    }
    assert "recon_heartbeat_total" not in known
    assert label_problems("sum by (outcomes) (rate(recon_heartbeats_total[5m]))", known)
    assert label_problems('rate(recon_heartbeats_total{outcom="ok"}[5m])', known)
    assert metrics_in('count(upp{job="recon-stream"})') == {"upp"}
    assert not label_problems(
        'sum by (le, provider) (rate(recon_shodan_request_duration_seconds_bucket{job="x"}[5m]))',
        known,
    )


def test_datasource_provisioning(dashboard: dict[str, Any]) -> None:
    provisioning = yaml.safe_load(DATASOURCES.read_text())
    assert provisioning["apiVersion"] == 1
    (prometheus,) = provisioning["datasources"]
    assert prometheus["type"] == "prometheus"
    assert prometheus["uid"] == "prometheus"
    assert prometheus["access"] == "proxy"
    assert prometheus["isDefault"] is True
    # The compose service Prometheus runs as, on its default port.
    compose = yaml.safe_load(COMPOSE.read_text())
    assert prometheus["url"] == "http://prometheus:9090"
    assert "prometheus" in compose["services"]
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["jsonData"]["timeInterval"] == scrape["global"]["scrape_interval"]


def test_dashboard_provider_reads_the_folder_compose_mounts_the_dashboard_into() -> None:
    provisioning = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    folder = provider["options"]["path"]

    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[source.removeprefix("./")] = target
    dashboard_target = mounts["deploy/grafana/recon-stream.json"]
    assert str(Path(dashboard_target).parent) == folder
    assert mounts["deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    # Grafana reads provisioning/<kind>/*.yml under that mount.
    assert DASHBOARD_PROVIDERS.parent.name == "dashboards"
    assert DATASOURCES.parent.name == "datasources"


def test_every_query_keeps_to_the_chosen_namespace_and_job(dashboard: dict[str, Any]) -> None:
    """One Grafana, many releases: every series a panel reads is filtered by the
    Namespace and Job variables (ALERTS by namespace: it carries the alert's labels)."""
    variables = [v["name"] for v in dashboard["templating"]["list"]]
    assert variables.index("namespace") < variables.index("job")
    unfiltered = []
    for where, expr in expressions(dashboard):
        for selector in re.findall(r"\b(?:recon_\w+|up|ALERTS)\{[^}]*\}|\brecon_\w+\b(?!\{)", expr):
            if (
                "{" not in selector
                or 'namespace=~"$namespace"' not in selector
                or (not selector.startswith("ALERTS") and 'job=~"$job"' not in selector)
            ):
                unfiltered.append((where, selector))
    assert unfiltered == []
