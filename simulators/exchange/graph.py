"""The simulated Microsoft Graph mail API (``/v1.0``) and Microsoft identity platform token endpoint.

Follows the published contracts:

- ``POST /{tenant}/oauth2/v2.0/token``: OAuth 2.0 client credentials grant (form body, or HTTP Basic
  client authentication); answers ``{"token_type": "Bearer", "expires_in", "ext_expires_in",
  "access_token"}`` or the AAD error body (``invalid_client``, ``unauthorized_client``,
  ``unsupported_grant_type``, ``invalid_scope``, ``invalid_request``) with its ``AADSTS`` code.  The token
  audience is the scope's resource: ``https://graph.microsoft.com`` for Graph, ``https://outlook.office365.com``
  for EWS, and each API refuses the other's tokens.
- ``POST /users/{id|userPrincipalName}/sendMail``: the JSON ``{"message": ..., "saveToSentItems": ...}``
  form (``toRecipients``/``ccRecipients``/``bccRecipients``/``replyTo``, ``body``, ``from``,
  ``internetMessageHeaders`` restricted to ``X-`` names, ``#microsoft.graph.fileAttachment`` with base64
  ``contentBytes``) and the MIME form (``Content-Type: text/plain``, base64 MIME); ``202 Accepted``.
- ``GET /users/{id}/messages``, ``GET /users/{id}/mailFolders/{id}/messages`` (``$top``, ``$skip``,
  ``$select``, ``@odata.nextLink``), ``GET /users/{id}/messages/{id}`` and ``.../$value`` (the MIME),
  ``GET /users/{id}/mailFolders/{id}/messages/delta`` (``@odata.nextLink`` with ``$skiptoken``, then
  ``@odata.deltaLink`` with ``$deltatoken``; removed items as ``{"@removed": {"reason": "deleted"}}``;
  page size from ``Prefer: odata.maxpagesize``).
- Errors as ``{"error": {"code", "message", "innerError"}}``: 401 ``InvalidAuthenticationToken`` (missing,
  unknown, expired, wrong audience), 403 ``ErrorAccessDenied`` (an application access policy excludes the
  mailbox), 404 ``ErrorInvalidUser``/``ErrorItemNotFound``, 400 ``ErrorInvalidRecipients``,
  ``InvalidInternetMessageHeader``, ``ErrorMimeContentInvalidBase64String``, ``RequestBodyRead``, 413
  ``RequestEntityTooLarge`` for a ``sendMail`` payload over 4 MB (``GraphApi.max_request_bytes``); 429
  ``ApplicationThrottled`` with ``Retry-After`` for a fifth request at once to one mailbox
  (``MailboxConcurrency``) and for a ``sendMail`` over the app's upload budget for the mailbox
  (``IncomingBytes``: 150 MB in 5 minutes, ``GraphApi.upload_budget`` and ``upload_window``); and
  injected 429/503 with ``Retry-After``, or a served call answered late, not at all, or with an error
  such as a gateway's 504 (``answering``).
  A ``sendMail`` may also be told to file its Sent Items copy late (``Organization.file_late``), as Graph
  answers ``202 Accepted`` before Exchange has sent.

``$filter`` is served for one expression only, ``internetMessageId eq '<id>'`` (what a sender uses to
find its own copy in Sent Items); any other filter is a 400.

Not served: delegated (user) tokens, ``/me``, change notifications (subscriptions), other ``$filter``s, ``$orderby``,
item and reference attachments, drafts (``createReply``, ``send``), batching (``$batch``).
"""
from __future__ import annotations

import base64
import binascii
import json
import math
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from urllib.parse import urlencode

from aiohttp import web

from . import answering
from .store import (
    EWS_AUDIENCE,
    GRAPH_AUDIENCE,
    Address,
    App,
    Attachment,
    Fault,
    Faults,
    Folder,
    Item,
    Mailbox,
    Organization,
    build_mime,
)

