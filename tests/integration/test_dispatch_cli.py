"""`conduit send` as a user runs it (a subprocess), against a running dispatch service and aiosmtpd."""
from __future__ import annotations

import json
import uuid

from conduit.peers.smtp import CaptureSmtpServer
from shared.rawstore import raw_sha256
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli as _cli
from tests.support.dispatch import dispatch, dispatch_running, finals, outbound, publish, sending_mailbox


async def test_conduit_send_waits_for_sent_and_a_replay_is_not_sent_again(
        settings: Settings, registry: Registry, org, publisher, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings):
            key = f"cli-{uuid.uuid4().hex[:8]}"
            args = ["send", "--org", org.name, "--from", sender.email, "--to", "someone@customer.example", "--subject", "From the CLI",
                    "--text", "Hello from conduit send.", "-H", "X-Source: cli", "--key", key, "--wait", "--json"]
            code, out, err = await _cli(settings, *args)
            assert code == 0, err
            status = json.loads(out)
            assert status["status"] == "sent" and status["idempotency_key"] == key and status["smtp_code"] == 250
            # The same key again: no second send, and its stored status at once (a wait for a status
            # that never comes would run into the test's own timeout).
            code, out, err = await _cli(settings, *args, "--timeout", "3600")
            assert code == 0, err
            assert json.loads(out)["message_id"] == status["message_id"]
            # Without --wait too: the stored status, not just the key of a request published again.
            code, out, err = await _cli(settings, *[a for a in args if a != "--wait"])
            assert code == 0 and json.loads(out)["status"] == "sent", (out, err)
            # Still its outcome once the mailbox may no longer send: not "dispatch would refuse it",
            # which would have the caller send it again under another key.
            await registry.record_test(sender.mailbox_id, "outgoing", False, "refused")
            code, out, err = await _cli(settings, *args, "--timeout", "3600")
            assert code == 0 and json.loads(out)["status"] == "sent", (out, err)
            await registry.record_test(sender.mailbox_id, "outgoing", True, "ok")
            # The same key for another email: refused before anything is published (dispatch would
            # dead-letter it as idempotency_key_reused), not answered with the first one's status.
            other = [a if a != "From the CLI" else "Another email" for a in args]
            code, out, err = await _cli(settings, *other)
            assert code == 2 and f"the key {key!r} is already used by a different request (sent)" in err, (out, err)
            # What dispatch would refuse is refused before anything is published.
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", "nobody@example.com", "--to", "x@example.com",
                                        "--wait", "--json")
            assert code == 2 and "dispatch would refuse this request (unknown_mailbox): no mailbox, user or queue " \
                                 "nobody@example.com" in err, (out, err)
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@example.com",
                                        "-H", "Bcc: evil@example.net")
            assert code == 2 and "(header_not_allowed): header 'Bcc' is not allowed" in err, (out, err)
            rejected = outbound(org, sender_email="nobody@example.com", to=["x@example.com"])   # another system's
            rejected_key = rejected.data.idempotency_key
            await publish(publisher, rejected)
            assert (await finals(settings, [rejected_key])).final(rejected_key).reason == "unknown_mailbox"

            # Where each request stands, as `conduit outbound` reads it from the send ledger.
            code, out, err = await _cli(settings, "outbound", "show", key, "--org", org.name, "--json")
            assert code == 0, err
            shown = json.loads(out)
            assert (shown["status"], shown["message_id"], shown["mailbox_email"], shown["to"]) == \
                ("sent", status["message_id"], sender.email, ["someone@customer.example"])
            assert shown["explanation"].startswith("Sent: the server accepted it")
            code, out, err = await _cli(settings, "outbound", "show", key, "--org", org.name)
            assert code == 0 and "Sent: the server accepted it" in out and "someone@customer.example" in out
            # "Why was it not tracked?" asked of an email Conduit sent: it says so, and names its activity.
            code, out, err = await _cli(settings, "message", "why", f"<{status['message_id']}>", "--org", org.name)
            assert code == 0 and out.startswith(f"sent by Conduit, not received: request {key} through {sender.email}. "
                                                "Sent: the server accepted it") and status["activity_id"] in out, (out, err)
            code, out, err = await _cli(settings, "outbound", "list", "--org", org.name, "--json")
            assert code == 0, err
            assert [(r["idempotency_key"], r["status"]) for r in json.loads(out)] == [(rejected_key, "rejected"), (key, "sent")]
            code, out, err = await _cli(settings, "outbound", "list", "--status", "rejected", "--org", org.name)
            assert code == 0 and "unknown_mailbox" in out and rejected_key in out and key not in out.replace(rejected_key, "")
            code, out, err = await _cli(settings, "outbound", "show", "no-such-key", "--org", org.name)
            assert code == 2 and "no request to send 'no-such-key'" in err and "Traceback" not in err
            code, out, err = await _cli(settings, "outbound", "list", "--status", "lost", "--org", org.name)
            assert code == 2 and "is not one of" in err and "Traceback" not in err
            # A request whose key is, by chance, that email's Message-ID does not hide the email.
            lookalike = outbound(org, sender_email="nobody@example.com", to=["x@example.com"],
                                 idempotency_key=status["message_id"])
            await publish(publisher, lookalike)
            assert (await finals(settings, [status["message_id"]])).final(status["message_id"]).reason == "unknown_mailbox"
            for asked in (status["message_id"], f"<{status['message_id']}>"):
                code, out, err = await _cli(settings, "message", "why", asked, "--org", org.name)
                assert code == 0 and out.startswith(f"sent by Conduit, not received: request {key} through"), (out, err)
        assert len(capture.messages()) == 1
        (message,) = capture.messages()
        assert message.header("X-Source") == "cli" and message.header("Subject").startswith("From the CLI CRM:")


