"""TLS client contexts: always verifying; a profile may add a CA file to trust (a private CA).

One context per CA file for the whole process: creating one loads the system CA store (~24 ms of
CPU here), and a replica polling 2,000 mailboxes spent 80% of a core on that alone with nothing to
fetch (bench/many_mailboxes.py).  Contexts are meant to be shared; callers must not change them.
A CA file changed on disk is read again after a restart.
"""
from __future__ import annotations

import ssl
from functools import lru_cache

from shared.errors import TlsFailed


@lru_cache(maxsize=64)
def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A verifying client context that also trusts ``ca_file``; ``TlsFailed`` when the file holds no
    usable certificate (the mailbox's failure to report, not a fault of ours)."""
    context = ssl.create_default_context()
    if ca_file:
        try:
            context.load_verify_locations(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFailed(f"The profile's TLS CA file {ca_file} cannot be used: {ca_file_problem(exc)}.") from None
    return context


def ca_file_problem(exc: OSError | ssl.SSLError) -> str:
    """Why a CA file could not be loaded, in words."""
    if isinstance(exc, ssl.SSLError):
        return "it holds no PEM certificate"
    return exc.strerror or str(exc)


def check_ca_file(ca_file: str) -> str | None:
    """Why ``ca_file`` cannot serve as a profile's TLS CA file here, or None when it can."""
    try:
        ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        return ca_file_problem(exc)
    return None
