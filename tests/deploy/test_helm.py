"""The Helm chart, linted and rendered by the real Helm engine (helm-python-sdk
bundles Helm v4 as a library), every manifest validated against the Kubernetes
schemas (kubernetes-validate, strict) or, for the CRDs, against their schemas in
conftest.py; then the properties a platform team relies on, value set by value set.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import itertools
import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate.utils as kubernetes_validate
import pytest
import yaml
from jsonschema import Draft202012Validator, ValidationError

from recon_stream.domain.scope import load_scope
from recon_stream.notifier import load_destinations

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "recon-stream"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
# The roles always deployed; the notifier is one more when notifier.enabled.
ROLES = ("ingest", "scanner", "scheduler")
ALL_ROLES = (*ROLES, "notifier")
RELEASE, NAMESPACE = "recon", "security"
FULLNAME = f"{RELEASE}-recon-stream"
KEV_URL = "https://www.cisa.gov/sites/default/files/feeds/known_exploited_vulnerabilities.json"
EPSS_URL = "https://epss.empiricalsecurity.com/epss_scores-current.csv.gz"
DASHBOARD = ROOT / "deploy" / "grafana" / "recon-stream.json"
# The example scope file: the entries an MSP writes (own egress, SASE ASNs, guest Wi-Fi).
SCOPE_EXAMPLE = (ROOT / "deploy" / "scope.example.yaml").read_text(encoding="utf-8")
SCOPE_DIR = "/etc/recon-stream-scope"
NOTIFY_FILE = """\
destinations:
  - name: psa
    url: https://psa.example/hooks/recon
    secret_env: RECON_PSA_WEBHOOK_SECRET
    min_severity: high
  - name: teams
    url: https://example.webhook.office.com/webhookb2/abc
    secret_env: RECON_TEAMS_WEBHOOK_SECRET
    format: text
"""

# The default values and four others a platform team would install with.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "existing-secret": {
        "existingSecret": "recon-stream-credentials",
        "shodan": {"provider": "api"},
        "kafka": {
            "bootstrapServers": "b-1.kafka.example.com:9096,b-2.kafka.example.com:9096",
            "securityProtocol": "SASL_SSL",
            "sasl": {"mechanism": "SCRAM-SHA-512"},
            "tls": {"existingSecret": "kafka-ca"},
        },
        "mongodb": {
            "tls": {
                "enabled": True,
                "existingSecret": "mongodb-tls",
                "certificateKeyKey": "client.pem",
                "certificateKeyEncrypted": True,
            }
        },
        "networkPolicy": {"egress": {"kafkaPorts": [9096]}},
    },
    "keda": {
        "ingest": {"autoscaling": {"mode": "keda"}},
        "scanner": {
            "autoscaling": {
                "mode": "keda",
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 600}},
            }
        },
        "keda": {"bootstrapServers": "kafka.kafka.svc.cluster.local:9092"},
        "kafka": {
            "bootstrapServers": "kafka.kafka.svc.cluster.local:9092",
            "securityProtocol": "SASL_PLAINTEXT",
            "sasl": {"mechanism": "SCRAM-SHA-256", "username": "recon", "password": "kafka-pass"},
        },
        "mongodb": {
            "uri": "mongodb://recon:mongo-pass@mongodb-0.mongodb.db.svc:27017/?replicaSet=rs0"
        },
        "shodan": {"provider": "api", "apiKey": "shodan-test-key"},
    },
    "monitoring": {
        # Every role, the notifier too, as in the compose scrape config.
        "notifier": {
            "enabled": True,
            "notifyFile": NOTIFY_FILE,
            "secrets": {
                "RECON_PSA_WEBHOOK_SECRET": "psa-key",
                "RECON_TEAMS_WEBHOOK_SECRET": "teams-key",
            },
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {
            "enabled": True,
            "label": "grafana_dashboard",
            "labelValue": "1",
            "annotations": {"grafana_folder": "Security"},
        },
        # What a production install adds: the public feeds, a policy, a scope file.
        "vulnFeeds": {"kevSource": KEV_URL, "epssSource": EPSS_URL},
        "riskPolicy": "organizations:\n  acme:\n    - port: tcp/8443\n      severity: info\n",
        "scope": SCOPE_EXAMPLE,
        "shodan": {"apiKey": "shodan-test-key"},
        "tracing": {
            "enabled": True,
            "otlpEndpoint": "http://otel-collector.observability:4318",
            "sampler": "parentbased_traceidratio",
            "samplerArg": "0.1",
            "resourceAttributes": {"deployment.environment": "production"},
        },
        "networkPolicy": {
            "metricsFrom": [
                {
                    "namespaceSelector": {
                        "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}
                    }
                }
            ]
        },
    },
    "fixed-replicas": {
        "ingest": {"replicas": 3, "autoscaling": {"mode": "none"}},
        "scanner": {"replicas": 1, "autoscaling": {"mode": "none"}},
        "scheduler": {
            "replicas": 1,
            "podDisruptionBudget": {"enabled": False, "maxUnavailable": 1},
        },
        "networkPolicy": {"enabled": False},
        "settings": {
            "httpPort": 9100,
            "gracefulTimeoutSeconds": 45,
            "extra": {"RECON_INGEST_CACHE_SIZE": 2_000_000, "RECON_SCANNER_CONCURRENCY": 4},
        },
        "terminationGracePeriodSeconds": 60,
        "image": {"digest": "sha256:" + "ab" * 32},
    },
    "notifier": {
        "notifier": {
            "enabled": True,
            "replicas": 2,
            "notifyFile": NOTIFY_FILE,
            "existingSecret": "recon-webhook-keys",
        },
        "kafka": {"consumerGroups": {"notifier": "acme-recon-notifier"}},
        "networkPolicy": {"egress": {"webhookPorts": [443, 8443]}},
    },
    "freshness": {
        # On-demand scans and TCP verification, with more ranges kept out of the probe's reach.
        "shodan": {"apiKey": "shodan-test-key"},
        "freshness": {
            "scanCreditsPerDay": 3,
            "scanPollSeconds": 30,
            "scanTimeoutSeconds": 7200,
            "verification": {
                "enabled": True,
                "rate": 7.5,
                "timeoutSeconds": 2,
                "confirmSeconds": 120,
            },
        },
        "networkPolicy": {"egress": {"verificationExcept": ["203.0.113.0/24", "2001:db8:1::/48"]}},
    },
}
SETS = list(VALUE_SETS)


# ---------------------------------------------------------------- helpers
class Rendered:
    """The manifests of one `helm template`, parsed."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files
        self.notes = next((text for path, text in files.items() if path.endswith("NOTES.txt")), "")
        self.docs = [
            doc
            for path, text in sorted(files.items())
            if path.endswith((".yaml", ".yml"))
            for doc in yaml.safe_load_all(text)
            if doc
        ]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        return found

    def workloads(self) -> list[dict[str, Any]]:
        """Deployments and Jobs: everything that runs a pod."""
        return self.of("Deployment") + self.of("Job")

    def settings(self) -> dict[str, str]:
        return self.one("ConfigMap", FULLNAME)["data"]


