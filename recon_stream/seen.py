"""The in-process memory of recently written (organization, IP) pairs.

Almost every heartbeat repeats one seen minutes ago. A heartbeat whose pair was
written less than `refresh_interval` ago, by an agent and site already written
for it, needs no MongoDB write, and its address needs no classification. The
map is bounded: the least recently *written* pairs go first (a pair in use is
rewritten every refresh interval, so it stays). Not touching the order on every
hit keeps the hot path to one dict lookup.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from recon_stream.domain.addresses import AddressClass

SeenKey = tuple[str, str]
"""(organization_id, public_ip exactly as the heartbeat spelled it)."""


@dataclass(slots=True)
class SeenEntry:
    address_class: AddressClass
    ip: str
    """The normalized address."""
    written_at: float = float("-inf")
    agents: set[str] = field(default_factory=set)
    sites: set[str] = field(default_factory=set)
    excluded: str | None = None
    """The scope's reason, when the pair was excluded as it was first seen: its later
    heartbeats are counted `excluded` too, without asking the scope again."""


class SeenPairs:
    """A bounded map of pairs to what was last written for them."""

    def __init__(
        self,
        max_entries: int,
        refresh_interval: float,
        *,
        max_members: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: dict[SeenKey, SeenEntry] = {}
        self.get: Callable[[SeenKey], SeenEntry | None] = self._entries.get
        """The entry of a pair, if remembered (the bound dict method: hot path)."""
        self._max_entries = max_entries
        self._refresh = refresh_interval
        self._max_members = max_members
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def fresh_after(self) -> float:
        """Entries written after this clock reading are fresh (one call per batch)."""
        return self._clock() - self._refresh

    def is_fresh(self, entry: SeenEntry, agents: Iterable[str], sites: Iterable[str]) -> bool:
        """True when writing the pair again would tell MongoDB nothing new."""
        if entry.written_at <= self.fresh_after():
            return False
        return entry.agents.issuperset(agents) and entry.sites.issuperset(sites)

    def remember(self, key: SeenKey, address_class: AddressClass, ip: str) -> SeenEntry:
        """Record a classified address that has not been written (yet)."""
        entry = self._entries.get(key)
        if entry is None:
            entry = SeenEntry(address_class, ip)
            if self._max_entries > 0:
                self._entries[key] = entry
                self._evict()
        return entry

    def written(
        self, key: SeenKey, entry: SeenEntry, agents: Iterable[str], sites: Iterable[str]
    ) -> None:
        """Record that the pair, with these agents and sites, is now in MongoDB."""
        entry.written_at = self._clock()
        entry.agents.update(agents)
        entry.sites.update(sites)
        # A pair with more members than we keep simply writes more often.
        if len(entry.agents) > self._max_members:
            entry.agents.clear()
        if len(entry.sites) > self._max_members:
            entry.sites.clear()
        if self._max_entries > 0:
            # Move to the young end: eviction order is write order.
            self._entries.pop(key, None)
            self._entries[key] = entry
            self._evict()

    def _evict(self) -> None:
        while len(self._entries) > self._max_entries:
            del self._entries[next(iter(self._entries))]

    def forget(self, key: SeenKey) -> None:
        self._entries.pop(key, None)
