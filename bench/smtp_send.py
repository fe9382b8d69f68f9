"""Benchmark: the dispatch SMTP send path against aiosmtplib and Postfix smtp-source.

Starts Postfix ``smtp-sink`` on a free loopback port, then sends 10,000 messages of 2 KB with

  (a)  aiosmtplib 5.x, a bare ``sendmail`` loop over 10 reused connections (and, for context,
       ``aiosmtplib.send()`` with one connection per message, on a tenth of the messages);
  (b)  ``SmtpPool`` (services/dispatch) with 10 connections, then other pool sizes;
  (c)  Postfix ``smtp-source -m 10000 -s 10 -l 2000`` (a C load generator), timed;

several rounds interleaved (the machine is shared, so single runs are noisy), and prints the
median msg/s of each and the ratios pool/aiosmtplib and pool/smtp-source.

    .venv/bin/python bench/smtp_send.py [--messages 10000] [--rounds 3] [--profile]

``--profile`` adds one cProfile run of (a) and (b) and prints where their time goes.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiosmtplib

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.dispatch.smtp_transport import SmtpPool, SmtpServer  # noqa: E402

SENDER, RECIPIENT = "bench@example.com", "sink@example.net"
MESSAGE_SIZE = 2000  # smtp-source -l 2000


def make_message(size: int = MESSAGE_SIZE) -> bytes:
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench\r\n"
        "Message-ID: <bench@conduit.test>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    body = line * ((size - len(head)) // len(line))
    return head + body + b"y" * (size - len(head) - len(body) - 2) + b"\r\n"


# --------------------------------------------------------------------------- peers


def postfix_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postfix/sbin")
    if path is None:
        sys.exit(f"{name} not found: apt-get install postfix")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_sink(port: int) -> subprocess.Popen:
    args = [postfix_tool("smtp-sink"), f"127.0.0.1:{port}", "256"]
    if os.geteuid() == 0:
        args[1:1] = ["-u", "nobody"]  # smtp-sink refuses to run as root
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 5
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                sys.exit(f"smtp-sink did not start: {proc.stderr.read()!r}")
            time.sleep(0.01)


# --------------------------------------------------------------------------- clients


async def aiosmtplib_reused(port: int, count: int, connections: int, message: bytes) -> None:
    async def worker(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, use_tls=False, start_tls=False)
        await client.connect()
        for _ in range(n):
            await client.sendmail(SENDER, [RECIPIENT], message)
        await client.quit()

    share, extra = divmod(count, connections)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(connections)))


async def aiosmtplib_per_message(port: int, count: int, connections: int, message: bytes) -> None:
    async def worker(n: int) -> None:
        for _ in range(n):
            await aiosmtplib.send(message, sender=SENDER, recipients=[RECIPIENT],
                                  hostname="127.0.0.1", port=port, use_tls=False, start_tls=False)

    share, extra = divmod(count, connections)
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(connections)))


async def pool_send(port: int, count: int, connections: int, message: bytes) -> None:
    """``connections`` sessions, one sender task per session pulling from a shared counter."""
    pool = SmtpPool(SmtpServer("127.0.0.1", port, "none"), None, max_connections=connections,
                    max_messages_per_connection=count)
    remaining = iter(range(count))

    async def worker() -> None:
        for _ in remaining:
            await pool.send(SENDER, [RECIPIENT], message)

    try:
        await asyncio.gather(*(worker() for _ in range(connections)))
    finally:
        await pool.close()


def timed_async(run: Callable[[], Awaitable[None]], count: int) -> float:
    async def main() -> float:
        start = time.perf_counter()
        await run()
        return count / (time.perf_counter() - start)

    return asyncio.run(main())


def smtp_source(port: int, count: int, sessions: int) -> float:
    args = [postfix_tool("smtp-source"), "-m", str(count), "-s", str(sessions),
            "-l", str(MESSAGE_SIZE), f"127.0.0.1:{port}"]
    start = time.perf_counter()
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
    return count / (time.perf_counter() - start)


def profile(label: str, run: Callable[[], Awaitable[None]]) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(run())
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(14)
    print(f"\n--- profile: {label} (tottime) ---")
    print("\n".join(out.getvalue().splitlines()[4:]))


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pool-sizes", default="5,10,20,40")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    n, message = args.messages, make_message()
    sizes = [int(s) for s in args.pool_sizes.split(",")]

    port = free_port()
    sink = start_sink(port)
    results: dict[str, list[float]] = {}

    def record(label: str, rate: float) -> None:
        results.setdefault(label, []).append(rate)
        print(f"  {label:<44} {rate:8.0f} msg/s", flush=True)

    try:
        print(f"smtp-sink on 127.0.0.1:{port}; {n} messages of {len(message)} bytes, "
              f"{args.rounds} rounds")
        for round_no in range(1, args.rounds + 1):
            print(f"round {round_no}")
            record("(a) aiosmtplib, 10 reused connections",
                   timed_async(lambda: aiosmtplib_reused(port, n, 10, message), n))
            record("(b) SmtpPool, 10 connections",
                   timed_async(lambda: pool_send(port, n, 10, message), n))
            record("(c) smtp-source -s 10", smtp_source(port, n, 10))
            for size in sizes:
                if size != 10:
                    record(f"(b) SmtpPool, {size} connections",
                           timed_async(lambda s=size: pool_send(port, n, s, message), n))
        per_message = max(n // 10, 100)
        record("(a') aiosmtplib.send(), new connection/message",
               timed_async(lambda: aiosmtplib_per_message(port, per_message, 10, message),
                           per_message))
        if args.profile:
            profile("aiosmtplib, 10 reused connections",
                    lambda: aiosmtplib_reused(port, n, 10, message))
            profile("SmtpPool, 10 connections", lambda: pool_send(port, n, 10, message))
    finally:
        sink.terminate()
        sink.wait(5)
        sink.stderr.close()

    median = {label: statistics.median(rates) for label, rates in results.items()}
    ours, theirs, postfix = (median["(b) SmtpPool, 10 connections"],
                             median["(a) aiosmtplib, 10 reused connections"],
                             median["(c) smtp-source -s 10"])
    best_label = max((l for l in median if l.startswith("(b)")), key=median.get)
    print("\nmedians (msg/s):")
    for label, rate in median.items():
        print(f"  {label:<44} {rate:8.0f}")
    print(f"\nSmtpPool(10) / aiosmtplib(10 reused)  = {ours / theirs:5.2f}x   (target >= 2.4x)")
    print(f"SmtpPool(10) / smtp-source(-s 10)     = {ours / postfix:5.2f}x   (target >= 0.25x)")
    print(f"SmtpPool(10) absolute                 = {ours:5.0f} msg/s (target >= 2000)")
    print(f"best pool size: {best_label} at {median[best_label]:.0f} msg/s")


if __name__ == "__main__":
    main()