def roles_of(merged: dict[str, Any]) -> tuple[str, ...]:
    """The roles a release with these (merged) values deploys."""
    return ALL_ROLES if merged["notifier"]["enabled"] else ROLES


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def pod_annotations(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["annotations"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, present = labels.get(expr["key"]), expr["key"] in labels
        op = expr["operator"]
        if (
            (op == "In" and value not in expr["values"])
            or (op == "NotIn" and value in expr["values"])
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def render(chart: helm.Chart) -> Any:
    cache: dict[str, Rendered] = {}

    def go(values: dict[str, Any]) -> Rendered:
        key = repr(sorted(values.items()))
        if key not in cache:
            cache[key] = Rendered(chart.render(values, name=RELEASE, namespace=NAMESPACE))
        return cache[key]

    return go


@pytest.fixture(params=SETS)
def case(request: pytest.FixtureRequest, render: Any, chart: helm.Chart) -> Any:
    """(name, values as given, values as merged with the defaults, manifests)."""
    values = VALUE_SETS[request.param]
    return request.param, values, chart.merge_values(values), render(values)


def kube_versions() -> list[str]:
    """The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest
    kubernetes-validate knows."""
    claimed = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))["kubeVersion"]
    oldest = re.search(r"(\d+\.\d+)", claimed).group(1)
    return [f"{oldest}.0", kubernetes_validate.latest_version()]


# ------------------------------------------------------------ lint, schema
@pytest.mark.parametrize("name", SETS)
def test_chart_lints_strictly(name: str) -> None:
    report = helm.lint(
        CHART,
        VALUE_SETS[name],
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{kube_versions()[0]}",
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # warnings and errors
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    assert problems == [], problems


def test_lint_reports_a_broken_value() -> None:
    """The lint call is a real check: a bad value is reported as an error."""
    report = helm.lint(CHART, {"ingest": {"replicas": "two"}}, strict=True)
    assert report["errors"], report


@pytest.mark.parametrize(
    ("values", "why"),
    [
        ({"ingest": {"replicas": "two"}}, "replicas must be an integer"),
        ({"shodan": {"provider": "censys"}}, "unknown Shodan provider"),
        ({"shodan": {"rate": 0}}, "the rate must be positive"),
        ({"ingest": {"autoscaling": {"mode": "both"}}}, "HPA and KEDA at once"),
        ({"scanner": {"autoscaling": {"mode": "keda", "hpa": True}}}, "unknown key"),
        (
            {"scheduler": {"autoscaling": {"mode": "hpa"}}},
            "the leader-elected scheduler never scales",
        ),
        ({"ingest": {"autoscaling": {"minReplicas": 0}}}, "scale to zero stops the relay"),
        ({"shodan": {"provider": ""}}, "no implicit provider: sample only when asked for"),
        (
            {"vulnFeeds": {"kevSource": "ftp://mirror/kev.json"}},
            "a feed source neither URL nor path",
        ),
        ({"vulnFeeds": {"epssSource": "epss.csv"}}, "a relative feed path"),
        ({"kafka": {"topics": {"commands": ""}}}, "the commands topic cannot be off"),
        ({"kafka": {"consumerGroups": {"commands": ""}}}, "no commands consumer group"),
        (
            {"mongodb": {"tls": {"enabled": True, "certificateKeyEncrypted": True}}},
            "an encrypted client key without its password in a chart-made Secret",
        ),
        ({"grafanaDashboard": {"label": "grafana dashboard"}}, "a label key with a space"),
        ({"networkPolicy": {"egress": {"feedPorts": [0]}}}, "feed port 0"),
        ({"kafka": {"securityProtocol": "SASL_SSL"}}, "SASL without credentials"),
        ({"kafka": {"securityProtocol": "TLS"}}, "unknown security protocol"),
        ({"kafka": {"bootstrapServers": "kafka"}}, "bootstrap server without a port"),
        ({"settings": {"extra": {"RECON_SHODAN_API_KEY": "x"}}}, "a secret in the ConfigMap"),
        ({"settings": {"extra": {"SHODAN_RATE": "2"}}}, "not a RECON_ setting"),
        ({"settings": {"httpPort": 80}}, "a privileged port as non-root"),
        ({"image": {"digest": "latest"}}, "a digest that is not sha256"),
        ({"notifier": {"autoscaling": {"mode": "hpa"}}}, "the notifier is not autoscaled"),
        ({"notifier": {"secrets": {"psa-key": "x"}}}, "a secret_env that is no variable name"),
        ({"notifier": {"secrets": {"RECON_PSA_WEBHOOK_SECRET": ""}}}, "an empty key"),
        ({"notifier": {"notifyFile": ""}}, "no notify file"),
        ({"networkPolicy": {"egress": {"webhookPorts": [0]}}}, "port 0"),
        ({"freshness": {"scanCreditsPerDay": -1}}, "a negative credit figure"),
        ({"freshness": {"scanCreditsPerDay": 1.5}}, "half a scan credit"),
        ({"freshness": {"scanPollSeconds": 0}}, "polling without a pause"),
        ({"freshness": {"verification": {"enabled": "yes"}}}, "the switch is a boolean"),
        ({"freshness": {"verification": {"rate": 0}}}, "a connect rate of zero"),
        ({"freshness": {"verification": {"timeoutSeconds": 120}}}, "a connect timeout > 60 s"),
        ({"freshness": {"verification": {"ports": [22]}}}, "unknown verification key"),
        (
            {"networkPolicy": {"egress": {"verificationExcept": ["192.0.2.1"]}}},
            "an excepted range without a prefix length",
        ),
        (
            {"networkPolicy": {"egress": {"verificationExcept": ["office"]}}},
            "an excepted range that is no CIDR",
        ),
        ({"scope": {"version": 1}}, "the scope file is text, as the risk policy is"),
        ({"replicas": 3}, "unknown top-level key"),
    ],
)
def test_schema_rejects(chart: helm.Chart, values: dict[str, Any], why: str) -> None:
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
    # `helm install` validates the same way before rendering anything.
    with pytest.raises(helm.HelmValuesError):
        chart.render(values, name=RELEASE)


@pytest.mark.parametrize("name", SETS)
def test_schema_accepts_the_value_sets(chart: helm.Chart, name: str) -> None:
    chart.validate_schema(VALUE_SETS[name])


# ------------------------------------------------------- Kubernetes schemas
@pytest.mark.parametrize("version", kube_versions())
def test_every_manifest_validates(
    case: Any, version: str, crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    _, _, _, rendered = case
    assert rendered.docs
    for doc in rendered.docs:
        crd = crd_schemas.get((doc["apiVersion"], doc["kind"]))
        if crd is not None:
            Draft202012Validator(crd).validate(doc)
            continue
        # Raises ValidationError on a bad manifest, SchemaNotFoundError on a kind
        # (or apiVersion) this Kubernetes does not serve: neither passes silently.
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("ScaledObject", lambda d: d["spec"]["triggers"][0]["metadata"].update(lagThreshold=10)),
        ("ScaledObject", lambda d: d["spec"].pop("scaleTargetRef")),
        ("ScaledObject", lambda d: d["spec"].update(maxReplicas=4)),
        ("TriggerAuthentication", lambda d: d["spec"]["secretTargetRef"][0].pop("key")),
        ("ServiceMonitor", lambda d: d["spec"].update(endpoint=d["spec"].pop("endpoints"))),
        ("ServiceMonitor", lambda d: d["spec"]["endpoints"][0].update(interval="30 seconds")),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].pop("expr")),
        ("PrometheusRule", lambda d: d["spec"]["groups"][0]["rules"][0].update(summary="x")),
    ],
)
def test_crd_schemas_reject_what_the_api_server_would(
    render: Any, crd_schemas: dict[tuple[str, str], dict[str, Any]], kind: str, break_it: Any
) -> None:
    """The CRD schemas are real checks: a broken custom resource fails them."""
    docs = render(VALUE_SETS["keda"]).docs + render(VALUE_SETS["monitoring"]).docs
    doc = copy.deepcopy(next(d for d in docs if d["kind"] == kind))
    schema = crd_schemas[(doc["apiVersion"], kind)]
    Draft202012Validator(schema).validate(doc)
    break_it(doc)
    with pytest.raises(ValidationError):
        Draft202012Validator(schema).validate(doc)


def test_kubernetes_validate_rejects_a_broken_manifest(render: Any) -> None:
    deployment = copy.deepcopy(render({}).of("Deployment")[0])
    kubernetes_validate.validate(deployment, kube_versions()[-1], strict=True)
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRoot"] = (
        True
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kube_versions()[-1], strict=True)


# ------------------------------------------------------------ workloads
def test_one_deployment_per_role_running_that_role(case: Any) -> None:
    _, _, merged, rendered = case
    deployments = {d["metadata"]["name"]: d for d in rendered.of("Deployment")}
    assert set(deployments) == {f"{FULLNAME}-{role}" for role in roles_of(merged)}
    for role in roles_of(merged):
        (container,) = containers(deployments[f"{FULLNAME}-{role}"])
        assert container["args"] == ["run", role]


def test_every_container_is_locked_down(case: Any, dockerfile: Any) -> None:
    _, _, _, rendered = case
    image_uid = int(dockerfile.final.last("USER").split(":")[0])
    for workload in rendered.workloads():
        pod = pod_spec(workload)
        assert pod["automountServiceAccountToken"] is False
        pod_sc = pod.get("securityContext", {})
        assert pod_sc["runAsNonRoot"] is True
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for container in containers(workload):
            sc = container["securityContext"]
            where = f"{workload['kind']} {workload['metadata']['name']}/{container['name']}"
            assert sc["runAsNonRoot"] is True, where
            assert sc["runAsUser"] == image_uid != 0, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
            # The one writable place: an emptyDir at /tmp (HOME and TMPDIR in the image).
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, where
            assert "emptyDir" in volumes[tmp[0]["name"]], where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"]["memory"], where