async def test_a_failed_request_is_resent_once_under_a_new_key(settings: Settings, registry: Registry, org, tmp_path) -> None:
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings):
            key = f"resend-{uuid.uuid4().hex[:8]}"
            capture.fail_next(1, "550")
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "someone@customer.example",
                                        "--subject", "Second chance", "--text", "Hello again.", "-H", "X-Source: cli",
                                        "--key", key, "--wait", "--json")
            first = json.loads(out)
            assert code == 1 and (first["status"], first["smtp_code"]) == ("failed", 550), (out, err)

            code, out, err = await _cli(settings, "outbound", "resend", key, "--org", org.name, "--wait", "--json")
            assert code == 0, err
            resent = json.loads(out)
            assert (resent["status"], resent["idempotency_key"]) == ("sent", f"{key}.resend")
            assert resent["message_id"] != first["message_id"]

            # A second resend answers with where the first stands (exit 0: it was sent) and publishes
            # nothing; a resend of what was sent is refused.
            code, out, err = await _cli(settings, "outbound", "resend", key, "--org", org.name, "--json")
            assert code == 0 and json.loads(out)["message_id"] == resent["message_id"], (out, err)
            for ref, says in [(f"{key}.resend", "sending it again would deliver it twice"),
                              ("no-such-key", "no request to send 'no-such-key'")]:
                code, out, err = await _cli(settings, "outbound", "resend", ref, "--org", org.name)
                assert code == 2 and says in err and "Traceback" not in err, (ref, err)
        (message,) = capture.messages()
        assert message.header("X-Source") == "cli" and message.header("Subject").startswith("Second chance")
        assert message.header("Message-ID").strip("<>") == resent["message_id"]


async def test_conduit_send_attaches_files_small_inline_and_large_by_reference(
        settings: Settings, registry: Registry, org, tmp_path) -> None:
    from email import message_from_bytes, policy

    small, large = tmp_path / "note.txt", tmp_path / "scan.pdf"
    small.write_text("a short note\n")
    large.write_bytes(b"%PDF-1.4 " + bytes(range(256)) * 1500)   # ~384 KB: over the inline limit
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings):
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                        "--subject", "Files", "--text", "See attached.", "--attach", str(small),
                                        "--attach", str(large), "--wait", "--json")
            assert code == 0 and json.loads(out)["status"] == "sent", (out, err)
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                        "--attach", str(tmp_path / "missing.pdf"))
            assert code == 2 and "missing.pdf" in err and "Traceback" not in err, err
            # The record it regards, named by its address as folder rules name it; and errors in
            # the options' words, not the request's field names.
            acme = await registry.add_record(org, "account", "Acme", f"info@acme-{uuid.uuid4().hex[:6]}.example")
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                        "--regarding", f"account:{acme.email.upper()}", "--wait", "--json")
            assert code == 0, (out, err)
            assert (await registry.activity(org, json.loads(out)["activity_id"])).regarding_id == acme.id
            for args, says in [(("--from", sender.email, "--regarding", "account:nobody@nowhere.example"),
                                "no account 'nobody@nowhere.example'"),
                               (("--from", sender.email, "--to", "not-an-address"), "error: --to: "),
                               (("--to", "x@customer.example",), "error: one of --mailbox and --from is required")]:
                code, out, err = await _cli(settings, "send", "--org", org.name, "--to", "x@customer.example", *args)
                assert code == 2 and says in err, (args, err)
                assert "Traceback" not in err and "sender_email" not in err and "to.0" not in err, err
        message = next(m for m in capture.messages() if m.header("Subject").startswith("Files"))
    parts = {p.get_filename(): (p.get_content_type(), p.get_content())
             for p in message_from_bytes(message.raw, policy=policy.default).iter_attachments()}
    assert parts == {"note.txt": ("text/plain", "a short note\n"), "scan.pdf": ("application/pdf", large.read_bytes())}


