"""The `conduit` command as a user runs it: one-line errors, --json, and secrets never shown."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "Pa55-w0rd-" + uuid.uuid4().hex


@pytest.fixture
def cli(base_settings: Settings):
    org = f"cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "CONDUIT_STATE_DIR": str(base_settings.state_dir), "CONDUIT_LOG_LEVEL": "DEBUG",
           "KAFKA_BOOTSTRAP_SERVERS": base_settings.kafka_bootstrap_servers or ""}
    env.pop("DATABASE_URL", None)

    def run(*args: str, stdin: str | None = None, org_scoped: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "conduit", *args] + (["--org", org] if org_scoped else [])
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, env={**env, **(extra_env or {})}, cwd=ROOT, timeout=60)

    assert run("org", "add", org, org_scoped=False).returncode == 0
    return run


def test_registry_round_trip_and_secrets_never_printed(cli) -> None:
    outputs = []

    def ok(*args: str, **kw) -> str:
        result = cli(*args, **kw)
        outputs.append(result.stdout + result.stderr)
        assert result.returncode == 0, result.stderr
        return result.stdout

    ok("profile", "add", "corp", "--type", "imap", "--incoming-host", "127.0.0.1", "--incoming-port", "10143",
       "--incoming-tls", "none", "--outgoing-port", "10025", "--outgoing-tls", "none",
       "--auth", "profile_impersonation", "--profile-user", "svc@example.com", extra_env={"CONDUIT_PROFILE_SECRET": SECRET})
    ok("user", "add", "ann@example.com", "--name", "Ann")
    ok("queue", "add", "support@example.com", "--name", "Support")
    ok("mailbox", "set-credentials", "ann@example.com", "--password-stdin", stdin=SECRET + "\n")
    assert ok("mailbox", "approve", "ann@example.com").strip() == "ann@example.com: email address approved"
    assert ok("mailbox", "approve", "ann@example.com").strip() == \
        "ann@example.com: email address approved already; nothing changed"
    ok("record", "add", "contact", "bea@customer.example", "--name", "Bea")
    mailboxes = json.loads(ok("mailbox", "list", "--json"))
    assert {m["email"] for m in mailboxes} == {"ann@example.com", "support@example.com"}
    shown = json.loads(ok("mailbox", "show", "ann@example.com", "--json"))
    assert shown["has_credentials"] and shown["email_approved"] and shown["profile_name"] == "corp"
    assert shown["sync"] == {"worked_by": None, "lease_expires_at": None, "folders": [], "pop3_seen": 0,
                             "ingested": 0, "last_ingested_at": None, "held": 0, "held_since": None, "held_for": None}
    assert "no ingest replica holds it now" in ok("mailbox", "show", "ann@example.com")
    profile = json.loads(ok("profile", "show", "corp", "--json"))
    assert profile["is_default"] and profile["has_profile_secret"]
    assert "max_concurrent_connections" in ok("profile", "set", "corp", "--max-connections", "4", "--new-profile-secret",
                                              extra_env={"CONDUIT_PROFILE_SECRET": SECRET + "-rotated"})
    assert json.loads(ok("profile", "show", "corp", "--json"))["max_concurrent_connections"] == 4
    ok("profile", "set", "corp", "--received-after", "2026-01-01T00:00:00+00:00")
    ok("profile", "set", "corp", "--clear", "received-after")
    assert json.loads(ok("profile", "show", "corp", "--json"))["process_email_received_after"] is None
    assert "profile corp: already so, nothing changed" in ok("profile", "set", "corp", "--clear", "received-after")
    # A setting that follows another is named too: the outgoing host follows the incoming one.
    assert "changed: incoming_host, outgoing_host" in ok("profile", "set", "corp", "--incoming-host", "localhost")
    convert = cli("mailbox", "configure", "ann@example.com", "--convert")
    assert convert.returncode == 2 and "only a queue's mailbox converts" in convert.stderr
    nothing = cli("mailbox", "configure", "ann@example.com")
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    assert "ann@example.com: already so, nothing changed" in ok("mailbox", "configure", "ann@example.com",
                                                                "--tracking", shown["tracking"])
    for verb in (("profile", "list"), ("user", "list"), ("queue", "list"), ("record", "list"), ("activity", "list")):
        ok(*verb)
        ok(*verb, "--json")
    # Test & Enable reaches for a server that is not there: a clear failure, still no secret.
    failed = cli("mailbox", "test-enable", "ann@example.com")
    outputs.append(failed.stdout + failed.stderr)
    assert failed.returncode == 1 and "failure" in failed.stdout
    quiet = cli("mailbox", "test-enable", "ann@example.com", extra_env={"CONDUIT_LOG_LEVEL": "WARNING"})
    assert quiet.returncode == 1 and "incoming  failure" in quiet.stdout
    assert "test_failed" not in quiet.stderr, quiet.stderr   # said once, not again as a log line
    for text in outputs:
        assert SECRET not in text


@pytest.mark.parametrize("args, message", [
    (("user", "add", "not-an-address", "--name", "X"), "not a valid email address"),
    (("profile", "show", "missing"), "no email server profile"),
    (("mailbox", "show", "nobody@example.com"), "no mailbox"),
    (("mailbox", "approve", "nobody@example.com"), "no mailbox"),
    (("profile", "add", "p", "--type", "imap"), "incoming-host"),
    (("profile", "add", "p", "--type", "imap", "--incoming-host", "h.example", "--incoming-port", "0"),
     "--incoming-port must be between 1 and 65535"),
    (("profile", "add", "p", "--type", "imap", "--incoming-host", "h.example", "--incoming-port", "993",
      "--auth", "profile_impersonation"), "no profile password: set CONDUIT_PROFILE_SECRET"),
    (("profile", "set", "missing", "--max-connections", "2"), "no email server profile"),
    (("profile", "set", "missing", "--clear", "name"), "cannot clear name"),
    (("mailbox", "configure", "nobody@example.com", "--tracking", "all"), "no mailbox"),
    (("user", "add", "eve@example.com", "--name", "Eve =?utf-8?q?x=0D=0ABcc:_a@evil.example?="), "line breaks"),
    (("queue", "add", "q@example.com", "--name", "Q\u2028Bcc: a@evil.example"), "line breaks"),
    (("profile", "add", "ews", "--type", "exchange_server", "--service-url", "http://mail.example.com/EWS/Exchange.asmx"),
     "must be an https:// URL"),
    (("org", "set-correlation", "--token-prefix", ""), "tracking token prefix"),
    (("org", "set-correlation"), "nothing to change"),
    (("org", "set-correlation", "--order", ""), "correlation order must list"),
    (("org", "set-correlation", "--token-prefix", "CRM 1"), "tracking token prefix"),
    (("org", "set-correlation", "--token-prefix", "1234"), "tracking token prefix"),
    (("org", "set-correlation", "--smart-matching-min-recipients", "0"), "between 1 and 50"),
])
def test_bad_input_is_one_line_and_non_zero(cli, args, message) -> None:
    result = cli(*args, extra_env={"CONDUIT_LOG_LEVEL": "WARNING"})
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_bad_service_setting_or_database_url_is_one_line_not_a_traceback(cli) -> None:
    """Settings a service reads as it starts (``CONDUIT_DISPATCH_*``), and a DATABASE_URL asyncpg
    cannot parse: one line, and the URL's password never in it."""
    result = cli("run", "dispatch", org_scoped=False,
                 extra_env={"CONDUIT_DISPATCH_WAVE_SIZE": "abc", "CONDUIT_LOG_LEVEL": "WARNING"})
    assert result.returncode == 2 and "bad setting wave_size (DispatchSettings)" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout and len(result.stderr.strip().splitlines()) == 1
    # A port that is no number; a password with '/' or '?' not percent-encoded (its rest read as the
    # port, or as a query field, which asyncpg's own message would quote).
    for url in ("postgresql://bob:s3cret-pw@127.0.0.1:notaport/db", "postgresql://bob:s3cret/pw@127.0.0.1:5432/db",
                "postgresql://bob:s3cret?pw@127.0.0.1:5432/db", "postgresql://bob:s3cret-pw@127.0.0.1:99999/db"):
        result = cli("outbound", "list", extra_env={"DATABASE_URL": url, "CONDUIT_LOG_LEVEL": "WARNING"})
        assert result.returncode == 2 and "DATABASE_URL is not a PostgreSQL URL" in result.stderr, result.stderr
        output = result.stderr + result.stdout
        assert "Traceback" not in output and "s3cret" not in output and "pw@" not in output, output


