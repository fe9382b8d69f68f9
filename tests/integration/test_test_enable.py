"""Test & Enable against the real peers, for every way a mailbox signs in: a password on Dovecot
(IMAP, POP3) and on aiosmtpd (AUTH PLAIN, or LOGIN when that is all the server offers), an SMTP
relay without credentials, XOAUTH2 on SMTP with a token from the profile's OAuth client, and
Exchange over EWS and Microsoft Graph (the simulator).  A direction that passes is enabled; one that
fails says why in one line and stays disabled."""
from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from exchangelib.protocol import CachingProtocol
from pydantic import SecretStr

from conduit import test_enable as check   # not imported by name: pytest would collect it as a test
from conduit.peers.ports import LOOPBACK
from conduit.peers.smtp import CaptureSmtpServer
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from simulators.exchange import ExchangeSimulator
from tests.support.mailboxes import imap_profile, pop3_profile
from tests.support.oauth import CLIENT_ID, CLIENT_SECRET, TokenEndpoint

PASSWORD = "pw-test-enable-1"


async def _mailbox(registry: Registry, org: Organization, profile: ProfileInput, *, email: str | None = None,
                   password: str | None = PASSWORD) -> str:
    await registry.add_profile(org, profile)
    email = email or f"user-{uuid.uuid4().hex[:8]}@example.com"
    await registry.add_user(org, f"User {email}", email)
    if password is not None:
        await registry.set_credentials(org, email, email, SecretStr(password))
    await registry.update_mailbox(org, email, email_approved=True, profile=profile.name)
    return email


async def _enabled(registry: Registry, org: Organization, email: str) -> tuple[bool, bool]:
    mailbox = await registry.mailbox(org, email)
    return mailbox.incoming.status == "success", mailbox.outgoing.status == "success"


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
async def test_a_password_mailbox_on_dovecot_and_aiosmtpd_is_enabled_both_ways(
        registry: Registry, org, dovecot, tmp_path, protocol: str) -> None:
    email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    dovecot.add_user(email, PASSWORD)
    with CaptureSmtpServer(tmp_path / "capture", users={email: PASSWORD}, require_auth=True) as smtp:
        make = imap_profile if protocol == "imap" else pop3_profile
        profile = make(dovecot, f"{protocol}-{uuid.uuid4().hex[:6]}", use_same_settings_for_outgoing=False,
                       outgoing_host=LOOPBACK, outgoing_port=smtp.port)
        await _mailbox(registry, org, profile, email=email)
        results = await check.test_enable(registry, org, email, ["incoming", "outgoing"])
    assert results == {"incoming": (True, "incoming connection and sign-in succeeded"),
                       "outgoing": (True, "outgoing connection and sign-in succeeded")}
    assert await _enabled(registry, org, email) == (True, True)
    assert smtp_messages(smtp) == 0   # signed in, sent nothing


def smtp_messages(smtp: CaptureSmtpServer) -> int:
    return len(smtp.messages())


async def test_a_wrong_password_fails_in_one_line_and_stays_disabled(registry: Registry, org, dovecot, tmp_path) -> None:
    email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    dovecot.add_user(email, "another-password")
    with CaptureSmtpServer(tmp_path / "capture", users={email: "another-password"}, require_auth=True) as smtp:
        profile = imap_profile(dovecot, f"imap-{uuid.uuid4().hex[:6]}", use_same_settings_for_outgoing=False,
                               outgoing_host=LOOPBACK, outgoing_port=smtp.port)
        await _mailbox(registry, org, profile, email=email)
        results = await check.test_enable(registry, org, email, ["incoming", "outgoing"])
    for ok, said in results.values():
        assert not ok and "\n" not in said and PASSWORD not in said
    assert "535" in results["outgoing"][1]
    assert await _enabled(registry, org, email) == (False, False)


async def test_smtp_relay_without_credentials_and_login_only_servers(registry: Registry, org, tmp_path) -> None:
    """A relay that trusts its network needs no credentials; a server that offers AUTH LOGIN but not
    PLAIN gets the password through LOGIN."""
    with CaptureSmtpServer(tmp_path / "relay") as relay:
        relayed = await _mailbox(registry, org, ProfileInput(
            name=f"relay-{uuid.uuid4().hex[:6]}", server_type="smtp", outgoing_host=LOOPBACK, outgoing_port=relay.port,
            outgoing_tls="none", use_same_settings_for_outgoing=False), password=None)
        assert await check.test_enable(registry, org, relayed, ["outgoing"]) == {
            "outgoing": (True, "outgoing connection and sign-in succeeded")}

    email = f"user-{uuid.uuid4().hex[:8]}@example.com"
    with CaptureSmtpServer(tmp_path / "login", users={email: PASSWORD}, require_auth=True,
                           password_mechanisms=["LOGIN"]) as login_only:
        await _mailbox(registry, org, ProfileInput(
            name=f"login-{uuid.uuid4().hex[:6]}", server_type="smtp", outgoing_host=LOOPBACK,
            outgoing_port=login_only.port, outgoing_tls="none", use_same_settings_for_outgoing=False), email=email)
        assert (await check.test_enable(registry, org, email, ["outgoing"]))["outgoing"][0]
    assert (await _enabled(registry, org, email))[1]


