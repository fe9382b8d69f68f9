"""SASL initial responses, shared by the IMAP and POP3 clients: PLAIN with an authorization identity
(a profile's service account signing in to each user's mailbox) and XOAUTH2.

PLAIN (RFC 4616) is ``base64(AUTHZID NUL AUTHCID NUL PASSWORD)``: the service account (authcid) proves
who it is with its password and asks to act as the mailbox's user (authzid); Dovecot master users,
Cyrus proxy authorization and Zimbra admin logins work that way.

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


def plain_initial_response(authzid: str, authcid: str, password: str) -> bytes:
    """Return the base64-encoded PLAIN initial response: sign in as ``authcid``, act as ``authzid``."""
    # A NUL would let a value forge the other fields; CR or LF has no place in a user name or password.
    for value, what in ((authzid, "mailbox user name"), (authcid, "profile user name"), (password, "password")):
        if not value or any(c in value for c in "\x00\r\n"):
            raise InvalidInput(f"The SASL PLAIN {what} is empty or contains a control character.")
    return base64.b64encode(f"{authzid}\x00{authcid}\x00{password}".encode())