def test_probes_use_the_health_endpoints_on_the_configured_port(case: Any) -> None:
    _, _, _, rendered = case
    port = int(rendered.settings()["RECON_HTTP_PORT"])
    for deployment in rendered.of("Deployment"):
        (container,) = containers(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": port}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def test_grace_period_outlasts_the_graceful_shutdown(case: Any) -> None:
    _, _, _, rendered = case
    timeout = float(rendered.settings()["RECON_GRACEFUL_TIMEOUT_SECONDS"])
    for deployment in rendered.of("Deployment"):
        assert pod_spec(deployment)["terminationGracePeriodSeconds"] > timeout


@pytest.mark.parametrize(("grace", "timeout"), [(20, 20), (30, 45)])
def test_too_short_grace_period_is_refused(chart: helm.Chart, grace: int, timeout: int) -> None:
    values = {
        "terminationGracePeriodSeconds": grace,
        "settings": {"gracefulTimeoutSeconds": timeout},
    }
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        chart.render(values, name=RELEASE)


def test_settings_are_what_the_app_accepts(
    case: Any, setting_names: set[str], load_settings: Any, tmp_path: Path
) -> None:
    """The ConfigMap plus the Secret make a configuration the workers start with."""
    _, _, merged, rendered = case
    data = rendered.settings()
    assert set(data) <= setting_names, set(data) - setting_names
    secrets = {s["metadata"]["name"]: s.get("data", {}) for s in rendered.of("Secret")}
    for deployment in rendered.of("Deployment"):
        (container,) = containers(deployment)
        env = dict(data)
        for name, entry in env_of(container).items():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref is None:
                continue
            if ref["name"] in secrets:
                encoded = secrets[ref["name"]].get(ref["key"])
                if encoded is None:
                    # Only the Shodan key may be missing (provider api, no key given):
                    # then the scanner pods must not start at all, rather than invent data.
                    assert name == "RECON_SHODAN_API_KEY", (
                        f"{name}: {ref['key']} is not in the Secret"
                    )
                    assert ref.get("optional") is False
                    assert not merged["shodan"]["apiKey"]
                    env[name] = "from-secret"
                    continue
                env[name] = base64.b64decode(encoded).decode()
            else:
                # An existing Secret: only the ones the values name.
                assert ref["name"] in {
                    merged["existingSecret"],
                    merged["notifier"]["existingSecret"],
                }, ref
                env[name] = "mongodb://db:27017" if name == "RECON_MONGODB_URI" else "from-secret"
        settings = load_settings(env)
        assert settings.http_port == container["ports"][0]["containerPort"]
        assert settings.kafka_bootstrap_servers == merged["kafka"]["bootstrapServers"]
        assert settings.kafka_security_protocol == merged["kafka"]["securityProtocol"]
        assert settings.topic_heartbeats == merged["kafka"]["topics"]["heartbeats"]
        assert settings.ingest_group_id == merged["kafka"]["consumerGroups"]["ingest"]
        assert settings.notifier_group_id == merged["kafka"]["consumerGroups"]["notifier"]
        if container["name"] == "notifier":
            # The notify file as mounted, with the variables the pod gets: the app
            # reads every destination and finds every secret_env set.
            notify = rendered.one("ConfigMap", f"{FULLNAME}-notifier")["data"]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "notify"]
            assert settings.notify_file is not None
            assert settings.notify_file.parent == Path(mount["mountPath"])
            copy_ = tmp_path / "notify.yaml"
            copy_.write_text(notify[settings.notify_file.name], encoding="utf-8")
            destinations = load_destinations(copy_, env)
            expected = yaml.safe_load(merged["notifier"]["notifyFile"])["destinations"]
            assert [d.name for d in destinations] == [d["name"] for d in expected]
            assert all(d.secret is not None for d in destinations)
        if merged["scope"]:
            # The scope file as mounted: the worker loads what the value says.
            scope = rendered.one("ConfigMap", f"{FULLNAME}-scope")["data"]
            (mount,) = [m for m in container["volumeMounts"] if m["name"] == "scope"]
            assert settings.scope_file is not None
            assert settings.scope_file.parent == Path(mount["mountPath"])
            mounted, given = tmp_path / "mounted-scope.yaml", tmp_path / "given-scope.yaml"
            mounted.write_text(scope[settings.scope_file.name], encoding="utf-8")
            given.write_text(merged["scope"], encoding="utf-8")
            assert load_scope(mounted) == load_scope(given)
        else:
            assert settings.scope_file is None
        if not merged["existingSecret"]:
            assert settings.mongodb_uri.get_secret_value() == merged["mongodb"]["uri"]
        for key, value in merged["settings"]["extra"].items():
            field = key.removeprefix("RECON_").lower()
            assert getattr(settings, field) == value, key


def test_secret_values_reach_only_the_pods_that_need_them(case: Any) -> None:
    _, _, merged, rendered = case
    shodan_key_users = set()
    webhook_key_users = set()
    for workload in rendered.workloads():
        for container in containers(workload):
            env = env_of(container)
            assert "RECON_MONGODB_URI" in env
            assert "value" not in env["RECON_MONGODB_URI"], "a secret written into the manifest"
            if "RECON_SHODAN_API_KEY" in env:
                shodan_key_users.add(container["name"])
            if any(name.endswith("_WEBHOOK_SECRET") for name in env):
                webhook_key_users.add(container["name"])
            sasl = merged["kafka"]["securityProtocol"].startswith("SASL")
            assert ("RECON_KAFKA_SASL_PASSWORD" in env) == sasl
    expected = {"scanner"} if merged["shodan"]["provider"] == "api" else set()
    assert shodan_key_users == expected
    assert webhook_key_users == ({"notifier"} if merged["notifier"]["enabled"] else set())


def test_existing_secret_is_used_and_no_secret_is_made(render: Any) -> None:
    values = VALUE_SETS["existing-secret"]
    rendered = render(values)
    assert rendered.of("Secret") == []
    names = values["existingSecret"]
    keys = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["existingSecretKeys"]
    refs = [
        entry["valueFrom"]["secretKeyRef"]
        for workload in rendered.workloads()
        for container in containers(workload)
        for entry in container["env"]
        if "secretKeyRef" in entry.get("valueFrom", {})
    ]
    assert refs
    assert {ref["name"] for ref in refs} == {names}
    assert {ref["key"] for ref in refs} == set(keys.values())
    # provider=api: the scanner must not start without the key.
    (scanner,) = containers(rendered.one("Deployment", f"{FULLNAME}-scanner"))
    assert env_of(scanner)["RECON_SHODAN_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is False
    # TLS material comes from the Secrets the values name, mounted read-only.
    mounts = {
        volume["secret"]["secretName"]
        for workload in rendered.workloads()
        for volume in pod_spec(workload)["volumes"]
        if "secret" in volume
    }
    assert mounts == {"kafka-ca", "mongodb-tls"}


def test_chart_made_secret_holds_the_values(render: Any) -> None:
    values = VALUE_SETS["keda"]
    rendered = render(values)
    secret = rendered.one("Secret", FULLNAME)
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "RECON_MONGODB_URI": values["mongodb"]["uri"],
        "RECON_SHODAN_API_KEY": values["shodan"]["apiKey"],
        "RECON_KAFKA_SASL_USERNAME": values["kafka"]["sasl"]["username"],
        "RECON_KAFKA_SASL_PASSWORD": values["kafka"]["sasl"]["password"],
    }
    # Changing a secret value rolls the pods.
    changed = render(deep_merge(values, {"shodan": {"apiKey": "another-key"}}))
    for role in ROLES:
        before = rendered.one("Deployment", f"{FULLNAME}-{role}")
        after = changed.one("Deployment", f"{FULLNAME}-{role}")
        assert (
            pod_annotations(before)["checksum/secret"] != pod_annotations(after)["checksum/secret"]
        )


def test_init_hook_runs_first_with_the_same_settings(case: Any) -> None:
    _, _, merged, rendered = case
    (job,) = rendered.of("Job")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = containers(job)
    assert container["args"][0] == "init"
    env = env_of(container)
    # Inline, not from the ConfigMap: on a first install it does not exist yet.
    inline = {
        name: entry["value"]
        for name, entry in env.items()
        if name.startswith("RECON_") and "value" in entry
    }
    # All of them but the files of release ConfigMaps a hook cannot mount (init
    # reads none of the risk policy, the scope file and the notify file).
    unmountable = {"RECON_RISK_POLICY_FILE", "RECON_SCOPE_FILE", "RECON_NOTIFY_FILE"}
    assert inline == {k: v for k, v in rendered.settings().items() if k not in unmountable}
    # The same credentials as the workers (the MongoDB key's password included).
    (scheduler,) = containers(rendered.one("Deployment", f"{FULLNAME}-scheduler"))
    worker_secrets = {n for n, e in env_of(scheduler).items() if "valueFrom" in e} - {
        "POD_NAME",
        "POD_NAMESPACE",
    }
    assert {n for n, e in env.items() if "valueFrom" in e} == worker_secrets
    assert "envFrom" not in container
    # Nor does the release's ServiceAccount or Secret: the Job uses neither.
    assert "serviceAccountName" not in pod_spec(job)
    secret_names = {
        e["valueFrom"]["secretKeyRef"]["name"] for e in env.values() if "valueFrom" in e
    }
    if merged["existingSecret"]:
        assert secret_names == {merged["existingSecret"]}
    else:
        (hook_secret,) = [s for s in rendered.of("Secret") if s["metadata"]["name"] in secret_names]
        hook = hook_secret["metadata"]["annotations"]
        assert hook["helm.sh/hook"] == annotations["helm.sh/hook"]
        assert int(hook["helm.sh/hook-weight"]) < int(annotations["helm.sh/hook-weight"])
        assert hook_secret["data"] == rendered.one("Secret", FULLNAME)["data"]


