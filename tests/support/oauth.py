"""A client-credentials token endpoint (RFC 6749 4.4) for SMTP XOAUTH2 tests against aiosmtpd, which
accepts a fixed set of tokens: the endpoint hands out those tokens, in order, to the one client it
knows.  (Dovecot checks tokens by introspection instead: tests/integration/test_xoauth2.py.)"""
from __future__ import annotations

import asyncio
import secrets
import ssl

from aiohttp import web

from conduit.peers.ports import LOOPBACK

CLIENT_ID, CLIENT_SECRET = "conduit-app", "app-secret-1"


class TokenEndpoint:
    def __init__(self, count: int = 1, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.tokens = ["tok-" + secrets.token_hex(8) for _ in range(count)]
        self.issued = 0   # the next issue gives tokens[issued], the last one once all are given
        self.requests = 0
        self.delay = 0.0   # seconds each answer is held back (a slow identity provider)
        self.answer: tuple[int, str] | None = None   # (status, body) instead of a token
        self.url = ""
        self._ssl_context = ssl_context   # https with it
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/token", self._issue)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0, ssl_context=self._ssl_context)
        await site.start()
        scheme = "https" if self._ssl_context else "http"
        self.url = f"{scheme}://{LOOPBACK}:{self._runner.addresses[0][1]}/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _issue(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.requests += 1
        await asyncio.sleep(self.delay)
        if self.answer is not None:
            return web.Response(status=self.answer[0], text=self.answer[1])
        if (form.get("client_id"), form.get("client_secret")) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        token = self.tokens[min(self.issued, len(self.tokens) - 1)]
        self.issued += 1
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": 3600})
