"""The Shodan providers over real HTTP: the official client against the local emulator."""

from __future__ import annotations

import asyncio
import socket
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from pydantic import SecretStr

from recon_stream.adapters.shodan import (
    ApiProvider,
    InternetDbProvider,
    Permanent,
    RateLimited,
    SampleProvider,
    ShodanError,
    Transient,
    Unauthorized,
    build_provider,
)
from recon_stream.settings import Settings
from tests.emulators.shodan import ShodanEmulator

IP = "198.51.100.7"
TIMEOUT = 2.0


def host_payload(ip: str = IP) -> dict[str, Any]:
    return {
        "ip_str": ip,
        "ports": [3389, 443],
        "hostnames": ["rdp.example.net"],
        "org": "Example Org",
        "asn": "AS64500",
        "last_update": "2025-01-05T11:48:29.660148",
        "data": [
            {
                "port": 3389,
                "transport": "tcp",
                "timestamp": "2025-01-05T11:48:29.660148",
                "product": "Remote Desktop Protocol",
                "_shodan": {"module": "rdp", "crawler": "c", "id": "i"},
            },
            {
                "port": 443,
                "transport": "tcp",
                "timestamp": "2025-01-04T09:02:41.662910",
                "product": "nginx",
                "version": "1.18.0",
                "cpe23": ["cpe:2.3:a:f5:nginx:1.18.0"],
                "vulns": {"CVE-2021-23017": {"cvss": "7.5", "verified": False}},
                "_shodan": {"module": "https"},
            },
        ],
    }


@pytest_asyncio.fixture
async def api(shodan_emulator: ShodanEmulator) -> AsyncIterator[ApiProvider]:
    provider = ApiProvider(SecretStr(shodan_emulator.api_key), shodan_emulator.url, TIMEOUT)
    yield provider
    await provider.close()


@pytest_asyncio.fixture
async def internetdb(shodan_emulator: ShodanEmulator) -> AsyncIterator[InternetDbProvider]:
    provider = InternetDbProvider(shodan_emulator.internetdb_url, TIMEOUT)
    yield provider
    await provider.close()


async def test_a_found_host_parses(shodan_emulator: ShodanEmulator, api: ApiProvider) -> None:
    shodan_emulator.set_host(IP, host_payload())

    scan = await api.lookup(IP)

    assert scan.provider == "api"
    assert scan.sample is False
    assert [(s.port, s.module) for s in scan.services] == [(443, "https"), (3389, "rdp")]
    assert scan.services[0].vulns == ("CVE-2021-23017",)
    assert scan.services[0].max_cvss == 7.5
    assert scan.org == "Example Org"
    (request,) = shodan_emulator.requests
    assert (request.path, request.key, request.status) == (
        f"/shodan/host/{IP}",
        shodan_emulator.api_key,
        200,
    )