def test_init_can_be_left_to_the_platform(render: Any) -> None:
    rendered = render({"init": {"enabled": False}})
    assert rendered.of("Job") == []
    assert [s["metadata"]["name"] for s in rendered.of("Secret")] == [FULLNAME]


def test_image_defaults_to_app_version_and_prefers_a_digest(render: Any, chart: helm.Chart) -> None:
    app_version = chart.metadata["appVersion"]
    images = {c["image"] for w in render({}).workloads() for c in containers(w)}
    assert images == {f"recon-stream:{app_version}"}
    digest = VALUE_SETS["fixed-replicas"]["image"]["digest"]
    images = {
        c["image"] for w in render(VALUE_SETS["fixed-replicas"]).workloads() for c in containers(w)
    }
    assert images == {f"recon-stream@{digest}"}


# ---------------------------------------------------------------- scaling
@pytest.mark.parametrize(
    ("ingest", "scanner"), list(itertools.product(["none", "hpa", "keda"], repeat=2))
)
def test_an_hpa_and_a_scaledobject_never_share_a_deployment(
    render: Any, ingest: str, scanner: str
) -> None:
    rendered = render(
        {"ingest": {"autoscaling": {"mode": ingest}}, "scanner": {"autoscaling": {"mode": scanner}}}
    )
    deployments = {d["metadata"]["name"]: d for d in rendered.of("Deployment")}
    by_hpa = [h["spec"]["scaleTargetRef"] for h in rendered.of("HorizontalPodAutoscaler")]
    by_keda = [s["spec"]["scaleTargetRef"] for s in rendered.of("ScaledObject")]
    for ref in by_hpa + by_keda:
        assert ref["kind"] == "Deployment"
        assert ref["name"] in deployments
    hpa_targets = [r["name"] for r in by_hpa]
    keda_targets = [r["name"] for r in by_keda]
    assert not set(hpa_targets) & set(keda_targets)
    assert len(hpa_targets + keda_targets) == len(set(hpa_targets + keda_targets))
    modes = {"ingest": ingest, "scanner": scanner, "scheduler": "none"}
    for role, mode in modes.items():
        name = f"{FULLNAME}-{role}"
        assert (name in hpa_targets) == (mode == "hpa")
        assert (name in keda_targets) == (mode == "keda")
        # An autoscaled Deployment leaves replicas to the autoscaler, so an
        # upgrade does not reset it.
        assert ("replicas" in deployments[name]["spec"]) == (mode == "none")


def test_scaledobjects_follow_the_consumer_lag_of_each_role(render: Any) -> None:
    rendered = render(VALUE_SETS["keda"])
    settings = rendered.settings()
    expected = {
        "ingest": (settings["RECON_INGEST_GROUP_ID"], settings["RECON_TOPIC_HEARTBEATS"]),
        "scanner": (settings["RECON_SCANNER_GROUP_ID"], settings["RECON_TOPIC_SCAN_REQUESTS"]),
    }
    auths = {a["metadata"]["name"]: a for a in rendered.of("TriggerAuthentication")}
    secrets = {s["metadata"]["name"]: s["data"] for s in rendered.of("Secret")}
    for role, (group, topic) in expected.items():
        scaled = rendered.one("ScaledObject", f"{FULLNAME}-{role}")
        spec = scaled["spec"]
        assert spec["minReplicaCount"] >= 1
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert (meta["consumerGroup"], meta["topic"]) == (group, topic)
        assert meta["bootstrapServers"] == VALUE_SETS["keda"]["keda"]["bootstrapServers"]
        assert meta["offsetResetPolicy"] == "earliest"
        assert meta["allowIdleConsumers"] == "false"
        assert meta["sasl"] == "scram_sha256"
        # The credentials KEDA reads are the ones the workers read.
        auth = auths[trigger["authenticationRef"]["name"]]
        params = {ref["parameter"]: ref for ref in auth["spec"]["secretTargetRef"]}
        assert set(params) == {"username", "password"}
        for ref in params.values():
            assert ref["key"] in secrets[ref["name"]]
    behavior = rendered.one("ScaledObject", f"{FULLNAME}-scanner")["spec"]["advanced"]
    assert behavior["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 600
    }


