"""What a new administrator met in the commands that set up profiles, users, queues and mailboxes
(an audit's findings), each as the administrator runs the command: a subprocess against the test's
PostgreSQL and broker, aiosmtpd where a server is signed in to.

- Test & Enable without ``--direction`` tests only the directions the mailbox is used for.
- A user or queue that takes a contact's address is warned of (sender resolution picks one).
- A profile edit that changes nothing a direction uses refuses settings no direction uses, and
  leaves the back-offs of directions it does not touch running.
- Delete after processing says what it does; a deadline in the past is refused before publishing;
  the hints name what was just changed; an empty Message-ID, an unknown mailbox, ``--email`` on
  ``add`` are one clear line.
"""
from __future__ import annotations

import re
import uuid

import pytest
from typer.testing import CliRunner

from conduit.cli import app
from conduit.peers.ports import LOOPBACK
from conduit.peers.smtp import CaptureSmtpServer
from shared.registry.models import Organization
from shared.registry.service import ProfileInput, Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.dispatch import sending_mailbox


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _cli(settings: Settings, org: Organization, *args: str) -> tuple[int, str, str]:
    code, out, err = await conduit_cli(settings, *args, "--org", org.name)
    assert "Traceback" not in err, err
    return code, out, err


def _help(*args: str) -> str:
    """``conduit ARGS --help``, its words on one line (click wraps them to the terminal)."""
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())


# --- M1: Test & Enable tests the directions the mailbox is used for --------------------------------

