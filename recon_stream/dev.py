"""`recon-stream dev`: the pipeline on one machine with embedded infrastructure.

Starts Tansu (Kafka protocol, in memory) and MongoDB (genuine mongod as a
one-node replica set, or SecantusDB where the mongod wheel cannot install; data
kept under `--data-dir`) as subprocesses, creates the topics and indexes, runs
the workers in this process, publishes sample heartbeats, prints what the
pipeline made of them, and where a platform team's own producer can publish.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from pydantic import SecretStr

from recon_stream.adapters import initialize, kafka, mongo
from recon_stream.adapters.exposures import MongoSnapshots
from recon_stream.adapters.org_ips import MongoOrgIps
from recon_stream.adapters.scan_queue import ScanQueue
from recon_stream.adapters.shodan import SAMPLE_FIXED_PORTS
from recon_stream.adapters.vuln_feeds import VulnFeeds
from recon_stream.app import build_worker
from recon_stream.domain.vulns import Feed, FeedError
from recon_stream.embedded import EmbeddedKafka, EmbeddedMongo, default_mongo_engine
from recon_stream.exposure_table import load_history, load_rows, render, render_history
from recon_stream.roles import ROLES
from recon_stream.settings import Settings

# Sample organizations with the public egress IPs their agents call home from.
# The addresses are well-known public resolvers and example networks, chosen so
# the demo runs without revealing anything about a real customer.
SAMPLE_ORGS: dict[str, list[str]] = {
    "acme-corp": ["8.8.8.8", "1.1.1.1"],
    "globex": ["8.8.8.8", "9.9.9.9"],
    "initech": ["208.67.222.222"],
    "umbrella": ["2606:4700:4700::1111", "1.0.0.1"],
    "hooli": ["149.112.112.112"],
}
SAMPLE_PRIVATE = ["10.0.0.12", "192.168.1.20", "100.64.3.3", "fd00::12"]


@dataclass(frozen=True)
class SampleRun:
    heartbeats: int
    invalid: int


def sample_heartbeats(per_agent: int = 20, now: datetime | None = None) -> Iterator[bytes]:
    """Heartbeats of 4 agents per organization, repeating as agents do."""
    rng = random.Random(7)  # noqa: S311 - sample data, not security
    now = now or datetime.now(UTC)
    for round_ in range(per_agent):
        for org, ips in SAMPLE_ORGS.items():
            for n in range(4):
                ip = ips[n % len(ips)]
                if n == 3 and round_ % 5 == 0:
                    ip = rng.choice(SAMPLE_PRIVATE)  # a laptop on a home/VPN network
                body = {
                    "organization_id": org,
                    "agent_id": f"{org}-agent-{n}",
                    "public_ip": ip,
                    "observed_at": (now - timedelta(minutes=per_agent - round_)).isoformat(),
                    "site_id": f"{org}-site-{n % 2}",
                    "hostname": f"{org}-host-{n}",
                    "agent_version": "4.2.0",
                }
                yield json.dumps(body).encode()


SAMPLE_INVALID = [b"{this is not json", json.dumps({"organization_id": "acme-corp"}).encode()]


async def publish_samples(settings: Settings) -> SampleRun:
    producer = AIOKafkaProducer(**kafka.admin_options(settings), acks="all", linger_ms=5)
    await producer.start()
    count = 0
    try:
        for value in sample_heartbeats():
            await producer.send(settings.topic_heartbeats, value)
            count += 1
        for value in SAMPLE_INVALID:
            await producer.send(settings.topic_heartbeats, value)
        await producer.flush()
    finally:
        await producer.stop()
    return SampleRun(count, len(SAMPLE_INVALID))


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [line.format(*header), line.format(*("-" * w for w in widths))]
    out += [line.format(*map(str, r)) for r in rows]
    return "\n".join(out)


async def report(settings: Settings) -> str:
    client = mongo.connect(settings)
    try:
        docs = await MongoOrgIps(client[settings.mongodb_database]).all_pairs()
    finally:
        await client.close()
    rows = [
        [
            d["organization_id"],
            d["ip"],
            ", ".join(a["agent_id"] for a in d.get("agents", [])),
            d["first_seen"].strftime("%H:%M:%S"),
            d["last_seen"].strftime("%H:%M:%S"),
            d.get("scan_request", {}).get("state", "-"),
        ]
        for d in docs
    ]
    return _table(
        rows, ["ORGANIZATION", "PUBLIC IP", "AGENTS", "FIRST SEEN", "LAST SEEN", "SCAN REQUEST"]
    )


def _samples(registry: Any, name: str) -> dict[str, float]:
    return {
        str(sample.labels): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name
    }


async def wait_for_scans(settings: Settings, patience: float = 120.0) -> None:
    """Until the scan queue is empty and every pair has a snapshot (or time runs out)."""
    client = mongo.connect(settings)
    db = client[settings.mongodb_database]
    queue, org_ips, exposures = ScanQueue(db), MongoOrgIps(db), MongoSnapshots(db)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while loop.time() < deadline:
            queued = sum((await queue.depth()).values())
            pairs = await org_ips.active_count()
            snapshots = await exposures.count()
            pending = await exposures.unpublished_count()
            if queued == 0 and snapshots >= pairs and pending == 0:
                return
            await asyncio.sleep(0.5)
        print(f"(scans still running after {patience:.0f}s; the table shows what is done)")
    finally:
        await client.close()


@dataclass(frozen=True)
class DevOptions:
    data_dir: Path
    keep_running: bool = False
    http_port: int = 8080
    kafka_port: int | None = None
    """None: a free port."""
    mongodb_port: int | None = None
    samples: bool = True


def publish_your_own(bootstrap: str, topic: str) -> str:
    """How a platform team points its own producer at the dev stack (printed by `dev`)."""
    return f"""\
