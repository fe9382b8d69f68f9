"""The simulator's server lifecycle and control surface: one aiohttp server for EWS, Graph and the token endpoint.

Routes: ``POST /EWS/Exchange.asmx`` (EWS, see ``ews``), ``/v1.0/...`` (Graph, see ``graph``),
``POST /{tenant}/oauth2/v2.0/token`` (client credentials), and ``/_sim/...``, a control API for tests
and demos that run the simulator out of process.  In process, the same controls are methods of
``ExchangeSimulator``::

    async with ExchangeSimulator() as sim:
        sim.add_mailbox("alice@contoso.test", password="pw")
        sim.add_app("client-id", "secret")
        sim.inject("ews", Fault(500, "ErrorServerBusy", retry_after=2))
        sim.drop_connection("graph", operation="sendMail")  # sent, but the client never hears so
        sim.fail_after_serving("graph", 504, operation="sendMail")  # sent, but the client hears 504
        sim.gateway_error("ews", 502, operation="CreateItem")  # sent; a gateway's page, Connection: close
        sim.garble_answer("ews", operation="CreateItem")  # sent; an answer the client cannot decode
        sim.trickle_answer("graph", 0.2, operation="sendMail")  # sent; answered one byte every 0.2 s
        sim.graph.upload_budget, sim.graph.upload_window = 10**6, 2.0  # Graph's 150 MB in 5 min, made small
        sim.file_sent_late("graph", 2.0)  # answered 202 at once, in Sent Items (and delivered) 2 s later
        ... sim.ews_url, sim.graph_url, sim.token_url ...
        sim.sent  # what was submitted

The listening socket is bound before the server starts (port 0 picks a free port), so the URLs are
known the moment ``start`` returns and nothing needs to wait for the server to come up.
"""
from __future__ import annotations

import base64
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Self

from aiohttp import web

from .ews import EwsEndpoint
from .graph import GraphApi, TokenEndpoint
from .store import (
    DROP,
    GARBLED,
    LATE,
    TRICKLE,
    App,
    Fault,
    Faults,
    Folder,
    Item,
    Mailbox,
    Organization,
    Principal,
    SentRecord,
)

__all__ = ["ExchangeSimulator", "Fault"]


