"""Every MongoDB collection the workers use, by name, and which adapter owns it.

One owner per collection: no other module queries it.
"""

from __future__ import annotations

ORG_IPS = "org_ips"
"""(organization, IP) pairs from heartbeats, with the scan-request outbox: `adapters.org_ips`."""
IP_SCANS = "ip_scans"
"""The latest lookup per IP, shared by every organization behind it: `adapters.ip_scans`."""
EXPOSURES = "exposures"
"""One snapshot per (organization, IP), with its event and state outboxes:
`adapters.exposures`."""
ACCEPTANCES = "acceptances"
"""Exposures organizations declared intended: `adapters.acceptances`."""
HISTORY = "exposure_history"
"""One entry per event, kept for RECON_HISTORY_RETENTION_SECONDS: `adapters.history`."""
SCAN_QUEUE = "scan_queue"
"""The scanner's durable priority queue, one item per IP: `adapters.scan_queue`."""
APPLIED_COMMANDS = "applied_commands"
"""Ids of commands already applied: `adapters.command_log`."""
VULN_CONTEXT = "vuln_context"
"""KEV and EPSS facts per CVE: `adapters.vuln_feeds`."""
VULN_FEEDS = "vuln_feeds"
"""When each feed last loaded, and its last error: `adapters.vuln_feeds`."""
RATE_BUDGETS = "rate_budgets"
"""The shared request budgets' slots: `adapters.ratelimit`."""
LEASES = "leases"
"""Leader leases (the scheduler's): `adapters.leadership`."""
SCAN_CREDITS = "scan_credits"
"""On-demand Shodan scan credits spent per UTC day, across replicas: `adapters.scan_credits`."""
VERIFICATION_CONSENTS = "verification_consents"
"""Organizations' consent to TCP verification, one document each: `adapters.consents`."""
