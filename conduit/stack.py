"""`conduit up`: the whole system on one machine.

Starts what is not configured (the embedded PostgreSQL when DATABASE_URL is unset, the Tansu broker
when KAFKA_BOOTSTRAP_SERVERS is unset), runs migrations, creates the topics, then runs the four
services as child processes (`conduit run SERVICE`, exactly what a Kubernetes pod runs), each with
its own health port.  Where things are (the broker, the topic prefix, the pids) is written to
``<state>/stack.json`` so other commands (`conduit send`, `conduit run`) find and use this stack.

One stack per state folder: it holds ``<state>/stack.lock`` while it runs, and a second `conduit up`
(or `conduit demo`) on the same folder refuses to start instead of taking the first one's record and
mailboxes over.  Ctrl-C or SIGTERM stops the services together (each finishes its work in flight),
then the broker, then the database.  A service ending on its own is started again (back-off 1 s,
doubling to 60 s), as a Kubernetes Deployment would; the embedded broker ending on its own stops the
stack, and `conduit up` exits non-zero saying so.  Killed with SIGKILL, it leaves nothing
running: its children are told by the kernel (Linux) and by its guard process, which kills those
still running after the grace period and stops the embedded database (conduit/orphans.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

import aiohttp

from conduit.broker import EmbeddedBroker, free_port
from conduit.orphans import StackGuard, stop_with_this_process
from conduit.services import SERVICE_FACTORIES, build_service
from shared.db.migrate import migrate
from shared.db.pool import create_pool, database_url
from shared.errors import ConduitError, InvalidInput
from shared.kafka import STACK_FILE, STACK_LOCK, ensure_topics
from shared.settings import Settings

SERVICE_NAMES = tuple(SERVICE_FACTORIES)


class StackFailed(ConduitError):
    """A part of the stack did not start, or stopped on its own."""

    reason = "stack_failed"


def say_now(line: str) -> None:
    # Flushed: `conduit up | tee up.log` (and whoever waits for "conduit is up") sees each step as it happens.
    print(line, flush=True)


def check_service_settings(settings: Settings, names: tuple[str, ...] = SERVICE_NAMES) -> None:
    """Build each service once, which reads its own settings (``CONDUIT_DISPATCH_*``, ...): a bad one
    is a one-line error before anything starts, not a child that dies during start-up."""
    for name in names:
        build_service(name, settings)


@dataclass
class Stack:
    settings: Settings
    say: Callable[[str], None] = say_now
    broker: EmbeddedBroker | None = None
    database_url: str = ""
    bootstrap_servers: str = ""
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)
    _lock: IO[str] | None = None
    _guard: StackGuard = field(default_factory=lambda: StackGuard(0.0, None))   # not started: tells nobody

    @property
    def stack_file(self) -> Path:
        return self.settings.state_dir / STACK_FILE

    async def start_infrastructure(self) -> None:
        self._make_state_dir()
        await self._claim_state_dir()
        # Before anything it may have to stop, should this process die without stopping it.
        pgdata = (self.settings.state_dir / "postgres").resolve() if self.settings.embedded_database else None
        self._guard = StackGuard(self.settings.stop_grace_seconds, pgdata)
        self._guard.start()
        started = time.monotonic()
        self.database_url = database_url(self.settings)
        self.say(f"postgres   {'embedded, data in ' + str(self.settings.state_dir / 'postgres') if self.settings.embedded_database else 'DATABASE_URL'}"
                 f" ({time.monotonic() - started:.1f} s)")
        if self.settings.embedded_broker:
            self.broker = EmbeddedBroker(self.settings.state_dir / "tansu.log")
            await self.broker.start()
            self._guard.watch(self.broker.pid)
            self.bootstrap_servers = self.broker.bootstrap_servers
            self.say(f"kafka      embedded Tansu broker on {self.bootstrap_servers} (memory storage, pid {self.broker.pid})")
        else:
            self.bootstrap_servers = self.settings.kafka_bootstrap_servers or ""
            self.say(f"kafka      {self.bootstrap_servers}")
        self.settings = self.settings.model_copy(update={"kafka_bootstrap_servers": self.bootstrap_servers})
        pool = await create_pool(self.settings, max_size=2, name="conduit-up")
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await pool.close()
        self.say(f"migrations {', '.join(applied) if applied else 'up to date'}")
        await ensure_topics(self.settings)
        self.write_record()

    def _make_state_dir(self) -> None:
        state = self.settings.state_dir
        if state.exists() and not state.is_dir():
            raise InvalidInput(f"CONDUIT_STATE_DIR {state} is a file, not a folder", reason="bad_setting")
        state.mkdir(parents=True, exist_ok=True)

    async def _claim_state_dir(self, patience: float = 2.0) -> None:
        """Hold the state folder's stack lock, or refuse: another stack runs from it."""
        lock = open(self.settings.state_dir / STACK_LOCK, "a+")
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    lock.seek(0)
                    holder = lock.read().strip() or "unknown"
                    lock.close()
                    raise StackFailed(f"a Conduit stack already runs from {self.settings.state_dir} (pid {holder}): "
                                      "stop it first, or give this one its own CONDUIT_STATE_DIR") from None
                # A command checking whether the stack runs holds the lock for an instant: try again.
                await asyncio.sleep(0.05)
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        self._lock = lock

    def write_record(self) -> None:
        """``stack.json``: what commands run beside this stack need to reach it."""
        self.stack_file.write_text(json.dumps({
            "kafka_bootstrap_servers": self.bootstrap_servers, "topic_prefix": self.settings.topic_prefix,
            "pid": os.getpid(), "broker_pid": self.broker.pid if self.broker else None,
            "services": {name: proc.pid for name, proc in self.children.items()},
        }))

    def child_env(self, service: str, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "CONDUIT_STATE_DIR": str(self.settings.state_dir),
            "CONDUIT_HEALTH_PORT": str(port),
            "CONDUIT_HEALTH_HOST": "127.0.0.1",   # a laptop's stack: its probes are not the network's
            "CONDUIT_TOPIC_PREFIX": self.settings.topic_prefix,
        })
        if not self.settings.embedded_database:
            env["DATABASE_URL"] = self.database_url
        return env

    async def start_services(self, names: tuple[str, ...] = SERVICE_NAMES) -> None:
        for name in names:
            await self._start_service(name)
        self.write_record()
        await self.wait_ready()

    async def _start_service(self, name: str) -> None:
        port = free_port()
        self.health_ports[name] = port
        # SIGTERM when `conduit up` dies, even by SIGKILL: stopped as on Ctrl-C, not left an orphan.
        # Forked in the event loop's thread, which lives as long as the process (see conduit/orphans.py).
        self.children[name] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "conduit", "run", name, env=self.child_env(name, port),
            preexec_fn=stop_with_this_process(),
        )
        self._guard.watch(self.children[name].pid)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.children)
        async with aiohttp.ClientSession() as http:
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    code = self.children[name].returncode
                    if code is not None:
                        raise StackFailed(f"service {name} was {killed_by(code)} during start-up" if code < 0 else
                                          f"service {name} exited during start-up (code {code}); its own error is above")
                    try:
                        async with http.get(f"http://127.0.0.1:{self.health_ports[name]}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                pending.discard(name)
                                self.say(f"{name:<10} ready (pid {self.children[name].pid}), "
                                         f"health on http://127.0.0.1:{self.health_ports[name]}/readyz")
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                if pending:
                    await asyncio.sleep(0.2)  # polling child readiness over HTTP, bounded by the deadline
        if pending:
            raise StackFailed(f"not ready within {timeout:.0f} s: {', '.join(sorted(pending))}")

    async def wait_until_stopped(self, stopping: asyncio.Event) -> str | None:
        """Until Ctrl-C/SIGTERM (None), or until the embedded broker ends on its own (what ended).  A
        service that ends on its own (dispatch after losing the database, a crash) is started again,
        after 1 s, then twice as long each time it ends again within a minute (at most 60 s): as a
        Kubernetes Deployment would, so one service's restart does not stop the whole system."""
        delays: dict[str, float] = {}
        started_at = {name: time.monotonic() for name in self.children}
        while True:
            watched: dict[asyncio.Future, str] = {asyncio.ensure_future(stopping.wait()): ""}
            for name, proc in self.children.items():
                watched[asyncio.ensure_future(proc.wait())] = name
            if self.broker is not None:
                watched[asyncio.ensure_future(self.broker.exited())] = BROKER
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            for w in watched:
                w.cancel()
            ended = [(watched[w], w.result()) for w in done if watched[w] and not w.cancelled()]
            if not ended:
                return None
            if any(what == BROKER for what, _ in ended):
                # Memory storage: a new broker would have none of the topics or offsets, so the services
                # are stopped rather than left retrying against nothing.
                code = next(code for what, code in ended if what == BROKER)
                failure = f"the embedded Kafka broker exited on its own (code {code}); see {self.broker.log_path}"  # type: ignore[union-attr]
                self.say(f"{failure}; stopping the stack")
                return failure
            for name, code in ended:
                quick = time.monotonic() - started_at[name] < 60
                delay = min(60.0, delays.get(name, 0.5) * 2) if quick else 1.0
                delays[name] = delay
                # A signal (an OOM kill, `kill -9`) leaves no error of the service's own to point at.
                how = f"(code {code}): {killed_by(code)};" if code < 0 else f"(code {code}; its own error is above):"
                self.say(f"{name:<10} exited on its own {how} starting it again in {delay:g} s")
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                    return None
                except asyncio.TimeoutError:
                    pass
                await self._start_service(name)
                started_at[name] = time.monotonic()
                self.write_record()
                self.say(f"{name:<10} started again (pid {self.children[name].pid}), "
                         f"health on http://127.0.0.1:{self.health_ports[name]}/readyz")

    async def stop(self) -> None:
        if self._lock is None:
            return   # it never claimed the state folder: nothing of it runs
        await self._stop_services()
        if self.broker is not None and self.broker.running:
            self.say("stopping   the embedded Kafka broker")
            await self.broker.stop()
        self._release_state_dir()
        self._guard.release()
        self.say("stopped")

    async def _stop_services(self) -> None:
        running = {name: proc for name, proc in self.children.items() if proc.returncode is None}
        if not running:
            return
        for proc in running.values():
            with contextlib.suppress(ProcessLookupError):   # it ended just now
                proc.send_signal(signal.SIGTERM)
        grace = self.settings.stop_grace_seconds
        self.say(f"stopping   {', '.join(running)}: each finishes its work in flight (killed after {grace:g} s)")
        await asyncio.gather(*(self._stop_service(name, proc, grace) for name, proc in running.items()))

    async def _stop_service(self, name: str, proc: asyncio.subprocess.Process, grace: float) -> None:
        try:
            await asyncio.wait_for(proc.wait(), grace)
            self.say(f"{name:<10} stopped")
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.say(f"{name:<10} killed: still running after {grace:g} s")

    def _release_state_dir(self) -> None:
        assert self._lock is not None
        self.stack_file.unlink(missing_ok=True)
        self._lock.close()   # closing releases the lock; the file stays (removing it would race a new stack)
        self._lock = None


BROKER = "the embedded Kafka broker"


def killed_by(code: int) -> str:
    """A child's negative exit code (asyncio's for a signal) in words: "killed by signal 9 (SIGKILL)"."""
    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-code}{name}"


async def run_up(settings: Settings, say: Callable[[str], None] = say_now) -> None:
    check_service_settings(settings)
    stack = Stack(settings, say)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    failure = None
    try:
        await stack.start_infrastructure()
        await stack.start_services()
        say(f"conduit is up: {len(stack.children)} services, state in {settings.state_dir}. Ctrl-C stops it.")
        failure = await stack.wait_until_stopped(stopping)
    finally:
        await stack.stop()
    if failure is not None:
        raise StackFailed(f"conduit up stopped: {failure}")
