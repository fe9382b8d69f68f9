"""The error taxonomy every service shares.

Three kinds, because each calls for a different reaction:

- ``InvalidInput``: the input itself is wrong (a malformed event, a bad address, header injection).
  Retrying cannot help: dead-letter it at once with the reason.  ``Refused`` is the kind a consumer
  read and refused by a rule (a mailbox that may not send, a message too large).
- ``TransientError``: the world is briefly wrong (a timeout, a refused connection, an SMTP 4xx).
  Retry with capped exponential back-off and jitter, until a deadline.
- ``PermanentError``: the outcome is final (an SMTP 5xx, a wrong password). Record it, do not retry.

Every error carries a short machine-readable ``reason`` code (used in status events, alerts and
``conduit message why``) and a human sentence.  Messages must never contain a credential.
"""
from __future__ import annotations


class ConduitError(Exception):
    """Base of every error Conduit raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class InvalidInput(ConduitError):
    """The input is wrong; dead-letter it, never retry."""

    reason = "invalid"
    # Counted toward the dead-letter limit (``shared.consumer.DeadLetterGate``), which stops a
    # consumer that cannot understand its input (a bad deploy) before it drains a whole topic.
    counts_toward_limit = True


class Refused(InvalidInput):
    """A well-formed request, understood and refused by a rule (a mailbox that may not send, a message
    too large, a key already used for another email): the system working as designed.

    Dead-lettered (to be replayed once the cause is mended), but not counted toward the dead-letter
    limit: a client publishing many requests a rule refuses would otherwise stop the consumer, and
    the restart replay the same refusals, stopping it again, for every organization.
    """

    reason = "refused"
    counts_toward_limit = False


class TransientError(ConduitError):
    """Worth retrying later with back-off."""

    reason = "transient"


class PermanentError(ConduitError):
    """Final; record the outcome and do not retry."""

    reason = "permanent"


class NotFound(InvalidInput):
    """A named record (profile, mailbox, user, ...) does not exist."""

    reason = "not_found"


class Conflict(InvalidInput):
    """The request contradicts what is stored (a second mailbox for a user, a duplicate name)."""

    reason = "conflict"


class AuthenticationFailed(PermanentError):
    """The server refused the credentials.  Permanent for this attempt; the mailbox backs off."""

    reason = "authentication_failed"


class ConnectionFailed(TransientError):
    """The server could not be reached or dropped the connection."""

    reason = "connection_failed"


class TlsFailed(PermanentError):
    """TLS negotiation or certificate verification failed; not retried until the profile changes."""

    reason = "tls_failed"


class ProtocolTimeout(TransientError):
    """The server did not answer in time."""

    reason = "timeout"


def raised_by_database(exc: BaseException) -> bool:
    """Whether ``exc`` came out of asyncpg: connecting to PostgreSQL failed, and asyncpg raises the
    socket's OSError as it is, which says nothing of the database (a mail server's connection failures
    are raised as ``ConnectionFailed`` by the mail clients).  Told by the frames it passed through."""
    tb = exc.__traceback__
    while tb is not None:
        if str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0] == "asyncpg":
            return True
        tb = tb.tb_next
    return False
