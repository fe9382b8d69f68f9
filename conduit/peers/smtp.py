"""SMTP peers for tests and benchmarks: Postfix's smtp-sink, and a capture server.

`SmtpSink` runs Postfix's `smtp-sink` (a fast C sink, Debian package `postfix`) for throughput
runs; with `dump_dir` it writes every transaction to a file, so a run can count what arrived.

`CaptureSmtpServer` is a real aiosmtpd server that stores every accepted message, one file per
message, written atomically to `STORE/messages/`: a JSON line (envelope sender, recipients,
authenticated login, TLS) then the raw message. Tests read them back with `messages()`, from
any process. It offers STARTTLS or implicit TLS, AUTH PLAIN, LOGIN and XOAUTH2 (the SASL string
`user=<u>\\x01auth=Bearer <token>\\x01\\x01`, accepted when the token is allowed), and
PIPELINING (aiosmtpd reads pipelined commands in order but does not advertise it: we add it).

It runs in a thread of the calling process, or as its own process (`separate_process=True`)
so it keeps running while a process under test is killed with SIGKILL. The process form is:

    python -m conduit.peers.smtp capture --store DIR [--port P] [--host H]
        [--tls-cert C --tls-key K [--implicit-tls]] [--auth USER:PASSWORD ...]
        [--xoauth2-token TOKEN ...] [--require-auth]

It prints `READY <port>` on stdout once it listens (`--port 0`, the default, lets the kernel
choose), and stops on SIGTERM or SIGINT.

Scripted faults make the next transactions fail. They are requested through control files
in `STORE/control/` that the server consumes before each RCPT and DATA, so they work the same
for both forms and from any process: `CaptureSmtpServer.fail_next(...)`, `request_fault(store,
...)`, or the command line

    python -m conduit.peers.smtp fault --store DIR --reply {451,550,drop,store-drop,stall,store-stall}
        [--count N] [--at {data,rcpt}]

Replies: `451` answers `451 4.3.0 try later`; `550` answers `550 5.1.1 no such user`; `drop`
closes the connection without a reply and stores nothing; `store-drop` (DATA only) stores the
message and then drops the connection, as when a server's 250 reply is lost: the client is
expected to retry, and the store shows the duplicate. `stall` never answers (the client's timeout
ends it) and stores nothing; `store-stall` (DATA only) stores the message and never answers, as a
server that hangs after taking it. Each fault is used for `count` transactions, in the order
requested.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import pwd
import secrets
import select
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from conduit.peers.ports import LOOPBACK, listening_ports

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

FAULT_REPLIES = {
    "451": "451 4.3.0 try later",
    "550": "550 5.1.1 no such user",
}
FAULT_KINDS = ("451", "550", "drop", "store-drop", "stall", "store-stall")
FAULT_STAGES = ("data", "rcpt")


class PeerError(RuntimeError):
    """An SMTP peer did not start or stop as asked; the message says why."""


# -- smtp-sink -----------------------------------------------------------------------------


class SmtpSink:
    """Postfix's smtp-sink on loopback: accepts everything, as fast as a C server can.

    It binds port 0 (or `port`) itself and we read the port back from /proc, so there is no
    race for a free port. PIPELINING is advertised (smtp-sink's default).

    To see what arrived, `dump_dir` keeps one file per transaction (-d), `dump_file` appends every
    transaction to one file (-D: no file created per message, so the sink keeps most of its speed;
    for benchmarks).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        dump_dir: Path | None = None,
        dump_file: Path | None = None,
        backlog: int = 256,
    ) -> None:
        if dump_dir and dump_file:
            raise ValueError("dump_dir or dump_file, not both")
        self.host = LOOPBACK
        self.port = port or 0
        self.dump_dir = Path(dump_dir).absolute() if dump_dir else None
        self.dump_file = Path(dump_file).absolute() if dump_file else None
        self.backlog = backlog
        self._process: subprocess.Popen | None = None
        self._stderr: Any = None

    def __enter__(self) -> SmtpSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> SmtpSink:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    def start(self) -> None:
        """Start smtp-sink and wait until it greets."""
        if self._process is not None:
            raise PeerError("this smtp-sink is already running")
        args = ["smtp-sink"]
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        if self.dump_file is not None:
            self.dump_file.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            # smtp-sink run as root insists on -u: the user it becomes once it listens, and
            # writes the dumps as.
            args += ["-u", self._run_as()]
        if self.dump_dir is not None:
            # -d: one file per transaction; "%" would be a strftime directive in the template
            args += ["-d", str(self.dump_dir).replace("%", "%%") + "/%Y%m%d%H%M%S."]
        if self.dump_file is not None:
            args += ["-D", str(self.dump_file).replace("%", "%%")]
        args += [f"{self.host}:{self.port}", str(self.backlog)]
        # A file, not a pipe: a pipe nobody reads would block the sink once it fills up.
        self._stderr = tempfile.TemporaryFile()
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._process.poll() is not None:
                error = self._stderr_text()
                self.stop()
                raise PeerError(f"smtp-sink exited while starting: {error}")
            ports = listening_ports(self._process.pid)
            if ports and _smtp_greets(self.host, ports[0]):
                self.port = ports[0]
                return
            if time.monotonic() > deadline:
                error = self._stderr_text()
                self.stop()
                raise PeerError(f"smtp-sink did not greet within {START_TIMEOUT:.0f} s: {error}")
            time.sleep(0.01)  # poll interval of a deadline-bounded wait

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

    def _run_as(self) -> str:
        dump_dir = self.dump_dir or (self.dump_file.parent if self.dump_file else None)
        if dump_dir is None:
            return "nobody"
        if _world_traversable(dump_dir.parent):
            os.chown(dump_dir, pwd.getpwnam("nobody").pw_uid, -1)
            return "nobody"
        # `nobody` could not reach the dump directory (pytest's tmp_path is private to root),
        # so this loopback-only test sink keeps root's privileges to write it.
        return "root"

    def clear_dumps(self) -> None:
        """Forget every dumped transaction (for a run that counts only its own)."""
        if self.dump_file is not None:
            self.dump_file.unlink(missing_ok=True)   # the sink opens it anew per transaction
        elif self.dump_dir is not None:
            for path in self.dump_dir.iterdir():
                path.unlink(missing_ok=True)

    def dumped_messages(self) -> list[bytes]:
        """Every dumped transaction, oldest first (needs `dump_dir`).

        Each file holds smtp-sink's own header lines (X-Client-Addr, X-Mail-Args, X-Rcpt-Args,
        a Received header) and then the message as received. A transaction still in progress
        may be dumped partly: wait for the count you expect.

        With `dump_file`, the file is split where a transaction's first header starts a line
        after an empty line (a message body line of that shape would split it too).
        """
        if self.dump_file is not None:
            if not self.dump_file.exists():
                return []
            data = b"\n\n" + self.dump_file.read_bytes()
            return [b"X-Client-Addr: " + part for part in data.split(b"\n\nX-Client-Addr: ")[1:]]
        if self.dump_dir is None:
            raise PeerError("this smtp-sink was started without dump_dir or dump_file")
        files = sorted(
            (p for p in self.dump_dir.iterdir() if p.is_file()),
            key=lambda p: (p.stat().st_mtime_ns, p.name),
        )
        return [p.read_bytes() for p in files]