publish your own heartbeat (a public IP of yours; any organization and agent id):
  RECON_KAFKA_BOOTSTRAP_SERVERS={bootstrap} recon-stream publish-heartbeat \\
      --org my-org --agent my-agent-1 --ip 8.8.4.4 --site hq
or from your producer (a JSON value; confluent-kafka shown, any Kafka client works):
  from confluent_kafka import Producer
  import json, datetime
  p = Producer({{"bootstrap.servers": "{bootstrap}"}})
  p.produce("{topic}", key="my-agent-1", value=json.dumps({{
      "organization_id": "my-org", "agent_id": "my-agent-1", "public_ip": "8.8.4.4",
      "observed_at": datetime.datetime.now(datetime.UTC).isoformat()}}))
  p.flush()
then: recon-stream exposures --org my-org  (with RECON_MONGODB_URI set as above)
(on Tansu, librdkafka consumer groups hang in JoinGroup: to read a topic with
librdkafka, assign partitions explicitly; producing works)"""


async def run_dev(options: DevOptions) -> None:
    """Run the dev stack until done (or, with `keep_running`, until a signal).

    SIGTERM, SIGINT and SIGHUP stop the workers, then the broker and the
    database: the servers run in sessions of their own (so a terminal's Ctrl-C
    reaches us, not them), so nothing else would stop them.
    """
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    received: list[signal.Signals] = []

    def stop(sig: signal.Signals) -> None:
        if not received:
            main.cancel()
        received.append(sig)

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in handled:
        loop.add_signal_handler(sig, stop, sig)
    try:
        await _run_stack(options)
    except asyncio.CancelledError:
        if not received:
            raise
        print(f"{received[0].name}: workers, broker and database stopped", flush=True)
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


async def _stop_workers(app: Any, patience: float) -> None:
    """Stop the workers, but never hang the exit on them: a consumer caught in a group
    join can wait out Kafka's request timeout (40 s), and the servers must stop anyway."""
    try:
        async with asyncio.timeout(patience):
            await app.stop()
    except TimeoutError:
        print(f"workers did not stop within {patience:g}s; stopping the servers anyway")


