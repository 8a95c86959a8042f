"""Exposure events as OCSF 1.8.0 Detection Findings (class 2004), for SIEMs.

`to_finding` maps one `ExposureEvent` to a bare OCSF JSON object (no CloudEvents
envelope), published on `recon.exposures.ocsf.v1` with Kafka key =
`organization_id` and sent by the notifier's `ocsf` format:

| event | `activity_id` | `status_id` |
|---|---|---|
| opened | 1 Create | 1 New; 3 Suppressed when accepted before it opened |
| changed | 2 Update | 1 New; 3 Suppressed while accepted |
| closed | 3 Close | 4 Resolved |

`type_uid` = 2004 x 100 + `activity_id`; `time` and every `*_time` are epoch
milliseconds; `finding_info.uid` is the exposure's stable key
(`organization_id/ip/transport/port`, the state topic's key), the same from opened
to closed; `metadata.uid` is the CloudEvent id, so both topics name a change alike.
Detection Finding rather than Vulnerability Finding (2002): an open port with no CVE
is still a finding, and 2002 would need a made-up advisory for it.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from recon_stream.domain.exposures import ChangeKind, ExposureEvent, state_key
from recon_stream.domain.risk import Severity

OCSF_VERSION = "1.8.0"
CLASS_UID = 2004
CATEGORY_UID = 2
PRODUCT = "recon-stream"

_ACTIVITIES: dict[ChangeKind, tuple[int, str]] = {
    ChangeKind.OPENED: (1, "Create"),
    ChangeKind.CHANGED: (2, "Update"),
    ChangeKind.CLOSED: (3, "Close"),
}
NEW, SUPPRESSED, RESOLVED = (1, "New"), (3, "Suppressed"), (4, "Resolved")
SEVERITY_IDS: dict[Severity, tuple[int, str]] = {
    Severity.INFO: (1, "Informational"),
    Severity.LOW: (2, "Low"),
    Severity.MEDIUM: (3, "Medium"),
    Severity.HIGH: (4, "High"),
    Severity.CRITICAL: (5, "Critical"),
}
# risk_level_id runs one below severity_id: 0 Info ... 4 Critical.
_RISK_LEVELS = ("Info", "Low", "Medium", "High", "Critical")
_PROTOCOL_NUMBERS = {"tcp": 6, "udp": 17}
_DATA_SOURCES = {"api": "Shodan", "internetdb": "Shodan InternetDB", "sample": "Sample data"}
# A finding worth an analyst's attention: not accepted, still open, high or critical.
_ALERT_FROM = Severity.HIGH.rank


def ms(moment: datetime) -> int:
    """Epoch milliseconds (OCSF's `timestamp_t`)."""
    return int(moment.timestamp() * 1000)


def finding_uid(organization_id: str, ip: str, transport: str, port: int) -> str:
    """`finding_info.uid`: one exposure's key for its whole life."""
    return state_key(organization_id, ip, transport, port)


def title(event: ExposureEvent) -> str:
    """E.g. "rdp (3389/tcp) exposed to the internet on 203.0.113.10"."""
    d = event.data
    what = d.service.name or "unidentified service"
    return f"{what} ({d.port}/{d.transport}) exposed to the internet on {d.ip}"


def _status(event: ExposureEvent) -> tuple[int, str]:
    change = event.data.change
    if change is ChangeKind.CLOSED:
        return RESOLVED
    if event.data.accepted:
        # Accepted before it opened, or while open: either way not for the queue.
        return SUPPRESSED
    return NEW


def _message(event: ExposureEvent) -> str:
    d = event.data
    where = f"{d.ip}:{d.port}/{d.transport}"
    service = d.service.name or "unidentified service"
    if d.change is ChangeKind.OPENED:
        return f"New internet exposure: {service} on {where}"
    if d.change is ChangeKind.CLOSED:
        why = f" ({d.reason.value})" if d.reason is not None else ""
        return f"Internet exposure closed{why}: {service} on {where}"
    fields = ", ".join(d.changed_fields) or "details"
    why = f" ({d.reason.value})" if d.reason is not None else ""
    return f"Internet exposure changed{why}: {fields} of {service} on {where}"


def _description(event: ExposureEvent) -> str:
    d = event.data
    software = " ".join(part for part in (d.service.product, d.service.version) if part)
    seen = f" ({software})" if software else ""
    source = _DATA_SOURCES[d.provider]
    return (
        f"{source} observed {d.service.name or 'a service'}{seen} on {d.ip}:{d.port}/{d.transport}."
    )


def _resources(event: ExposureEvent, hostname: str | None) -> list[dict[str, Any]]:
    d = event.data
    service: dict[str, Any] = {
        "uid": f"{d.ip}:{d.port}/{d.transport}",
        "name": d.service.name or "unknown",
        "type": "Internet-Exposed Service",
        "ip": d.ip,
        "role_id": 3,
        "role": "Affected",
        "data": {"product": d.service.product, "cpe": list(d.service.cpe)},
    }
    if hostname is not None:
        service["hostname"] = hostname
    if d.service.version is not None:
        service["version"] = d.service.version
    agents = [
        {"uid": agent, "name": agent, "type": "Endpoint Agent", "role_id": 4, "role": "Related"}
        for agent in d.candidate_agents
    ]
    return [service, *agents]


def _vulnerabilities(event: ExposureEvent) -> list[dict[str, Any]]:
    d = event.data
    packages: list[dict[str, Any]] = []
    if d.service.product is not None and d.service.version is not None:
        package: dict[str, Any] = {"name": d.service.product, "version": d.service.version}
        if d.service.cpe:
            package["cpe_name"] = d.service.cpe[0]
        packages.append(package)
    context = {v.id: v for v in d.vulnerabilities}
    entries = []
    for cve in d.vulns:
        entry: dict[str, Any] = {"cve": {"uid": cve}}
        known = context.get(cve)
        if known is not None and known.epss is not None:
            entry["cve"]["epss"] = {"score": f"{known.epss:g}"}
        if known is not None and known.kev:
            # In CISA's Known Exploited Vulnerabilities catalog: exploited in the wild.
            entry["is_exploit_available"] = True
        if packages:
            entry["affected_packages"] = packages
        entries.append(entry)
    return entries


def _observables(event: ExposureEvent) -> list[dict[str, Any]]:
    d = event.data
    found: list[dict[str, Any]] = [
        {"type_id": 2, "type": "IP Address", "name": "device.ip", "value": d.ip},
        {
            "type_id": 11,
            "type": "Port",
            "name": "device.network_interfaces.open_ports.port",
            "value": str(d.port),
        },
    ]
    found += [
        {"type_id": 1, "type": "Hostname", "name": "device.hostname", "value": name}
        for name in d.hostnames
    ]
    found += [
        {
            "type_id": 18,
            "type": "CVE Object: uid",
            "name": "vulnerabilities.cve.uid",
            "value": cve,
        }
        for cve in d.vulns
    ]
    return found


def _unmapped(event: ExposureEvent) -> dict[str, Any]:
    d = event.data
    acceptance = None
    if d.acceptance is not None:
        acceptance = {
            "reason": d.acceptance.reason,
            "requested_by": d.acceptance.requested_by,
            "accepted_time": ms(d.acceptance.accepted_at),
            "expires_time": ms(d.acceptance.expires_at) if d.acceptance.expires_at else None,
        }
    return {
        "change": d.change.value,
        "reason": d.reason.value if d.reason is not None else None,
        "changed_fields": list(d.changed_fields),
        "previous": d.previous.model_dump(mode="json") if d.previous is not None else None,
        "previous_vulns": list(d.previous_vulns) if d.previous_vulns is not None else None,
        "previous_severity": d.previous_severity.value if d.previous_severity else None,
        "accepted_risk": d.accepted,
        "acceptance": acceptance,
        "risk_reasons": list(d.risk_reasons),
        "max_cvss": d.max_cvss,
        # Shodan gives a score without its CVSS version, and OCSF's cvss needs one. A list
        # of {cve, score}, not an object keyed by CVE: SIEMs would make a field per CVE.
        "cvss": [{"cve": v.id, "score": v.cvss} for v in d.vulnerabilities if v.cvss is not None],
        "site_ids": list(d.site_ids),
        "candidate_agents": list(d.candidate_agents),
        "hostnames": list(d.hostnames),
        "shodan_last_scanned_time": ms(d.shodan_last_scanned) if d.shodan_last_scanned else None,
        "last_queried_time": ms(d.last_queried),
        "provider": d.provider,
        "sample": d.sample,
        # OCSF 1.8's `evidences` (Evidence Artifacts) describe what a detection observed on
        # a host (processes, files, connections *of* the device); our check is a probe *to*
        # the device from outside, for which no attribute of Detection Finding fits: kept
        # here, with OCSF's epoch-millisecond times.
        "verification": (
            {
                "state": d.verification.state.value,
                "checked_time": ms(d.verification.checked_at),
                "method": d.verification.method,
            }
            if d.verification is not None
            else None
        ),
        "scan": (
            {
                "uid": d.scan.id,
                "submitted_time": ms(d.scan.submitted_at),
                "status": d.scan.status.value,
            }
            if d.scan is not None
            else None
        ),
        "cloudevents": {"type": event.type, "source": event.source, "subject": event.subject},
    }


def to_finding(event: ExposureEvent, *, product_version: str = "0") -> dict[str, Any]:
    """The OCSF 1.8.0 Detection Finding announcing `event` (JSON-ready)."""
    d = event.data
    activity_id, activity = _ACTIVITIES[d.change]
    status_id, status = _status(event)
    severity_id, severity = SEVERITY_IDS[d.severity]
    hostname = d.hostnames[0] if d.hostnames else None
    uid = finding_uid(d.organization_id, d.ip, d.transport, d.port)
    time = ms(event.time)
    device: dict[str, Any] = {
        "type_id": 0,
        "type": "Unknown",
        "ip": d.ip,
        "network_interfaces": [
            {
                "ip": d.ip,
                "open_ports": [
                    {
                        "port": d.port,
                        "protocol_name": d.transport,
                        "protocol_num": _PROTOCOL_NUMBERS[d.transport],
                    }
                ],
            }
        ],
    }
    if hostname is not None:
        device["hostname"] = hostname
    finding: dict[str, Any] = {
        "category_uid": CATEGORY_UID,
        "category_name": "Findings",
        "class_uid": CLASS_UID,
        "class_name": "Detection Finding",
        "activity_id": activity_id,
        "activity_name": activity,
        "type_uid": CLASS_UID * 100 + activity_id,
        "type_name": f"Detection Finding: {activity}",
        "severity_id": severity_id,
        "severity": severity,
        "risk_level_id": severity_id - 1,
        "risk_level": _RISK_LEVELS[severity_id - 1],
        "status_id": status_id,
        "status": status,
        "is_alert": (
            d.change is not ChangeKind.CLOSED and not d.accepted and d.severity.rank >= _ALERT_FROM
        ),
        "confidence_id": 3,
        "confidence": "High",
        "time": time,
        "message": _message(event),
        "metadata": {
            "version": OCSF_VERSION,
            "uid": event.id,
            "correlation_uid": uid,
            "tenant_uid": d.organization_id,
            "event_code": f"exposure.{d.change.value}",
            "product": {
                "name": PRODUCT,
                "uid": PRODUCT,
                "vendor_name": PRODUCT,
                "version": product_version,
            },
        },
        "finding_info": {
            "uid": uid,
            "title": title(event),
            "desc": _description(event),
            "types": ["Exposure", "Open Port", *([d.service.name] if d.service.name else [])],
            "first_seen_time": ms(d.first_seen),
            "last_seen_time": ms(d.last_seen),
            "created_time": ms(d.first_seen),
            "modified_time": time,
            "data_sources": [_DATA_SOURCES[d.provider]],
        },
        "resources": _resources(event, hostname),
        "device": device,
        "observables": _observables(event),
        "unmapped": _unmapped(event),
    }
    if d.risk_reasons:
        finding["risk_details"] = "; ".join(d.risk_reasons)
    if d.change is ChangeKind.CLOSED and d.reason is not None:
        finding["status_detail"] = d.reason.value
    elif d.acceptance is not None:
        finding["status_detail"] = f"Risk accepted: {d.acceptance.reason}"
    vulnerabilities = _vulnerabilities(event)
    if vulnerabilities:
        finding["vulnerabilities"] = vulnerabilities
    return finding


def finding_json(event: ExposureEvent, *, product_version: str = "0") -> bytes:
    """`to_finding` as compact JSON: the OCSF topic's record value and the `ocsf` webhook body."""
    return json.dumps(
        to_finding(event, product_version=product_version), separators=(",", ":")
    ).encode()
