"""The `conduit` command when things go wrong: bad settings, a failing dependency, a second stack, a
broker that dies, shutdown, and what the demo leaves behind.

Every case runs the real command (a subprocess) against the session's embedded PostgreSQL (a
database of this module's own, so the stacks started here never see other tests' mailboxes) and,
where a stack runs, the embedded Tansu broker that `conduit up` starts itself.  The rule checked
throughout: one line on stderr, no traceback, no secret, nothing silently lost.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from pydantic import SecretStr

from conduit.peers.smtp import CaptureSmtpServer
from shared.crypto import load_cipher
from shared.db.pool import create_pool, database_url
from shared.registry.service import Registry
from shared.settings import Settings
from tests.support.dispatch import sending_mailbox
from tests.support.databases import scratch_database
from tests.support.waiting import eventually

ROOT = Path(__file__).resolve().parents[2]


# --- fixtures and helpers --------------------------------------------------------------------------

@pytest.fixture(scope="module")
async def db_url(base_settings: Settings) -> AsyncIterator[str]:
    """A fresh database on the session's PostgreSQL: the stacks here run ingest over every mailbox."""
    async with scratch_database(database_url(base_settings), "robust", migrated=True) as url:
        yield url


@pytest.fixture
def state() -> AsyncIterator[Path]:
    # Not tmp_path: the embedded PostgreSQL and Dovecot run as other users and must reach it.
    path = Path(tempfile.mkdtemp(prefix="conduit-robust-"))
    path.chmod(0o755)
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def env(db_url: str, state: Path) -> dict[str, str]:
    """A user's environment: this module's database, a state folder of the test's own, no broker set."""
    env = {**os.environ, "DATABASE_URL": db_url, "CONDUIT_STATE_DIR": str(state / "conduit"),
           "CONDUIT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "CONDUIT_TOPIC_PREFIX", "CALF_TANSU_BIN"):
        env.pop(name, None)
    return env


@pytest.fixture
async def send_args(db_url: str, base_settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[str, ...]]:
    """`conduit send` arguments for a mailbox that may send, through an SMTP capture server."""
    pool = await create_pool(base_settings.model_copy(update={"database_url": SecretStr(db_url)}), max_size=2)
    registry = Registry(pool, load_cipher(base_settings), producer="tests")
    try:
        org = await registry.add_organization(f"robust-{uuid.uuid4().hex[:8]}")
        with CaptureSmtpServer(tmp_path / "capture") as capture:
            sender = await sending_mailbox(registry, org, host="127.0.0.1", port=capture.port)
            yield ("send", "--org", org.name, "--from", sender.email, "--to", "bea@customer.example",
                   "--subject", "hi", "--text", "hi")
    finally:
        await pool.close()


async def conduit(env: dict[str, str], *args: str, timeout: float = 120) -> tuple[int, str, str]:
    """``conduit ARGS`` to its end: exit code, standard output, standard error."""
    # Its own process group: one that hangs (a second `conduit up` that does not refuse) is killed
    # with the services it started, which would otherwise hold its output pipes open.
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit", *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                                                start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except asyncio.TimeoutError:
        kill_group(proc.pid)
        await proc.wait()
        raise AssertionError(f"`conduit {' '.join(args)}` still running after {timeout:.0f} s") from None
    return proc.returncode, out.decode(), err.decode()


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]


class Up:
    """A running `conduit up`, its output collected line by line as it comes."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers: list[asyncio.Task] = []

    @property
    def state_dir(self) -> Path:
        return Path(self.env["CONDUIT_STATE_DIR"])

    def record(self) -> dict:
        return json.loads((self.state_dir / "stack.json").read_text())

    def children(self) -> dict[str, int]:
        """Its child processes by what they are ("ingest", ..., "broker"), read from /proc."""
        found = {}
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
                if "run" in argv:
                    found[argv[argv.index("run") + 1]] = int(pid)
                elif "broker" in argv:
                    found["broker"] = int(pid)
        return found

    async def start(self) -> "Up":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conduit", "up", env=self.env, cwd=ROOT,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, self.out)),
                         asyncio.create_task(self._read(self.proc.stderr, self.err))]
        await self.wait_for_output("conduit is up", timeout=90)
        return self

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        async for line in stream:
            into.append(line.decode().rstrip("\n"))

    async def wait_for_output(self, text: str, timeout: float = 30) -> None:
        async def seen() -> bool:
            if any(text in line for line in self.out):
                return True
            if self.proc.returncode is not None:
                raise AssertionError(f"conduit up exited ({self.proc.returncode}): {self.out} {self.err}")
            return False
        await eventually(seen, timeout=timeout, what=f"{text!r} from conduit up")

    async def exited(self, timeout: float) -> int:
        """Its exit code once it has exited, with all its output read; fails after ``timeout``."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"conduit up still running after {timeout:.0f} s: {self.out} {self.err}") from None
        await asyncio.gather(*self._readers)
        return self.proc.returncode

    async def close(self) -> None:
        """Whatever happened in the test: stop it, and kill what it started if it cannot stop."""
        if self.proc is None:
            return
        pids = []
        try:
            record = self.record()
            pids = [record.get("broker_pid"), *record.get("services", {}).values()]
        except (OSError, ValueError):
            pass
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 60)
            except asyncio.TimeoutError:
                pass
        kill_group(self.proc.pid)   # its services, if it could not stop them (the broker has a session of its own)
        await self.proc.wait()
        for pid in pids:
            if pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for reader in self._readers:
            reader.cancel()


