"""Which Exchange transport failures back a mailbox off: the server's, not Conduit's own congestion."""
from __future__ import annotations

from services.dispatch.service import _mailbox_level
from shared.errors import ConnectionFailed, ProtocolTimeout


def _marked(error, written: bool):
    error.after_write = written
    return error


def test_only_a_server_that_could_not_be_reached_backs_the_mailbox_off() -> None:
    for transport in ("ews", "graph"):
        assert _mailbox_level(_marked(ProtocolTimeout("no answer to connect"), False), transport)
        assert _mailbox_level(ConnectionFailed("could not reach the EWS server"), transport)
        assert not _mailbox_level(_marked(ProtocolTimeout("no answer to CreateItem"), True), transport)
        assert not _mailbox_level(ConnectionFailed("closed", reason="transport_closed"), transport)
        # Waited for one of the transport's own busy connections: Conduit's congestion.
        assert not _mailbox_level(_marked(ProtocolTimeout("did not start", reason="transport_busy"), False), transport)