# -- capture server ------------------------------------------------------------------------


@dataclass(frozen=True)
class CapturedMessage:
    """One message the capture server accepted, with its envelope."""

    raw: bytes
    mail_from: str
    rcpt_tos: tuple[str, ...]
    login: str | None  # the authenticated user, None without AUTH
    tls: bool
    received_at: float
    path: Path
    session: str = ""  # the client's address and port: which SMTP session carried the message

    def header(self, name: str) -> str | None:
        """The first `name` header of the message, or None."""
        headers = BytesHeaderParser(policy=compat32).parsebytes(self.raw)
        return headers.get(name)


def read_captured(store_dir: Path) -> list[CapturedMessage]:
    """All messages stored in `store_dir`, in the order they were accepted."""
    directory = Path(store_dir) / "messages"
    if not directory.is_dir():
        return []
    captured = []
    for path in sorted(directory.iterdir()):
        meta_line, _, raw = path.read_bytes().partition(b"\n")
        meta = json.loads(meta_line)
        captured.append(
            CapturedMessage(
                raw=raw,
                mail_from=meta["mail_from"],
                rcpt_tos=tuple(meta["rcpt_tos"]),
                login=meta["login"],
                tls=meta["tls"],
                received_at=meta["received_at"],
                path=path,
                session=meta.get("session", ""),
            )
        )
    return captured