async def _run_stack(options: DevOptions) -> None:
    data_dir = options.data_dir
    engine = default_mongo_engine()
    print(f"recon-stream dev: embedded Tansu + {engine}, data under {data_dir}/", flush=True)
    with (
        EmbeddedKafka(log_dir=data_dir / "logs", port=options.kafka_port) as broker,
        # The two engines' files differ: each keeps its own folder.
        EmbeddedMongo(
            data_dir=data_dir / engine,
            port=options.mongodb_port,
            log_dir=data_dir / "logs",
            engine=engine,
        ) as db,
    ):
        base = Settings()
        sample_data = base.effective_shodan_provider == "sample"
        settings = base.model_copy(
            update={
                "kafka_bootstrap_servers": broker.bootstrap_servers,
                "mongodb_uri": SecretStr(db.uri),
                "kafka_topic_partitions": 4,
                "http_port": options.http_port,
                "http_host": "127.0.0.1",
                "ingest_batch_timeout_ms": 100,
                # Sample answers cost nothing: no need to pace them like Shodan.
                "shodan_rate": 20.0 if sample_data else base.shodan_rate,
                "gauge_sample_seconds": 2.0,
                # The sample provider simulates on-demand scans (DONE after 5 s): the
                # demo's rescan shows a fix confirmed. With a real key, as configured.
                **(
                    {"shodan_scan_credits_per_day": 10, "shodan_scan_poll_seconds": 1.0}
                    if sample_data and base.shodan_scan_credits_per_day == 0
                    else {}
                ),
            }
        )
        print(f"Kafka (Tansu, in memory): {broker.bootstrap_servers}")
        print(f"MongoDB: {db.uri}  (database {settings.mongodb_database!r})")
        print(f"  {db.description}")
        topics, _ = await initialize(settings)
        print(f"topics: {', '.join(topics)}")
        await _load_feeds(settings)
        if sample_data:
            print(
                "Shodan: no RECON_SHODAN_API_KEY set, so the scanner answers from BUNDLED "
                "SAMPLE DATA (invented exposures, not real Shodan results)"
            )
        else:
            print(
                f"Shodan: provider {settings.effective_shodan_provider!r}, "
                f"{settings.shodan_rate:g} lookups/s"
            )
        worker = build_worker(settings, ROLES)
        await worker.app.start()
        try:
            print(f"metrics: http://127.0.0.1:{worker.status.port}/metrics", flush=True)
            if options.samples:
                await _demo(settings, worker.metrics.registry)
            print()
            print(publish_your_own(broker.bootstrap_servers, settings.topic_heartbeats))
            if options.keep_running:
                print("running; Ctrl-C (or SIGTERM) to stop", flush=True)
                await asyncio.Event().wait()
        finally:
            await _stop_workers(worker.app, settings.graceful_timeout_seconds + 10)


async def _load_feeds(settings: Settings) -> None:
    """KEV and EPSS before the first lookup: the configured sources, else bundled samples."""
    samples = resources.files("recon_stream.samples")
    feeds: list[tuple[Feed, str | None, str]] = [
        ("kev", settings.kev_source, "kev_sample.json"),
        ("epss", settings.epss_source, "epss_sample.csv"),
    ]
    client = mongo.connect(settings)
    try:
        store = VulnFeeds(client[settings.mongodb_database])
        for feed, configured, sample in feeds:
            source = configured or str(samples.joinpath(sample))
            try:
                count = await store.refresh(feed, source)
            except FeedError as error:
                print(f"{feed}: {error} (scanning goes on without it)")
                continue
            label = source if configured else f"BUNDLED SAMPLE ({sample}, not the real data)"
            print(f"{feed}: {count} CVEs from {label}")
    finally:
        await client.close()


