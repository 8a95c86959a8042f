"""Settings: the documented defaults, and secrets that never show."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from recon_stream.settings import Settings

MONGO_PASSWORD = "m0ngo-Pa55word"
SHODAN_KEY = "sh0dan-K3y-abcdefghijklmnop"
SASL_PASSWORD = "k4fka-Pa55word"
SECRETS = (MONGO_PASSWORD, SHODAN_KEY, SASL_PASSWORD)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No RECON_* variable and no .env file from the machine running the tests."""
    for name in list(os.environ):
        if name.upper().startswith("RECON_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_match_the_design() -> None:
    s = Settings()
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.mongodb_uri.get_secret_value() == "mongodb://localhost:27017"
    assert s.mongodb_database == "recon"
    assert s.shodan_api_key is None
    assert s.shodan_api_url is None
    assert s.shodan_rate == 1.0
    assert s.rescan_interval_seconds == 3 * 24 * 3600
    assert s.ip_retention_seconds == 30 * 24 * 3600
    assert s.topic_heartbeats == "agent.heartbeats.v1"
    assert s.topic_scan_requests == "recon.scan-requests.v1"
    assert s.topic_exposures == "recon.exposures.v1"
    assert s.topic_dlq == "recon.heartbeats.dlq.v1"
    assert s.http_port == 8080
    assert s.kafka_security_protocol == "PLAINTEXT"
    assert s.effective_shodan_provider == "sample"
    assert s.kafka_ssl_context() is None


def test_environment_uses_the_recon_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "RECON_KAFKA_BOOTSTRAP_SERVERS": "k1:9093,k2:9093",
        "RECON_MONGODB_URI": "mongodb://db:27018",
        "RECON_MONGODB_DATABASE": "recon_test",
        "RECON_SHODAN_API_URL": "http://127.0.0.1:9999",
        "RECON_SHODAN_PROVIDER": "internetdb",
        "RECON_SHODAN_RATE": "2.5",
        "RECON_RESCAN_INTERVAL_SECONDS": "60",
        "RECON_IP_RETENTION_SECONDS": "120",
        "RECON_TOPIC_HEARTBEATS": "hb",
        "RECON_TOPIC_SCAN_REQUESTS": "sr",
        "RECON_TOPIC_EXPOSURES": "ex",
        "RECON_TOPIC_DLQ": "dlq",
        "RECON_HTTP_PORT": "9090",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "unprefixed:1")  # must be ignored
    s = Settings()
    assert s.kafka_bootstrap_servers == "k1:9093,k2:9093"
    assert s.mongodb_uri.get_secret_value() == "mongodb://db:27018"
    assert s.mongodb_database == "recon_test"
    assert s.shodan_api_url == "http://127.0.0.1:9999"
    assert s.effective_shodan_provider == "internetdb"
    assert s.shodan_rate == 2.5
    assert (s.rescan_interval_seconds, s.ip_retention_seconds) == (60, 120)
    assert (s.topic_heartbeats, s.topic_scan_requests, s.topic_exposures, s.topic_dlq) == (
        "hb",
        "sr",
        "ex",
        "dlq",
    )
    assert s.http_port == 9090


def test_env_file_in_the_working_directory_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("RECON_MONGODB_DATABASE=from_dotenv\n")
    assert Settings().mongodb_database == "from_dotenv"


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in a .env copied from .env.example with the key left blank.
    monkeypatch.setenv("RECON_SHODAN_API_KEY", "")
    assert Settings().shodan_api_key is None
    assert Settings().effective_shodan_provider != "api"


def test_an_empty_optional_topic_switches_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().topic_exposures_ocsf == "recon.exposures.ocsf.v1"
    assert Settings().topic_exposure_state == "recon.exposure-state.v1"
    monkeypatch.setenv("RECON_TOPIC_EXPOSURES_OCSF", "")
    monkeypatch.setenv("RECON_TOPIC_EXPOSURE_STATE", "")
    assert (Settings().topic_exposures_ocsf, Settings().topic_exposure_state) == ("", "")