def request_fault(store_dir: Path, reply: str, count: int = 1, at: str = "data") -> None:
    """Ask the capture server on `store_dir` to fail its next `count` transactions."""
    if reply not in FAULT_KINDS:
        raise ValueError(f"reply must be one of {FAULT_KINDS}")
    if at not in FAULT_STAGES:
        raise ValueError(f"at must be one of {FAULT_STAGES}")
    if reply in ("store-drop", "store-stall") and at != "data":
        raise ValueError(f"{reply} happens at DATA only")
    control = Path(store_dir) / "control"
    control.mkdir(parents=True, exist_ok=True)
    name = f"{time.time_ns():020d}-{secrets.token_hex(4)}.json"
    tmp = control / ("." + name)
    tmp.write_text(json.dumps({"reply": reply, "count": count, "at": at}))
    os.replace(tmp, control / name)  # whole, or not there: the server never reads half


class _CaptureHandler:
    """aiosmtpd handler: stores messages, checks logins, plays scripted faults."""

    def __init__(self, store: Path, users: dict[str, str], tokens: set[str]) -> None:
        self.store = store
        self.users = users
        self.tokens = tokens
        self.faults: list[dict[str, Any]] = []
        for sub in ("messages", "tmp", "control"):
            (store / sub).mkdir(parents=True, exist_ok=True)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname  # the 5-argument hook must set it itself
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        fault = self._take_fault("rcpt")
        if fault == "drop":
            return await _drop(server)
        if fault == "stall":
            return await _stall()
        if fault:
            return FAULT_REPLIES[fault]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        fault = self._take_fault("data")
        if fault == "drop":
            return await _drop(server)
        if fault == "stall":
            return await _stall()
        if fault in FAULT_REPLIES:
            return FAULT_REPLIES[fault]
        name = self._store(server, session, envelope)
        if fault == "store-drop":
            return await _drop(server)
        if fault == "store-stall":
            return await _stall()
        return f"250 2.0.0 OK queued as {name}"

    def _store(self, server, session, envelope) -> str:
        auth = session.auth_data  # a LoginPassword for every mechanism offered here
        meta = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "login": auth.login.decode(errors="replace") if session.authenticated else None,
            "tls": server.transport.get_extra_info("ssl_object") is not None,
            "received_at": time.time(),
            "session": "{}:{}".format(*server.transport.get_extra_info("peername")[:2]),
        }
        name = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
        tmp = self.store / "tmp" / name
        with open(tmp, "wb") as f:
            f.write(json.dumps(meta).encode() + b"\n")
            f.write(envelope.original_content)
        os.replace(tmp, self.store / "messages" / (name + ".capture"))
        return name

    def _take_fault(self, stage: str) -> str | None:
        control = self.store / "control"
        for path in sorted(p for p in control.iterdir() if not p.name.startswith(".")):
            self.faults.append(json.loads(path.read_text()))
            path.unlink()
        for fault in self.faults:
            if fault["at"] == stage and fault["count"] > 0:
                fault["count"] -= 1
                return fault["reply"]
        return None

    def authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        """PLAIN and LOGIN: the user and password must match one of `users`."""
        login = auth_data.login.decode(errors="replace")
        password = auth_data.password.decode(errors="replace")
        ok = login in self.users and secrets.compare_digest(self.users[login], password)
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    async def auth_XOAUTH2(self, server, args):
        """XOAUTH2 as Gmail and Outlook speak it, including the error exchange on failure."""
        if len(args) == 2:
            try:
                blob = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await server.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        else:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=True)
        fields = dict(
            part.split("=", 1)
            for part in blob.decode(errors="replace").split("\x01")
            if "=" in part
        )
        user = fields.get("user", "")
        token = fields.get("auth", "").removeprefix("Bearer ")
        if user and token in self.tokens:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        # The server sends a JSON error as a challenge; the client answers with an empty line.
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "mail"})
        await server.challenge_auth(error)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Invalid credentials")


async def _stall() -> str:
    # No answer: the client gives up and closes, and connection_lost cancels this wait.
    await asyncio.sleep(3600)
    return "421 4.4.2 stalled"


