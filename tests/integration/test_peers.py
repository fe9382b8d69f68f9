"""The real peers start and speak their protocols: Dovecot, smtp-sink and the capture server.

Needs the Debian peers (scripts/install-peers.sh). Clients are the standard library's
imaplib, poplib and smtplib, so these tests check the launchers, not Conduit's own clients.
"""

from __future__ import annotations

import base64
import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conduit.peers import CaptureSmtpServer, Dovecot, SmtpSink
from conduit.peers.dovecot import DovecotError

pytestmark = pytest.mark.peers


def make_message(subject: str, key: str | None = None) -> bytes:
    extra = f"X-Conduit-Idempotency-Key: {key}\r\n" if key else ""
    return (
        f"From: sender@example.org\r\nTo: rcpt@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4()}@example.org>\r\n{extra}\r\nBody of {subject}.\r\n"
    ).encode()


def unique_address() -> str:
    return f"u{uuid.uuid4().hex[:10]}@example.com"


@pytest.fixture
def dovecot(tls_dovecot):
    """The session's TLS Dovecot (tests/integration/conftest.py); tests add their own users."""
    return tls_dovecot


@pytest.fixture
def user(dovecot) -> tuple[str, str]:
    address, password = unique_address(), "pw-" + uuid.uuid4().hex[:8]
    dovecot.add_user(address, password)
    return address, password


# -- Dovecot -------------------------------------------------------------------------------


async def test_imap_login_append_fetch(dovecot, user):
    address, password = user
    raw = make_message("append")
    uid = await dovecot.append(address, password, raw)
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login(address, password)
        imap.select("INBOX")
        typ, data = imap.uid("FETCH", str(uid), "(BODY.PEEK[])")
        assert typ == "OK"
        assert data[0][1] == raw
    assert dovecot.message_count(address) == 1


async def test_append_to_a_new_folder_creates_it(dovecot, user):
    address, password = user
    first = await dovecot.append(address, password, make_message("a"), folder="Sent Items")
    second = await dovecot.append(address, password, make_message("b"), folder="Sent Items")
    assert second == first + 1
    assert dovecot.message_count(address, "Sent Items") == 2


async def test_pop3_uidl_retr(dovecot, user):
    address, password = user
    raws = [make_message("pop one"), make_message("pop two")]
    assert dovecot.deliver_many(address, raws) == 2
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=10)
    try:
        pop.user(address)
        pop.pass_(password)
        _, listing, _ = pop.uidl()
        assert len(listing) == 2
        assert len({line.split()[1] for line in listing}) == 2  # distinct UIDLs
        _, lines, _ = pop.retr(1)
        assert b"\r\n".join(lines) + b"\r\n" in raws
    finally:
        pop.quit()


async def test_deliver_is_visible_over_imap_and_counted(dovecot, user):
    address, password = user
    dovecot.deliver(address, make_message("inbox"))
    dovecot.deliver_many(address, [make_message(f"archived {i}") for i in range(3)], "Archive")
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login(address, password)
        assert imap.select("INBOX")[1] == [b"1"]
        assert imap.select("Archive")[1] == [b"3"]
        # delete-after-processing: an expunge shows in message_count
        imap.store("1", "+FLAGS", r"(\Deleted)")
        imap.expunge()
    assert dovecot.message_count(address) == 1
    assert dovecot.message_count(address, "Archive") == 2


async def test_add_user_and_set_password_while_running(dovecot):
    address = unique_address()
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(address, "first")
    dovecot.add_user(address, "first")
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login(address, "first")
    # Same length, same second: only the forced mtime change makes Dovecot reread the file.
    dovecot.set_password(address, "secnd")
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(address, "first")
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        imap.login(address, "secnd")