async def _demo(settings: Settings, metrics: Any) -> None:
    """Publish the sample heartbeats and print what the pipeline made of them."""
    sample = await publish_samples(settings)
    print(
        f"published {sample.heartbeats} SAMPLE heartbeats from "
        f"{len(SAMPLE_ORGS) * 4} agents in {len(SAMPLE_ORGS)} organizations "
        f"(+{sample.invalid} malformed ones, for the DLQ)"
    )
    total = sample.heartbeats + sample.invalid
    for _ in range(600):
        outcomes = sum(
            metrics.get_sample_value("recon_heartbeats_total", {"outcome": o}) or 0
            for o in ("accepted", "duplicate", "non_public", "invalid")
        )
        if outcomes >= total:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    print()
    print(await report(settings))
    print()
    for outcome in ("accepted", "duplicate", "non_public", "invalid"):
        value = metrics.get_sample_value("recon_heartbeats_total", {"outcome": outcome})
        print(f"heartbeats {outcome:<10} {int(value or 0)}")
    requests = sum(
        metrics.get_sample_value(
            "recon_scan_requests_published_total", {"reason": "new", "path": p}
        )
        or 0
        for p in ("ingest", "relay")
    )
    print(f"scan requests published to {settings.topic_scan_requests}: {int(requests)}")
    await wait_for_scans(settings)
    events = sum(v for k, v in _samples(metrics, "recon_exposure_events_total").items())
    print(f"exposure events published to {settings.topic_exposures}: {int(events)}")
    for org in SAMPLE_ORGS:
        print()
        print(f"exposures of {org}  (recon-stream exposures --org {org})")
        print(render(await load_rows(settings, org), "table"), end="")
    await _act_on_an_exposure(settings, metrics)


async def _act_on_an_exposure(settings: Settings, metrics: Any) -> None:
    """Accept one exposure and rescan its IP, as an operator would, and show the effect."""
    org = next(iter(SAMPLE_ORGS))
    rows = await load_rows(settings, org)
    if not rows:
        return
    rank = ["info", "low", "medium", "high", "critical"]

    def severity(r: dict[str, Any]) -> int:
        return rank.index(r["severity"]) if r["severity"] in rank else -1

    ip = max(rows, key=severity)["ip"]
    on_ip = [r for r in rows if r["ip"] == ip]
    # The port the sample provider's simulated scan finds closed; the most severe
    # other one is accepted (the fix and the acceptance are two stories).
    ports = [int(r["port"]) for r in on_ip]
    fixed = next((p for p in SAMPLE_FIXED_PORTS if p in ports), ports[0])
    row = max((r for r in on_ip if int(r["port"]) != fixed), key=severity, default=on_ip[0])
    port = int(row["port"])
    until = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0).isoformat()
    print()
    print(
        f"an operator accepts one exposure; a technician closes port {fixed} on {ip} "
        "and asks for a rescan to confirm the fix:"
    )
    print(
        f"  recon-stream accept --org {org} --ip {ip} --port {port} "
        f'--reason "reviewed with the customer" --by tech@msp.example --until {until}'
    )
    print(f"  recon-stream rescan --org {org} --ip {ip}")
    if settings.shodan_scan_credits_per_day > 0:
        print(
            "  (the rescan submits an on-demand Shodan scan first, SIMULATED here by the "
            "sample provider: DONE after a few seconds, finding the port closed)"
        )
    now = datetime.now(UTC).isoformat()
    common = {"organization_id": org, "requested_by": "tech@msp.example", "requested_at": now}
    commands = [
        {
            **common,
            "command": "accept",
            "ip": ip,
            "port": port,
            "transport": row["transport"],
            "reason": "reviewed with the customer",
            "expires_at": until,
        },
        {**common, "command": "rescan", "ip": ip},
    ]
    producer = AIOKafkaProducer(**kafka.admin_options(settings), acks="all")
    await producer.start()
    try:
        for command in commands:
            await producer.send_and_wait(
                settings.topic_commands, json.dumps(command).encode(), key=org.encode()
            )
    finally:
        await producer.stop()
    for _ in range(600):
        applied = sum(
            metrics.get_sample_value("recon_commands_total", {"command": c, "outcome": "applied"})
            or 0
            for c in ("accept", "rescan")
        )
        if applied >= 2:
            break
        await asyncio.sleep(0.1)
    await wait_for_scans(settings)
    print()
    print(
        f"history of {ip} port {port}  (recon-stream history --org {org} --ip {ip} --port {port})"
    )
    print(render_history(await load_history(settings, org, ip=ip, port=port), "table"), end="")
    if fixed != port:
        print()
        print(f"history of {ip} port {fixed}  (the fix, confirmed by the rescan's scan)")
        print(render_history(await load_history(settings, org, ip=ip, port=fixed), "table"), end="")
    print()
    print(f"accepted exposures of {org}  (recon-stream exposures --org {org} --accepted)")
    print(render(await load_rows(settings, org, accepted=True), "table"), end="")
