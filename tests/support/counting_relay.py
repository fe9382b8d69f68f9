"""A loopback TCP relay in front of a mail server that counts the connections open through it, and can
make chosen sessions hang; and a server that accepts connections and never says a word.

``CountingRelay.peak`` is the most connections open at once, counted as the server would see them:
as each connection arrives, the others are looked at in the kernel (TCP_INFO), and one its client
has closed (its FIN arrived: CLOSE_WAIT) no longer counts, even if the relay has not yet read the
close.  A client that closes one connection and then opens another is never counted twice.

``hang_when(predicate)``: once a line the client sends matches, the session goes silent (nothing more
is forwarded either way, both connections stay open) until the client gives up and closes, as a
server that hangs on that account would.
"""
from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

TCP_ESTABLISHED = 1


def _established(sock: socket.socket) -> bool:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except OSError:
        return False
    return struct.unpack("B", info[:1])[0] == TCP_ESTABLISHED


class CountingRelay:
    def __init__(self, host: str | None, port: int | None) -> None:
        """Relay to ``host``:``port``; with None, accept and never answer (a hung server)."""
        self._upstream = (host, port) if host is not None and port is not None else None
        self._hang: Callable[[bytes], bool] | None = None
        self._open: set[socket.socket] = set()   # the client side of each session open here
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.peak = 0
        self.sessions = 0               # connections accepted in all
        self.hung = 0                   # sessions gone silent so far
        self.hung_open = 0              # of those, still open
        self.port = 0

    async def __aenter__(self) -> CountingRelay:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    def hang_when(self, predicate: Callable[[bytes], bool]) -> None:
        self._hang = predicate

    def open_now(self) -> int:
        return sum(1 for s in self._open if _established(s))

    def reset_peak(self) -> None:
        """Count the peak from now on (connections open now count)."""
        self.peak = self.open_now()

    async def _hung(self, reader: asyncio.StreamReader) -> None:
        self.hung += 1
        self.hung_open += 1
        try:
            await reader.read()  # until the client gives up and closes
        finally:
            self.hung_open -= 1

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        self._open.add(sock)
        self._writers.add(writer)
        self.sessions += 1
        self.peak = max(self.peak, self.open_now())
        silent = asyncio.Event()
        try:
            if self._upstream is None:  # says nothing: every session hangs until the client gives up
                await self._hung(reader)
                return
            up_reader, up_writer = await asyncio.open_connection(*self._upstream)

            async def to_server() -> None:
                while line := await reader.readline():
                    if self._hang is not None and self._hang(line):
                        silent.set()
                        await self._hung(reader)
                        break
                    up_writer.write(line)
                    await up_writer.drain()
                up_writer.close()

            async def to_client() -> None:
                while data := await up_reader.read(65536):
                    if silent.is_set():
                        continue
                    writer.write(data)
                    await writer.drain()

            pumps = [asyncio.ensure_future(to_server()), asyncio.ensure_future(to_client())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self._open.discard(sock)
            self._writers.discard(writer)
            writer.close()