async def _drop(server: SMTP) -> str:
    # abort() closes at once without sending buffered data; connection_lost then cancels the
    # session's coroutine, so the reply below is never sent.
    server.transport.abort()
    await asyncio.sleep(STOP_TIMEOUT)  # bounded: cancelled long before, in practice
    return "421 4.4.2 dropped"


@dataclass(frozen=True)
class _CaptureConfig:
    store: Path
    host: str = LOOPBACK
    port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    implicit_tls: bool = False
    users: tuple[tuple[str, str], ...] = ()
    xoauth2_tokens: tuple[str, ...] = ()
    require_auth: bool = False
    password_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")

    def argv(self) -> list[str]:
        args = [
            "capture",
            "--store",
            str(self.store),
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        if self.tls_cert and self.tls_key:
            args += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key)]
        if self.implicit_tls:
            args.append("--implicit-tls")
        for user, password in self.users:
            args += ["--auth", f"{user}:{password}"]
        for token in self.xoauth2_tokens:
            args += ["--xoauth2-token", token]
        if self.require_auth:
            args.append("--require-auth")
        for mechanism in self.password_mechanisms:
            args += ["--password-mechanism", mechanism]
        return args


async def _serve_capture(config: _CaptureConfig) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    handler = _CaptureHandler(config.store, dict(config.users), set(config.xoauth2_tokens))
    tls_context = None
    if config.tls_cert and config.tls_key:
        tls_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls_context.load_cert_chain(config.tls_cert, config.tls_key)
    excluded = [m for m in ("PLAIN", "LOGIN") if not config.users or m not in config.password_mechanisms]
    if not config.xoauth2_tokens:
        excluded.append("XOAUTH2")

    def session() -> SMTP:
        return SMTP(
            handler,
            hostname="capture.conduit.test",
            enable_SMTPUTF8=True,
            # STARTTLS mode: AUTH only once encrypted, as real submission servers do. aiosmtpd
            # only sees STARTTLS, not implicit TLS, so implicit TLS must not ask for it.
            tls_context=None if config.implicit_tls else tls_context,
            auth_require_tls=tls_context is not None and not config.implicit_tls,
            auth_required=config.require_auth,
            authenticator=handler.authenticate,
            auth_exclude_mechanism=excluded,
            loop=loop,
        )

    return await loop.create_server(
        session,
        config.host,
        config.port,
        ssl=tls_context if config.implicit_tls else None,
        backlog=256,
    )


