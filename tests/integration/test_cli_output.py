"""What `conduit` prints, as a user reads it: help at 80 columns, usage errors, tables in a terminal
and in a pipe, a reader that goes away, and the README's list of verbs.

Each case runs the real command (a subprocess), into a pipe or a pseudo-terminal of a given width,
against the session's embedded PostgreSQL and broker where it needs them.
"""
from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import uuid
from pathlib import Path

import pytest
import typer.main

from conduit.cli import app
from shared.registry.models import Organization
from shared.settings import Settings
from tests.support.cli import conduit_cli

ROOT = Path(__file__).resolve().parents[2]


def _commands(command=None, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    """Every command of the app (the leaves of its tree), with its path: ("profile", "add")."""
    command = command or typer.main.get_command(app)
    subs = getattr(command, "commands", None)
    if not subs:
        return [(path, command)]
    return [found for name, sub in subs.items() for found in _commands(sub, (*path, name))]


def _options(command) -> list[str]:
    return [o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]


def _env(settings: Settings | None = None, **extra: str) -> dict[str, str]:
    """A user's environment (as tests/support/cli.py makes it), without COLUMNS unless given."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "DATABASE_URL")}
    env |= {"PYTHONPATH": str(ROOT), "CONDUIT_LOG_LEVEL": "WARNING"}
    if settings is not None:
        env |= {"CONDUIT_STATE_DIR": str(settings.state_dir), "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
                "CONDUIT_TOPIC_PREFIX": settings.topic_prefix}
    return env | extra


def _piped(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "conduit", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)


def _in_terminal(*args: str, columns: int, env: dict[str, str]) -> tuple[int, str]:
    """``conduit ARGS`` on a pseudo-terminal ``columns`` wide (its window size, not COLUMNS):
    its exit code and what the terminal showed (stdout and stderr together)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "conduit", *args], stdin=follower, stdout=follower, stderr=follower,
                            env=env, cwd=ROOT)
    os.close(follower)
    shown = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:   # EIO: the command ended and closed the terminal
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(leader)
    return proc.wait(timeout=120), shown.decode().replace("\r\n", "\n")


# --- help ------------------------------------------------------------------------------------------

def test_every_commands_help_names_every_option_in_full_at_80_columns() -> None:
    """Rich's panels cut long option names (`--same-outgoing…`) to fit 80 columns: in a pipe with
    COLUMNS=80 and on an 80-column terminal, each option is there whole."""
    env = _env(COLUMNS="80")
    commands = _commands()
    assert len(commands) > 30 and ("profile", "add") in {path for path, _ in commands}
    for path, command in commands:
        result = _piped(*path, "--help", env=env)
        assert result.returncode == 0, (path, result.stderr)
        for option in _options(command):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", result.stdout), (path, option, result.stdout)
        assert "…" not in result.stdout and max(map(len, result.stdout.splitlines())) <= 80, (path, result.stdout)
    for path in (("profile", "add"), ("profile", "set"), ("mailbox", "configure")):
        code, shown = _in_terminal(*path, "--help", columns=80, env=_env())
        assert code == 0, shown
        for option in ("--same-outgoing-settings", "--separate-outgoing-settings", "--max-connections",
                       "--polling-interval", "--oauth-token-url") if path[0] == "profile" else ("--delete-after-processing",):
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown), (path, option, shown)
        assert "…" not in shown, shown
    code, shown = _in_terminal("profile", "add", "--help", columns=80, env=_env())
    assert "default: mailbox_credentials" in shown, shown


# --- usage errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (("outbound", "list", "--status", "bogus"), "Invalid value for --status: 'bogus' is not one of pending_send"),
    (("outbound", "list", "--limit", "0"), "greater than or equal to 1"),
    (("dead-letters", "list", "--bogus"), "No such option: --bogus"),
    (("send", "--to"), "Option '--to' requires an argument"),
    (("nosuch",), "No such command 'nosuch'"),
])
def test_a_usage_error_is_one_error_line(args, says) -> None:
    result = _piped(*args, env=_env(COLUMNS="80"))
    assert result.returncode == 2 and result.stdout == "", result
    assert result.stderr.startswith("error: ") and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_group_without_a_command_still_shows_its_help() -> None:
    result = _piped("outbound", env=_env(COLUMNS="80"))
    shown = result.stdout + result.stderr
    assert result.returncode == 2 and "error" not in shown and "Commands" in shown, result
    assert all(verb in shown for verb in ("list", "show", "resend", "store")), shown


