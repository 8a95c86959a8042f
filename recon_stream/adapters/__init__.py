"""Adapters: the only modules that talk to Kafka, MongoDB or Shodan."""

from __future__ import annotations

from recon_stream.settings import Settings


async def initialize(settings: Settings) -> tuple[dict[str, str], list[str]]:
    """Create the topics and every worker's MongoDB indexes; safe to run again.

    Returns each topic's outcome and the index names (for `recon-stream init`).
    """
    from recon_stream.adapters import (
        acceptances,
        command_log,
        exposures,
        history,
        ip_scans,
        kafka,
        migrations,
        mongo,
        org_ips,
        scan_queue,
        vuln_feeds,
    )

    topics = await kafka.create_topics(settings)
    client = mongo.connect(settings)
    try:
        db = client[settings.mongodb_database]
        indexes = [
            *await org_ips.ensure_indexes(db),
            *await scan_queue.ensure_indexes(db),
            *await ip_scans.ensure_indexes(db),
            *await exposures.ensure_indexes(db),
            *await acceptances.ensure_indexes(db),
            *await history.ensure_indexes(db),
            *await command_log.ensure_indexes(db),
            *await vuln_feeds.ensure_indexes(db),
            *await migrations.migrate(db, settings.history_retention_seconds),
        ]
    finally:
        await client.close()
    return topics, indexes
