"""How the simulator answers a request it served when an injected fault is about the answer, not the work.

Four faults let the request be served as usual (a send is stored, filed in Sent Items and delivered)
and change only what the client gets back:

- ``LATE``: the answer is held back ``delay`` seconds, a reply lost to a client whose timeout is shorter;
- ``DROP``: no answer at all, the connection is closed (FIN) or, with ``reset``, aborted (RST) instead,
  as when a load balancer or a network failure cuts the connection while Exchange has already acted;
- ``GARBLED``: a 200 whose body does not match its ``Content-Encoding: gzip``, as a broken proxy
  answers, which the client cannot read;
- ``TRICKLE``: the answer written one byte every ``delay`` seconds (status line and headers included),
  as a server that stalls mid-answer: a client bounded only per read waits for ever;
- a ``served`` fault with an error status: the fault's error instead of the real answer, as when a
  gateway gives up waiting (504) although Exchange went on and sent the message.

Each leaves the client unable to tell from the answer whether its request was carried out: what makes a
send's outcome unknown.  A protocol handler passes every fault it takes through ``hold``, and its
response through ``answer`` once the work is done, with how it renders a fault as an error answer.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from aiohttp import web

from .store import DROP, GARBLED, LATE, TRICKLE, Fault

_HELD = web.RequestKey("held_answer", Fault)  # the fault that applies to this request's answer, not its work


def hold(request: web.Request, fault: Fault | None) -> Fault | None:
    """Keep a LATE, DROP, GARBLED, TRICKLE or ``served`` ``fault`` for ``request``'s answer (the request is
    served as usual) and return None; return any other fault, for the handler to fail the request with now."""
    if fault is None or (fault.status not in (LATE, DROP, GARBLED, TRICKLE) and not fault.served):
        return fault
    request[_HELD] = fault
    return None


async def answer(request: web.Request, response: web.StreamResponse,
                 error: Callable[[Fault], web.StreamResponse]) -> web.StreamResponse:
    """The answer to ``request``, served as ``response``: as it is, or as a held fault changes it
    (``error`` renders a ``served`` fault the way this protocol answers an injected failure)."""
    fault = request.get(_HELD)
    if fault is None:
        return response
    if fault.status == GARBLED:
        return web.Response(status=200, body=b"this is not gzip", headers={
            "Content-Encoding": "gzip", "Content-Type": response.content_type or "text/xml"})
    if fault.status == TRICKLE:
        await _trickle(request, response, fault.delay)
        return response
    if fault.status not in (LATE, DROP):
        return error(fault)  # the work is done; the client hears only of a failure
    if fault.status == LATE:
        await asyncio.sleep(fault.delay)  # the injected slowness: served, answered late
        return response
    _hang_up(request, reset=fault.reset)
    # aiohttp cannot write this response to a closing transport: it notes a client disconnection
    # (at debug level) and moves on, so nothing of the answer reaches the client.
    return response


def closing(response: web.Response, fault: Fault) -> web.Response:
    """``response``, an injected failure's answer, sent with ``Connection: close`` (and the connection
    closed after it) if ``fault.close`` asks so."""
    if fault.close:
        response.force_close()
    return response


async def _trickle(request: web.Request, response: web.StreamResponse, pause: float) -> None:
    """Write ``response`` (a plain ``web.Response``) straight to the connection, a byte at a time, then
    close it; stop as soon as the client has gone."""
    transport = request.transport
    body = response.body if isinstance(response, web.Response) and isinstance(response.body, bytes) else b""
    head = [f"HTTP/1.1 {response.status} {response.reason}", f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in response.headers.items()
             if name.lower() not in ("content-length", "connection", "transfer-encoding")]
    if response.content_type and "Content-Type" not in response.headers:
        head.append(f"Content-Type: {response.content_type}")
    for byte in ("\r\n".join(head) + "\r\n\r\n").encode() + body:
        if transport is None or transport.is_closing():
            return
        transport.write(bytes([byte]))
        await asyncio.sleep(pause)  # the injected stall between bytes
    # aiohttp cannot write the handler's own response to a closing transport: the client saw only ours.
    _hang_up(request, reset=False)


def _hang_up(request: web.Request, *, reset: bool) -> None:
    transport = request.transport
    if transport is None or transport.is_closing():
        return
    if reset:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger on, timeout 0: close() sends RST instead of FIN, as a crashed peer or a middlebox does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    else:
        transport.close()
