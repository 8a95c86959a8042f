"""The lookup provider port: what the scanner asks of Shodan (or InternetDB, or the
bundled sample), and the errors a lookup can raise.

"Nothing known about this IP" (Shodan's 404 "No information available for that
IP.") is not an error: `lookup` returns a `HostScan` without services.

Errors, and what the scanner does with each:

    ShodanError            base class; never raised itself
    ├── RateLimited        429 / "rate limit reached": retry the same IP later and slow
    │                      the shared budget down; `retry_after` is a hint only (None
    │                      when absent or not positive: Shodan has sent `Retry-After: 0`)
    ├── Unauthorized       key rejected (401 "Invalid API key", 403 "Access denied"):
    │                      retrying cannot help until an operator fixes the key; stop
    │                      looking up, report not-ready, keep the requests unacknowledged
    ├── Transient          5xx, timeouts, connection failures, unparseable or unknown
    │                      answers: retry with backoff, never drop the request
    ├── Permanent          any other 4xx (400 "Invalid IP", 422, …): this request cannot
    │                      succeed as sent, so retrying soon only burns budget; record the
    │                      error on the queued IP, count it, and ask again no sooner than
    │                      the rescan interval, while other IPs go on
    ├── NotSent            the request's send slot (`SendGate`) had passed when its
    │                      thread got to it: nothing was sent; take a new slot at once
    └── ScanRefused        an on-demand scan was refused or lost (no credits, 401/403,
                           400, 404 unknown scan id, 429, "recently crawled"):
                           `outcome` names it; the rescan falls back to its plain lookup
                           at once and never submits again for that request

The adapters (`recon_stream.adapters.shodan`) raise these; the scanner stage handles
them. Error messages never contain the API key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from recon_stream.domain.scans import HostScan, ScanStatus


class ShodanError(Exception):
    """A lookup failed; see the module docstring for what each subclass means."""


class RateLimited(ShodanError):
    """Shodan refused the request because of its rate limit."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unauthorized(ShodanError):
    """The API key was rejected."""


class Transient(ShodanError):
    """A failure that a later retry can cure: 5xx, timeout, connection, odd answer."""


class Permanent(ShodanError):
    """Shodan refused this request for good (a 4xx other than 401, 403, 404 and 429)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ScanRefused(ShodanError):
    """Shodan would not scan (or lost the scan): `outcome` is the counted reason."""

    def __init__(self, message: str, outcome: str) -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass(frozen=True, slots=True)
class ScanTicket:
    """Shodan's answer to a scan submit: the scan id and the credits left after it."""

    id: str
    credits_left: int | None = None


class NotSent(ShodanError):
    """The request's send slot had passed before it could leave; nothing was sent."""


class SendGate(Protocol):
    """When a request may leave (`recon_stream.adapters.ratelimit.Slot` is one)."""

    @property
    def wait(self) -> float:
        """Seconds until the gate opens."""
        ...

    def enter(self) -> bool:
        """Block until the gate opens; False if the request may no longer leave."""
        ...

    def abandon(self) -> None:
        """The request will not be made: release a waiting `enter`."""
        ...


class ShodanProvider(Protocol):
    """Looks up what Shodan knows about one IP."""

    name: str

    async def lookup(self, ip: str, gate: SendGate | None = None) -> HostScan:
        """What is known about `ip`; no services when nothing is known.

        The request leaves when `gate` lets it (at once without one). Raises
        `RateLimited`, `Unauthorized`, `Transient`, `Permanent` or `NotSent`.
        """
        ...

    async def check_key(self, gate: SendGate | None = None) -> None:
        """Raise `Unauthorized` if the API key is rejected; no-op for keyless providers."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class ScanningProvider(ShodanProvider, Protocol):
    """A provider that can also have Shodan scan an IP now (`POST /shodan/scan`)."""

    async def submit_scan(self, ip: str, gate: SendGate | None = None) -> ScanTicket:
        """Ask for a scan of `ip` (1 credit). Raises `ScanRefused`, `Transient`,
        `NotSent`."""
        ...

    async def scan_status(self, scan_id: str, gate: SendGate | None = None) -> ScanStatus:
        """Where the scan stands. Raises `ScanRefused` (404: unknown id), `Transient`,
        `NotSent`."""
        ...


class ReservedSlot(SendGate, Protocol):
    """A slot of the shared rate budget (`recon_stream.adapters.ratelimit.Slot`)."""

    @property
    def entered_at(self) -> float | None:
        """When the request was let go (local monotonic), None until it was."""
        ...


class RateBudget(Protocol):
    """The request budget shared by every scanner replica."""

    async def reserve(self) -> ReservedSlot: ...
