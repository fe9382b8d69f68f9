"""TLS client contexts: always verifying; a profile may add a CA file to trust (a private CA)."""
from __future__ import annotations

import ssl


def client_context(ca_file: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context