def test_pod_disruption_budgets_never_block_a_drain(case: Any) -> None:
    _, _, merged, rendered = case
    budgets = rendered.of("PodDisruptionBudget")
    deployments = rendered.of("Deployment")
    expected = {role for role in roles_of(merged) if merged[role]["podDisruptionBudget"]["enabled"]}
    assert {b["metadata"]["labels"]["app.kubernetes.io/component"] for b in budgets} == expected
    for budget in budgets:
        assert "minAvailable" not in budget["spec"]
        assert budget["spec"]["maxUnavailable"] >= 1
        matched = [
            d
            for d in deployments
            if selects(budget["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(matched) == 1


# ------------------------------------------------------- services, metrics
def test_each_service_selects_exactly_its_role(case: Any) -> None:
    _, _, _, rendered = case
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
        for w in rendered.workloads()
    }
    for service in rendered.of("Service"):
        role = service["metadata"]["labels"]["app.kubernetes.io/component"]
        matched = [
            name
            for name, labels in pods.items()
            if selects({"matchLabels": service["spec"]["selector"]}, labels)
        ]
        assert matched == [f"{FULLNAME}-{role}"]
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] == "http"
        assert service["spec"]["publishNotReadyAddresses"] is True


def test_service_monitor_scrapes_every_role_as_the_alerts_expect(
    render: Any, chart: helm.Chart
) -> None:
    rendered = render(VALUE_SETS["monitoring"])
    roles = roles_of(chart.merge_values(VALUE_SETS["monitoring"]))
    assert roles == ALL_ROLES
    monitor = rendered.one("ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    services = [
        s
        for s in rendered.of("Service")
        if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert len(services) == len(roles) == len(rendered.of("Service"))
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    for service in services:
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    # The job label the rules select on: the Service label jobLabel names.
    jobs = {s["metadata"]["labels"][monitor["spec"]["jobLabel"]] for s in services}
    assert len(jobs) == 1
    (job,) = jobs
    for pattern in job_matchers():
        assert re.fullmatch(pattern, job), (pattern, job)
    # The same job and role labels as the compose scrape config.
    compose = yaml.safe_load(
        (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    )
    scrape = next(c for c in compose["scrape_configs"] if c["job_name"] == job)
    compose_roles = {s["labels"]["role"] for s in scrape["static_configs"]}
    assert compose_roles == set(roles)
    (relabel,) = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "role"]
    assert relabel["sourceLabels"] == [
        "__meta_kubernetes_service_label_app_kubernetes_io_component"
    ]


def job_matchers() -> list[str]:
    """The regular expressions alerts.yml matches `job` with (`=` is a literal)."""
    rules = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    patterns = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', str(rule["expr"])):
                patterns.append(value if op == "=~" else re.escape(value))
    return patterns


def test_prometheus_rule_carries_the_compose_alert_rules(render: Any) -> None:
    rendered = render(VALUE_SETS["monitoring"])
    rule = rendered.one("PrometheusRule", FULLNAME)
    expected = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    assert expected["groups"], "deploy/prometheus/alerts.yml has no rule groups"
    assert rule["spec"]["groups"] == expected["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_alert_rules_are_one_file_in_the_packaged_chart_too(tmp_path: Path) -> None:
    link = CHART / "files" / "alerts.yml"
    assert link.resolve() == ALERTS.resolve()
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("recon-stream/files/alerts.yml")
        assert member.isfile()  # the contents, not a link that would dangle
        packaged = tar.extractfile(member).read()
    assert packaged == ALERTS.read_bytes()


def test_monitoring_objects_are_opt_in(render: Any) -> None:
    rendered = render({})
    assert rendered.of("ServiceMonitor") == rendered.of("PrometheusRule") == []


def test_tracing_exports_to_the_configured_collector(render: Any) -> None:
    tracing = VALUE_SETS["monitoring"]["tracing"]
    for deployment in render(VALUE_SETS["monitoring"]).of("Deployment"):
        role = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        env = {k: v.get("value") for k, v in env_of(containers(deployment)[0]).items()}
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == tracing["otlpEndpoint"]
        assert env["OTEL_SERVICE_NAME"] == f"recon-stream-{role}"
        assert env["OTEL_TRACES_SAMPLER"] == tracing["sampler"]
        assert env["OTEL_TRACES_SAMPLER_ARG"] == tracing["samplerArg"]
        assert "deployment.environment=production" in env["OTEL_RESOURCE_ATTRIBUTES"].split(",")
        assert "OTEL_SDK_DISABLED" not in env
    for deployment in render({}).of("Deployment"):
        env = env_of(containers(deployment)[0])
        assert env["OTEL_SDK_DISABLED"]["value"] == "true"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env


# ----------------------------------------------------------- NetworkPolicy
def test_network_policy_lets_through_exactly_what_the_workers_use(case: Any) -> None:
    _, _, merged, rendered = case
    policies = rendered.of("NetworkPolicy")
    if not merged["networkPolicy"]["enabled"]:
        assert policies == []
        return
    main = rendered.one("NetworkPolicy", FULLNAME)
    scanner_only = rendered.one("NetworkPolicy", f"{FULLNAME}-scanner-shodan")
    webhooks = [p for p in policies if p["metadata"]["name"] == f"{FULLNAME}-notifier-webhooks"]
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
        for w in rendered.workloads()
    }
    assert all(selects(main["spec"]["podSelector"], labels) for labels in pods.values())
    assert [
        n for n, labels in pods.items() if selects(scanner_only["spec"]["podSelector"], labels)
    ] == [f"{FULLNAME}-scanner"]
    # In: the named HTTP port only, from the configured scrapers.
    (ingress,) = main["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert ingress.get("from", []) == merged["networkPolicy"]["metricsFrom"]
    # Out: DNS, every Kafka bootstrap port, MongoDB, and OTLP when tracing.
    allowed = {(p["port"], p["protocol"]) for rule in main["spec"]["egress"] for p in rule["ports"]}
    assert {(53, "UDP"), (53, "TCP")} <= allowed
    for server in merged["kafka"]["bootstrapServers"].split(","):
        assert (int(server.rsplit(":", 1)[1]), "TCP") in allowed, server
    if not merged["existingSecret"]:
        uri = urlsplit(merged["mongodb"]["uri"].split(",")[0])
        assert (uri.port or 27017, "TCP") in allowed
    if merged["tracing"]["enabled"]:
        assert (urlsplit(merged["tracing"]["otlpEndpoint"]).port, "TCP") in allowed
    assert (443, "TCP") not in allowed
    https = {
        (p["port"], p["protocol"]) for rule in scanner_only["spec"]["egress"] for p in rule["ports"]
    }
    assert https == {(443, "TCP")}
    # The notifier reaches webhook receivers anywhere on the webhook ports (443
    # by default); no other pod does.
    feeds = [p for p in policies if p["metadata"]["name"] == f"{FULLNAME}-scheduler-feeds"]
    urls = [s for s in merged["vulnFeeds"].values() if s.startswith(("http://", "https://"))]
    if urls:
        # The scheduler's leader fetches the feeds: HTTPS out, scheduler pods only.
        (feed_policy,) = feeds
        assert [
            n for n, labels in pods.items() if selects(feed_policy["spec"]["podSelector"], labels)
        ] == [f"{FULLNAME}-scheduler"]
        (rule,) = feed_policy["spec"]["egress"]
        assert {(p["port"], p["protocol"]) for p in rule["ports"]} == {
            (port, "TCP") for port in merged["networkPolicy"]["egress"]["feedPorts"]
        }
    else:
        assert feeds == []
    verification = [
        p for p in policies if p["metadata"]["name"] == f"{FULLNAME}-scanner-verification"
    ]
    assert len(verification) == int(merged["freshness"]["verification"]["enabled"])
    if not merged["notifier"]["enabled"]:
        assert webhooks == []
        assert len(policies) == 2 + len(feeds) + len(verification)
        return
    (notifier_only,) = webhooks
    assert notifier_only["spec"]["policyTypes"] == ["Egress"]
    assert [
        n for n, labels in pods.items() if selects(notifier_only["spec"]["podSelector"], labels)
    ] == [f"{FULLNAME}-notifier"]
    (rule,) = notifier_only["spec"]["egress"]
    assert "to" not in rule  # any address: the internet, or a receiver in the cluster
    ports = {(p["port"], p["protocol"]) for p in rule["ports"]}
    assert ports == {(port, "TCP") for port in merged["networkPolicy"]["egress"]["webhookPorts"]}
    assert (443, "TCP") in ports


# ---------------------------------------------------------------- freshness
FRESHNESS_SETTINGS = {
    "RECON_SHODAN_SCAN_CREDITS_PER_DAY": "0",
    "RECON_SHODAN_SCAN_POLL_SECONDS": "60",
    "RECON_SHODAN_SCAN_TIMEOUT_SECONDS": "21600",
    "RECON_VERIFY_TCP": "false",
    "RECON_VERIFY_RATE": "20",
    "RECON_VERIFY_TIMEOUT_SECONDS": "3",
    "RECON_VERIFY_CONFIRM_SECONDS": "60",
}
# The ranges the verification policy never opens, whatever the values say.
ALWAYS_EXCEPTED_V4 = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "169.254.0.0/16",
    "127.0.0.0/8",
]
ALWAYS_EXCEPTED_V6 = ["fc00::/7", "fe80::/10", "::1/128"]
VERIFICATION_POLICY = f"{FULLNAME}-scanner-verification"


def test_the_freshness_defaults_are_the_apps_and_reach_the_configmap(
    render: Any, load_settings: Any
) -> None:
    """Off by default, with the app's own defaults: the chart changes nothing until asked."""
    from recon_stream.settings import Settings

    data = render({}).settings()
    assert {k: data[k] for k in FRESHNESS_SETTINGS} == FRESHNESS_SETTINGS
    fields = Settings.model_fields
    for key, text in FRESHNESS_SETTINGS.items():
        default = fields[key.removeprefix("RECON_").lower()].default
        assert str(default).lower().removesuffix(".0") == text, key
    settings = load_settings({**data, "RECON_MONGODB_URI": "mongodb://db"})
    assert settings.shodan_scan_credits_per_day == 0
    assert settings.verify_tcp is False


def test_the_freshness_values_reach_the_workers_as_the_app_reads_them(
    render: Any, load_settings: Any
) -> None:
    rendered = render(VALUE_SETS["freshness"])
    data = rendered.settings()
    assert {k: data[k] for k in FRESHNESS_SETTINGS} == {
        "RECON_SHODAN_SCAN_CREDITS_PER_DAY": "3",
        "RECON_SHODAN_SCAN_POLL_SECONDS": "30",
        "RECON_SHODAN_SCAN_TIMEOUT_SECONDS": "7200",
        "RECON_VERIFY_TCP": "true",
        "RECON_VERIFY_RATE": "7.5",
        "RECON_VERIFY_TIMEOUT_SECONDS": "2",
        "RECON_VERIFY_CONFIRM_SECONDS": "120",
    }
    settings = load_settings({**data, "RECON_MONGODB_URI": "mongodb://db"})
    assert settings.shodan_scan_credits_per_day == 3
    assert settings.shodan_scan_poll_seconds == 30
    assert settings.shodan_scan_timeout_seconds == 7200
    assert settings.verify_tcp is True
    assert settings.verify_rate == 7.5
    assert settings.verify_timeout_seconds == 2
    assert settings.verify_confirm_seconds == 120
    # Inline in the init Job too (checked for every value set elsewhere), and a
    # large whole number is printed as one, not as 1e+06.
    big = render({"freshness": {"scanTimeoutSeconds": 1_000_000}}).settings()
    assert big["RECON_SHODAN_SCAN_TIMEOUT_SECONDS"] == "1000000"


@pytest.mark.parametrize("key", sorted(FRESHNESS_SETTINGS))
def test_settings_extra_cannot_set_a_freshness_setting_behind_the_values_back(
    chart: helm.Chart, key: str
) -> None:
    """The chart's keys win over settings.extra: rather than ignore an operator's
    extra silently (credits back to 0, verification off), the render fails and
    names the value to use."""
    with pytest.raises(helm.HelmRenderError, match=rf"settings\.extra\.{key}: set freshness\."):
        chart.render({"settings": {"extra": {key: "1"}}}, name=RELEASE)


@pytest.mark.parametrize(
    ("verification", "egress", "policies"),
    [(False, True, True), (True, False, True), (True, True, False), (False, False, True)],
    ids=["verification-off", "egress-open", "no-network-policy", "neither"],
)
def test_no_verification_egress_unless_both_switches_are_on(
    render: Any, verification: bool, egress: bool, policies: bool
) -> None:
    rendered = render(
        {
            "freshness": {"verification": {"enabled": verification}},
            "networkPolicy": {"enabled": policies, "egress": {"enabled": egress}},
        }
    )
    names = {p["metadata"]["name"] for p in rendered.of("NetworkPolicy")}
    assert VERIFICATION_POLICY not in names
    # With egress unrestricted there is nothing to open; with verification off, nothing to reach.
    assert not [d for d in rendered.docs if "verification" in d["metadata"]["name"]]


def test_the_verification_egress_is_public_tcp_from_the_scanner_pods_only(render: Any) -> None:
    rendered = render(VALUE_SETS["freshness"])
    policy = rendered.one("NetworkPolicy", VERIFICATION_POLICY)
    spec = policy["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert "ingress" not in spec
    pods = {
        w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
        for w in rendered.workloads()
    }
    assert [n for n, labels in pods.items() if selects(spec["podSelector"], labels)] == [
        f"{FULLNAME}-scanner"
    ]
    (rule,) = spec["egress"]
    # Every TCP port (no port named): the ports are whatever Shodan reported. No UDP.
    assert rule["ports"] == [{"protocol": "TCP"}]
    blocks = {peer["ipBlock"]["cidr"]: peer["ipBlock"]["except"] for peer in rule["to"]}
    assert set(blocks) == {"0.0.0.0/0", "::/0"}
    assert [set(peer) for peer in rule["to"]] == [{"ipBlock"}] * 2
    assert blocks["0.0.0.0/0"] == [*ALWAYS_EXCEPTED_V4, "203.0.113.0/24"]
    assert blocks["::/0"] == [*ALWAYS_EXCEPTED_V6, "2001:db8:1::/48"]
    # Each excepted range is inside its block (the API server refuses one that is not).
    for cidr, excepted in blocks.items():
        outer = ipaddress.ip_network(cidr)
        for inner in excepted:
            net = ipaddress.ip_network(inner)
            assert net.version == outer.version, inner
            assert net.subnet_of(outer), inner
    # With no extra ranges, exactly the fixed ones; a repeated one is listed once.
    plain = render(
        {
            "freshness": {"verification": {"enabled": True}},
            "networkPolicy": {"egress": {"verificationExcept": ["10.0.0.0/8"]}},
        }
    ).one("NetworkPolicy", VERIFICATION_POLICY)
    ((v4, v6),) = [[p["ipBlock"]["except"] for p in r["to"]] for r in plain["spec"]["egress"]]
    assert (v4, v6) == (ALWAYS_EXCEPTED_V4, ALWAYS_EXCEPTED_V6)
    # The other policies are unchanged: the scanner's Shodan egress is still 443 only.
    shodan = rendered.one("NetworkPolicy", f"{FULLNAME}-scanner-shodan")
    assert [p["port"] for r in shodan["spec"]["egress"] for p in r["ports"]] == [443]


def test_notes_remind_of_consent_and_the_probe_identity_only_with_verification(
    render: Any,
) -> None:
    on = render(VALUE_SETS["freshness"]).notes
    assert "recon-stream verification --org ORG --enable --by WHO --reason R" in on
    assert "reverse DNS" in on
    assert "Verification: the probe's egress" in on
    assert VERIFICATION_POLICY in on
    assert "monthly / 30" in on
    off = render({}).notes
    assert "verification" not in off.lower()
    assert "On-demand Shodan scans" not in off
    no_policy = render(
        {"freshness": {"verification": {"enabled": True}}, "networkPolicy": {"enabled": False}}
    ).notes
    assert "--enable" in no_policy
    assert VERIFICATION_POLICY not in no_policy


# --------------------------------------------------------- notes, README
def test_notes_warn_about_sample_data_and_idle_replicas(render: Any) -> None:
    assert "sample" in render({}).notes
    assert "WARNING" not in render(VALUE_SETS["keda"]).notes
    assert "WARNING" not in render(VALUE_SETS["existing-secret"]).notes
    assert "sit idle" not in render({}).notes
    assert "sit idle" in render({"ingest": {"autoscaling": {"maxReplicas": 24}}}).notes


def value_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and path not in DOCUMENTED_AS_A_WHOLE:
            yield from value_paths(value, path + ".")
        else:
            yield path


# Maps documented as one entry (Kubernetes objects passed through).
DOCUMENTED_AS_A_WHOLE = {
    "podSecurityContext",
    "securityContext",
    *(f"{role}.resources" for role in ALL_ROLES),
    "init.resources",
}


def test_chart_readme_documents_every_value() -> None:
    readme = (CHART / "README.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\|\s*`([^`]+)`", readme, flags=re.MULTILINE))
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    missing = [path for path in value_paths(values) if path not in documented]
    assert missing == []
    stale = [path for path in documented if path.split(".")[0] not in values]
    assert stale == []


def test_a_risk_policy_is_mounted_into_every_worker(render: Any) -> None:
    text = "organizations:\n  acme:\n    - port: tcp/8443\n      severity: info\n"
    rendered = render(
        {
            "riskPolicy": text,
            # With the TLS Secrets mounted too: none may land inside another mount.
            "kafka": {"securityProtocol": "SSL", "tls": {"existingSecret": "kafka-ca"}},
            "mongodb": {"tls": {"enabled": True, "existingSecret": "mongo-ca"}},
        }
    )
    policy = rendered.one("ConfigMap", f"{FULLNAME}-risk-policy")
    assert policy["data"]["risk-policy.yaml"].strip() == text.strip()
    expected = "/etc/recon-stream-policy/risk-policy.yaml"
    assert rendered.settings()["RECON_RISK_POLICY_FILE"] == expected
    for deployment in rendered.of("Deployment"):
        spec = pod_spec(deployment)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["risk-policy"]["configMap"]["name"] == f"{FULLNAME}-risk-policy"
        (container,) = [c for c in spec["containers"] if c["name"] != "istio-proxy"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["risk-policy"]["mountPath"] == "/etc/recon-stream-policy"
        paths = [m["mountPath"] for m in mounts.values()]
        assert {"kafka-tls", "mongodb-tls"} <= set(mounts)
        nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + "/")]
        assert nested == []
        assert mounts["risk-policy"]["readOnly"] is True
    default = render({})
    assert "RECON_RISK_POLICY_FILE" not in default.settings()
    assert not [c for c in default.of("ConfigMap") if c["metadata"]["name"].endswith("policy")]


# ------------------------------------------------------------- scope file
def effective_env(rendered: Rendered, container: dict[str, Any]) -> dict[str, str]:
    """The plain variables a container starts with: its envFrom ConfigMaps, then `env`."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(rendered.one("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_a_scope_file_is_mounted_into_every_worker_and_not_into_init(
    render: Any, tmp_path: Path
) -> None:
    rendered = render(
        {
            "scope": SCOPE_EXAMPLE,
            "notifier": {"enabled": True, "notifyFile": "destinations: []\n"},
            # With the TLS Secrets mounted too: none may land inside another mount.
            "kafka": {"securityProtocol": "SSL", "tls": {"existingSecret": "kafka-ca"}},
            "mongodb": {"tls": {"enabled": True, "existingSecret": "mongo-ca"}},
        }
    )
    config = rendered.one("ConfigMap", f"{FULLNAME}-scope")
    assert config["data"] == {"scope.yaml": SCOPE_EXAMPLE}
    path = f"{SCOPE_DIR}/scope.yaml"
    assert rendered.settings()["RECON_SCOPE_FILE"] == path
    deployments = {d["metadata"]["name"]: d for d in rendered.of("Deployment")}
    assert set(deployments) == {f"{FULLNAME}-{role}" for role in ALL_ROLES}
    for name, deployment in deployments.items():
        spec = pod_spec(deployment)
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["scope"] == {"name": "scope", "configMap": {"name": f"{FULLNAME}-scope"}}
        (container,) = spec["containers"]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert mounts["scope"] == {"name": "scope", "mountPath": SCOPE_DIR, "readOnly": True}
        paths = [m["mountPath"] for m in mounts.values()]
        nested = [(a, b) for a in paths for b in paths if a != b and b.startswith(a + "/")]
        assert nested == [], name
        # The variable each worker starts with names the mounted file, and that file
        # (the ConfigMap's key under the mount) is the example, as the app loads it.
        env = effective_env(rendered, container)
        assert env["RECON_SCOPE_FILE"] == path, name
        mounted = tmp_path / Path(path).relative_to("/")
        mounted.parent.mkdir(parents=True, exist_ok=True)
        key = Path(path).relative_to(SCOPE_DIR).as_posix()
        mounted.write_text(config["data"][key], encoding="utf-8")
        assert load_scope(mounted) == load_scope(ROOT / "deploy" / "scope.example.yaml")
    # The init hook runs before the ConfigMap exists: no volume, no mount, no variable.
    (job,) = rendered.of("Job")
    spec = pod_spec(job)
    (init,) = spec["containers"]
    assert "scope" not in {v["name"] for v in spec["volumes"]}
    assert SCOPE_DIR not in {m["mountPath"] for m in init["volumeMounts"]}
    assert "RECON_SCOPE_FILE" not in effective_env(rendered, init)
    assert ("ConfigMap", f"{FULLNAME}-scope") not in referenced_objects(spec)
    # No value, no file: nothing mounted, nothing set.
    default = render({})
    assert "RECON_SCOPE_FILE" not in default.settings()
    assert not [c for c in default.of("ConfigMap") if c["metadata"]["name"].endswith("-scope")]
    for workload in default.workloads():
        assert "scope" not in {v["name"] for v in pod_spec(workload)["volumes"]}


def test_a_changed_scope_file_rolls_every_worker_and_nothing_else_changes(
    render: Any, chart: helm.Chart
) -> None:
    """The workers read the file at start: the pod annotation checksum/scope is how a
    change reaches them (a new pod template, so a rolling restart)."""
    base = {"notifier": {"enabled": True, "notifyFile": "destinations: []\n"}}
    widened = SCOPE_EXAMPLE + "  org-c:\n    exclude:\n      - {asn: AS64500, reason: x}\n"

    def templates(rendered: Rendered) -> dict[str, dict[str, Any]]:
        return {d["metadata"]["name"]: d["spec"]["template"] for d in rendered.of("Deployment")}

    none, example, changed = (
        templates(render({**base, "scope": s})) for s in ("", SCOPE_EXAMPLE, widened)
    )
    # A second render of its own (render() caches): the checksum is stable.
    again = templates(
        Rendered(chart.render({**base, "scope": SCOPE_EXAMPLE}, name=RELEASE, namespace=NAMESPACE))
    )
    assert set(example) == {f"{FULLNAME}-{role}" for role in ALL_ROLES}
    for name, template in example.items():
        checksum = template["metadata"]["annotations"]["checksum/scope"]
        assert re.fullmatch(r"[0-9a-f]{64}", checksum)
        # The same file, the same pods; another file (or none), a roll.
        assert again[name] == template
        assert changed[name]["metadata"]["annotations"]["checksum/scope"] != checksum
        assert none[name]["metadata"]["annotations"]["checksum/scope"] != checksum
        # Only the scope checksum differs: the file's path is the same, the settings too.
        before = copy.deepcopy(template)
        after = copy.deepcopy(changed[name])
        before["metadata"]["annotations"].pop("checksum/scope")
        after["metadata"]["annotations"].pop("checksum/scope")
        assert before == after, name
    assert len({t["metadata"]["annotations"]["checksum/scope"] for t in example.values()}) == 1


@pytest.mark.parametrize(
    ("scope", "message"),
    [
        ("exclude: [\n", "scope is not a YAML mapping"),
        ("- {asn: AS62044, reason: Zscaler}\n", "scope is not a YAML mapping"),
        ("exclude:\n  - {asn: AS62044, reason: Zscaler}\n", "`version: 1`"),
        ("extends: default\n", "`version: 1`"),  # a risk policy, in the wrong value
        ("version: 2\n", "`version: 1`"),
    ],
)
def test_the_chart_refuses_a_scope_that_is_no_scope_file(
    chart: helm.Chart, scope: str, message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render({"scope": scope}, name=RELEASE)


# ----------------------------------------------------------------- notifier
def test_the_notifier_is_off_by_default(render: Any) -> None:
    rendered = render({})
    names = [d["metadata"]["name"] for d in rendered.docs]
    assert not [n for n in names if "notifier" in n]
    assert "RECON_NOTIFY_FILE" not in rendered.settings()


def test_the_notifier_reads_its_file_from_a_configmap_and_its_keys_from_a_secret(
    render: Any,
) -> None:
    values = VALUE_SETS["notifier"]
    rendered = render(values)
    deployment = rendered.one("Deployment", f"{FULLNAME}-notifier")
    assert deployment["spec"]["replicas"] == 2
    spec = pod_spec(deployment)
    (container,) = spec["containers"]
    assert container["args"] == ["run", "notifier"]
    # The file: a ConfigMap of the value, mounted read-only where RECON_NOTIFY_FILE points.
    notify = rendered.one("ConfigMap", f"{FULLNAME}-notifier")
    assert notify["data"] == {"notify.yaml": values["notifier"]["notifyFile"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert volumes["notify"]["configMap"]["name"] == f"{FULLNAME}-notifier"
    assert mounts["notify"]["readOnly"] is True
    path = rendered.settings()["RECON_NOTIFY_FILE"]
    assert path == f"{mounts['notify']['mountPath']}/notify.yaml"
    assert rendered.settings()["RECON_NOTIFIER_GROUP_ID"] == "acme-recon-notifier"
    # The mount is not inside another volume's (a ConfigMap volume is read-only:
    # the runtime could not make the mount point there).
    others = [m["mountPath"] for m in container["volumeMounts"] if m["name"] != "notify"]
    assert not [o for o in others if Path(path).is_relative_to(o)]
    # The keys: each secret_env from the existing Secret, under its own name.
    env = env_of(container)
    for name in ("RECON_PSA_WEBHOOK_SECRET", "RECON_TEAMS_WEBHOOK_SECRET"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "recon-webhook-keys", "key": name}
    # No ConfigMap sets them, the mounted file names them only, and the chart makes
    # no Secret for them.
    for config in rendered.of("ConfigMap"):
        assert not [key for key in config["data"] if key.endswith("_WEBHOOK_SECRET")]
    for destination in yaml.safe_load(notify["data"]["notify.yaml"])["destinations"]:
        assert "secret" not in destination
    assert {s["metadata"]["name"] for s in rendered.of("Secret")} == {FULLNAME, f"{FULLNAME}-init"}
    # Only the notifier gets the file, the keys and the webhook egress.
    for other in rendered.of("Deployment"):
        if other is deployment:
            continue
        (c,) = containers(other)
        assert "notify" not in {m["name"] for m in c["volumeMounts"]}
        assert not [n for n in env_of(c) if n.endswith("_WEBHOOK_SECRET")]


def test_a_chart_made_notifier_secret_holds_the_keys_and_rolls_the_pods(render: Any) -> None:
    values = VALUE_SETS["monitoring"]
    rendered = render(values)
    secret = rendered.one("Secret", f"{FULLNAME}-notifier")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == values["notifier"]["secrets"]
    for config in rendered.of("ConfigMap"):
        text = yaml.safe_dump(config["data"])
        assert not [key for key in decoded.values() if key in text], config["metadata"]["name"]
    (container,) = containers(rendered.one("Deployment", f"{FULLNAME}-notifier"))
    env = env_of(container)
    assert env["RECON_PSA_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": f"{FULLNAME}-notifier",
        "key": "RECON_PSA_WEBHOOK_SECRET",
    }
    # A new key or a new file rolls the notifier.
    before = pod_annotations(rendered.one("Deployment", f"{FULLNAME}-notifier"))
    for change in (
        {"notifier": {"secrets": {"RECON_PSA_WEBHOOK_SECRET": "rotated"}}},
        {"notifier": {"notifyFile": NOTIFY_FILE + "  - {name: x, url: https://x.example}\n"}},
    ):
        after = pod_annotations(
            render(deep_merge(values, change)).one("Deployment", f"{FULLNAME}-notifier")
        )
        assert after["checksum/notifier"] != before["checksum/notifier"]


@pytest.mark.parametrize(
    ("notifier", "message"),
    [
        (
            {"notifyFile": "destinations:\n  - {name: a, url: 'https://a.example', secret: k}\n"},
            "inline secret",
        ),
        ({"notifyFile": NOTIFY_FILE}, "RECON_PSA_WEBHOOK_SECRET, which has no value"),
        ({"notifyFile": "destinations:\n"}, "needs a `destinations:` list"),
        ({"notifyFile": "destinations: [\n"}, "not YAML"),
    ],
)
def test_the_chart_refuses_a_notify_file_it_cannot_deploy_safely(
    chart: helm.Chart, notifier: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render({"notifier": {"enabled": True, **notifier}}, name=RELEASE)


# ------------------------------------------------------------------- hooks
def referenced_objects(pod: dict[str, Any]) -> set[tuple[str, str]]:
    """(kind, name) of every ConfigMap and Secret a pod spec mounts or reads."""
    found: set[tuple[str, str]] = set()
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            found.add(("ConfigMap", volume["configMap"]["name"]))
        if "secret" in volume:
            found.add(("Secret", volume["secret"]["secretName"]))
        for source in volume.get("projected", {}).get("sources", []):
            if "configMap" in source:
                found.add(("ConfigMap", source["configMap"]["name"]))
            if "secret" in source:
                found.add(("Secret", source["secret"]["name"]))
    for container in pod.get("initContainers", []) + pod["containers"]:
        for entry in container.get("envFrom", []):
            if "configMapRef" in entry:
                found.add(("ConfigMap", entry["configMapRef"]["name"]))
            if "secretRef" in entry:
                found.add(("Secret", entry["secretRef"]["name"]))
        for entry in container.get("env", []):
            source = entry.get("valueFrom", {})
            if "configMapKeyRef" in source:
                found.add(("ConfigMap", source["configMapKeyRef"]["name"]))
            if "secretKeyRef" in source:
                found.add(("Secret", source["secretKeyRef"]["name"]))
    for secret in pod.get("imagePullSecrets", []):
        found.add(("Secret", secret["name"]))
    return found


def hook_weight(doc: dict[str, Any]) -> int | None:
    """A hook's weight, or None for an ordinary release object."""
    annotations = doc["metadata"].get("annotations") or {}
    if "helm.sh/hook" not in annotations:
        return None
    return int(annotations.get("helm.sh/hook-weight", "0"))


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"riskPolicy": "extends: default\n"},
        {"scope": SCOPE_EXAMPLE},
        {"notifier": {"enabled": True, "notifyFile": "destinations: []\n"}},
        {"mongodb": {"tls": {"enabled": True, "existingSecret": "mongo-ca"}}},
    ],
    ids=["as-is", "risk-policy", "scope", "notifier", "mongodb-tls"],
)
def test_hooks_use_only_what_exists_before_hooks_run(case: Any, render: Any, extra: Any) -> None:
    """A pre-install hook runs before the release's ordinary objects exist: a hook
    that mounts or reads one of them waits for it forever on a first install. It
    may use hook objects of a lower weight, and objects the chart does not make
    (the values name them: they exist before `helm install`)."""
    _, values, _, _ = case
    rendered = render(deep_merge(values, extra))
    made = {(d["kind"], d["metadata"]["name"]): hook_weight(d) for d in rendered.docs}
    hooks = [d for d in rendered.workloads() if hook_weight(d) is not None]
    assert hooks, "the init Job is a hook"
    for hook in hooks:
        weight = hook_weight(hook)
        for ref in sorted(referenced_objects(pod_spec(hook))):
            if ref not in made:
                continue  # made by you, before the install
            assert made[ref] is not None, f"hook {hook['metadata']['name']} uses {ref}, no hook"
            assert made[ref] < weight, f"{ref} is created after the hook that uses it"