async def test_tls_implicit_and_starttls_verify_the_certificate(dovecot, user, tls):
    address, password = user
    context = tls["client"]
    with imaplib.IMAP4_SSL(dovecot.host, dovecot.imaps_port, ssl_context=context) as imap:
        imap.login(address, password)
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port) as imap:
        assert "STARTTLS" in imap.capabilities
        imap.starttls(ssl_context=context)
        imap.login(address, password)
    pop = poplib.POP3_SSL(dovecot.host, dovecot.pop3s_port, context=context)
    pop.user(address)
    pop.pass_(password)
    pop.quit()
    pop = poplib.POP3(dovecot.host, dovecot.pop3_port)
    pop.stls(context=context)
    pop.user(address)
    pop.pass_(password)
    pop.quit()
    # A client that does not trust the test CA refuses the certificate.
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL(
            dovecot.host, dovecot.imaps_port, ssl_context=ssl.create_default_context()
        )


async def test_idle_push_arrives_after_append(dovecot, user):
    address, password = user
    with imaplib.IMAP4(dovecot.host, dovecot.imap_port, timeout=10) as imap:
        imap.login(address, password)
        imap.select("INBOX")
        tag = imap._new_tag()  # imaplib of Python 3.11 has no IDLE: speak it directly
        imap.send(tag + b" IDLE\r\n")
        assert imap.readline().startswith(b"+")
        started = time.monotonic()
        await dovecot.append(address, password, make_message("pushed"))
        lines = []
        while not any(re.match(rb"\* 1 EXISTS", line) for line in lines):
            lines.append(imap.readline())  # the socket timeout (10 s) is the deadline
        assert time.monotonic() - started < 5
        imap.send(b"DONE\r\n")
        while not imap.readline().startswith(tag):
            pass


async def test_second_instance_runs_beside_the_first(dovecot, tmp_path):
    async with Dovecot(tmp_path / "second") as other:
        assert other.imap_port not in (dovecot.imap_port, dovecot.pop3_port)
        assert other.imaps_port is None
        other.add_user("bob@example.com", "pw")
        other.deliver("bob@example.com", make_message("hi"))
        with imaplib.IMAP4(other.host, other.imap_port) as imap:
            imap.login("bob@example.com", "pw")
            assert imap.select("INBOX")[1] == [b"1"]
        assert "STARTTLS" not in imap.capabilities
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((other.host, other.imap_port), timeout=2)


async def test_start_failure_reports_the_log(tmp_path):
    server = Dovecot(tmp_path / "bad", tls_cert=tmp_path / "missing.pem", tls_key=tmp_path / "k")
    with pytest.raises(DovecotError, match="missing.pem"):
        await server.start()
    await server.stop()


# -- smtp-sink -----------------------------------------------------------------------------


def test_smtp_sink_accepts_and_dumps(tmp_path):
    with SmtpSink(dump_dir=tmp_path / "dump") as sink:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("pipelining")
            for i in range(3):
                client.sendmail("a@example.org", ["b@example.com"], make_message(f"m{i}", f"k{i}"))
        deadline = time.monotonic() + 10
        while len(sink.dumped_messages()) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        keys = sorted(
            re.search(rb"X-Conduit-Idempotency-Key: (\S+)", m).group(1)
            for m in sink.dumped_messages()
        )
        assert keys == [b"k0", b"k1", b"k2"]


