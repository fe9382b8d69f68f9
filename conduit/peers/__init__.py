"""Launchers for the real peers that tests, benchmarks and `conduit demo` talk to.

Each peer is a real server on loopback, on ports chosen at run time:
- `Dovecot`: a private Dovecot IMAP/POP3 instance (Debian package; scripts/install-peers.sh).
- `SmtpSink`: Postfix's fast C `smtp-sink`, for throughput.
- `CaptureSmtpServer`: an aiosmtpd server that stores every message and can be told to fail.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conduit.peers.dovecot import Dovecot, DovecotError
    from conduit.peers.ports import free_port, free_ports, listening_ports
    from conduit.peers.smtp import CapturedMessage, CaptureSmtpServer, PeerError, SmtpSink

# Imported on first use: `python -m conduit.peers.smtp` must not find its own module already
# imported by this package (runpy warns), and a user of one peer need not import the others.
_EXPORTS = {
    "Dovecot": "conduit.peers.dovecot",
    "DovecotError": "conduit.peers.dovecot",
    "CaptureSmtpServer": "conduit.peers.smtp",
    "CapturedMessage": "conduit.peers.smtp",
    "PeerError": "conduit.peers.smtp",
    "SmtpSink": "conduit.peers.smtp",
    "free_port": "conduit.peers.ports",
    "free_ports": "conduit.peers.ports",
    "listening_ports": "conduit.peers.ports",
}

__all__ = [
    "CaptureSmtpServer",
    "CapturedMessage",
    "Dovecot",
    "DovecotError",
    "PeerError",
    "SmtpSink",
    "free_port",
    "free_ports",
    "listening_ports",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
