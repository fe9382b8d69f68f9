"""Real peers that several integration test files share: a test CA and a Dovecot with TLS.

The suite-wide peers (PostgreSQL, the broker, the plaintext `dovecot`) are in tests/conftest.py.
Tests using `tls_dovecot` add users of their own (unique addresses), so one instance serves them all.
"""
from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from conduit.peers.dovecot import Dovecot


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A trustme CA, a server certificate for 127.0.0.1 and localhost, and a client context that
    trusts the CA and verifies: {"cert": chain PEM path, "key": key PEM path, "client": SSLContext,
    "ca": the CA certificate's PEM path (what a profile's tls_ca_file names)}."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_pem.write_to_path(key_path)
    cert.cert_chain_pems[0].write_to_path(cert_path)
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(cert_path, append=True)
    ca_path = directory / "ca.pem"
    ca.cert_pem.write_to_path(ca_path)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return {"cert": cert_path, "key": key_path, "client": client, "ca": ca_path}


@pytest.fixture(scope="session")
async def tls_dovecot(tmp_path_factory: pytest.TempPathFactory, tls: dict) -> AsyncIterator[Dovecot]:
    """One private Dovecot for the session with plaintext, STARTTLS and implicit TLS listeners
    (IMAP and POP3), its certificate issued by the `tls` CA."""
    async with Dovecot(tmp_path_factory.mktemp("tls-dovecot"), tls_cert=tls["cert"], tls_key=tls["key"]) as server:
        yield server
