"""OAuth 2.0 access tokens for XOAUTH2 (IMAP, POP3, SMTP) and Microsoft Graph.

The client-credentials grant against the profile's token endpoint; tokens are cached until shortly
before they expire.  Secrets come decrypted from the registry and never leave this module.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from shared.errors import AuthenticationFailed, ConnectionFailed
from shared.tls import client_context


class TokenProvider:
    def __init__(self, *, verify: bool | str = True, timeout: float = 20.0) -> None:
        self._verify = verify
        self._timeout = timeout
        self._cache: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def token(self, token_url: str, client_id: str, client_secret: str, scope: str | None, *,
                    ca_file: str | None = None) -> str:
        """An access token for the client, cached until a minute before it expires.  ``ca_file``:
        the profile's CA (``tls_ca_file``), for an identity provider behind a private CA."""
        key = (token_url, client_id, scope or "")
        cached = self._fresh(key)
        if cached is not None:
            return cached
        # One request per client at a time, and the cache read again once it is ours: the many
        # mailboxes of one profile signing in together share one token instead of asking for one each.
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._fresh(key)
            if cached is not None:
                return cached
            verify = client_context(ca_file) if ca_file else self._verify
            token, lifetime = await self._request(token_url, client_id, client_secret, scope, verify)
            self._cache[key] = (token, time.monotonic() + lifetime)
            return token

    def _fresh(self, key: tuple[str, str, str]) -> str | None:
        cached = self._cache.get(key)
        return cached[0] if cached and cached[1] > time.monotonic() + 60 else None

    async def _request(self, token_url: str, client_id: str, client_secret: str, scope: str | None,
                       verify: Any) -> tuple[str, float]:
        data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
        if scope:
            data["scope"] = scope
        try:
            async with httpx.AsyncClient(verify=verify, timeout=self._timeout) as http:
                response = await http.post(token_url, data=data)
        except httpx.HTTPError as exc:
            raise ConnectionFailed(f"the OAuth token endpoint could not be reached: {type(exc).__name__}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            # Throttled or down: the credentials may be fine, so this is not the mailbox's fault.
            raise ConnectionFailed(f"the OAuth token endpoint is not answering now (HTTP {response.status_code})")
        if response.status_code != 200:
            raise AuthenticationFailed(f"the OAuth token endpoint refused the client credentials (HTTP {response.status_code})")
        try:
            body = response.json()
            token, lifetime = body.get("access_token"), float(body.get("expires_in", 3600))
        except (ValueError, AttributeError, TypeError):
            raise AuthenticationFailed("the OAuth token endpoint answered without a JSON token "
                                       "(is the profile's token URL right?)") from None
        if not token or not isinstance(token, str):
            raise AuthenticationFailed("the OAuth token endpoint answered without an access token")
        return token, lifetime

    def forget(self, token: str) -> None:
        """Drop a token a server refused: the next ``token()`` asks the endpoint for a new one."""
        for key, (cached, _) in list(self._cache.items()):
            if cached == token:
                del self._cache[key]