@pytest.fixture
async def up(env: dict[str, str]) -> AsyncIterator:
    """``await up(**extra_env)`` starts a `conduit up` (stopped at the end of the test)."""
    started: list[Up] = []

    async def start(**extra: str) -> Up:
        stack = Up({**env, **extra})
        started.append(stack)
        return await stack.start()

    yield start
    for stack in started:
        await stack.close()


async def dead_pid() -> int:
    """The pid of a process that has exited (a stack killed with -9 leaves one in stack.json)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    return proc.pid


# --- 1. settings and failing dependencies: one line ------------------------------------------------

SEND = ("send", "--from", "nobody@example.com", "--to", "bea@customer.example", "--subject", "hi", "--text", "hi")


@pytest.mark.parametrize("args, extra, needles", [
    (("org", "show"), {"CONDUIT_LOG_LEVEL": "verbose"}, ("CONDUIT_LOG_LEVEL", "DEBUG, INFO, WARNING")),
    (("run", "dispatch"), {"CONDUIT_LOG_LEVEL": "verbose"}, ("CONDUIT_LOG_LEVEL", "DEBUG, INFO, WARNING")),
    (SEND, {"KAFKA_BOOTSTRAP_SERVERS": "host:notaport"}, ("KAFKA_BOOTSTRAP_SERVERS", "port number")),
    (SEND, {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092,"}, ("KAFKA_BOOTSTRAP_SERVERS", "empty entry")),
    (SEND, {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "BOGUS", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "Secret-pw-1"},
     ("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")),
    (SEND, {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "PLAIN"}, ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD")),
    (("run", "dispatch"), {"CONDUIT_DISPATCH_WAVE_SIZE": "abc"}, ("CONDUIT_DISPATCH_WAVE_SIZE",)),
    # Written into EHLO as it is: a line break would send another SMTP command.
    (("run", "dispatch"), {"CONDUIT_DISPATCH_HELO_NAME": "relay.example\r\nMAIL FROM:<x@evil.example>"},
     ("CONDUIT_DISPATCH_HELO_NAME", "host name or an address literal")),
])
async def test_a_bad_setting_is_one_line_naming_the_variable(env, args, extra, needles) -> None:
    code, out, err = await conduit({**env, **extra}, *args)
    assert_one_line_error(code, err, *needles)
    assert "Secret-pw-1" not in out + err


@pytest.mark.parametrize("where", ["/proc/nope", "file"])
async def test_schemas_export_to_a_place_it_cannot_write_is_one_line(env, state, where) -> None:
    target = state / "a-file" if where == "file" else Path(where)
    if where == "file":
        target.write_text("not a folder")
    code, _, err = await conduit(env, "schemas", "export", "--directory", str(target))
    assert_one_line_error(code, err, f"cannot write the schemas to {target}")


async def test_an_os_error_says_what_failed_not_always_cannot_reach(env, state, base_settings) -> None:
    # The state folder is a file: a local problem, named with its path.
    a_file = state / "state-is-a-file"
    a_file.write_text("")
    # ERROR: shared.db.pool warns (a line of its own) that it is creating an embedded database there.
    no_db = {**{k: v for k, v in env.items() if k != "DATABASE_URL"}, "CONDUIT_LOG_LEVEL": "ERROR"}
    code, _, err = await conduit({**no_db, "CONDUIT_STATE_DIR": str(a_file)}, "org", "show")
    assert_one_line_error(code, err, str(a_file))
    assert "cannot reach a server" not in err
    code, _, err = await conduit({**no_db, "CONDUIT_STATE_DIR": str(a_file)}, "up")
    assert_one_line_error(code, err, "CONDUIT_STATE_DIR", "not a folder")
    # A health port another process holds: a port in use, not a server out of reach.
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await conduit({**env, "KAFKA_BOOTSTRAP_SERVERS": base_settings.kafka_bootstrap_servers,
                                      "CONDUIT_HEALTH_PORT": str(port)}, "run", "dispatch")
    assert_one_line_error(code, err, "already in use", str(port))


async def test_a_database_turning_connections_away_is_said_as_such(env, db_url) -> None:
    # PostgreSQL's own "not now" (53300 here; 57P03 while it starts) is no refusal of the command.
    role = f"full_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(db_url)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'never-shown-8' CONNECTION LIMIT 0")
        url = re.sub(r"//[^@/]*@", f"//{role}:never-shown-8@", db_url, count=1)
        code, _, err = await conduit({**env, "DATABASE_URL": url}, "org", "show")
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()
    assert_one_line_error(code, err, "is not taking connections now", "too many connections", "try again")
    assert "refused the command" not in err and "never-shown-8" not in err


async def test_up_with_a_bad_service_setting_is_one_line_before_anything_starts(env) -> None:
    code, out, err = await conduit({**env, "CONDUIT_DISPATCH_WAVE_SIZE": "0"}, "up")
    assert_one_line_error(code, err, "CONDUIT_DISPATCH_WAVE_SIZE", "greater than or equal to 1")
    assert "ready" not in out   # no service was started only to die


@pytest.mark.parametrize("binary, needle", [("/bin/false", "exited at start (code 1)"),
                                            ("/nonexistent", "CALF_TANSU_BIN")])
async def test_up_with_a_broker_that_cannot_start_is_one_line(env, binary, needle) -> None:
    code, _, err = await conduit({**env, "CALF_TANSU_BIN": binary}, "up")
    assert_one_line_error(code, err, "embedded Kafka broker", needle)


# --- 2 and 3. one stack per state folder; commands use its broker and its topic prefix --------------

async def test_a_second_up_refuses_and_leaves_the_running_stack_alone(env, up, send_args) -> None:
    # A record left by a stack that died (kill -9) is no stack: `conduit up` starts regardless.
    state_dir = Path(env["CONDUIT_STATE_DIR"])
    state_dir.mkdir(parents=True)
    (state_dir / "stack.json").write_text(json.dumps({"kafka_bootstrap_servers": "127.0.0.1:1", "pid": await dead_pid()}))
    first = await up()
    record = first.record()
    assert record["pid"] == first.proc.pid
    for command in ("up", "demo"):
        code, _, err = await conduit(env, command)
        assert_one_line_error(code, err, f"pid {first.proc.pid}", "already runs")
    assert first.record() == record and first.proc.returncode is None
    # The CLI still reaches the first stack's broker.
    code, out, err = await conduit(env, *send_args)
    assert code == 0, err


async def test_a_stale_stack_record_is_a_clear_error_not_a_bootstrap_failure(env, send_args) -> None:
    state_dir = Path(env["CONDUIT_STATE_DIR"])
    state_dir.mkdir(parents=True)
    pid = await dead_pid()
    with socket.socket() as s:   # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (state_dir / "stack.json").write_text(json.dumps({"kafka_bootstrap_servers": f"127.0.0.1:{port}", "pid": pid}))
    code, _, err = await conduit(env, *send_args)
    assert_one_line_error(code, err, f"pid {pid}", "no longer running", "conduit up")


async def test_commands_use_the_running_stacks_topic_prefix(env, up, send_args) -> None:
    prefix = f"p{uuid.uuid4().hex[:8]}."
    stack = await up(CONDUIT_TOPIC_PREFIX=prefix)
    record = stack.record()
    # No prefix set: the request reaches the stack's dispatch, which sends it (not lost on unread topics).
    code, out, err = await conduit(env, *send_args, "--wait", "--timeout", "60")
    assert "no final status" not in err, err
    assert code == 0 and "sent" in out, out + err
    assert record.get("topic_prefix") == prefix
    # Another prefix than the stack's: refused, not published where nobody reads.
    code, _, err = await conduit({**env, "CONDUIT_TOPIC_PREFIX": "other."}, *send_args)
    assert_one_line_error(code, err, "CONDUIT_TOPIC_PREFIX", repr(prefix), f"pid {stack.proc.pid}")


# --- 4. shutdown and a dying broker ----------------------------------------------------------------

async def test_shutdown_stops_the_services_together_and_says_what_it_waits_for(up) -> None:
    stack = await up(CONDUIT_STOP_GRACE_SECONDS="10")
    services = {name: pid for name, pid in stack.children().items() if name != "broker"}
    assert set(services) == {"ingest", "evaluate", "dispatch", "exchange_sync"}
    record = stack.record()
    # Two services that will not stop (frozen): stopped one after another with the old code, 2 x 30 s.
    for name in ("ingest", "dispatch"):
        os.kill(services[name], signal.SIGSTOP)
    started = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    # Together: about one grace period in all (the old code took 30 s for each frozen one).
    assert await stack.exited(timeout=30) == 0, stack.err
    assert time.monotonic() - started < 30
    waiting = [line for line in stack.out if line.startswith("stopping ")]
    assert waiting and all(name in waiting[0] for name in services), stack.out
    for name in ("ingest", "dispatch"):
        assert any(line.startswith(name) and "killed: still running after 10 s" in line for line in stack.out), stack.out
    for name in ("evaluate", "exchange_sync"):
        assert any(line.split() == [name, "stopped"] for line in stack.out), "\n".join(stack.out + stack.err)
    assert stack.out[-1] == "stopped" and not (stack.state_dir / "stack.json").exists()
    assert record.get("services") == services   # recorded for operators (and `kill -STOP` in tests)


async def test_up_starts_a_service_again_when_it_ends_on_its_own(up, env, send_args) -> None:
    """dispatch exits when it loses the database that holds its worker lock, and any service may
    crash: `conduit up` starts it again (as Kubernetes would), instead of stopping the whole system."""
    stack = await up(CONDUIT_STOP_GRACE_SECONDS="10")
    dispatch = stack.children()["dispatch"]
    os.kill(dispatch, signal.SIGKILL)
    await stack.wait_for_output("dispatch   started again", timeout=60)
    assert any(line.startswith("dispatch") and "exited on its own (code -9" in line and "starting it again in 1 s" in line
               for line in stack.out), stack.out
    again = stack.record()["services"]["dispatch"]
    assert again != dispatch and stack.children()["dispatch"] == again
    # The new dispatch works: a request is sent.
    code, out, err = await conduit(env, *send_args, "--wait", "--timeout", "60")
    assert code == 0 and "sent" in out, out + err
    stack.proc.send_signal(signal.SIGTERM)
    assert await stack.exited(timeout=30) == 0, stack.err


async def test_up_reports_and_stops_when_the_embedded_broker_dies(up) -> None:
    stack = await up(CONDUIT_STOP_GRACE_SECONDS="5")
    broker = stack.children()["broker"]
    record = stack.record()
    os.kill(broker, signal.SIGKILL)
    assert await stack.exited(timeout=60) == 2
    errors = [line for line in stack.err if line.startswith("error: ")]
    assert errors and "the embedded Kafka broker exited on its own (code -9)" in errors[-1], stack.err
    assert "tansu.log" in errors[-1]
    assert any("embedded Kafka broker exited" in line and "stopping the stack" in line for line in stack.out), stack.out
    assert not (stack.state_dir / "stack.json").exists()
    assert record.get("broker_pid") == broker


# --- 5. the demo cleans up after itself -------------------------------------------------------------

@pytest.mark.peers
async def test_demo_deactivates_its_organization_and_removes_its_files(env, state, db_url) -> None:
    tmp = state / "tmp"
    tmp.mkdir()
    tmp.chmod(0o755)
    code, out, err = await conduit({**env, "TMPDIR": str(tmp)}, "demo", timeout=300)
    assert code == 0, out + err
    assert "accepted by the SMTP server" in out
    assert not list(tmp.glob("conduit-demo-*")), list(tmp.iterdir())
    conn = await asyncpg.connect(db_url)
    try:
        rows = await conn.fetch("SELECT o.name, m.email, m.active FROM mailbox m JOIN organization o"
                                " ON o.id = m.organization_id WHERE o.name LIKE 'demo-%'")
    finally:
        await conn.close()
    assert {r["email"] for r in rows} == {"ann@example.com", "bob@example.com"}
    assert not any(r["active"] for r in rows), rows
