"""Build the Emarsys client a worker uses from its settings."""

from __future__ import annotations

from typing import TYPE_CHECKING

from app.emarsys.auth import Authenticator, OAuth2Authenticator, WsseAuthenticator
from app.emarsys.client import EmarsysClient, OnRetry
from app.settings import WsseAuth

if TYPE_CHECKING:
    from app.settings import Settings

__all__ = ["emarsys_client_from_settings"]


def emarsys_client_from_settings(
    settings: Settings, *, on_retry: OnRetry | None = None
) -> EmarsysClient:
    e = settings.emarsys
    auth = e.auth
    authenticator: Authenticator
    if isinstance(auth, WsseAuth):
        authenticator = WsseAuthenticator(auth.username, auth.secret.get_secret_value())
    else:
        # Client-credentials token shared by every request, refreshed before expiry/on 401.
        authenticator = OAuth2Authenticator(
            None, auth.token_url, auth.client_id, auth.client_secret.get_secret_value()
        )
    return EmarsysClient(
        e.api_url,
        authenticator,
        requests_per_minute=e.requests_per_minute,
        request_timeout=e.request_timeout,
        max_backoff=e.max_retry_backoff,
        on_retry=on_retry,
    )