def test_the_hook_check_notices_a_release_configmap(render: Any) -> None:
    """The check above is real: the workers' pods (no hooks) do use release objects."""
    rendered = render({"riskPolicy": "extends: default\n", "scope": SCOPE_EXAMPLE})
    made = {(d["kind"], d["metadata"]["name"]) for d in rendered.docs}
    deployment = rendered.one("Deployment", f"{FULLNAME}-scanner")
    used = referenced_objects(pod_spec(deployment)) & made
    assert ("ConfigMap", f"{FULLNAME}-risk-policy") in used
    assert ("ConfigMap", f"{FULLNAME}-scope") in used
    assert ("ConfigMap", FULLNAME) in used
    # And the init hook uses none of them: only objects that exist before it runs.
    (job,) = rendered.of("Job")
    assert not [ref for ref in referenced_objects(pod_spec(job)) & made if ref[0] == "ConfigMap"]


def test_init_gets_the_encrypted_mongodb_keys_password(render: Any) -> None:
    values = {
        "mongodb": {
            "tls": {
                "enabled": True,
                "existingSecret": "mongodb-tls",
                "certificateKeyKey": "client.pem",
                "certificateKeyEncrypted": True,
                "certificateKeyPassword": "pem-pass",
            }
        }
    }
    rendered = render(values)
    (job,) = rendered.of("Job")
    for workload in (job, rendered.one("Deployment", f"{FULLNAME}-ingest")):
        (container,) = containers(workload)
        ref = env_of(container)["RECON_MONGODB_TLS_CERTIFICATE_KEY_FILE_PASSWORD"]["valueFrom"]
        secret = rendered.one("Secret", ref["secretKeyRef"]["name"])
        assert base64.b64decode(secret["data"][ref["secretKeyRef"]["key"]]) == b"pem-pass"
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/recon-stream/mongodb-tls" in mounts
    assert "RECON_MONGODB_TLS_CERTIFICATE_KEY_FILE_PASSWORD" not in yaml.safe_dump(
        rendered.settings()
    )
    # init.extraEnv reaches the Job.
    extra = [{"name": "RECON_MONGODB_SERVER_SELECTION_TIMEOUT_MS", "value": "20000"}]
    (job,) = render({"init": {"extraEnv": extra}}).of("Job")
    assert env_of(containers(job)[0])["RECON_MONGODB_SERVER_SELECTION_TIMEOUT_MS"] == extra[0]


