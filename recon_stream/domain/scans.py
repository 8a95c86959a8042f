"""What one Shodan lookup says about one IP, normalized (the providers' output)."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Transport = Literal["tcp", "udp"]
ProviderName = Literal["api", "internetdb", "sample"]


class Service(BaseModel):
    """One open port as Shodan last saw it."""

    model_config = ConfigDict(frozen=True)

    port: int = Field(ge=0, le=65535)
    transport: Transport = "tcp"
    module: str | None = None
    """Shodan's crawler module (`_shodan.module`), e.g. "rdp", "smb", "https"."""
    product: str | None = None
    version: str | None = None
    cpe: tuple[str, ...] = ()
    """CPE 2.3 strings, sorted (from `cpe23`, else the deprecated `cpe`)."""
    vulns: tuple[str, ...] = ()
    """CVE ids, sorted and de-duplicated."""
    max_cvss: float | None = None
    cvss: tuple[tuple[str, float], ...] = ()
    """(CVE id, CVSS score) for the CVEs Shodan scored, sorted by id."""
    shodan_timestamp: datetime | None = None
    """Shodan's own scan time for this port (UTC)."""

    @property
    def key(self) -> tuple[Transport, int]:
        return (self.transport, self.port)


class ScanStatus(enum.StrEnum):
    """Where an on-demand Shodan scan stood when its lookup was made.

    Shodan's own statuses (`SUBMITTING`, `QUEUE`, `PROCESSING`, `DONE`), lower-cased,
    and `timed_out`: not DONE after RECON_SHODAN_SCAN_TIMEOUT_SECONDS (the lookup was
    made anyway)."""

    SUBMITTING = "submitting"
    QUEUE = "queue"
    PROCESSING = "processing"
    DONE = "done"
    TIMED_OUT = "timed_out"

    @classmethod
    def of(cls, shodan_status: object) -> ScanStatus:
        """Shodan's status text; anything unknown is taken as still in progress."""
        text = str(shodan_status).strip().lower()
        return cls(text) if text in cls._value2member_map_ else cls.PROCESSING


class ScanRecord(BaseModel):
    """An on-demand Shodan scan a rescan submitted before its lookup (`data.scan`)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(description="Shodan's scan id.")
    submitted_at: datetime = Field(description="When recon-stream submitted it (UTC).")
    status: ScanStatus = Field(description="Its status when the lookup was made.")


class HostScan(BaseModel):
    """A provider's answer for one IP. `services` is empty when nothing is known
    (Shodan's 404 "No information available for that IP.")."""

    model_config = ConfigDict(frozen=True)

    ip: str
    provider: ProviderName
    queried_at: datetime
    """When we asked (UTC)."""
    services: tuple[Service, ...] = ()
    hostnames: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    vulns: tuple[str, ...] = ()
    cpes: tuple[str, ...] = ()
    """CPEs the provider gave for the host but for none of its services (InternetDB's
    operating systems and products it could not place on an open port)."""
    org: str | None = None
    isp: str | None = None
    asn: str | None = None
    os: str | None = None
    last_update: datetime | None = None
    sample: bool = False
    """True for bundled sample data (never real Shodan results)."""
    scan: ScanRecord | None = None
    """The on-demand scan this lookup waited for (a rescan's), if any."""