# --- a reader that goes away -----------------------------------------------------------------------

def test_output_into_a_closed_pipe_ends_quietly(settings: Settings, org: Organization) -> None:
    """`conduit outbound list | head -1`: head leaves after its line.  Here the reader is gone
    before the first line, so the broken pipe is certain, not a race."""
    reader, writer = os.pipe()
    os.close(reader)
    try:
        result = subprocess.run([sys.executable, "-m", "conduit", "outbound", "list", "--org", org.name], stdout=writer,
                                stderr=subprocess.PIPE, text=True, env=_env(settings), cwd=ROOT, timeout=120)
    finally:
        os.close(writer)
    assert result.returncode == 141, result.stderr   # 128 + SIGPIPE, as a shell reports `yes | head -1`'s yes
    assert "error" not in result.stderr and "Broken pipe" not in result.stderr, result.stderr


# --- tables ----------------------------------------------------------------------------------------

async def _dead_letter(publisher, error: str, key: str) -> None:
    await publisher.publish_raw("email.outbound.dlq", b"not an event", key,
                                [("reason", b"schema_error"), ("error", error.encode())])


ERROR = "the request names a mailbox this organization does not have; " + "x" * 40 + " (end of the error)"   # 120 characters


async def test_a_table_in_a_pipe_is_not_cut_and_a_line_break_in_a_cell_is_escaped(settings: Settings, publisher) -> None:
    key = f"bad\nkey-{uuid.uuid4().hex[:6]}"
    await _dead_letter(publisher, ERROR, key)
    code, out, err = await conduit_cli(settings, "dead-letters", "list", "email.outbound")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3 and lines[0].startswith("TOPIC") and lines[2] == "1 dead letter, 1 not replayed.", out
    assert ERROR in lines[1] and key.replace("\n", "\\n") in lines[1], out


async def test_a_table_on_a_terminal_is_as_wide_as_the_terminal(settings: Settings, publisher) -> None:
    await _dead_letter(publisher, ERROR, f"key-{uuid.uuid4().hex[:6]}")
    code, shown = _in_terminal("dead-letters", "list", "email.outbound", columns=250, env=_env(settings))
    assert code == 0 and ERROR in shown, shown   # 250 columns: all of it
    code, shown = _in_terminal("dead-letters", "list", "email.outbound", columns=120, env=_env(settings))
    row = shown.splitlines()[1]
    assert code == 0 and row.startswith("email.outbound") and len(row) <= 120 and row.endswith("…"), shown
    assert ERROR[:20] in row, shown


async def test_dead_letters_list_or_replay_of_a_reason_none_has_names_those_there_are(settings: Settings, publisher) -> None:
    await _dead_letter(publisher, ERROR, f"key-{uuid.uuid4().hex[:6]}")
    code, out, err = await conduit_cli(settings, "dead-letters", "list", "email.outbound", "--reason", "nonsense")
    assert code == 2 and out == "", (out, err)
    assert "has the reason 'nonsense': the reasons there are schema_error" in err and len(err.strip().splitlines()) == 1, err
    code, out, err = await conduit_cli(settings, "dead-letters", "list", "--reason", "schema_error", "--json")
    assert code == 0 and '"schema_error"' in out, err
    code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound", "--reason", "nonsense")
    assert code == 2 and out == "", (out, err)
    assert "has the reason 'nonsense': the reasons there are schema_error" in err, err
    code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound", "--reason", "schema_error",
                                       "--reason", "shema_error", "--dry-run")   # one right, one mistyped
    assert code == 2 and "has the reason 'shema_error'" in err, (out, err)
    code, out, err = await conduit_cli(settings, "dead-letters", "replay", "email.outbound", "--reason", "schema_error",
                                       "--dry-run")
    assert code == 0 and "would replay 1 dead letter" in out, (out, err)


# --- the README ------------------------------------------------------------------------------------

def test_the_readmes_list_of_verbs_is_the_apps() -> None:
    """README.md lists every command `conduit --help` has, and none it does not."""
    text = (ROOT / "README.md").read_text()
    paragraph = text[text.index("Verbs:"):].split("\n\n", 1)[0]
    listed = set()
    for item in re.findall(r"`([a-z][a-z| -]*)`", paragraph):
        *group, verbs = item.split(" ")
        listed |= {(*group, verb) for verb in verbs.split("|")}
    assert listed == {path for path, _ in _commands()}
