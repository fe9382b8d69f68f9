"""The SASL XOAUTH2 initial response, shared by the IMAP and POP3 clients.

Google and Microsoft accept OAuth 2.0 access tokens over IMAP, POP3 and SMTP with the XOAUTH2
mechanism (the format predates RFC 7628's OAUTHBEARER and is what both providers document):
``base64("user=" USER ^A "auth=Bearer " TOKEN ^A ^A)`` where ^A is the byte 0x01.
"""
from __future__ import annotations

import base64

from shared.errors import InvalidInput


def xoauth2_initial_response(user: str, access_token: str) -> bytes:
    """Return the base64-encoded XOAUTH2 initial client response for ``user`` and ``access_token``."""
    # A 0x01, CR or LF inside either value would let it forge fields of the SASL string.
    for value, what in ((user, "user name"), (access_token, "access token")):
        if not value or any(c in value for c in "\x01\r\n"):
            raise InvalidInput(f"The XOAUTH2 {what} is empty or contains a control character.")
    raw = f"user={user}\x01auth=Bearer {access_token}\x01\x01".encode()
    return base64.b64encode(raw)