async def test_smtp_xoauth2_signs_in_with_a_token_of_the_profiles_client(registry: Registry, org, tmp_path) -> None:
    async with TokenEndpoint() as tokens:
        with CaptureSmtpServer(tmp_path / "oauth", xoauth2_tokens=tokens.tokens, require_auth=True) as smtp:
            spec = dict(server_type="smtp", outgoing_host=LOOPBACK, outgoing_port=smtp.port, outgoing_tls="none",
                        use_same_settings_for_outgoing=False, auth_method="oauth2", oauth_token_url=tokens.url,
                        oauth_client_id=CLIENT_ID)
            email = await _mailbox(registry, org, ProfileInput(name=f"oauth-{uuid.uuid4().hex[:6]}",
                                                               oauth_client_secret=SecretStr(CLIENT_SECRET), **spec),
                                   password=None)
            assert await check.test_enable(registry, org, email, ["outgoing"]) == {
                "outgoing": (True, "outgoing connection and sign-in succeeded")}
            assert tokens.issued == 1 and (await _enabled(registry, org, email))[1]

            # The wrong client secret: the token endpoint refuses it, and the check says so.
            wrong = await _mailbox(registry, org, ProfileInput(name=f"oauth-{uuid.uuid4().hex[:6]}",
                                                               oauth_client_secret=SecretStr("not-the-secret"), **spec),
                                   password=None)
            ok, said = (await check.test_enable(registry, org, wrong, ["outgoing"]))["outgoing"]
            assert not ok and "refused the client credentials" in said and "not-the-secret" not in said


@pytest.fixture
async def sim() -> AsyncIterator[ExchangeSimulator]:
    CachingProtocol.clear_cache()
    async with ExchangeSimulator(domain="contoso.test") as s:
        yield s
    CachingProtocol.clear_cache()


async def test_exchange_mailboxes_are_enabled_over_ews_and_graph(registry: Registry, org, sim: ExchangeSimulator) -> None:
    ews_user, graph_user = (f"{n}-{uuid.uuid4().hex[:6]}@contoso.test" for n in ("ews", "graph"))
    sim.add_mailbox(ews_user, password=PASSWORD, display_name="EWS user")
    sim.add_mailbox(graph_user, password=PASSWORD, display_name="Graph user")
    sim.add_app(CLIENT_ID, CLIENT_SECRET, mailboxes={graph_user})
    await _mailbox(registry, org, ProfileInput(
        name=f"ews-{uuid.uuid4().hex[:6]}", server_type="exchange_server", service_url=sim.ews_url,
        auth_method="mailbox_credentials"), email=ews_user)
    await _mailbox(registry, org, ProfileInput(
        name=f"graph-{uuid.uuid4().hex[:6]}", server_type="exchange_online", service_url=sim.graph_url,
        auth_method="oauth2", oauth_token_url=sim.token_url, oauth_client_id=CLIENT_ID,
        oauth_client_secret=SecretStr(CLIENT_SECRET)), email=graph_user, password=None)
    for email in (ews_user, graph_user):
        assert await check.test_enable(registry, org, email, ["outgoing"]) == {
            "outgoing": (True, "outgoing connection and sign-in succeeded")}, email
        assert (await _enabled(registry, org, email))[1]

    # An app not granted the mailbox, and a wrong EWS password: refused, in one line.
    other = f"other-{uuid.uuid4().hex[:6]}@contoso.test"
    sim.add_mailbox(other, password="something-else", display_name="Other")
    await _mailbox(registry, org, ProfileInput(
        name=f"ews-{uuid.uuid4().hex[:6]}", server_type="exchange_server", service_url=sim.ews_url,
        auth_method="mailbox_credentials"), email=other)
    ok, said = (await check.test_enable(registry, org, other, ["outgoing"]))["outgoing"]
    assert not ok and "\n" not in said and PASSWORD not in said


async def test_act_is_refused_before_anything_is_tested_and_nothing_is_recorded(registry: Registry, org, dovecot) -> None:
    """Appointments, contacts and tasks are not synchronized yet: asking to test them is refused as a
    whole, rather than recorded as a failed test that would leave the mailbox failing for good."""
    from shared.errors import InvalidInput

    profile = imap_profile(dovecot, f"imap-{uuid.uuid4().hex[:6]}")
    email = await _mailbox(registry, org, profile)
    with pytest.raises(InvalidInput, match="not available yet"):
        await check.test_enable(registry, org, email, ["incoming", "act"])
    mailbox = await registry.mailbox(org, email)
    assert (mailbox.incoming.status, mailbox.act.status) == ("not_run", "not_run")