class ExchangeSimulator:
    """A simulated Exchange organization served over HTTP or HTTPS on loopback."""

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None,
                 tenant: str = "simulated-tenant", domain: str = "sim.exchange.test",
                 token_lifetime: float = 3600.0, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.org = Organization(tenant=tenant, domain=domain, clock=clock)
        self.faults = Faults()
        self.ews = EwsEndpoint(self.org, self.faults)
        self.graph = GraphApi(self.org, self.faults)
        self.token_endpoint = TokenEndpoint(self.org, self.faults, token_lifetime)
        self._runner: web.AppRunner | None = None

    # -- lifecycle

    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/EWS/Exchange.asmx", self.ews.__call__)
        app.router.add_post("/ews/exchange.asmx", self.ews.__call__)  # IIS paths are case-insensitive
        app.router.add_routes(self.graph.routes())
        app.router.add_post("/{tenant}/oauth2/v2.0/token", self.token_endpoint.__call__)
        app.router.add_routes(_control_routes(self))
        return app

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.build_app(), access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"

    @property
    def ews_url(self) -> str:
        return f"{self.base_url}/EWS/Exchange.asmx"

    @property
    def graph_url(self) -> str:
        return f"{self.base_url}/v1.0"

    @property
    def token_url(self) -> str:
        return f"{self.base_url}/{self.org.tenant}/oauth2/v2.0/token"

    # -- directory and state

    def add_mailbox(self, address: str, *, password: str | None = None, display_name: str | None = None) -> Mailbox:
        return self.org.add_mailbox(address, password=password, display_name=display_name)

    def add_folder(self, address: str, name: str, *, parent: str = "msgfolderroot",
                   folder_class: str = "IPF.Note") -> Folder:
        return self.org.add_folder(address, name, parent=parent, folder_class=folder_class)

    def add_service_account(self, username: str, password: str, *, impersonation: bool = False) -> Principal:
        return self.org.add_service_account(username, password, impersonation=impersonation)

    def grant_full_access(self, address: str, username: str) -> None:
        self.org.grant_full_access(address, username)

    def grant_send_as(self, address: str, username: str) -> None:
        self.org.grant_send_as(address, username)

    def add_app(self, client_id: str, client_secret: str, *, mailboxes: set[str] | None = None) -> App:
        return self.org.add_app(client_id, client_secret, mailboxes=mailboxes)

    def mailbox(self, address: str) -> Mailbox:
        self.org.file_due()
        return self.org.mailbox(address)

    def items(self, address: str, folder: str = "inbox") -> list[Item]:
        self.org.file_due()
        found = self.org.mailbox(address).folder(folder)
        if found is None:
            raise KeyError(folder)
        return list(found.items.values())

    def deliver(self, address: str, mime: bytes, folder: str = "inbox") -> Item:
        """A message arriving from outside the organization (for ingest and sync tests)."""
        return self.org.deliver_mime(self.org.mailbox(address), mime, folder)

    @property
    def sent(self) -> list[SentRecord]:
        """Every send accepted, in order (``filed_at`` None: its copies are still to be filed)."""
        self.org.file_due()
        return self.org.sent

    # -- faults

    def inject(self, api: str, fault: Fault) -> None:
        """The next ``fault.times`` calls to ``api`` (``ews``, ``graph``, ``token``) fail with ``fault``."""
        self.faults.add(api, fault)

    def ews_server_busy(self, *, back_off: float = 30.0, times: int = 1, operation: str | None = None) -> None:
        self.inject("ews", Fault(500, "ErrorServerBusy", "The server cannot service this request right now. "
                                 "Try again later.", retry_after=back_off, operation=operation, times=times))

    def graph_throttle(self, *, retry_after: float = 10.0, times: int = 1, status: int = 429,
                       operation: str | None = None) -> None:
        code = "ApplicationThrottled" if status == 429 else "ServiceUnavailable"
        message = ("Application is over its MailboxConcurrency limit." if status == 429
                   else "The service is temporarily unavailable.")
        self.inject("graph", Fault(status, code, message, retry_after=retry_after, operation=operation, times=times))

    def answer_late(self, api: str, seconds: float, *, operation: str | None = None, times: int = 1) -> None:
        """The next ``times`` calls to ``api`` (``ews``, ``graph``, ``token``) are served, but answered ``seconds``
        late."""
        self.inject(api, Fault(LATE, "Late", "Served; answered late.", operation=operation, times=times, delay=seconds))

    def trickle_answer(self, api: str, pause: float, *, operation: str | None = None, times: int = 1) -> None:
        """The next ``times`` calls to ``api`` (``ews``, ``graph``, ``token``) are served, and their answer is
        written one byte every ``pause`` seconds (status line and headers too), as a server that stalls
        mid-answer: a client whose timeouts are per read never gives up."""
        self.inject(api, Fault(TRICKLE, "Trickle", "Served; answered a byte at a time.", operation=operation,
                               times=times, delay=pause))

    def drop_connection(self, api: str, *, operation: str | None = None, times: int = 1, reset: bool = False) -> None:
        """The next ``times`` calls to ``api`` (``ews``, ``graph``, ``token``) are served (a send is filed in
        Sent Items and delivered), then their connection is closed without an answer; ``reset`` aborts
        it with a TCP reset instead of closing it."""
        self.inject(api, Fault(DROP, "Dropped", "Served; the connection dropped before the answer.",
                               operation=operation, times=times, reset=reset))

    def fail_after_serving(self, api: str, status: int = 504, *, code: str = "GatewayTimeout",
                           message: str = "The upstream server did not answer in time.", operation: str | None = None,
                           times: int = 1) -> None:
        """The next ``times`` calls to ``api`` (``ews``, ``graph``, ``token``) are served (a send is filed in
        Sent Items and delivered), then answered with ``status`` (on Graph with the JSON error body and
        ``code``; on EWS a bare HTTP answer, or a SOAP fault for 500), as a gateway that gave up waiting
        for Exchange answers although Exchange went on.  ``inject(api, Fault(504, ...))`` is the same
        answer for a call that was not served."""
        self.inject(api, Fault(status, code, message, operation=operation, times=times, served=True))

    def gateway_error(self, api: str, status: int = 504, *, served: bool = True, retry_after: float | None = None,
                      operation: str | None = None, times: int = 1) -> None:
        """The next ``times`` calls to ``api`` are answered as a gateway in front of Exchange answers its own
        error page: ``status`` (a bare page on EWS), with ``Connection: close``, and the connection closed
        after it; with ``Retry-After`` when ``retry_after`` is set.  ``served``: Exchange got the call and
        carried it out (a send is filed and delivered) before the gateway gave up on its answer."""
        self.inject(api, Fault(status, "GatewayError", "<html><body>Gateway error</body></html>",
                               retry_after=retry_after, operation=operation, times=times, served=served, close=True))

    def garble_answer(self, api: str, *, operation: str | None = None, times: int = 1) -> None:
        """The next ``times`` calls to ``api`` are served, then answered 200 with a body that does not match
        its ``Content-Encoding: gzip``, as a broken proxy answers: the client cannot read the answer."""
        self.inject(api, Fault(GARBLED, "Garbled", "Served; the answer cannot be decoded.", operation=operation,
                               times=times))

    def file_sent_late(self, api: str, seconds: float, *, times: int = 1) -> None:
        """The next ``times`` sends through ``api`` (``ews``, ``graph``) are accepted and answered as usual, but
        their copy lands in Sent Items, and their recipients' copies in their Inboxes, ``seconds`` later: Graph
        ``sendMail`` answers ``202 Accepted`` before Exchange has sent.  Combines with ``answer_late`` and
        ``drop_connection``, which are about the answer."""
        self.org.file_late(api, seconds, times)

    def expire_tokens(self) -> None:
        self.org.expire_tokens()


