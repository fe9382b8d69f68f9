"""`conduit message why` as a user runs it (a subprocess), for an email Conduit sent: the request it
was sent for (idempotency key, status, when), its outgoing activity and what that regards, in the
text and in `--json`; beside the decisions when a mailbox Conduit processes received it too; and a
clear error, exit code 1, for a Message-ID Conduit knows nothing of.  Against a running dispatch,
aiosmtpd, the broker, PostgreSQL and, for the received copy, Dovecot with ingest and evaluate."""
from __future__ import annotations

import json
import uuid

import pytest

from conduit.peers.smtp import CaptureSmtpServer
from services.evaluate.service import EvaluateService
from services.ingest.service import IngestService
from shared.lifecycle import run_service
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli
from tests.support.dispatch import dispatch_running, sending_mailbox
from tests.support.mailboxes import imap_profile, ready_mailbox


async def _send(settings: Settings, org, sender: str, to: str, key: str, *extra: str) -> dict:
    code, out, err = await conduit_cli(settings, "send", "--org", org.name, "--from", sender, "--to", to,
                                       "--subject", "Your quote", "--text", "Here it is.", "--key", key,
                                       "--wait", "--json", *extra)
    assert code in (0, 1), (out, err)
    return json.loads(out)


async def _why(settings: Settings, org, message_id: str, *args: str) -> tuple[int, str, str]:
    return await conduit_cli(settings, "message", "why", f"<{message_id}>", "--org", org.name, *args)


async def test_why_explains_an_email_conduit_sent_and_one_it_could_not_send(
        settings: Settings, registry: Registry, org, tmp_path) -> None:
    acme = await registry.add_record(org, "account", "Acme", "info@acme.example")
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings):
            key = f"why-{uuid.uuid4().hex[:8]}"
            sent = await _send(settings, org, sender.email, "buyer@customer.example", key,
                               "--regarding", f"account:{acme.id}")
            assert sent["status"] == "sent" and sent["activity_id"], sent
            capture.fail_next(1, "550")
            refused_key = f"why-{uuid.uuid4().hex[:8]}"
            refused = await _send(settings, org, sender.email, "nobody@customer.example", refused_key)
            assert refused["status"] == "failed" and refused["message_id"], refused

    code, out, err = await _why(settings, org, sent["message_id"], "--json")
    assert code == 0, (out, err)
    [answer] = json.loads(out)
    assert answer["kind"] == "sent" and answer["message_id"] == sent["message_id"], answer
    assert (answer["idempotency_key"], answer["status"], answer["mailbox_email"]) == (key, "sent", sender.email)
    assert answer["sent_at"] and answer["explanation"].startswith("Sent: the server accepted it at "), answer
    assert answer["activity_id"] == sent["activity_id"]
    assert answer["regarding"] == {"kind": "account", "id": str(acme.id)}
    assert (answer["activity"]["id"], answer["activity"]["direction"]) == (sent["activity_id"], "outgoing")
    assert answer["request"]["to"] == ["buyer@customer.example"] and answer["request"]["smtp_code"] == 250

    code, out, err = await _why(settings, org, sent["message_id"])
    assert code == 0, (out, err)
    [line] = out.splitlines()
    assert line.startswith(f"sent by Conduit, not received: request {key} through {sender.email}. "
                           "Sent: the server accepted it at "), line
    assert line.endswith(f"Its outgoing activity: {sent['activity_id']}, regarding account {acme.id}."), line

    # Asked to send, and not sent: it says so, not "sent by Conduit".
    code, out, err = await _why(settings, org, refused["message_id"], "--json")
    assert code == 0, (out, err)
    [answer] = json.loads(out)
    assert (answer["kind"], answer["idempotency_key"], answer["status"]) == ("sent", refused_key, "failed")
    assert answer["sent_at"] is None and answer["activity"] is None and answer["regarding"] is None
    code, out, err = await _why(settings, org, refused["message_id"])
    assert code == 0 and out.startswith(f"an email Conduit was asked to send (failed), not received: request "
                                        f"{refused_key} through {sender.email}. Failed ("), (out, err)


async def test_why_explains_an_email_conduit_sent_that_a_processed_mailbox_received_too(
        settings: Settings, registry: Registry, org, dovecot, tmp_path) -> None:
    """Sent by one user to another whose mailbox Conduit processes: the recipient's decision and the send."""
    await registry.add_profile(org, imap_profile(dovecot))
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        recipient = await ready_mailbox(registry, org, dovecot, tracking="all", profile="dovecot-imap")
        async with dispatch_running(settings):
            key = f"why-{uuid.uuid4().hex[:8]}"
            sent = await _send(settings, org, sender.email, recipient.email, key)
        [copy] = capture.messages()
    dovecot.deliver(recipient.email, copy.raw)   # what the recipient's server does with it
    await run_service(IngestService(settings), burst=True)
    await run_service(EvaluateService(settings), burst=True)

    code, out, err = await _why(settings, org, sent["message_id"], "--json")
    assert code == 0, (out, err)
    decision, send = json.loads(out)
    assert (decision["kind"], decision["mailbox_email"], decision["reason"]) == \
        ("decision", recipient.email, "already_tracked"), decision
    assert decision["activity_id"] == sent["activity_id"]
    assert (send["kind"], send["idempotency_key"], send["activity_id"]) == ("sent", key, sent["activity_id"])
    code, out, err = await _why(settings, org, sent["message_id"])
    assert code == 0, (out, err)
    received, sent_line = out.splitlines()
    assert received.startswith(f"{recipient.email}: tracked [already_tracked"), received
    assert sent_line.startswith(f"sent by Conduit: request {key} through {sender.email}. Sent: "), sent_line
    assert sent_line.endswith(f"Its outgoing activity: {sent['activity_id']}, regarding no record."), sent_line


@pytest.mark.parametrize("as_json", [False, True])
async def test_why_says_clearly_that_it_knows_no_such_message(settings: Settings, org, as_json: bool) -> None:
    unknown = f"never-{uuid.uuid4().hex[:8]}@nowhere.example"
    code, out, err = await _why(settings, org, unknown, *(["--json"] if as_json else []))
    assert code == 1, (out, err)
    assert err.startswith(f"error: no message <{unknown}> is known in organization {org.name}: ") and \
        "Conduit did not send it" in err and "Traceback" not in err, err
    assert (json.loads(out) == []) if as_json else out == "", out
    assert "no dead letter of it was found" in err, err


async def test_why_does_not_claim_no_dead_letter_when_it_could_not_read_them(settings: Settings, org) -> None:
    unknown = f"never-{uuid.uuid4().hex[:8]}@nowhere.example"
    no_broker = settings.model_copy(update={"kafka_bootstrap_servers": "127.0.0.1:9"})   # nothing listens there
    code, out, err = await _why(no_broker, org, unknown)
    assert code == 1 and "the dead letters could not be read (" in err, (out, err)
    assert "no dead letter of it was found" not in err and "Traceback" not in err, err
