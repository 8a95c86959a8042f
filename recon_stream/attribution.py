"""Attribution: which organization an IP's exposures belong to (issue 19).

Part of the scheduler role, run by its leader every `tick`, and of the scanner's
fan-out (`judge_lookup`). It keeps every (organization, IP) pair's status
(`domain.pairs.PairStatus`) in step with the scope file (`RECON_SCOPE_FILE`, read at
start) and with how many organizations share the IP:

- a pair the scope file excludes (by network, for every organization or for one)
  becomes `excluded`; one it no longer excludes (the file changed, the workers
  restarted) becomes `active` again and is looked up;
- a pair whose IP's lookup names an excluded ASN becomes `excluded` at that lookup;
- an IP reported by at least `shared_egress_organizations` organizations is shared
  egress (a SASE or VPN exit, a hotel, CGNAT): every pair on it whose organization
  did not declare the network `own` becomes `shared_egress`; when fewer share it,
  those pairs become `active` again. It is looked up at most once per rescan
  interval: a stored lookup younger than that serves every request for it (`shared`).

A pair leaving `active` closes its open exposures with the status's reason
(`excluded`, `shared_egress`), through the same snapshot decision as retirement.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial

from recon_stream.domain.pairs import PairStatus
from recon_stream.domain.scans import HostScan
from recon_stream.domain.scope import Scope
from recon_stream.metrics import Metrics
from recon_stream.outbox import OutboxPublisher
from recon_stream.ports import PairStates

log = logging.getLogger(__name__)


class Attribution:
    def __init__(
        self, pairs: PairStates, scope: Scope, outbox: OutboxPublisher, metrics: Metrics
    ) -> None:
        self._pairs = pairs
        self._scope = scope
        self._outbox = outbox
        self._metrics = metrics

    async def move(
        self, organization_id: str, ip: str, status: PairStatus, reason: str | None
    ) -> bool:
        """Give the pair `status`; when it leaves `active`, close its open exposures.
        True when the status changed."""
        retrying = self._outbox.retrying
        before = await retrying(
            "changing a pair's status",
            lambda: self._pairs.set_status(organization_id, ip, status, reason),
        )
        if before is None or before is status:
            return False
        log.info("a pair became %s (%s)", status.value, reason or "no reason given")
        if not status.reported:
            now = datetime.now(UTC)
            outbox = await retrying(
                "closing exposures",
                lambda: self._outbox.updater.retire(organization_id, ip, now, status),
            )
            await self._outbox.publish(outbox)
        return True

    async def judge_lookup(self, organization_id: str, scan: HostScan) -> bool:
        """Before a lookup is applied to an organization: False when the organization is
        not to be told (the pair then excluded, for an excluded ASN the lookup names, or
        shared egress, when enough organizations share the IP and this one does not own
        it)."""
        reason = self._scope.excluded_asn(organization_id, scan.asn) if scan.asn else None
        if reason is not None:
            status, why = PairStatus.EXCLUDED, f"{scan.asn}: {reason}"
            await self.move(organization_id, scan.ip, status, why)
            return False
        threshold = self._scope.shared_egress_threshold
        if threshold is None or self._scope.owns(organization_id, scan.ip):
            return True
        # A newcomer on an IP already shared is not told about it even once.
        sharing = await self._outbox.retrying(
            "counting who shares an IP", partial(self._pairs.sharing, scan.ip)
        )
        if len(sharing) < threshold:
            return True
        why = f"reported by {len(sharing)} organizations (RECON_SCOPE_FILE: {threshold} or more)"
        await self.move(organization_id, scan.ip, PairStatus.SHARED_EGRESS, why)
        return False

    async def shared(self, ip: str) -> bool:
        """Whether `ip` is shared egress: reported by at least the scope file's
        `shared_egress_organizations` (whoever owns it)."""
        threshold = self._scope.shared_egress_threshold
        if threshold is None:
            return False
        sharing = await self._outbox.retrying(
            "counting who shares an IP", partial(self._pairs.sharing, ip)
        )
        return len(sharing) >= threshold

    async def reconcile(self) -> int:
        """Bring every pair's status in step with the scope file and the sharing count;
        returns how many pairs changed."""
        changed = 0
        retrying = self._outbox.retrying
        # Pairs the file excludes now; excluded pairs it no longer excludes.
        for status in (PairStatus.ACTIVE, PairStatus.SHARED_EGRESS):
            pairs = await retrying("reading pairs", partial(self._pairs.pairs_with_status, status))
            for org, ip in pairs:
                reason = self._scope.excluded(org, ip)
                if reason is not None:
                    changed += await self.move(org, ip, PairStatus.EXCLUDED, reason)
        excluded = await retrying(
            "reading pairs", lambda: self._pairs.pairs_with_status(PairStatus.EXCLUDED)
        )
        for org, ip in excluded:
            reason = await retrying(
                "reading a pair's reason", partial(self._pairs.reason_of, org, ip)
            )
            # An ASN exclusion's reason starts with the ASN its lookup named.
            asn = (reason or "").split(":", 1)[0]
            by_asn = asn.upper().startswith("AS") and self._scope.excluded_asn(org, asn)
            if self._scope.excluded(org, ip) is None and not by_asn:
                changed += await self.move(org, ip, PairStatus.ACTIVE, "no longer excluded")
        changed += await self._shared_egress()
        return changed

    async def _shared_egress(self) -> int:
        threshold = self._scope.shared_egress_threshold
        retrying = self._outbox.retrying
        crowded: dict[str, list[str]] = {}
        if threshold is not None:
            crowded = await retrying(
                "counting who shares IPs", lambda: self._pairs.crowded_ips(threshold)
            )
        self._metrics.shared_egress_ips.set(len(crowded))
        changed = 0
        for ip, orgs in crowded.items():
            why = f"reported by {len(orgs)} organizations (RECON_SCOPE_FILE: {threshold} or more)"
            for org in orgs:
                if self._scope.owns(org, ip):
                    changed += await self.move(org, ip, PairStatus.ACTIVE, "declared own")
                else:
                    changed += await self.move(org, ip, PairStatus.SHARED_EGRESS, why)
        shared = await retrying(
            "reading pairs", lambda: self._pairs.pairs_with_status(PairStatus.SHARED_EGRESS)
        )
        for org, ip in shared:
            if ip not in crowded:
                changed += await self.move(org, ip, PairStatus.ACTIVE, "no longer shared")
        return changed

    async def run(self, tick: float, leading: Callable[[], bool]) -> None:
        """Reconcile every `tick` seconds while this replica leads the scheduler."""
        while True:
            if leading():
                try:
                    if changed := await self.reconcile():
                        log.info("attribution: %d pairs changed status", changed)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("attribution pass failed; the next tick tries again")
            await asyncio.sleep(tick)
