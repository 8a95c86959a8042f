"""MongoDB: the client, with the TLS settings applied.

Each collection has one owner among the adapters; `adapters.collections` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.monitoring import CommandListener

from recon_stream.settings import Settings

Document = dict[str, Any]


def connect(
    settings: Settings, listeners: Sequence[CommandListener] = ()
) -> AsyncMongoClient[Document]:
    """A client for `RECON_MONGODB_URI` with the TLS settings applied."""
    options: dict[str, Any] = {
        "serverSelectionTimeoutMS": settings.mongodb_server_selection_timeout_ms,
        "appname": "recon-stream",
        "tz_aware": True,
        "event_listeners": list(listeners),
    }
    if settings.mongodb_tls:
        options["tls"] = True
        if settings.mongodb_tls_ca_file:
            options["tlsCAFile"] = str(settings.mongodb_tls_ca_file)
        if settings.mongodb_tls_certificate_key_file:
            options["tlsCertificateKeyFile"] = str(settings.mongodb_tls_certificate_key_file)
        if settings.mongodb_tls_certificate_key_file_password:
            options["tlsCertificateKeyFilePassword"] = (
                settings.mongodb_tls_certificate_key_file_password.get_secret_value()
            )
        if settings.mongodb_tls_allow_invalid_hostnames:
            options["tlsAllowInvalidHostnames"] = True
    return AsyncMongoClient(settings.mongodb_uri.get_secret_value(), **options)


def aware(moment: datetime) -> datetime:
    """`moment` as UTC with its zone: a client that is not tz-aware hands times back
    naive."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def delete_organization(collection: AsyncCollection[Document], organization_id: str) -> int:
    """Delete the organization's documents in `collection` (`purge`); how many."""
    result = await collection.delete_many({"organization_id": organization_id})
    return result.deleted_count
