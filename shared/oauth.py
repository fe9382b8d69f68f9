"""OAuth 2.0 access tokens for XOAUTH2 (IMAP, POP3, SMTP) and Microsoft Graph.

The client-credentials grant against the profile's token endpoint; tokens are cached until shortly
before they expire.  Secrets come decrypted from the registry and never leave this module.
"""
from __future__ import annotations

import asyncio
import time

import httpx

from shared.errors import AuthenticationFailed, ConnectionFailed


class TokenProvider:
    def __init__(self, *, verify: bool | str = True, timeout: float = 20.0) -> None:
        self._verify = verify
        self._timeout = timeout
        self._cache: dict[tuple[str, str, str], tuple[str, float]] = {}
        self._lock = asyncio.Lock()

    async def token(self, token_url: str, client_id: str, client_secret: str, scope: str | None) -> str:
        key = (token_url, client_id, scope or "")
        cached = self._cache.get(key)
        if cached and cached[1] > time.monotonic() + 60:
            return cached[0]
        async with self._lock:
            data = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": client_secret}
            if scope:
                data["scope"] = scope
            try:
                async with httpx.AsyncClient(verify=self._verify, timeout=self._timeout) as http:
                    response = await http.post(token_url, data=data)
            except httpx.HTTPError as exc:
                raise ConnectionFailed(f"the OAuth token endpoint could not be reached: {type(exc).__name__}") from exc
            if response.status_code != 200:
                raise AuthenticationFailed(f"the OAuth token endpoint refused the client credentials (HTTP {response.status_code})")
            body = response.json()
            token = body.get("access_token")
            if not token:
                raise AuthenticationFailed("the OAuth token endpoint answered without an access token")
            self._cache[key] = (token, time.monotonic() + float(body.get("expires_in", 3600)))
            return token

    def forget(self, token: str) -> None:
        """Drop a token a server refused: the next ``token()`` asks the endpoint for a new one."""
        for key, (cached, _) in list(self._cache.items()):
            if cached == token:
                del self._cache[key]
