"""Prometheus configuration and alert rules, checked with the real promtool.

promtool checks the rules and the scrape config and runs the rules' unit
tests (deploy/prometheus/alerts.test.yml: each alert fires in one case and
stays quiet in another). The rest holds the rules to what an operator needs:
a severity, a summary, a description, a runbook section that exists, and
every situation the deployment must be alerted about.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from recon_stream.app import build_worker
from recon_stream.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
RUNBOOK = ROOT / "deploy" / "OBSERVABILITY.md"
COMPOSE = ROOT / "docker-compose.yml"

SEVERITIES = {"critical", "warning", "info"}
ROLES = {"ingest", "scanner", "scheduler", "notifier"}

# The situations the deployment must alert on: the alert that covers each,
# and the series its expression must read.
REQUIRED = {
    "the Shodan key is rejected": ("ReconShodanKeyRejected", {"recon_shodan_key_accepted"}),
    "the scan backlog grows for 30 minutes": ("ReconScanBacklogGrowing", {"recon_scan_backlog"}),
    "results are older than twice the rescan interval": (
        "ReconScanResultsStale",
        {"recon_oldest_scan_age_seconds", "recon_rescan_interval_seconds"},
    ),
    "the dead-letter rate is above a threshold": (
        "ReconDeadLetterRate",
        {"recon_dlq_messages_total"},
    ),
    "consumer lag grows": ("ReconConsumerLagGrowing", {"recon_consumer_lag"}),
    "no scheduler leads": ("ReconNoSchedulerLeader", {"recon_scheduler_leader"}),
    "an outbox does not drain": ("ReconOutboxNotDraining", {"recon_outbox_pending"}),
    "a vulnerability feed keeps failing or never loads": (
        "ReconVulnFeedFailing",
        {"recon_vuln_feed_failures_total", "recon_vuln_feed_age_seconds"},
    ),
    "a vulnerability feed is older than two refreshes": (
        "ReconVulnFeedStale",
        {"recon_vuln_feed_age_seconds"},
    ),
}
# Labels every aggregation must keep: one Prometheus, many releases.
KEPT_APART = ("namespace", "job")


def promtool(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; `python3 tasks.py test` installs it")
    return subprocess.run(
        [path, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
    )


def rule_tests() -> list[Path]:
    """The promtool unit-test files (their rule_files name alerts.yml beside them)."""
    return sorted(PROMETHEUS.glob("*.test.yml"))


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", *rule_tests())
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("broken", ["never fires", "always fires"])
def test_rule_unit_tests_notice_a_broken_alert(broken: str, tmp_path: Path) -> None:
    """The unit tests are not vacuous. Each rule is broken so that it never fires,
    or so that it also fires whenever it should not (with the same labels when
    it should): every alert then fails at least one case."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if broken == "never fires":
                rule["expr"] = f"({rule['expr']}) unless on () vector(1)"
            else:
                rule["expr"] = f"({rule['expr']}) or on () vector(1)"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    copies = [Path(shutil.copy(test_file, tmp_path)) for test_file in rule_tests()]
    result = promtool("test", "rules", *copies)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    unnoticed = [r["alert"] for r in alert_rules() if f"alertname: {r['alert']}," not in output]
    assert unnoticed == []


def test_every_alert_has_tests_where_it_fires_and_where_it_must_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for path in rule_tests():
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert names - fires == set(), "alerts never shown to fire"
    assert names - quiet == set(), "alerts never shown to stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_prometheus_config_is_valid_where_compose_mounts_it(tmp_path: Path) -> None:
    # As in the repository...
    result = promtool("check", "config", CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    # ...and as a copy of the folder alone, as compose mounts it at
    # /etc/prometheus: rule_files must resolve inside it.
    mounted = tmp_path / "etc-prometheus"
    mounted.mkdir()
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROMETHEUS / name, mounted / name)
    result = promtool("check", "config", mounted / "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: 1 rule files? found", result.stdout), result.stdout


