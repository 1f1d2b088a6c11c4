"""Build the Emarsys client a worker uses from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.emarsys.auth import WsseAuthenticator
from app.emarsys.client import EmarsysClient

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["emarsys_client_from_settings"]


def emarsys_client_from_settings(settings: Settings) -> EmarsysClient:
    e = settings.emarsys
    auth = e.auth
    if auth.type != "wsse":
        raise ValueError(f"emarsys.auth.type: {auth.type!r} is not supported yet (use wsse)")
    return EmarsysClient(
        e.api_url,
        WsseAuthenticator(auth.username, auth.secret.get_secret_value()),
        requests_per_minute=e.requests_per_minute,
        request_timeout=e.request_timeout,
        max_backoff=e.max_retry_backoff,
    )