def _control_routes(sim: ExchangeSimulator) -> list[web.RouteDef]:
    """``/_sim``: the same controls over HTTP, for a simulator run with ``python -m simulators.exchange``."""

    async def add_mailbox(request: web.Request) -> web.Response:
        data = await request.json()
        box = sim.add_mailbox(data["address"], password=data.get("password"), display_name=data.get("display_name"))
        return web.json_response({"address": box.address, "id": box.id}, status=201)

    async def add_service_account(request: web.Request) -> web.Response:
        data = await request.json()
        sim.add_service_account(data["username"], data["password"], impersonation=bool(data.get("impersonation")))
        return web.json_response({"username": data["username"]}, status=201)

    async def grant(request: web.Request) -> web.Response:
        data = await request.json()
        right = request.match_info["right"]
        if right == "full-access":
            sim.grant_full_access(request.match_info["address"], data["username"])
        elif right == "send-as":
            sim.grant_send_as(request.match_info["address"], data["username"])
        else:
            raise web.HTTPNotFound()
        return web.json_response({}, status=201)

    async def add_app(request: web.Request) -> web.Response:
        data = await request.json()
        mailboxes = set(data["mailboxes"]) if data.get("mailboxes") is not None else None
        sim.add_app(data["client_id"], data["client_secret"], mailboxes=mailboxes)
        return web.json_response({"client_id": data["client_id"]}, status=201)

    async def add_fault(request: web.Request) -> web.Response:
        data = await request.json()
        sim.inject(data.get("api", "ews"), Fault(
            status=int(data["status"]), code=data["code"], message=data.get("message", "Injected."),
            retry_after=data.get("retry_after"), operation=data.get("operation"), times=int(data.get("times", 1)),
            delay=float(data.get("delay", 0.0)), reset=bool(data.get("reset", False)),
            served=bool(data.get("served", False)), close=bool(data.get("close", False))))
        return web.json_response({}, status=201)

    async def file_late(request: web.Request) -> web.Response:
        data = await request.json()
        sim.file_sent_late(data.get("api", "graph"), float(data["seconds"]), times=int(data.get("times", 1)))
        return web.json_response({}, status=201)

    async def clear_faults(request: web.Request) -> web.Response:
        sim.faults.clear()
        return web.json_response({})

    async def sent(request: web.Request) -> web.Response:
        return web.json_response([_sent_json(r) for r in sim.sent])

    async def items(request: web.Request) -> web.Response:
        try:
            found = sim.items(request.match_info["address"], request.match_info["folder"])
        except KeyError:
            raise web.HTTPNotFound()
        return web.json_response([{"id": i.id, "subject": i.subject, "internet_message_id": i.internet_message_id,
                                   "from": i.from_.email if i.from_ else None, "to": [a.email for a in i.to],
                                   "item_class": i.item_class} for i in found])

    async def deliver(request: web.Request) -> web.Response:
        item = sim.deliver(request.match_info["address"], await request.read(), request.query.get("folder", "inbox"))
        return web.json_response({"id": item.id}, status=201)

    async def expire_tokens(request: web.Request) -> web.Response:
        sim.expire_tokens()
        return web.json_response({})

    return [
        web.post("/_sim/mailboxes", add_mailbox),
        web.post("/_sim/service-accounts", add_service_account),
        web.post("/_sim/mailboxes/{address}/{right:full-access|send-as}", grant),
        web.post("/_sim/apps", add_app),
        web.post("/_sim/faults", add_fault),
        web.delete("/_sim/faults", clear_faults),
        web.post("/_sim/late-filings", file_late),
        web.get("/_sim/sent", sent),
        web.get("/_sim/mailboxes/{address}/folders/{folder}/items", items),
        web.post("/_sim/mailboxes/{address}/deliver", deliver),
        web.post("/_sim/tokens/expire", expire_tokens),
    ]


def _sent_json(r: SentRecord) -> dict[str, Any]:
    return {"protocol": r.protocol, "mailbox": r.mailbox, "sender": r.sender, "recipients": r.recipients,
            "message_id": r.message_id, "delivered_to": r.delivered_to, "external": r.external,
            "sent_item_id": r.sent_item_id, "mime": base64.b64encode(r.mime).decode(), "at": r.at,
            "filed_at": r.filed_at}