async def test_no_information_is_an_empty_scan_not_an_error(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    scan = await api.lookup(IP)
    assert scan.services == ()
    assert scan.ip == IP
    assert [r.status for r in shodan_emulator.requests] == [404]


async def test_a_rejected_key(shodan_emulator: ShodanEmulator) -> None:
    bad = ApiProvider(SecretStr("not-a-valid-key-0123456789abcdef"), shodan_emulator.url, TIMEOUT)
    try:
        with pytest.raises(Unauthorized, match="Invalid API key"):
            await bad.lookup(IP)
        with pytest.raises(Unauthorized):
            await bad.check_key()
    finally:
        await bad.close()
    assert [r.status for r in shodan_emulator.requests] == [401, 401]


async def test_check_key_passes_for_a_valid_key(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    await api.check_key()
    assert shodan_emulator.paths() == ["/api-info"]


@pytest.mark.parametrize("status", [401, 403])
async def test_401_and_403_are_unauthorized(
    shodan_emulator: ShodanEmulator, api: ApiProvider, status: int
) -> None:
    shodan_emulator.set_host(IP, host_payload())
    shodan_emulator.fail_next(IP, status)
    with pytest.raises(Unauthorized):
        await api.lookup(IP)


async def test_the_clients_own_throttle_is_off(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    # With the client's throttle on, requests would arrive at most one per second.
    shodan_emulator.rate = 100
    ips = [f"198.51.100.{n}" for n in range(1, 6)]
    for ip in ips:
        shodan_emulator.set_host(ip, host_payload(ip))

    for ip in ips:
        await api.lookup(ip)

    assert shodan_emulator.paths() == [f"/shodan/host/{ip}" for ip in ips]
    assert shodan_emulator.max_requests_in_any_window(1.0) == 5
    assert shodan_emulator.violations == 0


async def test_exceeding_shodans_rate_is_rate_limited(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    shodan_emulator.set_host(IP, host_payload())
    await api.lookup(IP)
    with pytest.raises(RateLimited, match="rate limit") as caught:
        await api.lookup(IP)
    assert caught.value.retry_after is None
    assert shodan_emulator.violations == 1
    assert [r.status for r in shodan_emulator.requests] == [200, 429]


@pytest.mark.parametrize(("header", "expected"), [("0", None), ("2", 2.0), (None, None)])
async def test_retry_after_is_a_hint_only_when_positive(
    shodan_emulator: ShodanEmulator, api: ApiProvider, header: str | None, expected: float | None
) -> None:
    shodan_emulator.fail_next(IP, 429, headers={"Retry-After": header} if header else None)
    with pytest.raises(RateLimited) as caught:
        await api.lookup(IP)
    assert caught.value.retry_after == expected


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (500, None),
        (502, None),
        (503, None),
        (503, {"error": "The service is temporarily unavailable"}),
        (504, "gateway timeout"),
    ],
)
async def test_server_errors_are_transient(
    shodan_emulator: ShodanEmulator, api: ApiProvider, status: int, body: Any
) -> None:
    shodan_emulator.set_host(IP, host_payload())
    shodan_emulator.fail_next(IP, status, body=body)
    with pytest.raises(Transient):
        await api.lookup(IP)
    # The next attempt succeeds: the fault was transient.
    shodan_emulator.rate = None
    assert len((await api.lookup(IP)).services) == 2


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, None),
        (400, {"error": "Invalid IP"}),
        (400, {"detail": "no error field"}),  # the client would return this as a host
        (422, "unprocessable"),
    ],
)
async def test_other_client_errors_are_permanent(
    shodan_emulator: ShodanEmulator, api: ApiProvider, status: int, body: Any
) -> None:
    shodan_emulator.set_host(IP, host_payload())
    shodan_emulator.fail_next(IP, status, body=body)
    with pytest.raises(Permanent, match=f"HTTP {status}") as caught:
        await api.lookup(IP)
    assert caught.value.status == status


