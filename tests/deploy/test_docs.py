"""The documents stand on their own and say what the code does: every exported
metric and every alert is documented, every setting, topic and consumer group is
in the reference, every relative link points at a file (and heading) that
exists, and the README is a newcomer's page.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter

from recon_stream.metrics import Metrics
from recon_stream.settings import Settings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
DEPLOY_README = ROOT / "deploy" / "README.md"
OBSERVABILITY = ROOT / "deploy" / "OBSERVABILITY.md"
CHART_README = ROOT / "deploy" / "helm" / "recon-stream" / "README.md"
CHART_ALERTS = ROOT / "deploy" / "helm" / "recon-stream" / "files" / "alerts.yml"
CONFIGURATION = ROOT / "docs" / "configuration.md"
# Every document whose links must resolve.
LINKED = [README, *DOCS, DEPLOY_README, OBSERVABILITY, CHART_README]

FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", flags=re.MULTILINE)


def prose(text: str) -> str:
    """The text without code blocks and code spans (a link there is an example)."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link and code markup dropped, lower case,
    punctuation but '-' and '_' removed, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for _, title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        anchor = github_anchor(title)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return found


def documented_text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in LINKED)


def exported_metrics() -> set[str]:
    """The names a scrape shows for every metric recon_stream/metrics.py defines."""
    metrics = Metrics()
    metrics.shodan_key_gauge()
    names = set()
    for collector in metrics.registry.collect():
        names.add(collector.name + ("_total" if collector.type == "counter" else ""))
    # The registry is what is exported; prove it holds counters (the suffix rule matters).
    assert any(isinstance(v, Counter) for v in vars(metrics).values())
    return names


