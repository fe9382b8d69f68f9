"""Client-credentials tokens from a real HTTP token endpoint: shared by the mailboxes that sign in at
once, and an endpoint's failures told apart (throttled or down is not wrong credentials)."""
from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from shared.errors import AuthenticationFailed, ConnectionFailed
from shared.oauth import TokenProvider
from tests.support.oauth import CLIENT_ID, CLIENT_SECRET, TokenEndpoint


async def test_mailboxes_signing_in_together_share_one_token_request() -> None:
    async with TokenEndpoint(count=100) as endpoint:
        endpoint.delay = 0.05
        provider = TokenProvider()
        tokens = await asyncio.gather(*(provider.token(endpoint.url, CLIENT_ID, CLIENT_SECRET, None) for _ in range(100)))
        assert endpoint.requests == 1 and set(tokens) == {endpoint.tokens[0]}
        provider.forget(endpoint.tokens[0])   # a server refused it: the next sign-in asks again
        assert await provider.token(endpoint.url, CLIENT_ID, CLIENT_SECRET, None) == endpoint.tokens[1]
        assert endpoint.requests == 2


@pytest.mark.parametrize("status, body, error, words", [
    (429, "slow down", ConnectionFailed, "not answering now (HTTP 429)"),
    (503, "maintenance", ConnectionFailed, "not answering now (HTTP 503)"),
    (401, '{"error": "invalid_client"}', AuthenticationFailed, "refused the client credentials (HTTP 401)"),
    (200, "<html>sign in</html>", AuthenticationFailed, "without a JSON token"),
    (200, '{"token_type": "Bearer"}', AuthenticationFailed, "without an access token"),
])
async def test_an_endpoints_failure_says_which_kind_it_is(status: int, body: str, error: type, words: str) -> None:
    async with TokenEndpoint() as endpoint:
        endpoint.answer = (status, body)
        with pytest.raises(error) as caught:
            await TokenProvider().token(endpoint.url, CLIENT_ID, CLIENT_SECRET, None)
        assert words in caught.value.message and CLIENT_SECRET not in caught.value.message


async def test_an_endpoint_behind_the_profiles_private_ca_is_trusted_with_it(tmp_path) -> None:
    """The profile's `tls_ca_file` counts for its token endpoint too, as for its mail servers:
    before, the token request ignored it, so XOAUTH2 behind a private CA never signed in."""
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(ca_file)
    async with TokenEndpoint(ssl_context=server) as endpoint:
        with pytest.raises(ConnectionFailed):   # verified against the system's CAs: refused
            await TokenProvider().token(endpoint.url, CLIENT_ID, CLIENT_SECRET, None)
        token = await TokenProvider().token(endpoint.url, CLIENT_ID, CLIENT_SECRET, None, ca_file=str(ca_file))
    assert token == endpoint.tokens[0]