async def test_a_404_that_is_not_no_information_is_not_an_empty_host(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    shodan_emulator.fail_next(IP, 404, body={"detail": "no such route"})
    with pytest.raises(Transient):
        await api.lookup(IP)


async def test_a_slow_answer_times_out(shodan_emulator: ShodanEmulator) -> None:
    shodan_emulator.set_host(IP, host_payload())
    shodan_emulator.fail_next(IP, 200, delay=10.0)
    provider = ApiProvider(SecretStr(shodan_emulator.api_key), shodan_emulator.url, timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(Transient, match="did not answer within"):
            await provider.lookup(IP)
        assert time.monotonic() - started < 2.0
    finally:
        await provider.close()


async def test_an_unreachable_server_is_transient() -> None:
    provider = ApiProvider(SecretStr("k" * 32), f"http://127.0.0.1:{closed_port()}", TIMEOUT)
    try:
        with pytest.raises(Transient, match="Unable to connect"):
            await provider.lookup(IP)
    finally:
        await provider.close()


async def test_concurrent_lookups_share_one_client(
    shodan_emulator: ShodanEmulator, api: ApiProvider
) -> None:
    shodan_emulator.rate = None
    ips = [f"198.51.100.{n}" for n in range(10, 18)]
    for ip in ips:
        shodan_emulator.set_host(ip, host_payload(ip))
    scans = await asyncio.gather(*(api.lookup(ip) for ip in ips))
    assert [s.ip for s in scans] == ips
    assert all(len(s.services) == 2 for s in scans)


async def test_the_api_key_never_shows_in_errors(shodan_emulator: ShodanEmulator) -> None:
    key = shodan_emulator.api_key
    good = ApiProvider(SecretStr(key), shodan_emulator.url, timeout=0.5)
    unreachable = ApiProvider(SecretStr(key), f"http://127.0.0.1:{closed_port()}", 0.5)
    errors: list[ShodanError] = []
    shodan_emulator.rate = None
    try:
        for status, delay in [(401, 0.0), (403, 0.0), (429, 0.0), (500, 0.0), (200, 5.0)]:
            shodan_emulator.fail_next(IP, status, delay=delay)
            with pytest.raises(ShodanError) as caught:
                await good.lookup(IP)
            errors.append(caught.value)
        # The server echoing the key back must not leak it either.
        shodan_emulator.fail_next(IP, 503, body={"error": f"overloaded ?key={key}"})
        with pytest.raises(Transient) as transient:
            await good.lookup(IP)
        errors.append(transient.value)
        shodan_emulator.fail_next(IP, 400, body={"error": f"bad request ?key={key}"})
        with pytest.raises(Permanent) as permanent:
            await good.lookup(IP)
        errors.append(permanent.value)
        with pytest.raises(Transient) as refused:
            await unreachable.lookup(IP)
        errors.append(refused.value)
        assert key not in repr(good)
        assert key not in repr(unreachable)
    finally:
        await good.close()
        await unreachable.close()

    assert len(errors) == 8
    for error in errors:
        text = "".join(traceback.format_exception(error))
        assert key not in str(error)
        assert key not in repr(error)
        assert key not in text, text


async def test_internetdb_found_and_not_found(
    shodan_emulator: ShodanEmulator, internetdb: InternetDbProvider
) -> None:
    shodan_emulator.rate = None
    shodan_emulator.set_host(IP, host_payload())

    scan = await internetdb.lookup(IP)
    empty = await internetdb.lookup("203.0.113.9")

    assert scan.provider == "internetdb"
    # InternetDB's `cpes` name no port: nginx's goes to the web port.
    assert [(s.port, s.transport, s.module, s.cpe) for s in scan.services] == [
        (443, "tcp", None, ("cpe:2.3:a:f5:nginx:1.18.0",)),
        (3389, "tcp", None, ()),
    ]
    assert scan.cpes == ()
    assert scan.vulns == ("CVE-2021-23017",)
    assert scan.hostnames == ("rdp.example.net",)
    assert empty.services == ()
    assert shodan_emulator.paths() == [f"/internetdb/{IP}", "/internetdb/203.0.113.9"]
    assert [r.key for r in shodan_emulator.requests] == [None, None]


async def test_internetdb_rate_limit(
    shodan_emulator: ShodanEmulator, internetdb: InternetDbProvider
) -> None:
    shodan_emulator.set_host(IP, host_payload())
    await internetdb.lookup(IP)
    with pytest.raises(RateLimited):
        await internetdb.lookup(IP)
    shodan_emulator.fail_next(IP, 429, headers={"Retry-After": "30"})
    with pytest.raises(RateLimited) as caught:
        await internetdb.lookup(IP)
    assert caught.value.retry_after == 30.0
    assert shodan_emulator.violations == 1


@pytest.mark.parametrize("status", [500, 503])
async def test_internetdb_server_errors_are_transient(
    shodan_emulator: ShodanEmulator, internetdb: InternetDbProvider, status: int
) -> None:
    shodan_emulator.fail_next(IP, status)
    with pytest.raises(Transient):
        await internetdb.lookup(IP)


@pytest.mark.parametrize("status", [400, 422])
async def test_internetdb_client_errors_are_permanent(
    shodan_emulator: ShodanEmulator, internetdb: InternetDbProvider, status: int
) -> None:
    shodan_emulator.fail_next(IP, status)
    with pytest.raises(Permanent, match=f"HTTP {status}"):
        await internetdb.lookup(IP)


async def test_internetdb_slow_and_unreachable(shodan_emulator: ShodanEmulator) -> None:
    shodan_emulator.fail_next(IP, 200, delay=10.0)
    slow = InternetDbProvider(shodan_emulator.internetdb_url, timeout=0.5)
    unreachable = InternetDbProvider(f"http://127.0.0.1:{closed_port()}", timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(Transient, match="did not answer within"):
            await slow.lookup(IP)
        assert time.monotonic() - started < 2.0
        with pytest.raises(Transient, match="Unable to connect"):
            await unreachable.lookup(IP)
        await slow.check_key()
    finally:
        await slow.close()
        await unreachable.close()


async def test_sample_provider() -> None:
    provider = SampleProvider()
    expected = {
        "8.8.8.8",
        "1.1.1.1",
        "9.9.9.9",
        "208.67.222.222",
        "2606:4700:4700::1111",
        "1.0.0.1",
        "149.112.112.112",
    }
    assert set(provider.ips) == expected
    scans = {ip: await provider.lookup(ip) for ip in sorted(expected)}
    await provider.check_key()
    await provider.close()

    assert all(s.sample and s.provider == "sample" for s in scans.values())
    assert scans["1.0.0.1"].services == ()
    assert all(s.services for ip, s in scans.items() if ip != "1.0.0.1")
    ports = {(ip, s.port) for ip, scan in scans.items() for s in scan.services}
    assert {("8.8.8.8", 3389), ("208.67.222.222", 3390), ("149.112.112.112", 445)} <= ports
    assert {("9.9.9.9", 1433), ("208.67.222.222", 6379), ("9.9.9.9", 22)} <= ports
    # Two banners of 3389 on 149.112.112.112 merged into one service.
    assert [s.port for s in scans["149.112.112.112"].services].count(3389) == 1
    assert any(s.vulns for s in scans["8.8.8.8"].services if s.port == 443)


async def test_sample_provider_invents_stable_answers_for_other_ips() -> None:
    provider = SampleProvider()
    first = await provider.lookup("203.0.113.50")
    again = await provider.lookup("203.0.113.50")
    other = [await provider.lookup(f"203.0.113.{n}") for n in range(1, 30)]

    assert first.sample
    assert 1 <= len(first.services) <= 3
    assert first.services == again.services
    assert "invented" in (first.org or "")
    assert len({s.services for s in other}) > 5


def test_build_provider_follows_the_settings(
    shodan_emulator: ShodanEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RECON_SHODAN_API_KEY", "RECON_SHODAN_API_URL", "RECON_SHODAN_PROVIDER"):
        monkeypatch.delenv(name, raising=False)

    def build(**values: Any) -> Any:
        return build_provider(Settings(_env_file=None, **values), timeout=1.0)  # type: ignore[call-arg]

    api = build(shodan_api_key=SecretStr("k" * 32), shodan_api_url=shodan_emulator.url)
    assert isinstance(api, ApiProvider)
    assert api.name == "api"
    assert isinstance(build(), SampleProvider)
    idb = build(shodan_provider="internetdb")
    assert isinstance(idb, InternetDbProvider)
    assert "internetdb.shodan.io" in repr(idb)
    with pytest.raises(ValueError, match="RECON_SHODAN_API_KEY"):
        build(shodan_provider="api")
    asyncio.run(api.close())
    asyncio.run(idb.close())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