def alert_names() -> list[str]:
    groups = yaml.safe_load(CHART_ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


# ------------------------------------------------------------------ metrics
def test_every_exported_metric_is_in_the_metric_reference() -> None:
    reference = OBSERVABILITY.read_text(encoding="utf-8")
    names = exported_metrics()
    assert len(names) > 30
    missing = sorted(
        n for n in names if not re.search(rf"`{re.escape(n)}(\{{[^`]*\}})?`", reference)
    )
    assert missing == []


def test_the_metric_check_is_real() -> None:
    reference = OBSERVABILITY.read_text(encoding="utf-8")
    assert "`recon_heartbeats_total`" in reference
    assert "recon_heartbeats_total" in exported_metrics()
    assert "`recon_no_such_metric_total`" not in reference


# ------------------------------------------------------------------- alerts
def test_every_alert_of_the_chart_has_a_row_and_a_runbook_section() -> None:
    """The chart's rules (files/alerts.yml, the same file compose mounts) are each
    in the alert table and have a section of their own in OBSERVABILITY.md."""
    assert CHART_ALERTS.resolve() == (ROOT / "deploy" / "prometheus" / "alerts.yml").resolve()
    reference = OBSERVABILITY.read_text(encoding="utf-8")
    headings = {title for _, title in HEADING.findall(reference)}
    names = alert_names()
    assert len(names) >= 10
    for name in names:
        assert name in headings, f"no section `### {name}`"
        assert re.search(rf"^\| \[{name}\]\(#{name.lower()}\) \|", reference, re.MULTILINE), name


# ------------------------------------------------- settings, topics, groups
def test_every_setting_is_in_the_configuration_reference() -> None:
    reference = CONFIGURATION.read_text(encoding="utf-8")
    names = [f"RECON_{name.upper()}" for name in Settings.model_fields]
    # Rows may name several settings at once: `RECON_A` / `RECON_B`, or `_SUFFIX`
    # after a first full name.
    cells = re.findall(r"^\| (.*?) \|", reference, flags=re.MULTILINE)
    covered: set[str] = set()
    for cell in cells:
        spans = re.findall(r"`([A-Z_]+)`", cell)
        full = [s for s in spans if s.startswith("RECON_")]
        covered |= set(full)
        if not full:
            continue
        parts = full[0].split("_")
        stems = ["_".join(parts[:i]) for i in range(len(parts), 1, -1)]
        for suffix in (s for s in spans if s.startswith("_")):
            # `RECON_KAFKA_SSL_CAFILE` / `_CERTFILE`: the longest stem that names a setting.
            covered.add(next((stem + suffix for stem in stems if stem + suffix in names), suffix))
    missing = [n for n in names if n not in covered]
    assert missing == []


def test_every_topic_and_consumer_group_is_in_the_deployment_guide() -> None:
    """A platform that pre-creates topics or grants ACLs from the guide gets them all,
    and is told which topic is compacted and how."""
    guide = DEPLOY_README.read_text(encoding="utf-8")
    fields = Settings.model_fields
    topics = {n: f.default for n, f in fields.items() if n.startswith("topic_")}
    groups = {n: f.default for n, f in fields.items() if n.endswith("_group_id")}
    assert len(topics) >= 8
    for name, default in {**topics, **groups}.items():
        assert f"`{default}" in guide, f"{name} ({default}) is not in deploy/README.md"
    (row,) = [
        line
        for line in guide.splitlines()
        if f"`{topics['topic_exposure_state']}`" in line and line.startswith("|")
    ]
    assert "cleanup.policy=compact" in row


# -------------------------------------------------------------------- links
def relative_links(path: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(path.read_text(encoding="utf-8")))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_at_something_that_exists(path: Path) -> None:
    problems = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            problems.append(f"{target}: no such file")
            continue
        if fragment and destination.suffix == ".md" and fragment not in anchors(destination):
            problems.append(f"{target}: no heading #{fragment}")
    assert problems == []


def test_the_link_check_is_real(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n[a](missing.md) [b](#title) [c](#nowhere) `[d](code.md)` "
        "[e](https://example.com/x.md)\n```\n[f](block.md)\n```\n",
        encoding="utf-8",
    )
    assert relative_links(page) == ["missing.md", "#title", "#nowhere"]
    assert anchors(page) == {"title"}
    assert github_anchor("Where this departs from [the contracts](x.md), and why") == (
        "where-this-departs-from-the-contracts-and-why"
    )


# ------------------------------------------------------------------- README
def test_the_readme_is_a_newcomers_page() -> None:
    text = README.read_text(encoding="utf-8")
    # The two set-up commands, exactly.
    assert re.search(r"^python3 tasks\.py dev\b", text, re.MULTILINE)
    assert re.search(r"^python3 tasks\.py test\b", text, re.MULTILINE)
    # The picture of the pipeline.
    assert "agent.heartbeats.v1" in text
    assert "[scanner]" in text
    assert "\n## Map of the code\n" in text
    assert "## Where to read more" in text
    # The contracts are in the repository: no link to a file outside it.
    assert "DESIGN.md" not in text
    assert "](docs/contracts.md)" in text
    # Every document in docs/ is reachable from the README.
    for doc in DOCS:
        assert f"](docs/{doc.name})" in text, doc.name
    # A newcomer's page, not the reference: that lives in docs/ and deploy/.
    assert len(text.splitlines()) < 300


def test_no_document_points_at_design_md() -> None:
    for path in LINKED:
        if path.name == "contracts.md":
            continue
        assert "DESIGN.md" not in path.read_text(encoding="utf-8"), path


def test_the_contracts_are_in_the_repository() -> None:
    text = (ROOT / "docs" / "contracts.md").read_text(encoding="utf-8")
    intro = " ".join(text.split("\n\n")[1].replace("> ", "").split())
    assert "contract document" in intro
    assert "kept in step with the project's design" in intro
    for section in ("## Public contracts", "## Correctness rules", "### Settings"):
        assert section in text, section


def test_the_license_file_matches_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    license_ = project["license"]
    spdx = license_["text"] if isinstance(license_, dict) else license_
    assert spdx == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


# ------------------------------------------------- the helm install walk-through
def test_the_helm_walk_through_matches_the_chart_as_rendered() -> None:
    """deploy/README.md's recon-values.yaml renders (schema and templates), and the
    objects the walk-through names are the ones the chart makes from it."""
    import helm_python as helm

    guide = DEPLOY_README.read_text(encoding="utf-8")
    (values_text,) = re.findall(
        r"^`recon-values\.yaml`:\n\n```yaml\n(.*?)```", guide, re.DOTALL | re.MULTILINE
    )
    values = yaml.safe_load(values_text)
    with helm.Chart.load(ROOT / "deploy" / "helm" / "recon-stream") as chart:
        chart.validate_schema(values)
        files = chart.render(values, name="recon", namespace="recon")
    docs = [
        d
        for path, text in files.items()
        if path.endswith(".yaml")
        for d in yaml.safe_load_all(text)
        if d
    ]
    made = {(d["kind"], d["metadata"]["name"]) for d in docs}
    named = {
        ("Job", "recon-recon-stream-init"),
        ("Service", "recon-recon-stream-scanner"),
        ("Deployment", "recon-recon-stream-ingest"),
        ("NetworkPolicy", "recon-recon-stream-scheduler-feeds"),
        ("ConfigMap", "recon-recon-stream-dashboard"),
    }
    assert named <= made
    # The names the guide's commands use.
    for name in (
        "recon-recon-stream-init",
        "recon-recon-stream-scanner",
        "recon-recon-stream-ingest",
    ):
        assert name in guide, name
    # The feeds it sets reach the workers, with the URLs the guide gives.
    (config,) = [
        d
        for d in docs
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "recon-recon-stream"
    ]
    for key, url in (
        ("RECON_KEV_SOURCE", values["vulnFeeds"]["kevSource"]),
        ("RECON_EPSS_SOURCE", values["vulnFeeds"]["epssSource"]),
    ):
        assert config["data"][key] == url
        assert url in guide
    # The secret keys the guide's `kubectl create secret` sets are the ones the pods read.
    step = guide[guide.index("### 1. A namespace and the secret") :]
    (secret_command, *_) = re.findall(
        r"create secret generic recon-stream-credentials \\\n(.*?)\n```", step, re.DOTALL
    )
    keys = set(re.findall(r"--from-literal=(RECON_\w+)=", secret_command))
    refs = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for d in docs
        if d["kind"] in ("Deployment", "Job")
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == keys
