"""`conduit` as a user runs it, for a profile's `--stop-after-refused-logins`: set, shown, turned off,
refused in one line when out of range; and a mailbox direction stopped after refused sign-ins, as
`mailbox show`, `mailbox list` and `mailbox set-credentials` tell it."""
from __future__ import annotations

import json
import uuid

import pytest

from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.cli import conduit_cli

pytestmark = pytest.mark.peers


def _ok(settings: Settings, org):
    """``conduit ... --org ORG`` as a user runs it, which must succeed: its output."""
    async def ok(*args: str) -> str:
        code, out, err = await conduit_cli(settings, *args, "--org", org.name)
        assert code == 0, err
        return out
    return ok


async def test_the_option_is_set_shown_and_turned_off(settings: Settings, org) -> None:
    ok = _ok(settings, org)

    await ok("profile", "add", "corp", "--type", "imap", "--incoming-host", "127.0.0.1", "--incoming-port", "10143",
             "--incoming-tls", "none", "--stop-after-refused-logins", "3")
    assert json.loads(await ok("profile", "show", "corp", "--json"))["stop_after_refused_logins"] == 3
    assert "after 3 in a row, the direction stops until Test & Enable" in await ok("profile", "show", "corp")
    assert "stop after 3" in await ok("profile", "list")
    assert "changed: stop_after_refused_logins" in await ok("profile", "set", "corp", "--stop-after-refused-logins", "0")
    assert json.loads(await ok("profile", "show", "corp", "--json"))["stop_after_refused_logins"] is None
    assert "never (backs off and retries)" in await ok("profile", "show", "corp")
    assert "already so, nothing changed" in await ok("profile", "set", "corp", "--stop-after-refused-logins", "0")
    await ok("profile", "set", "corp", "--stop-after-refused-logins", "100")
    await ok("profile", "set", "corp", "--clear", "stop-after-refused-logins")
    assert json.loads(await ok("profile", "show", "corp", "--json"))["stop_after_refused_logins"] is None
    # Not given: never stop, as before the option existed.
    await ok("profile", "add", "plain", "--type", "imap", "--incoming-host", "127.0.0.1", "--incoming-port", "10143")
    assert json.loads(await ok("profile", "show", "plain", "--json"))["stop_after_refused_logins"] is None


@pytest.mark.parametrize("args", [
    ("profile", "add", "p", "--type", "imap", "--incoming-host", "h.example", "--incoming-port", "993",
     "--stop-after-refused-logins", "101"),
    ("profile", "add", "p", "--type", "imap", "--incoming-host", "h.example", "--incoming-port", "993",
     "--stop-after-refused-logins", "-1"),
    ("profile", "set", "existing", "--stop-after-refused-logins", "1000"),
])
async def test_an_out_of_range_limit_is_one_line(settings: Settings, registry: Registry, org, args) -> None:
    code, _, err = await conduit_cli(settings, "profile", "add", "existing", "--type", "imap", "--incoming-host",
                                     "h.example", "--incoming-port", "993", "--org", org.name)
    assert code == 0, err
    code, out, err = await conduit_cli(settings, *args, "--org", org.name)
    assert code != 0
    assert "--stop-after-refused-logins must be between 1 and 100 refused sign-ins, or 0 to never stop" in err, err
    assert "Traceback" not in err + out and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in await registry.profiles(org)] == ["existing"]
    assert (await registry.profile(org, "existing")).stop_after_refused_logins is None


async def test_a_stopped_direction_is_shown_as_stopped(settings: Settings, registry: Registry, org, monkeypatch) -> None:
    email = f"ann-{uuid.uuid4().hex[:6]}@example.com"

    ok = _ok(settings, org)

    await ok("profile", "add", "corp", "--type", "imap", "--incoming-host", "127.0.0.1", "--incoming-port", "10143",
             "--incoming-tls", "none", "--stop-after-refused-logins", "2")
    await ok("user", "add", email, "--name", "Ann")
    await ok("mailbox", "approve", email)
    mailbox = await registry.mailbox(org, email)
    await registry.record_test(mailbox.id, "incoming", True, "ok")
    refused = "The IMAP server 127.0.0.1 rejected the credentials"
    await registry.record_failure(mailbox.id, "incoming", "authentication_failed", refused)
    line = _line(await ok("mailbox", "show", email), "incoming ")
    assert "success; errors 1; refused sign-ins in a row 1; backing off until" in line, line
    await registry.record_failure(mailbox.id, "incoming", "authentication_failed", refused)

    shown = await ok("mailbox", "show", email)
    line = _line(shown, "incoming ")
    assert "failure: STOPPED at " in line and "UTC, not processed until Test & Enable succeeds" in line
    assert "stopped after 2 refused sign-ins in a row" in line
    assert "backing off" not in line
    assert f"`conduit mailbox set-credentials {email}`" in line
    assert f"`conduit mailbox test-enable {email} --direction incoming`" in line
    assert "error       incoming stopped_refused_logins: incoming stopped after 2 refused sign-ins in a row" in shown
    listed = _line(await ok("mailbox", "list"), email)
    assert "failure, stopped" in listed
    as_json = json.loads(await ok("mailbox", "show", email, "--json"))["incoming"]
    assert (as_json["status"], as_json["refused_logins"]) == ("failure", 2) and as_json["stopped_at"]

    monkeypatch.setenv("CONDUIT_MAILBOX_SECRET", "corrected")   # the command reads it from there
    out = await ok("mailbox", "set-credentials", email)
    assert (f"{email}: incoming stopped after refused sign-ins: not processed until "
            f"`conduit mailbox test-enable {email}` succeeds") in out


def _line(output: str, start: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(start))
