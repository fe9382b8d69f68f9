"""A PostgreSQL wire-protocol proxy that can lose the acknowledgement of a COMMIT.

The one failure no client-side test can stage otherwise: the server commits a transaction and the
connection breaks before its answer arrives, so the client cannot tell whether it committed
(PostgreSQL's docs on ``pg_xact_status`` describe this case).  ``PgProxy`` forwards the bytes of
every connection unchanged, reading the client's messages as it goes (RFC-less, but the protocol
is in the PostgreSQL docs, "Message Formats").  Armed with a marker (``lose_commit_ack``), it
watches for a transaction that ran a statement containing the marker and changing at least one row
(its CommandComplete tag, "UPDATE 2" say); when that transaction's ``COMMIT`` comes, the proxy lets it reach the server, reads the server's answer up to
ReadyForQuery, and then closes both sides without passing the answer on.

Connect with ``sslmode=disable`` (the proxy reads plaintext only).
"""
from __future__ import annotations

import asyncio
import contextlib
import struct
from pathlib import Path


class PgProxy:
    def __init__(self, socket_path: Path) -> None:
        self._socket_path = socket_path
        self._server: asyncio.AbstractServer | None = None
        self._marker: bytes | None = None
        self.lost = asyncio.Event()   # set once a COMMIT's answer was withheld and the connection cut
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, url: str) -> "PgProxy":
        """A proxy for the embedded server's URL (``...?host=/dir``: its Unix socket in ``dir``)."""
        directory = url.rsplit("host=", 1)[1].split("&")[0]
        return cls(Path(directory) / ".s.PGSQL.5432")

    async def __aenter__(self) -> "PgProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"postgresql://postgres@127.0.0.1:{port}/postgres?sslmode=disable"

    def lose_commit_ack(self, marker: str) -> None:
        """Withhold the answer to the next COMMIT of a transaction that ran SQL containing ``marker``."""
        self._marker = marker.encode()
        self.lost.clear()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        server_reader, server_writer = await asyncio.open_unix_connection(str(self._socket_path))
        link = _Link(client_writer, server_writer)
        try:
            await asyncio.gather(self._from_client(client_reader, link), self._from_server(server_reader, link))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            link.cut()
            self._tasks.discard(task)

    async def _from_client(self, reader: asyncio.StreamReader, link: _Link) -> None:
        (length,) = struct.unpack("!I", await reader.readexactly(4))
        link.server.write(struct.pack("!I", length) + await reader.readexactly(length - 4))   # the startup message
        statements: dict[bytes, bytes] = {}
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
            kind = head[:1]
            sql = b""
            if kind == b"P":   # Parse: statement name, query
                name, rest = body.split(b"\0", 1)
                sql = statements[name] = rest.split(b"\0", 1)[0]
            elif kind == b"B":   # Bind: portal, statement name
                sql = statements.get(body.split(b"\0", 2)[1], b"")
            elif kind == b"Q":
                sql = body.rstrip(b"\0")
            word = sql.lstrip()[:8].upper()
            if word.startswith((b"COMMIT", b"ROLLBACK")):
                if link.marked and word.startswith(b"COMMIT") and self._marker is not None:
                    self._marker = None
                    link.withhold = True   # before the COMMIT leaves: none of its answer is passed on
                link.marked = False
            elif self._marker is not None and self._marker in sql:
                link.awaiting = True   # the statement's CommandComplete says whether it changed rows
            link.server.write(head + body)

    async def _from_server(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while True:
            head = await reader.readexactly(5)
            body = await reader.readexactly(struct.unpack("!I", head[1:])[0] - 4)
            if head[:1] == b"C" and link.awaiting:   # CommandComplete: "UPDATE 2", "INSERT 0 1", ...
                link.awaiting = False
                count = body.rstrip(b"\0").rsplit(b" ", 1)[-1]
                link.marked = link.marked or (count.isdigit() and int(count) > 0)
            if not link.withhold:
                link.client.write(head + body)
            elif head[:1] == b"Z":   # ReadyForQuery: the COMMIT was carried out, its answer withheld
                link.cut()
                self.lost.set()
                return


class _Link:
    """The two sides of one proxied connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.withhold = False
        self.awaiting = False   # a statement with the marker was sent, its CommandComplete not yet read
        self.marked = False     # the open transaction changed rows with such a statement

    def cut(self) -> None:
        for writer in (self.client, self.server):
            with contextlib.suppress(Exception):
                writer.transport.abort()
