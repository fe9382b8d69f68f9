"""Run the Exchange simulator: ``python -m simulators.exchange --port P [--tls-cert C --tls-key K]``.

Mailboxes and apps can be registered on the command line (``--mailbox addr:password``,
``--app client_id:secret``) or later through the ``/_sim`` control API.  Stops on SIGINT or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import ssl

from .server import ExchangeSimulator


def _pair(value: str) -> tuple[str, str]:
    left, sep, right = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:SECRET, got {value!r}")
    return left, right


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m simulators.exchange", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--tls-cert", help="PEM certificate chain; serves HTTPS when given with --tls-key")
    p.add_argument("--tls-key", help="PEM private key")
    p.add_argument("--tenant", default="simulated-tenant")
    p.add_argument("--mailbox", action="append", type=_pair, default=[], metavar="ADDRESS:PASSWORD")
    p.add_argument("--app", action="append", type=_pair, default=[], metavar="CLIENT_ID:SECRET")
    args = p.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        p.error("--tls-cert and --tls-key go together")
    return args


async def serve(args: argparse.Namespace) -> None:
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    sim = ExchangeSimulator(host=args.host, port=args.port, ssl_context=context, tenant=args.tenant)
    for address, password in args.mailbox:
        sim.add_mailbox(address, password=password or None)
    for client_id, secret in args.app:
        sim.add_app(client_id, secret)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        print(f"EWS   {sim.ews_url}\nGraph {sim.graph_url}\nToken {sim.token_url}\nControl {sim.base_url}/_sim",
              flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