async def test_send_wait_reports_this_requests_status_not_an_earlier_one_for_the_key(
        settings: Settings, registry: Registry, org, publisher, tmp_path) -> None:
    """A key whose earlier request was rejected may be requested again (once the mailbox is mended,
    say); `--wait` must not take the earlier `rejected` for the new request's outcome.  Tansu's end
    offset for a partition can fall inside its last record batch, so a follower that starts there
    re-reads the batch's later records: here the earlier request's `pending_send` and `rejected`."""
    from services.dispatch.ledger import status_event
    from shared.events.payloads import EmailStatusV1

    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        key = f"again-{uuid.uuid4().hex[:8]}"
        earlier = [status_event(org.id, EmailStatusV1(idempotency_key=key, status=s, reason=r), "an-earlier-request")
                   for s, r in (("pending_send", None), ("rejected", "email_not_approved"))]
        await publisher.publish_many([(topic, event.model_dump_json().encode(), k) for topic, k, event in earlier])
        async with dispatch_running(settings):
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "b@customer.example",
                                        "--subject", "Again", "--text", "Mended.", "--key", key, "--wait", "--json")
        assert code == 0 and json.loads(out)["status"] == "sent", (out, err)
        assert len(capture.messages()) == 1


async def test_conduit_send_wait_shows_each_retry_and_where_the_request_stands_at_its_timeout(
        settings: Settings, registry: Registry, org, tmp_path) -> None:
    """A server answering 451: `--wait` says so as each attempt fails (on stderr), and a wait that ends
    first says where the request stands in the send ledger, not that dispatch may not be running."""
    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        capture.fail_next(100, "451")
        async with dispatch_running(settings):
            key = f"retry-{uuid.uuid4().hex[:8]}"
            code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to",
                                        "x@customer.example", "--subject", "Retried", "--key", key, "--wait", "--timeout", "15")
    assert code == 1 and out.strip() == key, (out, err)
    assert f"{key}: pending send, after attempt 1 failed (smtp_temporary): SMTP 451" in err, err
    assert "no final status within 15 s: the send ledger says: Waiting to be sent at" in err and "451" in err.splitlines()[-1], err
    assert "is the dispatch service running" not in err and "Traceback" not in err


async def test_another_system_stores_a_large_attachment_then_refers_to_it(
        settings: Settings, registry: Registry, org, publisher, tmp_path) -> None:
    """`conduit outbound store` prints the SHA-256 an email.outbound request names the stored content
    by; the request published afterwards (not by the CLI) is sent with it."""
    from email import message_from_bytes, policy

    large = tmp_path / "contract.pdf"
    large.write_bytes(b"%PDF-1.4 " + uuid.uuid4().bytes * 40_000)   # 640 KB
    code, out, err = await _cli(settings, "outbound", "store", str(large), "--json")
    assert code == 0, err
    (stored,) = json.loads(out)
    assert (stored["size"], len(stored["content_sha256"])) == (large.stat().st_size, 64)
    code, again, err = await _cli(settings, "outbound", "store", str(large), "--json")
    assert code == 0 and json.loads(again) == [stored], "content-addressed: stored once"
    code, out, err = await _cli(settings, "outbound", "store", str(tmp_path / "missing.pdf"))
    assert code == 2 and "missing.pdf" in err and "Traceback" not in err, err

    with CaptureSmtpServer(tmp_path / "capture") as capture:
        sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
        async with dispatch_running(settings):
            request = outbound(org, sender_email=sender.email, attachments=[
                {"filename": "contract.pdf", "content_type": "application/pdf", "content_sha256": stored["content_sha256"]}])
            await publish(publisher, request)
            key = request.data.idempotency_key
            assert (await finals(settings, [key])).final(key).status == "sent"
        (message,) = capture.messages()
    (part,) = message_from_bytes(message.raw, policy=policy.default).iter_attachments()
    assert (part.get_filename(), part.get_content()) == ("contract.pdf", large.read_bytes())


