"""Coalescing: a batch of heartbeats folded into one sighting per (organization, IP).

Coalescing merges, never picks: every agent and site seen survives, with the
latest time each was seen, and the pair keeps its earliest and latest times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from recon_stream.domain.heartbeats import Heartbeat

PairKey = tuple[str, str]
"""(organization_id, ip text)."""


@dataclass(slots=True)
class AgentSighting:
    agent_id: str
    last_seen: datetime
    hostname: str | None = None


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

    def add(self, hb: Heartbeat) -> None:
        self.heartbeats += 1
        observed = hb.observed_at
        if observed < self.first_seen:
            self.first_seen = observed
        if observed > self.last_seen:
            self.last_seen = observed
        if hb.site_id is not None:
            self.site_ids.add(hb.site_id)
        agent = self.agents.get(hb.agent_id)
        if agent is None:
            self.agents[hb.agent_id] = AgentSighting(hb.agent_id, observed, hb.hostname)
        elif observed >= agent.last_seen:
            agent.last_seen = observed
            if hb.hostname is not None:
                agent.hostname = hb.hostname
        elif agent.hostname is None:
            agent.hostname = hb.hostname

    def merge(self, other: PairSighting) -> None:
        """Fold another sighting of the same pair (e.g. another spelling of the IP)."""
        self.heartbeats += other.heartbeats
        self.first_seen = min(self.first_seen, other.first_seen)
        self.last_seen = max(self.last_seen, other.last_seen)
        self.site_ids |= other.site_ids
        for agent in other.agents.values():
            mine = self.agents.get(agent.agent_id)
            if mine is None or agent.last_seen > mine.last_seen:
                self.agents[agent.agent_id] = agent

    def agents_most_recent_first(self) -> list[AgentSighting]:
        return sorted(self.agents.values(), key=lambda a: a.last_seen, reverse=True)


def fold(heartbeats: Iterable[Heartbeat]) -> dict[PairKey, PairSighting]:
    """Fold heartbeats by (organization_id, public_ip as sent)."""
    pairs: dict[PairKey, PairSighting] = {}
    for hb in heartbeats:
        key = (hb.organization_id, hb.public_ip)
        sighting = pairs.get(key)
        if sighting is None:
            sighting = pairs[key] = PairSighting(
                hb.organization_id, hb.public_ip, hb.observed_at, hb.observed_at
            )
        sighting.add(hb)
    return pairs