def test_an_out_of_range_option_is_a_usage_error_not_a_traceback(cli) -> None:
    for args in (("activity", "list", "--limit", "-1"), ("send", "--to", "x@example.com", "--wait", "--timeout", "-1")):
        result = cli(*args)
        assert result.returncode == 2 and "greater than or equal to 1" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout


def test_a_command_outside_the_stacks_folder_does_not_make_a_new_registry(cli, tmp_path) -> None:
    """Run where no `conduit up` ever ran (no CONDUIT_STATE_DIR, another folder): said so, and no
    new, empty database that would answer as if everything were gone."""
    elsewhere = tmp_path / "elsewhere"
    for args in (("profile", "list"), ("outbound", "list"), ("dead-letters", "list")):
        result = cli(*args, org_scoped=args[0] != "dead-letters", extra_env={"CONDUIT_STATE_DIR": str(elsewhere)})
        assert result.returncode == 2 and f"no Conduit state in {elsewhere}" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (elsewhere / "postgres").exists()
    assert cli("db", "migrate", org_scoped=False, extra_env={"CONDUIT_STATE_DIR": str(elsewhere)}).returncode == 0
    assert cli("profile", "list", extra_env={"CONDUIT_STATE_DIR": str(elsewhere)}).returncode == 2   # no such org there


