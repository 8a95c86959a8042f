"""The roles a worker process can run (`recon-stream run ROLE`); `recon_stream.app`
wires each of them (`ROLE_WIRING`), the CLI offers them and `all`."""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    ingest = "ingest"
    scanner = "scanner"
    scheduler = "scheduler"
    notifier = "notifier"
    all = "all"
    """Every role in one process."""


ROLES: tuple[str, ...] = tuple(role.value for role in Role if role is not Role.all)
"""Every role, in the order a process running several wires them."""