def test_smtp_sink_takes_smtp_source_load():
    with SmtpSink() as sink:
        result = subprocess.run(
            ["smtp-source", "-m", "200", "-s", "4", "-l", "1000", f"{sink.host}:{sink.port}"],
            capture_output=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr


# -- capture server ------------------------------------------------------------------------


def test_capture_stores_envelope_and_message(tmp_path):
    with CaptureSmtpServer(tmp_path / "store") as server:
        raw = make_message("captured", "key-1")
        with smtplib.SMTP(server.host, server.port, timeout=10) as client:
            client.ehlo()
            assert client.has_extn("pipelining")
            client.sendmail("from@example.org", ["a@example.com", "b@example.com"], raw)
        [message] = server.messages()
        assert message.raw == raw
        assert message.mail_from == "from@example.org"
        assert message.rcpt_tos == ("a@example.com", "b@example.com")
        assert message.login is None and not message.tls
        assert message.header("X-Conduit-Idempotency-Key") == "key-1"


def test_capture_auth_plain_login_xoauth2_after_starttls(tmp_path, tls):
    server = CaptureSmtpServer(
        tmp_path / "store",
        tls_cert=tls["cert"],
        tls_key=tls["key"],
        users={"alice": "secret"},
        xoauth2_tokens=["good-token"],
        require_auth=True,
    )
    with server:

        def connect() -> smtplib.SMTP:
            client = smtplib.SMTP(server.host, server.port, timeout=10)
            client.ehlo()
            assert not client.has_extn("auth")  # AUTH is offered only once encrypted
            client.starttls(context=tls["client"])
            client.ehlo()
            return client

        with connect() as client:
            with pytest.raises(smtplib.SMTPSenderRefused):  # 530: authentication required
                client.sendmail("alice@example.org", ["x@example.com"], make_message("no auth"))
        for mechanism in ("PLAIN", "LOGIN"):
            with connect() as client:
                assert mechanism in client.esmtp_features["auth"]
                client.user, client.password = "alice", "wrong"
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            with connect() as client:
                client.user, client.password = "alice", "secret"
                client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
                client.sendmail("alice@example.org", ["x@example.com"], make_message(mechanism))
        with connect() as client:
            bad = base64.b64encode(b"user=carol\x01auth=Bearer bad-token\x01\x01").decode()
            code, challenge = client.docmd("AUTH", f"XOAUTH2 {bad}")
            assert code == 334 and b"401" in base64.b64decode(challenge)
            assert client.docmd("")[0] == 535
        with connect() as client:
            good = base64.b64encode(b"user=carol\x01auth=Bearer good-token\x01\x01").decode()
            assert client.docmd("AUTH", f"XOAUTH2 {good}")[0] == 235
            client.sendmail("carol@example.org", ["x@example.com"], make_message("oauth"))
        stored = server.messages()
        assert [(m.login, m.tls) for m in stored] == [
            ("alice", True),
            ("alice", True),
            ("carol", True),
        ]


def test_capture_implicit_tls(tmp_path, tls):
    with CaptureSmtpServer(
        tmp_path / "store",
        tls_cert=tls["cert"],
        tls_key=tls["key"],
        implicit_tls=True,
        users={"alice": "secret"},
    ) as server:
        with smtplib.SMTP_SSL(
            server.host, server.port, context=tls["client"], timeout=10
        ) as client:
            client.ehlo()
            assert not client.has_extn("starttls")
            client.login("alice", "secret")
            client.sendmail("alice@example.org", ["x@example.com"], make_message("implicit"))
        [message] = server.messages()
        assert message.tls and message.login == "alice"


def test_capture_scripted_faults_in_a_separate_process(tmp_path):
    store = tmp_path / "store"
    with CaptureSmtpServer(store, separate_process=True) as server:
        assert server.pid is not None

        def send(subject: str) -> None:
            with smtplib.SMTP(server.host, server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], make_message(subject))

        server.fail_next(2, "451")
        for _ in range(2):
            with pytest.raises(smtplib.SMTPDataError) as failure:
                send("deferred")
            assert failure.value.smtp_code == 451
        # the command-line form of the control, as a test in another process would use it
        subprocess.run(
            [
                sys.executable,
                "-m",
                "conduit.peers.smtp",
                "fault",
                "--store",
                str(store),
                "--reply",
                "550",
                "--at",
                "rcpt",
            ],
            check=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            send("bounced")
        assert refused.value.recipients["b@example.com"][0] == 550
        server.fail_next(1, "550")
        with pytest.raises(smtplib.SMTPDataError) as failure:
            send("bounced at data")
        assert failure.value.smtp_code == 550
        server.fail_next(1, "drop")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            send("dropped")
        assert server.messages() == []
        server.fail_next(1, "store-drop")
        with pytest.raises(smtplib.SMTPServerDisconnected):
            send("stored then dropped")
        send("accepted")
        subjects = [m.header("Subject") for m in server.messages()]
        assert subjects == ["stored then dropped", "accepted"]
