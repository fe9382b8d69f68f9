"""Launchers for the real peers that tests, benchmarks and `conduit demo` talk to.

Each peer is a real server on loopback, on ports chosen at run time:
- `Dovecot`: a private Dovecot IMAP/POP3 instance (Debian package; scripts/install-peers.sh).
- `SmtpSink`: Postfix's fast C `smtp-sink`, for throughput.
- `CaptureSmtpServer`: an aiosmtpd server that stores every message and can be told to fail.
"""

from conduit.peers.dovecot import Dovecot, DovecotError
from conduit.peers.ports import free_port, free_ports, listening_ports
from conduit.peers.smtp import CapturedMessage, CaptureSmtpServer, PeerError, SmtpSink

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