async def test_test_enable_leaves_a_direction_the_owner_does_not_use_untested_and_unfailed(
        settings: Settings, registry: Registry, org: Organization, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as smtp:
        profile = _name("local")
        await registry.add_profile(org, ProfileInput(name=profile, server_type="smtp", outgoing_host=LOOPBACK,
                                                     outgoing_port=smtp.port, outgoing_tls="none"))
        eve = f"{_name('eve')}@example.com"
        await registry.add_user(org, "Eve", eve, incoming="none")
        await registry.update_mailbox(org, eve, email_approved=True, profile=profile)

        code, out, err = await _cli(settings, org, "mailbox", "test-enable", eve)
        assert code == 0, (out, err)
        lines = out.splitlines()
        assert lines[0] == "incoming  not used (the user's incoming is none)", out
        assert lines[1] == "outgoing  success: outgoing connection and sign-in succeeded", out
        mailbox = await registry.mailbox(org, eve)
        assert mailbox.incoming.status == "not_run" and mailbox.outgoing.status == "success"
        assert not [a for a in mailbox.alerts if a.code == "test_failed"], mailbox.alerts

        # Asked for by name, it is tested; its failure says why it does not matter.
        code, out, err = await _cli(settings, org, "mailbox", "test-enable", eve, "--direction", "incoming")
        assert code == 1 and out.strip() == ("incoming  failure: incoming email over smtp is not available yet "
                                             "(not used: the user's incoming is none)"), (out, err)


# --- M2: an address shared with a contact, an account or a lead is warned of -------------------------

async def test_a_user_or_queue_taking_a_records_address_is_warned_of(
        settings: Settings, registry: Registry, org: Organization) -> None:
    domain = f"{_name('customer')}.example"
    bea = await registry.add_record(org, "contact", "Bea Customer", f"bea@{domain}")
    firm = await registry.add_record(org, "account", "Firm", f"info@{domain}")

    code, out, err = await _cli(settings, org, "user", "add", f"bea@{domain}", "--name", "Bea Colleague",
                                "--incoming", "none", "--outgoing", "none")
    assert code == 0 and out.startswith(f"user bea@{domain} added"), (out, err)
    user = next(u for u in await registry.users(org) if u.email == f"bea@{domain}")
    assert err.strip() == (
        f"warning: bea@{domain} is also the address of contact Bea Customer ({bea.id}); mail from it is resolved to "
        "this user, not to the contact Bea Customer (the first of users, contacts, accounts, leads, queues, the "
        "oldest first: docs/inbound.md), mail to it to all of them"), err

    # A queue comes after the records: the account keeps its mail, and the queue's is the account's.
    code, out, err = await _cli(settings, org, "queue", "add", f"info@{domain}", "--name", _name("Info"),
                                "--incoming", "none", "--outgoing", "none")
    assert code == 0 and f"also the address of account Firm ({firm.id}); mail from it is resolved to the " \
                         "account Firm, not to this queue" in err, (out, err)

    # An edit to such an address too (and only when the address changes).
    await registry.add_user(org, "Cy", f"cy@{domain}.internal", incoming="none", outgoing="none")
    code, out, err = await _cli(settings, org, "user", "set", f"cy@{domain}.internal", "--email", f"lead@{domain}")
    assert code == 0 and not err, (out, err)
    lead = await registry.add_record(org, "lead", "Lee Lead", f"lead2@{domain}")
    code, out, err = await _cli(settings, org, "user", "set", f"lead@{domain}", "--email", f"lead2@{domain}")
    assert code == 0 and err.startswith(f"warning: lead2@{domain} is also the address of lead Lee Lead ({lead.id}); "
                                        "mail from it is resolved to this user, not to the lead Lee Lead"), (out, err)
    queue = _name("Desk")
    await registry.add_queue(org, queue, f"desk@{domain}.internal", incoming="none", outgoing="none")
    code, out, err = await _cli(settings, org, "queue", "set", queue, "--email", f"BEA@{domain}")
    assert code == 0 and "mail from it is resolved to the user Bea Colleague, not to the contact Bea Customer or " \
                         "this queue" in err, (out, err)

    # `record add` counts users and queues in.
    code, out, err = await _cli(settings, org, "record", "add", "lead", f"bea@{domain}", "--name", "Bea Lead")
    assert code == 0, (out, err)
    assert f"also the address of user Bea Colleague ({user.id}), contact Bea Customer ({bea.id}), queue {queue} (" \
           in err and "resolved to the user Bea Colleague, not to the contact Bea Customer or this lead or the " \
                      f"queue {queue}" in err, err


# --- M3: profile edits that change nothing about connecting -------------------------------------------

async def test_a_profile_edit_refuses_settings_nothing_uses_and_keeps_untouched_back_offs(
        settings: Settings, registry: Registry, org: Organization, monkeypatch: pytest.MonkeyPatch) -> None:
    profile = _name("corp")
    await registry.add_profile(org, ProfileInput(name=profile, server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=10143, incoming_tls="none", outgoing_host="127.0.0.1",
                                                 outgoing_port=10025, outgoing_tls="none"))
    boxes = [f"{_name('u')}@example.com" for _ in range(2)]
    for email in boxes:
        await registry.add_user(org, f"User {email}", email)
        mailbox = await registry.update_mailbox(org, email, profile=profile, email_approved=True)
        for direction in ("incoming", "outgoing"):
            await registry.record_test(mailbox.id, direction, True, "ok")
            for _ in range(3):   # backing off for two minutes: the commands below take seconds
                await registry.record_failure(mailbox.id, direction, "connection_failed", "connection refused")

    async def backing_off() -> list[tuple[bool, bool]]:
        return [(m.incoming.backoff_until is not None, m.outgoing.backoff_until is not None)
                for m in [await registry.mailbox(org, e) for e in boxes]]

    monkeypatch.setenv("CONDUIT_PROFILE_SECRET", "not-used")
    monkeypatch.setenv("CONDUIT_OAUTH_CLIENT_SECRET", "not-used")
    refused = {
        ("--service-url", "https://ews.example.com/EWS/Exchange.asmx"):
            f"error: --service-url: not used by the profile {profile} (a service URL only for Exchange "
            "(exchange_server, exchange_online), and it is imap); nothing changed",
        ("--new-profile-secret",):
            f"error: --new-profile-secret: not used by the profile {profile} (a profile user and password only with "
            "--auth profile_impersonation, and it signs in with mailbox_credentials); nothing changed",
        ("--new-client-secret", "--oauth-scope", "mail"):
            f"error: --oauth-scope, --new-client-secret: not used by the profile {profile} (OAuth settings only with "
            "--auth oauth2 (or on exchange_online), and it signs in with mailbox_credentials); nothing changed",
    }
    for args, said in refused.items():
        code, out, err = await _cli(settings, org, "profile", "set", profile, *args)
        assert code == 2 and err.strip() == said and not out, (args, out, err)
    p = await registry.profile(org, profile)
    assert p.service_url is None and not p.has_profile_secret and not p.has_oauth_client_secret and p.oauth_scope is None
    assert await backing_off() == [(True, True)] * 2

    # No longer sharing the incoming settings, with the same outgoing server: the same SMTP session.
    code, out, err = await _cli(settings, org, "profile", "set", profile, "--separate-outgoing-settings")
    assert code == 0 and out.strip() == f"profile {profile} changed: use_same_settings_for_outgoing", (out, err)
    assert await backing_off() == [(True, True)] * 2
    # What incoming connects with ends incoming's back-offs, and only those.
    code, out, err = await _cli(settings, org, "profile", "set", profile, "--incoming-port", "10144")
    assert code == 0 and out.splitlines()[1] == (f"profile {profile}: back-off cleared for 2 mailboxes (incoming): "
                                                 "their next sessions use the new settings"), (out, err)
    assert await backing_off() == [(False, True)] * 2


# --- M4: delete after processing says what it does ---------------------------------------------------------

async def test_delete_after_processing_says_what_now_happens(
        settings: Settings, registry: Registry, org: Organization) -> None:
    help_ = _help("mailbox", "configure")
    assert ("--delete-after-processing / --keep-on-server Delete from the server each message once it is an activity "
            "(and copies of it found earlier); queue mailboxes only. See docs/inbound.md.") in help_, help_
    email = f"{_name('help')}@example.com"
    await registry.add_queue(org, _name("Help"), email)
    code, out, err = await _cli(settings, org, "mailbox", "configure", email, "--delete-after-processing")
    assert code == 0 and out.strip() == (f"{email}: messages that became activities are now deleted from the server, "
                                         "including ones found before (and their copies)"), (out, err)
    assert (await registry.mailbox(org, email)).delete_after_processing
    code, out, err = await _cli(settings, org, "mailbox", "configure", email, "--keep-on-server")
    assert code == 0 and out.strip() == (f"{email}: messages that became activities are now kept on the server "
                                         "(those deleted already are gone)"), (out, err)


# --- L3: a deadline in the past ------------------------------------------------------------------------

async def test_send_refuses_a_deadline_in_the_past_before_publishing(
        settings: Settings, registry: Registry, org: Organization) -> None:
    sender = await sending_mailbox(registry, org, host=LOOPBACK, port=9)
    code, out, err = await _cli(settings, org, "send", "--from", sender.email, "--to", "x@customer.example",
                                "--subject", "Late", "--text", "Too late.", "--deadline", "2020-01-01T00:00:00Z")
    assert code == 2 and not out and err.strip() == ("error: --deadline 2020-01-01T00:00:00+00:00 has passed: give a "
                                                     "time to come, or leave --deadline out"), (out, err)


# --- L4, L5: the hints of a user edit ----------------------------------------------------------------

async def test_a_user_edits_hints_name_the_direction_turned_off_and_not_act(
        settings: Settings, registry: Registry, org: Organization) -> None:
    await registry.add_profile(org, ProfileInput(name=_name("corp"), server_type="imap", incoming_host="127.0.0.1",
                                                 incoming_port=10143, incoming_tls="none"), make_default=True)
    ann = f"{_name('ann')}@example.com"
    await registry.add_user(org, "Ann", ann, incoming="none")
    code, out, err = await _cli(settings, org, "user", "set", ann, "--outgoing", "none")
    assert code == 0 and f"the user uses server-side sync for no direction (`conduit user set {ann} --outgoing " \
                         "server_side_sync`)" in out, (out, err)

    code, out, err = await _cli(settings, org, "user", "set", ann, "--outgoing", "server_side_sync",
                                "--act", "server_side_sync")
    assert code == 0, (out, err)
    assert f"Test & Enable has not succeeded for outgoing (`conduit mailbox test-enable {ann}`)" in out, out
    assert "act (appointments, contacts and tasks) is not synchronized yet and has no Test & Enable" in out, out


# --- L7, L8, L14: bad input in one clear line -----------------------------------------------------------

async def test_an_empty_message_id_is_bad_input(settings: Settings, org: Organization) -> None:
    code, out, err = await _cli(settings, org, "message", "why", " ")
    assert code == 2 and err.strip() == ("error: the Message-ID is empty: give the one from the email's Message-ID "
                                         "header"), (out, err)


async def test_credentials_for_an_unknown_mailbox_say_no_mailbox(
        settings: Settings, org: Organization, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDUIT_MAILBOX_SECRET", "")   # what --password-stdin reads from an empty input
    code, out, err = await _cli(settings, org, "mailbox", "set-credentials", "nobody@example.com")
    assert code == 2 and err.strip() == "error: no mailbox 'nobody@example.com' (see `conduit mailbox list`)", (out, err)


async def test_email_on_add_says_the_address_is_the_argument(settings: Settings, org: Organization) -> None:
    code, out, err = await _cli(settings, org, "queue", "add", "Support", "--email", "x@example.com")
    # (Run as `python -m conduit` here, which the command names itself.)
    assert code == 2 and re.fullmatch(r"error: no such option: --email: the address is the argument, "
                                      r"`(python -m )?conduit queue add ADDRESS --name NAME`", err.strip()), (out, err)


# --- L12, L13: help and times ------------------------------------------------------------------------------

def test_profile_help_says_what_the_options_do() -> None:
    assert ("--same-outgoing-settings / --separate-outgoing-settings Use the incoming settings for outgoing too: "
            "the incoming credentials, and the incoming host when no --outgoing-host is given.") in _help("profile", "add")
    help_ = _help("profile", "set")
    for option in ("--incoming-host", "--incoming-port", "--incoming-tls", "--outgoing-host", "--outgoing-port",
                   "--outgoing-tls", "--oauth-token-url", "--oauth-client-id", "--oauth-scope", "--tls-ca-file",
                   "--same-outgoing-settings / --separate-outgoing-settings"):
        assert re.search(re.escape(option) + r" (<[^>]+> )?[A-Z]", help_), (option, help_)


async def test_mailbox_show_gives_the_back_off_in_utc(settings: Settings, registry: Registry, org: Organization) -> None:
    sender = await sending_mailbox(registry, org, host=LOOPBACK, port=9)
    await registry.record_failure(sender.mailbox_id, "outgoing", "connection_failed", "connection refused")
    code, out, err = await _cli(settings, org, "mailbox", "show", sender.email)
    assert code == 0 and re.search(r"backing off until \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(`conduit mailbox "
                                   r"test-enable` tries now\)", out), (out, err)