def test_second_user_with_same_address_and_missing_credentials(cli) -> None:
    assert cli("user", "add", "dup@example.com", "--name", "A").returncode == 0
    dup = cli("user", "add", "DUP@example.com", "--name", "B")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    no_secret = cli("mailbox", "set-credentials", "dup@example.com", stdin="")
    assert no_secret.returncode == 2 and "CONDUIT_MAILBOX_SECRET" in no_secret.stderr


def test_rules_list_shows_each_tracking_options_chain(cli) -> None:
    chains = json.loads(cli("rules", "list", "--json", org_scoped=False).stdout)
    assert set(chains) == {"all", "responses", "known_records", "email_enabled_records"}
    responses = [r["rule"] for r in chains["responses"]]
    assert responses[0] == "mailbox_inactive" and responses[-1] == "no_correlation_match"
    # Every reason `conduit message why` can print is explained by some rule here.
    assert "sender_unknown" in {reason for rules in chains.values() for r in rules for reason in r["reasons"]}
    bad = cli("rules", "list", "--option", "nope", org_scoped=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: unknown tracking option")


def test_a_profile_that_would_send_passwords_in_clear_is_added_with_a_warning(cli) -> None:
    """No TLS to a host beyond the loopback: allowed (a relay inside the organization), but said."""
    quiet = {"CONDUIT_LOG_LEVEL": "WARNING"}
    result = cli("profile", "add", "plain", "--type", "imap", "--incoming-host", "imap.example.com", "--incoming-port", "143",
                 "--incoming-tls", "none", "--outgoing-host", "smtp.example.com", "--outgoing-port", "587",
                 "--outgoing-tls", "starttls", "--separate-outgoing-settings", extra_env=quiet)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "warning: profile plain reaches imap.example.com:143 without TLS: passwords and tokens would cross the network "
        "in clear (--incoming-tls / --outgoing-tls starttls or implicit)"]
    result = cli("profile", "set", "plain", "--incoming-tls", "starttls", extra_env=quiet)
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_a_command_run_from_another_directory_does_not_start_a_new_registry(tmp_path) -> None:
    """The state folder is ./.conduit by default: run elsewhere, a command would work on a new, empty
    registry, as if everything were gone; it says where it looked and what to do instead."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONDUIT_", "DATABASE_URL", "KAFKA_"))}
    env |= {"PYTHONPATH": str(ROOT), "CONDUIT_LOG_LEVEL": "WARNING"}
    note = tmp_path / "note.txt"
    note.write_text("hello\n")
    result = subprocess.run([sys.executable, "-m", "conduit", "outbound", "store", str(note)], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: no Conduit state in {tmp_path / '.conduit'}: set CONDUIT_STATE_DIR"), \
        result.stderr
    assert not (tmp_path / ".conduit" / "postgres").exists()
