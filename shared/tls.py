"""TLS client contexts: always verifying; a profile may add a CA file to trust (a private CA).

One context per CA file for the whole process: creating one loads the system CA store (~24 ms of
CPU here), and a replica polling 2,000 mailboxes spent 80% of a core on that alone with nothing to
fetch (bench/many_mailboxes.py).  Contexts are meant to be shared; callers must not change them.
A CA file changed on disk is read again after a restart.
"""
from __future__ import annotations

import ssl
from functools import lru_cache


@lru_cache(maxsize=64)
def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context
