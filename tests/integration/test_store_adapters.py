"""The store cases (`tests/store_cases.py`) on the MongoDB adapters, on a real server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from recon_stream.adapters.acceptances import Acceptances
from recon_stream.adapters.exposures import MongoSnapshots
from tests.store_cases import ACCEPTANCE_CASES, SNAPSHOT_CASES


@pytest.mark.parametrize("case", SNAPSHOT_CASES, ids=lambda case: case.__name__)
async def test_snapshot_store(case: Callable[[Any], Awaitable[None]], db: Any) -> None:
    await case(MongoSnapshots(db))


@pytest.mark.parametrize("case", ACCEPTANCE_CASES, ids=lambda case: case.__name__)
async def test_acceptance_store(case: Callable[[Any], Awaitable[None]], db: Any) -> None:
    await case(Acceptances(db))


async def test_the_oldest_lookup_counts_only_ips_some_organization_still_uses(db: Any) -> None:
    from datetime import UTC, datetime, timedelta

    from recon_stream.adapters.ip_scans import IpScans
    from recon_stream.adapters.org_ips import MongoOrgIps
    from recon_stream.domain.scans import HostScan

    scans, org_ips = IpScans(db, 3600.0), MongoOrgIps(db)
    now = datetime.now(UTC).replace(microsecond=0)
    # 250 retired IPs looked up long ago (more than one batch of the search), one in use.
    for i in range(250):
        await scans.put(
            HostScan(
                ip=f"198.51.100.{i}", provider="api", queried_at=now - timedelta(days=30, seconds=i)
            )
        )
    await scans.put(HostScan(ip="203.0.113.7", provider="api", queried_at=now - timedelta(days=2)))
    await db.org_ips.insert_many(
        [
            {"organization_id": "acme", "ip": "203.0.113.7", "status": "active"},
            {"organization_id": "acme", "ip": "198.51.100.3", "status": "retired"},
        ]
    )
    assert await scans.oldest_query() == now - timedelta(days=30, seconds=249)
    assert await scans.oldest_query(org_ips.in_use) == now - timedelta(days=2)
    await db.org_ips.delete_many({})
    assert await scans.oldest_query(org_ips.in_use) is None
