"""TCP verification: is what Shodan reported open still open, seen from our own network?

Part of the scanner role, on when `RECON_VERIFY_TCP` is true. A round checks the TCP
ports the provider reported for one IP, once each, with a plain connect
(`ports.Prober`, within the connect budget every replica shares), and applies the
results to the snapshot of every organization that

- consented (`verification` command, `ports.ConsentStore`), and
- has agents that reported from the IP in the last 24 hours (a dynamic IP changes
  hands; the next holder gave no consent).

Nothing else is ever connected to: no other port, no other IP, no payload.

When: after every lookup that leaves TCP ports open (in the background, so `opened`
is never held back), before a rescan's scan (`agrees`: when every reported port
answers, no scan credit is spent), and `confirm` seconds after a round that found a
port refused or silent, to confirm it (two such checks close the exposure; see
`domain.snapshot.plan_verification`): the refused ports again, or, when one was
silent, every port of the round, since silence closes a port only while another
answers in the same round. A follow-up lost in a crash is made by the
next lookup or rescan.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from recon_stream.domain.scans import HostScan
from recon_stream.domain.verification import Check, CheckState, NotCheckable
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import ConsentStore, Prober, RecentReporters

log = logging.getLogger(__name__)

REPORTED_WITHIN = timedelta(hours=24)
"""Only IPs an organization's agents reported this recently are ever checked."""
IN_FLIGHT_PER_IP = 2
"""Connects to one IP at a time: a probe, not a scan."""
MAX_ROUNDS = 16
"""Rounds running at once in one replica (the budget paces the connects anyway)."""
MAX_PORTS = 50
"""An IP with more reported ports than this is not checked: Shodan itself is likely
seeing a tarpit or a middlebox that answers every port."""


class Verifier:
    def __init__(
        self,
        prober: Prober,
        consents: ConsentStore,
        reporters: RecentReporters,
        outbox: OutboxPublisher,
        metrics: Metrics,
        *,
        confirm: float,
    ) -> None:
        self._prober = prober
        self._consents = consents
        self._reporters = reporters
        self._outbox = outbox
        self._metrics = metrics
        self._confirm = timedelta(seconds=confirm)
        self._rounds = asyncio.Semaphore(MAX_ROUNDS)
        self._background: set[asyncio.Task[None]] = set()

    async def consenting(self, ip: str) -> list[str]:
        """The organizations whose consent covers checking `ip` now."""
        retrying = self._outbox.retrying
        since = datetime.now(UTC) - REPORTED_WITHIN
        reporters = await retrying(
            "reading who reported an IP", lambda: self._reporters.reported_since(ip, since)
        )
        if not reporters:
            return []
        enabled = await retrying(
            "reading verification consents", lambda: self._consents.enabled_orgs(reporters)
        )
        return [org for org in reporters if org in enabled]

    async def agrees(self, scan: HostScan | None) -> bool:
        """Check the IP's reported TCP ports now (a rescan's first step); True when every
        one answered open, so the provider's record stands and no scan is needed."""
        if scan is None or not (ports := _tcp_ports(scan)):
            return False
        checks = await self.round(scan.ip, ports, "rescan")
        # A check that failed on our side (no Check) says nothing: that port did not
        # answer open, so the scan decides.
        return {check.port for check in checks if check.state is CheckState.OPEN} == set(ports)

    def after_lookup(self, scan: HostScan) -> None:
        """Check the ports a lookup left open, in the background."""
        if ports := _tcp_ports(scan):
            self._spawn(self._round_quietly(scan.ip, ports, "lookup"))

    async def round(self, ip: str, ports: Sequence[int], trigger: str) -> list[Check]:
        """Check `ports` of `ip` for the organizations that consented, apply the results
        to their snapshots, and schedule the confirming round when one is needed."""
        orgs = await self.consenting(ip)
        if not orgs:
            return []
        if len(ports) > MAX_PORTS:
            self._metrics.verification_rounds.labels("too_many_ports").inc()
            return []
        async with self._rounds:
            checks = await self._check_all(ip, ports)
        self._metrics.verification_rounds.labels(trigger).inc()
        if not checks:
            return []
        for org in orgs:
            outbox = await self._outbox.retrying(
                "applying checks",
                lambda org=org: self._outbox.updater.verify(  # type: ignore[misc]
                    org, ip, checks, self._confirm
                ),
            )
            await self._outbox.publish(outbox)
        failing = [check.port for check in checks if check.state is not CheckState.OPEN]
        if failing and trigger != "confirm":
            # A silent port closes only when another port of the IP answered in the same
            # round (`plan_verification`): its confirming round checks every port again,
            # not the silent ones alone (which could never close then).
            silent = any(check.state is CheckState.NO_ANSWER for check in checks)
            self._spawn(self._confirm_later(ip, list(ports) if silent else failing))
        return checks

    async def _check_all(self, ip: str, ports: Sequence[int]) -> list[Check]:
        flight = asyncio.Semaphore(IN_FLIGHT_PER_IP)

        async def one(port: int) -> Check | None:
            async with flight:
                try:
                    check = await self._prober.check(ip, port)
                except NotCheckable as error:
                    log.error("refused to check a non-public address: %s", error)
                    self._metrics.verification_checks.labels("not_checkable").inc()
                    return None
                except Exception as error:  # ProbeError and anything local
                    log.warning("a TCP check failed on our side: %s", error)
                    self._metrics.verification_checks.labels("error").inc()
                    return None
            self._metrics.verification_checks.labels(check.state.value).inc()
            return check

        done = await asyncio.gather(*(one(port) for port in sorted(set(ports))))
        return [check for check in done if check is not None]

    async def _confirm_later(self, ip: str, ports: Sequence[int]) -> None:
        await asyncio.sleep(self._confirm.total_seconds())
        await self._round_quietly(ip, ports, "confirm")

    async def _round_quietly(self, ip: str, ports: Sequence[int], trigger: str) -> None:
        try:
            await self.round(ip, ports, trigger)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a verification round failed; the next lookup checks again")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def idle(self) -> None:
        """Wait for the rounds running in the background (tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*list(self._background), return_exceptions=True)


def _tcp_ports(scan: HostScan) -> list[int]:
    return sorted({s.port for s in scan.services if s.transport == "tcp"})