# ----------------------------------------------------- topics, groups, feeds
def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def test_values_name_every_topic_and_consumer_group_the_app_uses(
    render: Any, load_settings: Any
) -> None:
    """kafka.topics and kafka.consumerGroups hold every topic `init` creates and
    every group a worker joins, with the app's defaults."""
    from recon_stream.settings import Settings

    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["kafka"]
    defaults = Settings.model_fields
    topics = {"topic_" + snake_case(k): v for k, v in values["topics"].items()}
    app_topics = {
        name: field.default for name, field in defaults.items() if name.startswith("topic_")
    }
    assert topics == app_topics
    groups = {f"{snake_case(k)}_group_id": v for k, v in values["consumerGroups"].items()}
    app_groups = {name: f.default for name, f in defaults.items() if name.endswith("_group_id")}
    assert groups == app_groups
    # And each reaches the workers as the app reads it.
    settings = load_settings({**render({}).settings(), "RECON_MONGODB_URI": "mongodb://db"})
    for name, value in {**topics, **groups}.items():
        assert getattr(settings, name) == value, name
    off = render({"kafka": {"topics": {"exposureState": "", "exposuresOcsf": ""}}}).settings()
    settings = load_settings({**off, "RECON_MONGODB_URI": "mongodb://db"})
    assert not settings.topic_exposure_state
    assert not settings.topic_exposures_ocsf


