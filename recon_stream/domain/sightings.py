"""Coalescing: a batch of heartbeats folded into one sighting per (organization, IP).

Coalescing merges, never picks: every agent and site seen survives, with the
latest time each was seen, and the pair keeps its earliest and latest times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from recon_stream.domain.heartbeats import Heartbeat, observed_time

PairKey = tuple[str, str]
"""(organization_id, ip text)."""


@dataclass(slots=True)
class AgentSighting:
    agent_id: str
    last_seen: datetime
    hostname: str | None = None
    hostname_seen: datetime | None = None
    """When the kept hostname was reported: the latest report that had one wins."""

    def saw(self, observed: datetime, hostname: str | None) -> None:
        if observed > self.last_seen:
            self.last_seen = observed
        if hostname is not None and (self.hostname_seen is None or observed >= self.hostname_seen):
            self.hostname = hostname
            self.hostname_seen = observed


@dataclass(slots=True)
class PairSighting:
    """Everything one batch says about one (organization, IP) pair."""

    organization_id: str
    ip: str
    first_seen: datetime
    last_seen: datetime
    heartbeats: int = 0
    agents: dict[str, AgentSighting] = field(default_factory=dict)
    site_ids: set[str] = field(default_factory=set)

    @property
    def key(self) -> PairKey:
        return (self.organization_id, self.ip)

    def add(self, hb: Heartbeat, observed: datetime) -> None:
        """Fold in one heartbeat; `observed` is its parsed `observed_at`."""
        self.heartbeats += 1
        if observed < self.first_seen:
            self.first_seen = observed
        if observed > self.last_seen:
            self.last_seen = observed
        if hb.site_id is not None:
            self.site_ids.add(hb.site_id)
        agent = self.agents.get(hb.agent_id)
        if agent is None:
            self.agents[hb.agent_id] = AgentSighting(
                hb.agent_id, observed, hb.hostname, observed if hb.hostname else None
            )
        else:
            agent.saw(observed, hb.hostname)

    def merge(self, other: PairSighting) -> None:
        """Fold another sighting of the same pair (e.g. another spelling of the IP)."""
        self.heartbeats += other.heartbeats
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.site_ids |= other.site_ids
        for agent in other.agents.values():
            mine = self.agents.get(agent.agent_id)
            if mine is None:
                self.agents[agent.agent_id] = AgentSighting(
                    agent.agent_id, agent.last_seen, agent.hostname, agent.hostname_seen
                )
            else:
                mine.saw(agent.last_seen, None)
                if agent.hostname_seen is not None:
                    mine.saw(agent.hostname_seen, agent.hostname)

    def agents_most_recent_first(self) -> list[AgentSighting]:
        return sorted(self.agents.values(), key=lambda a: a.last_seen, reverse=True)


def fold(heartbeats: Iterable[Heartbeat]) -> dict[PairKey, PairSighting]:
    """Fold heartbeats by (organization_id, public_ip as sent)."""
    pairs: dict[PairKey, PairSighting] = {}
    for hb in heartbeats:
        key = (hb.organization_id, hb.public_ip)
        observed = observed_time(hb)
        sighting = pairs.get(key)
        if sighting is None:
            sighting = pairs[key] = PairSighting(
                hb.organization_id, hb.public_ip, observed, observed
            )
        sighting.add(hb, observed)
    return pairs