DEFAULT_PAGE = 10  # Graph's default page size for messages
MAX_REQUEST_BYTES = 4 * 1024 * 1024  # a sendMail payload (JSON, or the base64 MIME), as Graph limits it
# Outlook's limit per app and mailbox: "4 concurrent requests"; more are refused with 429
# (learn.microsoft.com/graph/throttling-limits, "Outlook service limits").
MAILBOX_CONCURRENCY = 4
# Outlook's limit per app ID and mailbox: "150 megabytes (MB) upload (PATCH, POST, PUT) in a 5 minute
# period" (https://learn.microsoft.com/en-us/graph/throttling-limits, "Outlook service limits"); more
# is refused with 429 ApplicationThrottled, "Application is over its IncomingBytes limit".  Decimal
# megabytes, the stricter reading of "MB", and a request's body only (what Graph counts is not published).
UPLOAD_BUDGET = 150 * 1000 * 1000
UPLOAD_WINDOW = 300.0


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"code": code, "message": message, "innerError": {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        "request-id": str(uuid.uuid4()), "client-request-id": str(uuid.uuid4())}}}
    return web.json_response(body, status=status, headers=headers)


def _graph_time(dt: datetime | None) -> str | None:
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ") if dt else None


class TokenEndpoint:
    """``POST /{tenant}/oauth2/v2.0/token`` (client credentials)."""

    def __init__(self, org: Organization, faults: Faults, lifetime: float) -> None:
        self.org = org
        self.faults = faults
        self.lifetime = lifetime

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        return await answering.answer(request, await self._serve(request), lambda fault: _aad_error(
            fault.status, fault.code, fault.message, retry_after=fault.retry_after))

    async def _serve(self, request: web.Request) -> web.Response:
        fault = answering.hold(request, self.faults.take("token", "token"))
        if fault is not None:
            return _aad_error(fault.status, fault.code, fault.message, retry_after=fault.retry_after)
        tenant = request.match_info["tenant"]
        if tenant not in (self.org.tenant, "common", "organizations"):
            return _aad_error(400, "invalid_tenant", f"AADSTS90002: Tenant '{tenant}' not found.", 90002)
        form = await request.post()
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                client_id, _, client_secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _aad_error(400, "invalid_request", "AADSTS900144: Malformed client authentication.", 900144)
        if form.get("grant_type") != "client_credentials":
            return _aad_error(400, "unsupported_grant_type",
                              "AADSTS70003: The app requested an unsupported grant type.", 70003)
        if not client_id:
            return _aad_error(400, "invalid_request",
                              "AADSTS900144: The request body must contain the following parameter: 'client_id'.",
                              900144)
        app = self.org.apps.get(str(client_id))
        if app is None:
            return _aad_error(400, "unauthorized_client",
                              f"AADSTS700016: Application with identifier '{client_id}' was not found in the "
                              f"directory '{self.org.tenant}'.", 700016)
        if not client_secret or str(client_secret) != app.client_secret:
            return _aad_error(401, "invalid_client",
                              "AADSTS7000215: Invalid client secret provided. Ensure the secret being sent in the "
                              "request is the client secret value, not the client secret ID.", 7000215)
        scopes = str(form.get("scope", "")).split()
        audience = next((a for a in (GRAPH_AUDIENCE, EWS_AUDIENCE)
                         if any(s.rstrip("/").lower() == f"{a}/.default" for s in scopes)), None)
        if audience is None:
            return _aad_error(400, "invalid_scope",
                              "AADSTS1002012: The provided value for scope is not valid. Client credential flows "
                              "must have a scope value with /.default suffixed to the resource identifier.",
                              1002012)
        token, _ = self.org.issue_token(app.client_id, audience, self.lifetime)
        lifetime = int(self.lifetime)
        return web.json_response({"token_type": "Bearer", "expires_in": lifetime, "ext_expires_in": lifetime,
                                  "access_token": token})


