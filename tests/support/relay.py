"""A loopback TCP relay in front of a mail server that looks at each line the client sends: the test
decides whether it goes on, is answered in the server's place, or ends the session (a middlebox
that drops it).  What the server sends goes to the client unchanged, or line by line through
``on_answer`` (rewritten, or the session ended there: an answer lost on the way)."""
from __future__ import annotations

import asyncio
from collections.abc import Callable

# What ``on_line`` returns to end the session there (both ways), as a dropped connection would.
CLOSE = b""


async def line_relay(host: str, port: int, on_line: Callable[[bytes], bytes | None],
                     on_session: Callable[[], None] = lambda: None,
                     on_answer: Callable[[bytes], bytes] | None = None) -> tuple[asyncio.Server, int]:
    """Start the relay; return it and its port.  ``on_line(line)``: None passes the line on, bytes
    answer the client instead (the server never sees the line), ``CLOSE`` ends the session.
    ``on_session`` is called as each session opens.  ``on_answer(line)``, for each line the server
    sends: what the client gets instead, or ``CLOSE`` to end the session there."""

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        on_session()
        up_reader, up_writer = await asyncio.open_connection(host, port)

        async def to_server() -> None:
            while line := await reader.readline():
                answer = on_line(line)
                if answer is None:
                    up_writer.write(line)
                elif answer == CLOSE:
                    break
                else:
                    writer.write(answer)
            writer.close()
            up_writer.close()

        async def to_client() -> None:
            if on_answer is None:
                while data := await up_reader.read(65536):
                    writer.write(data)
            else:
                while (line := await up_reader.readline()) and (line := on_answer(line)) != CLOSE:
                    writer.write(line)
                    await writer.drain()
            writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]
