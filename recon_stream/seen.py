"""The in-process memory of recently written (organization, IP) pairs.

Almost every heartbeat repeats one seen minutes ago. A pair written less than
`refresh_interval` ago, with no agent or site we have not written yet, needs no
MongoDB write. Entries are bounded in number (least recently used go first).
"""

from __future__ import annotations

import time
from collections import OrderedDict
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


class SeenPairs:
    """A bounded LRU map of pairs to what was last written for them."""

    def __init__(
        self,
        max_entries: int,
        refresh_interval: float,
        *,
        max_members: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[SeenKey, SeenEntry] = OrderedDict()
        self._max_entries = max_entries
        self._refresh = refresh_interval
        self._max_members = max_members
        self._clock = clock

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: SeenKey) -> SeenEntry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def is_fresh(self, entry: SeenEntry, agents: Iterable[str], sites: Iterable[str]) -> bool:
        """True when writing the pair again would tell MongoDB nothing new."""
        if self._clock() - entry.written_at >= self._refresh:
            return False
        return entry.agents.issuperset(agents) and entry.sites.issuperset(sites)

    def remember(self, key: SeenKey, address_class: AddressClass, ip: str) -> SeenEntry:
        """Record a classified address that has not been written (yet)."""
        entry = self._entries.get(key)
        if entry is None:
            if self._max_entries <= 0:
                return SeenEntry(address_class, ip)
            entry = self._entries[key] = SeenEntry(address_class, ip)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)
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

    def forget(self, key: SeenKey) -> None:
        self._entries.pop(key, None)