def _aad_error(status: int, code: str, description: str, aadsts: int | None = None, *,
               retry_after: float | None = None) -> web.Response:
    body = {"error": code, "error_description": description, "error_codes": [aadsts] if aadsts else [],
            "timestamp": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ"),
            "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())}
    headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else None
    return web.json_response(body, status=status, headers=headers)


class GraphApi:
    """The ``/v1.0`` mail routes."""

    def __init__(self, org: Organization, faults: Faults) -> None:
        self.org = org
        self.faults = faults
        self.requests: list[str] = []
        # Graph refuses a sendMail payload over 4 MB with 413 ("Submission attempts that exceed this
        # limit will result in an HTTP 413 Request Entity Too Large"); a test may lower it.
        self.max_request_bytes = MAX_REQUEST_BYTES
        # (access token, mailbox) -> requests being served or answered now; refusals for going over.
        self.in_flight: dict[tuple[str, str], int] = {}
        self.over_concurrency = 0
        # Bytes of sendMail bodies per app and mailbox in any ``upload_window`` seconds (None: no limit);
        # (app, mailbox) -> (arrival, bytes) of the uploads in the window; refusals for going over.
        self.upload_budget: int | None = UPLOAD_BUDGET
        self.upload_window = UPLOAD_WINDOW
        self.uploads: dict[tuple[str, str], deque[tuple[float, int]]] = {}
        self.over_upload_budget = 0

    def routes(self, prefix: str = "/v1.0") -> list[web.RouteDef]:
        u = f"{prefix}/users/{{user}}"
        return [
            web.post(f"{u}/sendMail", _answered(self.send_mail)),
            web.get(f"{u}/messages", _answered(self.list_messages)),
            web.get(f"{u}/messages/{{message}}", _answered(self.get_message)),
            web.get(f"{u}/messages/{{message}}/$value", _answered(self.get_message_mime)),
            web.get(f"{u}/mailFolders/{{folder}}/messages", _answered(self.list_messages)),
            web.get(f"{u}/mailFolders/{{folder}}/messages/delta", _answered(self.delta)),
        ]

    # -- common checks

    def _begin(self, request: web.Request, action: str) -> tuple[Mailbox | None, web.Response | None]:
        """Authenticate, apply injected faults and resolve the user: a mailbox or the error answer."""
        self.requests.append(action)
        self.org.file_due()  # sends filed late show up once their time has come
        app, failure = self._authenticate(request)
        if failure is not None:
            return None, failure
        fault = answering.hold(request, self.faults.take("graph", action))  # LATE, DROP, served: see ``_answered``
        if fault is not None:
            return None, _injected(fault)
        user = request.match_info["user"]
        box = self.org.find_mailbox(user)
        if box is None:
            return None, _error(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if app.mailboxes is not None and box.address.lower() not in app.mailboxes:  # type: ignore[union-attr]
            return None, _error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        return box, None

    def _authenticate(self, request: web.Request) -> tuple[App | None, web.Response | None]:
        challenge = {"WWW-Authenticate": 'Bearer realm="", authorization_uri="https://login.microsoftonline.com/'
                                         'common/oauth2/authorize", client_id="00000003-0000-0000-c000-000000000000"'}
        auth = request.headers.get("Authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            return None, _error(401, "InvalidAuthenticationToken", "Access token is empty.", challenge)
        issued = self.org.tokens.get(auth[7:].strip())
        if issued is None:
            return None, _error(401, "InvalidAuthenticationToken", "IDX14100: JWT is not well formed.", challenge)
        if issued.expires_at <= self.org.clock():
            return None, _error(401, "InvalidAuthenticationToken",
                                "Lifetime validation failed, the token is expired.", challenge)
        if issued.audience != GRAPH_AUDIENCE:
            return None, _error(401, "InvalidAuthenticationToken", "Access token validation failure. Invalid audience.",
                                challenge)
        app = self.org.apps.get(issued.client_id)
        if app is None:
            return None, _error(401, "InvalidAuthenticationToken", "Access token validation failure.", challenge)
        return app, None

    # -- sendMail

    async def send_mail(self, request: web.Request) -> web.Response:
        box, failure = self._begin(request, "sendMail")
        if failure is not None:
            return failure
        assert box is not None
        raw = await request.read()
        if len(raw) > self.max_request_bytes:
            return _error(413, "RequestEntityTooLarge", f"The request is {len(raw)} bytes; sendMail takes at most "
                                                        f"{self.max_request_bytes}.")
        over = self._over_upload_budget(request, box, len(raw))
        if over is not None:
            return over
        if request.content_type == "text/plain":
            return self._send_mime(box, raw)
        try:
            payload = json.loads(raw)
            message = payload["message"]
            if not isinstance(message, dict):
                raise TypeError("message")
        except (ValueError, KeyError, TypeError):
            return _error(400, "RequestBodyRead", "Cannot read the request body: the 'message' property is required.")
        try:
            mime, sender = self._mime_from_json(box, message)
        except _BadRequest as bad:
            return _error(400, bad.code, bad.message)
        if sender.lower() != box.address.lower() and not self._app_may_send_as(request, sender):
            return _error(403, "ErrorSendAsDenied", "The user account which was used to submit this request does not "
                                                    "have the right to send mail on behalf of the specified sending "
                                                    "account.")
        self.org.submit("graph", box, mime, save_copy=payload.get("saveToSentItems", True) is not False)
        return web.Response(status=202)

    def _send_mime(self, box: Mailbox, raw: bytes) -> web.Response:
        try:
            mime = base64.b64decode(b"".join(raw.split()), validate=True)
        except binascii.Error:
            return _error(400, "ErrorMimeContentInvalidBase64String", "Invalid base64 string for MIME content.")
        probe = Item.from_mime(mime, "", now=self.org.now())
        if not mime.strip() or not probe.headers:
            return _error(400, "ErrorMimeContentInvalid", "The MIME content is invalid.")
        if not probe.to and not probe.cc and not probe.bcc:
            return _error(400, "ErrorInvalidRecipients", "At least one recipient isn't valid.")
        self.org.submit("graph", box, mime, save_copy=True)
        return web.Response(status=202)

    def _over_upload_budget(self, request: web.Request, box: Mailbox, size: int) -> web.Response | None:
        """Count ``size`` uploaded bytes against the app's budget for ``box``, or refuse them (uncounted)
        with 429 and the seconds until they would fit."""
        if self.upload_budget is None:
            return None
        app, _ = self._authenticate(request)
        assert app is not None  # _begin authenticated the request
        key = (app.client_id, box.address.lower())
        now = self.org.clock()
        uploads = self.uploads.setdefault(key, deque())
        while uploads and uploads[0][0] <= now - self.upload_window:
            uploads.popleft()
        used = sum(n for _, n in uploads)
        # A budget made smaller than one message (for a test) still lets it through alone.
        if used + size <= self.upload_budget or not used:
            uploads.append((now, size))
            return None
        freed, wait = 0, self.upload_window
        for at, n in uploads:
            freed += n
            if used - freed + size <= self.upload_budget:
                wait = at + self.upload_window - now
                break
        self.over_upload_budget += 1
        return _error(429, "ApplicationThrottled", "Application is over its IncomingBytes limit.",
                      {"Retry-After": str(max(math.ceil(wait), 1))})

    def _app_may_send_as(self, request: web.Request, sender: str) -> bool:
        # Application Mail.Send lets an app send as any mailbox it may reach.
        target = self.org.find_mailbox(sender)
        app, _ = self._authenticate(request)
        return target is not None and app is not None and (
            app.mailboxes is None or target.address.lower() in app.mailboxes)

    def _mime_from_json(self, box: Mailbox, message: dict) -> tuple[bytes, str]:
        def recipients(name: str) -> list[Address]:
            out = []
            for r in message.get(name) or []:
                ea = (r or {}).get("emailAddress") or {}
                if not ea.get("address") or "@" not in ea["address"]:
                    raise _BadRequest("ErrorInvalidRecipients", "At least one recipient isn't valid.")
                out.append(Address(email=ea["address"], name=ea.get("name") or ""))
            return out

        to, cc, bcc = recipients("toRecipients"), recipients("ccRecipients"), recipients("bccRecipients")
        if not (to or cc or bcc):
            raise _BadRequest("ErrorInvalidRecipients", "At least one recipient isn't valid.")
        headers = []
        for h in message.get("internetMessageHeaders") or []:
            name = str((h or {}).get("name", ""))
            if not name.lower().startswith("x-"):
                raise _BadRequest("InvalidInternetMessageHeader",
                                  f"The internet message header name '{name}' should start with 'x-' or 'X-'.")
            headers.append((name, str(h.get("value", ""))))
        attachments = []
        for a in message.get("attachments") or []:
            if (a or {}).get("@odata.type") != "#microsoft.graph.fileAttachment":
                raise _BadRequest("ErrorInvalidRequest", "The simulator only accepts #microsoft.graph.fileAttachment.")
            try:
                content = base64.b64decode(a.get("contentBytes") or "", validate=True)
            except binascii.Error:
                raise _BadRequest("ErrorInvalidRequest", "The attachment contentBytes is not valid base64.")
            attachments.append(Attachment(name=a.get("name") or "attachment",
                                          content_type=a.get("contentType") or "application/octet-stream",
                                          content=content))
        sender = Address(box.address, box.display_name)
        if isinstance(message.get("from"), dict):
            ea = message["from"].get("emailAddress") or {}
            sender = Address(email=ea.get("address", box.address), name=ea.get("name") or "")
        body = message.get("body") or {}
        mime = build_mime(sender=sender, to=to, cc=cc, bcc=bcc, reply_to=recipients("replyTo"),
                          subject=str(message.get("subject") or ""), body=str(body.get("content") or ""),
                          body_type=str(body.get("contentType") or "text"), headers=headers,
                          attachments=attachments, domain=self.org.domain, now=self.org.now())
        return mime, sender.email

    # -- reading

    async def list_messages(self, request: web.Request) -> web.Response:
        box, failure = self._begin(request, "messages")
        if failure is not None:
            return failure
        assert box is not None
        folder_name = request.match_info.get("folder")
        if folder_name:
            folder = box.folder(folder_name)
            if folder is None:
                return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            items = [(folder, i) for i in folder.items.values()]
        else:  # /messages spans every folder of the mailbox
            items = [(f, i) for f in box.folders.values() for i in f.items.values()]
        items = [(f, i) for f, i in items if i.item_class.startswith("IPM.Note")]
        if "$filter" in request.query:
            wanted = _internet_message_id_filter(request.query["$filter"])
            if wanted is None:
                return _error(400, "ErrorInvalidUrlQueryFilter",
                              "The simulator filters only on internetMessageId eq '<id>'.")
            items = [(f, i) for f, i in items if i.internet_message_id == wanted]
        items.sort(key=lambda fi: fi[1].date_received or self.org.now(), reverse=True)
        try:
            top = int(request.query.get("$top", DEFAULT_PAGE))
            skip = int(request.query.get("$skip", 0))
        except ValueError:
            return _error(400, "BadRequest", "Invalid $top or $skip.")
        select = _select(request)
        page = items[skip:skip + top]
        body: dict[str, object] = {"@odata.context": f"{request.url.origin()}/v1.0/$metadata#users('{box.address}')"
                                                     f"/messages",
                                   "value": [message_json(box, f, i, select) for f, i in page]}
        if skip + top < len(items):
            query = dict(request.query)
            query["$skip"] = str(skip + top)
            body["@odata.nextLink"] = str(request.url.with_query(query))
        return web.json_response(body)

    async def get_message(self, request: web.Request) -> web.Response:
        box, failure = self._begin(request, "messages")
        if failure is not None:
            return failure
        assert box is not None
        found = _find(box, request.match_info["message"])
        if found is None:
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return web.json_response(message_json(box, *found, _select(request)))

    async def get_message_mime(self, request: web.Request) -> web.Response:
        box, failure = self._begin(request, "messages")
        if failure is not None:
            return failure
        assert box is not None
        found = _find(box, request.match_info["message"])
        if found is None or found[1].mime is None:
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        return web.Response(body=found[1].mime, content_type="text/plain")

    async def delta(self, request: web.Request) -> web.Response:
        """Delta query: all current messages first (paged), then changes after the returned delta token."""
        box, failure = self._begin(request, "delta")
        if failure is not None:
            return failure
        assert box is not None
        folder = box.folder(request.match_info["folder"])
        if folder is None:
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        page_size = _max_page_size(request)
        select = _select(request)
        skip_token, delta_token = request.query.get("$skiptoken"), request.query.get("$deltatoken")
        try:
            if skip_token:
                mode, anchor, offset = _decode_token(skip_token, folder)
            elif delta_token:
                mode, anchor, offset = "since", _decode_token(delta_token, folder)[1], 0
            else:
                mode, anchor, offset = "initial", self.org.last_seq, 0
        except ValueError:
            return _error(400, "SyncStateInvalid", "The sync state is invalid.")
        if mode == "initial":
            # A snapshot of the folder as of ``anchor``; changes after it come with the delta token.
            entries = [message_json(box, folder, i, select)
                       for i in sorted(folder.items.values(), key=lambda i: i.date_received or self.org.now())]
        else:
            entries = _changes_since(box, folder, anchor, select)
        page = entries[offset:offset + page_size]
        body: dict[str, object] = {"@odata.context": f"{request.url.origin()}/v1.0/$metadata#Collection(message)",
                                   "value": page}
        base = request.url.with_query({})
        if offset + page_size < len(entries):
            body["@odata.nextLink"] = f"{base}?{urlencode({'$skiptoken': _encode_token(mode, folder, anchor, offset + page_size)})}"
        else:
            body["@odata.deltaLink"] = f"{base}?{urlencode({'$deltatoken': _encode_token('since', folder, self.org.last_seq, 0)})}"
        return web.json_response(body)


_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _answered(handler: _Handler) -> _Handler:
    """``handler`` whose answer follows an injected LATE, DROP or ``served`` fault, once it has done its
    work; a request over the mailbox's concurrency limit (per app, here per access token) is refused."""
    api: GraphApi = handler.__self__  # type: ignore[attr-defined]

    async def serve(request: web.Request) -> web.StreamResponse:
        key = (request.headers.get("Authorization", ""), request.match_info.get("user", "").lower())
        api.in_flight[key] = api.in_flight.get(key, 0) + 1
        try:
            if api.in_flight[key] > MAILBOX_CONCURRENCY:
                api.over_concurrency += 1
                return _error(429, "ApplicationThrottled", "Application is over its MailboxConcurrency limit.",
                              {"Retry-After": "1"})
            return await answering.answer(request, await handler(request), _injected)
        finally:
            api.in_flight[key] -= 1
            if not api.in_flight[key]:
                del api.in_flight[key]

    return serve


class _BadRequest(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _injected(fault: Fault) -> web.Response:
    headers = {"Retry-After": str(max(int(fault.retry_after), 0))} if fault.retry_after is not None else None
    return answering.closing(_error(fault.status, fault.code, fault.message, headers), fault)


def _select(request: web.Request) -> set[str] | None:
    raw = request.query.get("$select")
    return {s.strip() for s in raw.split(",") if s.strip()} if raw else None


def _max_page_size(request: web.Request) -> int:
    for pref in request.headers.getall("Prefer", []):
        for part in pref.split(","):
            key, _, value = part.strip().partition("=")
            if key.lower() == "odata.maxpagesize" and value.isdigit():
                return max(int(value), 1)
    return DEFAULT_PAGE


def _internet_message_id_filter(expression: str) -> str | None:
    """The id of ``internetMessageId eq '<id>'`` (OData string literal: a quote doubled), else None."""
    field, _, rest = expression.strip().partition(" ")
    op, _, literal = rest.strip().partition(" ")
    literal = literal.strip()
    if field != "internetMessageId" or op != "eq" or len(literal) < 2 or literal[0] != "'" or literal[-1] != "'":
        return None
    return literal[1:-1].replace("''", "'")


def _find(box: Mailbox, message_id: str) -> tuple[Folder, Item] | None:
    for f in box.folders.values():
        if message_id in f.items:
            return f, f.items[message_id]
    return None


def _changes_since(box: Mailbox, folder: Folder, since: int, select: set[str] | None) -> list[dict]:
    # One entry per item with its latest state, as Graph collapses changes in a delta round.
    latest: dict[str, str] = {}
    for c in folder.changes:
        if c.seq > since:
            latest.pop(c.item_id, None)
            latest[c.item_id] = c.kind
    out = []
    for item_id, kind in latest.items():
        item = folder.items.get(item_id)
        if kind == "delete" or item is None:
            out.append({"@odata.type": "#microsoft.graph.message", "id": item_id, "@removed": {"reason": "deleted"}})
        else:
            out.append(message_json(box, folder, item, select))
    return out


def _encode_token(mode: str, folder: Folder, seq: int, offset: int) -> str:
    return base64.urlsafe_b64encode(f"{mode}:{folder.id}:{seq}:{offset}".encode()).decode().rstrip("=")


def _decode_token(token: str, folder: Folder) -> tuple[str, int, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        mode, folder_id, seq, offset = raw.split(":")
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise ValueError(token) from e
    if folder_id != folder.id or mode not in ("initial", "since"):
        raise ValueError(token)
    return mode, int(seq), int(offset)


def _email(a: Address | None) -> dict | None:
    return {"emailAddress": {"name": a.name or a.email, "address": a.email}} if a else None


def message_json(box: Mailbox, folder: Folder, item: Item, select: set[str] | None = None) -> dict:
    """The Graph ``message`` resource for an item."""
    body_type = "html" if item.body_type == "HTML" else "text"
    full = {
        "@odata.etag": f'W/"{item.change_key}"',
        "id": item.id,
        "createdDateTime": _graph_time(item.date_created),
        "lastModifiedDateTime": _graph_time(item.date_received or item.date_created),
        "changeKey": item.change_key,
        "categories": [],
        "receivedDateTime": _graph_time(item.date_received),
        "sentDateTime": _graph_time(item.date_sent),
        "hasAttachments": bool(item.attachments),
        "internetMessageId": item.internet_message_id,
        "subject": item.subject,
        "bodyPreview": " ".join(item.body.split())[:255] if body_type == "text" else "",
        "importance": "normal",
        "parentFolderId": folder.id,
        "conversationId": item.conversation_id,
        "isDeliveryReceiptRequested": False,
        "isReadReceiptRequested": False,
        "isRead": item.is_read,
        "isDraft": item.is_draft,
        "webLink": f"https://outlook.office365.com/owa/?ItemID={item.id}",
        "inferenceClassification": "focused",
        "body": {"contentType": body_type, "content": item.body},
        "sender": _email(item.sender),
        "from": _email(item.from_),
        "toRecipients": [_email(a) for a in item.to],
        "ccRecipients": [_email(a) for a in item.cc],
        "bccRecipients": [_email(a) for a in item.bcc],
        "replyTo": [_email(a) for a in item.reply_to],
        "flag": {"flagStatus": "notFlagged"},
    }
    if select is None:
        return full
    return {k: v for k, v in full.items() if k in select or k in ("id", "@odata.etag")}
