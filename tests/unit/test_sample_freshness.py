"""The sample provider tells the truth about freshness: its observation times are
relative to the lookup, only a few deliberately old ones are stale, and the data is
the same on every run apart from the clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from recon_stream.adapters.shodan import SampleProvider
from recon_stream.domain.scans import HostScan

pytestmark = pytest.mark.unit

STALE_AFTER = timedelta(days=30)  # RECON_STALE_OBSERVATION_DAYS's default


def ages(scans: dict[str, HostScan], at: datetime) -> dict[tuple[str, int], timedelta]:
    return {
        (ip, service.port): at - service.shodan_timestamp
        for ip, scan in scans.items()
        for service in scan.services
        if service.shodan_timestamp is not None
    }


async def lookups(at: datetime, ips: list[str]) -> dict[str, HostScan]:
    provider = SampleProvider(clock=lambda: at)
    return {ip: await provider.lookup(ip) for ip in ips}


async def test_bundled_observations_are_recent_but_for_a_few_stale_on_purpose() -> None:
    at = datetime(2026, 12, 2, 16, 20, tzinfo=UTC)
    ips = list(SampleProvider().ips)
    seen = ages(await lookups(at, ips), at)
    stale = sorted(key for key, age in seen.items() if age > STALE_AFTER)
    assert stale == [("1.1.1.1", 445), ("9.9.9.9", 1433)]
    assert all(age >= timedelta(0) for age in seen.values())
    assert max(age for key, age in seen.items() if key not in stale) < timedelta(days=7)


async def test_the_same_ages_on_any_day_in_the_same_minute_of_the_hour() -> None:
    ips = [*SampleProvider().ips, *(f"203.0.113.{n}" for n in range(1, 40))]
    one = datetime(2026, 12, 2, 16, 20, tzinfo=UTC)
    other = one + timedelta(days=400, hours=5)
    first, later = await lookups(one, ips), await lookups(other, ips)
    assert ages(first, one) == ages(later, other)
    assert [s.services for s in first.values()] != [s.services for s in later.values()]
    invented = {k: a for k, a in ages(first, one).items() if k[0].startswith("203.0.113.")}
    assert 0 < sum(age > STALE_AFTER for age in invented.values()) < len(invented) / 2