async def test_conduit_send_refuses_an_empty_blank_or_multi_line_key(settings: Settings, registry: Registry, org) -> None:
    """One line, nothing published: an empty key used to mean a random one (a retry would send twice)."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=9)   # never reached: nothing is sent
    for key, says in [("", "--key is empty"), ("   ", "--key is empty"), ("k-1\r\nBcc: a@evil.example", "control character"),
                      ("k\x1b[2J", "control character"), (" k-2", "begins or ends with whitespace")]:
        code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                    "--key", key)
        assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1, (key, out, err)


async def test_conduit_send_from_a_user_without_a_mailbox_says_so(settings: Settings, registry: Registry, org) -> None:
    """Not "no mailbox, user or queue": the user is there, and looking for a typo would not help."""
    carl = f"carl-{uuid.uuid4().hex[:8]}@example.com"
    await registry.add_user(org, "Carl", carl, incoming="none", outgoing="none", act="none")
    code, out, err = await _cli(settings, "send", "--org", org.name, "--from", carl, "--to", "x@customer.example")
    assert code == 2 and f"(unknown_mailbox): the user {carl} exists but has no mailbox (added with incoming none, " \
                         "outgoing none)" in err and "`conduit mailbox list`" in err, (out, err)
    assert len(err.strip().splitlines()) == 1, err


async def test_conduit_send_refuses_an_email_over_the_size_limit_before_storing_its_attachment(
        settings: Settings, registry: Registry, org, pool, tmp_path) -> None:
    """Not stored in the raw store (30 MB in PostgreSQL for nothing), then rejected by dispatch."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=9)   # never reached: nothing is sent
    big = tmp_path / "big.bin"
    big.write_bytes(uuid.uuid4().bytes * (30 * 2**20 // 16))   # 30 MB, of this test's own content
    code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                "--attach", str(big))
    assert code == 2 and out == "" and "over dispatch's size limit of 25.0 MB (26214400 bytes, " \
                                       "CONDUIT_DISPATCH_MAX_MESSAGE_BYTES as this environment sets it)" in err, (out, err)
    assert len(err.strip().splitlines()) == 1, err
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM raw_message WHERE sha256 = $1", raw_sha256(big.read_bytes())) == 0


async def test_outbound_list_shows_the_subject_of_a_rejected_request(settings: Settings, org, publisher) -> None:
    """A rejected request was never sent, so it has no subject "as sent": the one it asked for is shown."""
    rejected = outbound(org, sender_email="nobody@example.com", subject="Quote for Bea")
    key = rejected.data.idempotency_key
    await publish(publisher, rejected)
    await dispatch(settings)
    code, out, err = await _cli(settings, "outbound", "list", "--status", "rejected", "--org", org.name)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if key in line]
    assert "unknown_mailbox" in row and "Quote for Bea" in row, out
    code, out, err = await _cli(settings, "outbound", "show", key, "--org", org.name, "--json")
    assert code == 0 and json.loads(out)["subject"] == "Quote for Bea", (out, err)


async def test_a_bad_dispatch_setting_in_the_senders_shell_does_not_stop_conduit_send(
        settings: Settings, registry: Registry, org, monkeypatch) -> None:
    """The size pre-check reads dispatch's limit from this shell; another wrong CONDUIT_DISPATCH_*
    value there is dispatch's to report where it runs, not a reason to refuse the email."""
    sender = await sending_mailbox(registry, org, host="127.0.0.1", port=9)   # nothing is sent: no dispatch runs
    monkeypatch.setenv("CONDUIT_DISPATCH_RETRY_BASE_SECONDS", "0")
    code, out, err = await _cli(settings, "send", "--org", org.name, "--from", sender.email, "--to", "x@customer.example",
                                "--key", f"shell-{uuid.uuid4().hex}", "--text", "hi")
    assert code == 0 and "shell-" in out, (out, err)