def test_the_feed_sources_are_first_class_values(render: Any, load_settings: Any) -> None:
    rendered = render({"vulnFeeds": {"kevSource": KEV_URL, "epssSource": EPSS_URL}})
    settings = load_settings({**rendered.settings(), "RECON_MONGODB_URI": "mongodb://db"})
    assert (settings.kev_source, settings.epss_source) == (KEV_URL, EPSS_URL)
    assert "RECON_KEV_SOURCE" not in render({}).settings()
    # A file in the image needs no egress.
    files = render({"vulnFeeds": {"kevSource": "/srv/kev.json", "epssSource": ""}})
    assert files.settings()["RECON_KEV_SOURCE"] == "/srv/kev.json"
    names = {p["metadata"]["name"] for p in files.of("NetworkPolicy")}
    assert f"{FULLNAME}-scheduler-feeds" not in names
    assert f"{FULLNAME}-scheduler-feeds" in {
        p["metadata"]["name"] for p in rendered.of("NetworkPolicy")
    }


def test_the_default_provider_is_the_api_and_a_missing_key_stops_the_scanner(
    render: Any, chart: helm.Chart
) -> None:
    assert chart.merge_values({})["shodan"]["provider"] == "api"
    rendered = render({})
    assert rendered.settings()["RECON_SHODAN_PROVIDER"] == "api"
    (scanner,) = containers(rendered.one("Deployment", f"{FULLNAME}-scanner"))
    ref = env_of(scanner)["RECON_SHODAN_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is False
    assert ref["key"] not in rendered.one("Secret", ref["name"])["data"]
    assert "ERROR" in rendered.notes
    assert "will not start" in rendered.notes
    sample = render({"shodan": {"provider": "sample"}})
    assert "WARNING" in sample.notes
    assert "invented" in sample.notes
    (scanner,) = containers(sample.one("Deployment", f"{FULLNAME}-scanner"))
    assert "RECON_SHODAN_API_KEY" not in env_of(scanner)


# ----------------------------------------------------------------- Grafana
def test_the_dashboard_is_a_configmap_for_the_grafana_sidecar(render: Any) -> None:
    assert not [
        c for c in render({}).of("ConfigMap") if c["metadata"]["name"].endswith("dashboard")
    ]
    rendered = render(VALUE_SETS["monitoring"])
    config = rendered.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config["metadata"]["annotations"] == {"grafana_folder": "Security"}
    (text,) = config["data"].values()
    assert json.loads(text) == json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = [v["name"] for v in json.loads(text)["templating"]["list"]]
    assert "namespace" in variables
    other = render(
        {
            "grafanaDashboard": {
                "enabled": True,
                "label": "example.com/dashboard",
                "labelValue": "recon",
                "namespace": "monitoring",
            }
        }
    ).one("ConfigMap", f"{FULLNAME}-dashboard")
    assert other["metadata"]["labels"]["example.com/dashboard"] == "recon"
    assert other["metadata"]["namespace"] == "monitoring"


def test_the_dashboard_is_one_file_in_the_packaged_chart_too(tmp_path: Path) -> None:
    link = CHART / "files" / "recon-stream.json"
    assert link.resolve() == DASHBOARD.resolve()
    archive = helm.package(CHART, destination=tmp_path)
    with tarfile.open(archive) as tar:
        member = tar.getmember("recon-stream/files/recon-stream.json")
        assert member.isfile()
        packaged = tar.extractfile(member).read()
    assert packaged == DASHBOARD.read_bytes()