class CaptureSmtpServer:
    """A real SMTP server (aiosmtpd) that stores what it accepts (see the module docstring)."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        implicit_tls: bool = False,
        users: dict[str, str] | None = None,
        xoauth2_tokens: Iterable[str] = (),
        require_auth: bool = False,
        password_mechanisms: Iterable[str] = ("PLAIN", "LOGIN"),
        separate_process: bool = False,
    ) -> None:
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        if implicit_tls and tls_cert is None:
            raise ValueError("implicit_tls needs tls_cert and tls_key")
        self.store_dir = Path(store_dir).absolute()
        self.host = LOOPBACK
        self.port = port or 0
        self.separate_process = separate_process
        self._config = _CaptureConfig(
            store=self.store_dir,
            port=self.port,
            tls_cert=Path(tls_cert).absolute() if tls_cert else None,
            tls_key=Path(tls_key).absolute() if tls_key else None,
            implicit_tls=implicit_tls,
            users=tuple((users or {}).items()),
            xoauth2_tokens=tuple(xoauth2_tokens),
            require_auth=require_auth,
            password_mechanisms=tuple(m.upper() for m in password_mechanisms),
        )
        self._process: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id in the process form (None in the thread form)."""
        return self._process.pid if self._process else None

    def __enter__(self) -> CaptureSmtpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> CaptureSmtpServer:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)

    def start(self) -> None:
        """Start listening; returns once the server accepts connections."""
        if self._process or self._thread:
            raise PeerError("this capture server is already running")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        if self.separate_process:
            self._start_process()
        else:
            self._start_thread()

    def stop(self) -> None:
        """Stop the server; stored messages stay in the store directory."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process)
            process.stdout.close()
        thread, self._thread = self._thread, None
        if thread is not None and self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            thread.join(STOP_TIMEOUT)

    def messages(self) -> list[CapturedMessage]:
        """Every stored message, oldest first."""
        return read_captured(self.store_dir)

    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[CapturedMessage]:
        """Wait until at least `count` messages are stored; raise TimeoutError at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            captured = self.messages()
            if len(captured) >= count:
                return captured
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(captured)} of {count} messages after {timeout} s")
            await asyncio.sleep(0.02)  # poll interval of a deadline-bounded wait

    def fail_next(self, count: int = 1, reply: str = "451", at: str = "data") -> None:
        """Make the next `count` transactions fail at `at` with `reply` (see FAULT_KINDS)."""
        request_fault(self.store_dir, reply, count, at)

    # -- the two forms ---------------------------------------------------------------------

    def _start_process(self) -> None:
        env = dict(os.environ)
        # the child imports this package even when the caller's cwd is elsewhere
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        log = open(self.store_dir / "server.log", "ab")
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "conduit.peers.smtp", *self._config.argv()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                start_new_session=True,  # a signal aimed at the test's process group misses it
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT
        line = b""
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._process.stdout], [], [], max(remaining, 0))
            chunk = os.read(self._process.stdout.fileno(), 200) if ready else b""
            if not chunk:
                tail = (self.store_dir / "server.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise PeerError(f"capture server did not start; its log:\n{tail}")
            line += chunk
        self.port = int(line.split()[1])

    def _start_thread(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                server = loop.run_until_complete(_serve_capture(self._config))
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                loop.close()
                return
            self.port = server.sockets[0].getsockname()[1]
            self._stopped = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._stopped.wait())
                server.close()
                loop.run_until_complete(server.wait_closed())
                for task in asyncio.all_tasks(loop):
                    task.cancel()
                loop.run_until_complete(asyncio.sleep(0))
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="capture-smtp", daemon=True)
        self._thread.start()
        ready.wait(START_TIMEOUT)
        if failure or not ready.is_set():
            self._thread = None
            raise PeerError(f"capture server did not start: {failure[0] if failure else 'timeout'}")


# -- helpers -------------------------------------------------------------------------------


def _smtp_greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            return sock.recv(512).startswith(b"220")
    except OSError:
        return False


def _terminate(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _world_traversable(path: Path) -> bool:
    """True when every directory from / to `path` lets other users pass (o+x)."""
    return all(os.stat(d).st_mode & 0o001 for d in (path, *path.parents))


# -- command line (the process form) -------------------------------------------------------


async def _run_capture(config: _CaptureConfig) -> None:
    server = await _serve_capture(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()
    await stop.wait()
    server.close()
    await server.wait_closed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m conduit.peers.smtp",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    capture = commands.add_parser("capture", help="run a capture SMTP server")
    capture.add_argument("--store", type=Path, required=True)
    capture.add_argument("--host", default=LOOPBACK)
    capture.add_argument("--port", type=int, default=0)
    capture.add_argument("--tls-cert", type=Path)
    capture.add_argument("--tls-key", type=Path)
    capture.add_argument("--implicit-tls", action="store_true")
    capture.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD")
    capture.add_argument("--xoauth2-token", action="append", default=[])
    capture.add_argument("--require-auth", action="store_true")
    capture.add_argument("--password-mechanism", action="append", choices=["PLAIN", "LOGIN"],
                         help="offer only these for passwords (default: PLAIN and LOGIN)")
    fault = commands.add_parser("fault", help="script faults for a running capture server")
    fault.add_argument("--store", type=Path, required=True)
    fault.add_argument("--reply", choices=FAULT_KINDS, required=True)
    fault.add_argument("--count", type=int, default=1)
    fault.add_argument("--at", choices=FAULT_STAGES, default="data")
    args = parser.parse_args(argv)

    if args.command == "fault":
        request_fault(args.store, args.reply, args.count, args.at)
        return
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("give both --tls-cert and --tls-key, or neither")
    config = _CaptureConfig(
        store=args.store.absolute(),
        host=args.host,
        port=args.port,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        implicit_tls=args.implicit_tls,
        users=tuple(tuple(pair.split(":", 1)) for pair in args.auth),
        xoauth2_tokens=tuple(args.xoauth2_token),
        require_auth=args.require_auth,
        password_mechanisms=tuple(args.password_mechanism or ("PLAIN", "LOGIN")),
    )
    asyncio.run(_run_capture(config))


if __name__ == "__main__":
    main()