def test_shodan_key_selects_the_api_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECON_SHODAN_API_KEY", SHODAN_KEY)
    assert Settings().effective_shodan_provider == "api"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RECON_SHODAN_RATE", "0"),
        ("RECON_SHODAN_RATE", "-1"),
        ("RECON_RESCAN_INTERVAL_SECONDS", "0"),
        ("RECON_HTTP_PORT", "70000"),
        ("RECON_SHODAN_PROVIDER", "scraping"),
        ("RECON_INGEST_MAX_PARTITION_FETCH_BYTES", "1024"),
        ("RECON_KAFKA_SECURITY_PROTOCOL", "SASL"),
    ],
)
def test_invalid_values_are_rejected(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def _leaks(secret: str, text: str) -> bool:
    """Whether any 8 consecutive characters of the secret show (repr truncates)."""
    return any(secret[i : i + 8] in text for i in range(len(secret) - 7))


def _with_secrets(monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("RECON_MONGODB_URI", f"mongodb://recon:{MONGO_PASSWORD}@db1,db2/?tls=true")
    monkeypatch.setenv("RECON_SHODAN_API_KEY", SHODAN_KEY)
    monkeypatch.setenv("RECON_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RECON_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("RECON_KAFKA_SASL_USERNAME", "recon")
    monkeypatch.setenv("RECON_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    return Settings()


def test_secrets_never_appear_in_repr_str_or_json(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _with_secrets(monkeypatch)
    # They are there for whoever asks explicitly...
    assert s.shodan_api_key is not None
    assert s.shodan_api_key.get_secret_value() == SHODAN_KEY
    assert s.kafka_sasl_password is not None
    assert s.kafka_sasl_password.get_secret_value() == SASL_PASSWORD
    assert MONGO_PASSWORD in s.mongodb_uri.get_secret_value()
    # ...and nowhere else.
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump()), f"{s}"):
        for secret in SECRETS:
            assert not _leaks(secret, text), text


def test_sasl_without_credentials_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECON_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = str(caught.value)
    assert "RECON_KAFKA_SASL_USERNAME" in message
    assert "RECON_KAFKA_SASL_PASSWORD" in message


@pytest.mark.parametrize("missing", ["RECON_KAFKA_SASL_USERNAME", "RECON_KAFKA_SASL_PASSWORD"])
def test_sasl_needs_both_username_and_password(
    monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setenv("RECON_KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("RECON_KAFKA_SASL_USERNAME", "recon")
    monkeypatch.setenv("RECON_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.delenv(missing)
    with pytest.raises(ValidationError, match=missing):
        Settings()


def test_sasl_with_credentials_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    s = _with_secrets(monkeypatch)
    assert s.kafka_security_protocol == "SASL_PLAINTEXT"
    assert s.kafka_sasl_username == "recon"


def test_validation_errors_do_not_leak_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RECON_MONGODB_URI", f"mongodb://recon:{MONGO_PASSWORD}@db1/")
    monkeypatch.setenv("RECON_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("RECON_KAFKA_SASL_PASSWORD", SASL_PASSWORD)  # username missing
    monkeypatch.setenv("RECON_SHODAN_API_KEY", SHODAN_KEY)
    with pytest.raises(ValidationError) as caught:
        Settings()
    error = caught.value
    # What a crash at startup prints. (error.errors()/json() carry the raw input
    # whatever the config: never log those.)
    for text in (str(error), repr(error)):
        for secret in SECRETS:
            assert not _leaks(secret, text), text


def test_the_ingest_fetch_size_reaches_only_the_heartbeat_subscriber(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from recon_stream.app import build_worker

    assert Settings().ingest_max_partition_fetch_bytes == 4 * 1024 * 1024
    monkeypatch.setenv("RECON_INGEST_MAX_PARTITION_FETCH_BYTES", "2097152")
    worker = build_worker(Settings(), ["ingest", "scanner"])
    # FastStream keeps the consumer's arguments on the subscriber.
    fetch = {
        topic: subscriber._connection_args["max_partition_fetch_bytes"]
        for subscriber in worker.broker.subscribers
        for topic in subscriber.topic_names
    }
    assert fetch == {
        "agent.heartbeats.v1": 2097152,
        "recon.scan-requests.v1": 1024 * 1024,
        "recon.commands.v1": 1024 * 1024,
    }


def test_the_notify_dlq_topic_has_a_default_and_an_override(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().topic_notify_dlq == "recon.notify.dlq.v1"
    monkeypatch.setenv("RECON_TOPIC_NOTIFY_DLQ", "acme.notify.dlq")
    assert Settings().topic_notify_dlq == "acme.notify.dlq"