def test_scrape_config_matches_the_compose_services() -> None:
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "recon-stream"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {
        target: group["labels"]["role"]
        for group in job["static_configs"]
        for target in group["targets"]
    }
    assert targets == {f"{role}:8080": role for role in ROLES}

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    for role in ROLES:
        assert role in services, role
    prometheus = services["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_ = volume.split(":")
        mounts[source.removeprefix("./")] = target
    assert mounts["deploy/prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key}"
        # The runbook annotation names the OBSERVABILITY.md section about it.
        links = re.findall(r"OBSERVABILITY\.md#([\w-]+)", annotations["runbook"])
        assert links == [name.lower()], name
        assert links[0] in anchors, f"{name}: deploy/OBSERVABILITY.md has no #{links[0]}"
        assert rule.get("for"), f"{name}: fires on a single evaluation"


def test_each_required_situation_has_its_alert() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for situation, (name, series) in REQUIRED.items():
        assert name in rules, f"no alert for: {situation}"
        expr = rules[name]["expr"]
        for metric in series:
            assert re.search(rf"\b{metric}\b", expr), f"{name} does not read {metric}"
    # "Also when the metric is absent while workers are up" (per namespace and job:
    # absent() would see another release's gauge).
    leader = rules["ReconNoSchedulerLeader"]["expr"]
    assert re.search(r"count by \(namespace, job\) \(recon_build_info\)\s*unless", leader)


AGGREGATION = re.compile(
    r"\b(sum|max|min|avg|count|stddev|stdvar|topk|bottomk|quantile)\s*(by|without)?\s*(\([^)]*\))?\s*\("
)
VECTOR_MATCH = re.compile(r"\b(and|or|unless|>|<|>=|<=|==|!=)\s*(on|ignoring)\s*\(([^)]*)\)")


def test_every_aggregation_keeps_namespace_and_job_apart() -> None:
    """`max(x)` over a Prometheus scraping two releases lets one hide the other;
    so every aggregation is `by (namespace, job, ...)` and every vector match
    `on (namespace, job, ...)`."""
    problems = []
    for rule in alert_rules():
        expr = str(rule["expr"])
        for match in AGGREGATION.finditer(expr):
            _, how, labels = match.groups()
            kept = [label.strip() for label in (labels or "()").strip("()").split(",")]
            if how != "by" or any(label not in kept for label in KEPT_APART):
                problems.append(f"{rule['alert']}: {match.group(0)}")
        for match in VECTOR_MATCH.finditer(expr):
            _, how, labels = match.groups()
            kept = [label.strip() for label in labels.split(",")]
            if how != "on" or any(label not in kept for label in KEPT_APART):
                problems.append(f"{rule['alert']}: {match.group(0)}")
    assert problems == []
    # The check is real: the rules before issue 21 fail it.
    assert AGGREGATION.search("max(recon_scheduler_leader) < 1").group(2) is None


def test_a_retired_ip_case_guards_the_stale_results_alert() -> None:
    """The stale-results alert once fired for good about two rescan intervals after
    any IP retired; its tests keep a case with a retirement where it must not fire."""
    cases = [case for path in rule_tests() for case in yaml.safe_load(path.read_text())["tests"]]
    (case,) = [c for c in cases if "retired IP" in c["name"]]
    series = " ".join(s["series"] for s in case["input_series"])
    assert "recon_pairs_retired_total" in series
    assert "recon_oldest_scan_age_seconds" in series
    checks = case["alert_rule_test"]
    assert checks
    assert all(
        c["alertname"] == "ReconScanResultsStale" and not c.get("exp_alerts") for c in checks
    )


@pytest.mark.parametrize(
    ("role", "exports"),
    [("scanner", True), ("ingest", False), ("scheduler", False), ("notifier", False)],
)
async def test_only_scanners_export_the_key_gauge(role: str, exports: bool) -> None:
    """ReconShodanKeyRejected reads recon_shodan_key_accepted on every target:
    a process that never checks the key must not export it (a default 0
    would read as a rejected key)."""
    worker = build_worker(Settings(), [role], tracer_provider=TracerProvider())
    try:
        exposed = generate_latest(worker.metrics.registry).decode()
    finally:
        await worker.mongo_client.close()
    samples = {
        sample.name
        for family in text_string_to_metric_families(exposed)
        for sample in family.samples
    }
    assert ("recon_shodan_key_accepted" in samples) is exports
