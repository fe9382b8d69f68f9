"""`conduit up`: the whole system on one machine.

Starts what is not configured (the embedded PostgreSQL when DATABASE_URL is unset, the Tansu broker
when KAFKA_BOOTSTRAP_SERVERS is unset), runs migrations, creates the topics, then runs the four
services as child processes (`conduit run SERVICE`, exactly what a Kubernetes pod runs), each with
its own health port.  Where things are is written to ``<state>/stack.json`` so other commands
(`conduit send`, `conduit run`) find the embedded broker.  Ctrl-C or SIGTERM stops the services
(each finishes its work in flight), then the broker, then the database.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import aiohttp

from conduit.broker import EmbeddedBroker, free_port
from conduit.services import SERVICE_FACTORIES
from shared.db.migrate import migrate
from shared.db.pool import create_pool, database_url
from shared.kafka import ensure_topics
from shared.settings import Settings

SERVICE_NAMES = tuple(SERVICE_FACTORIES)


@dataclass
class Stack:
    settings: Settings
    say: Callable[[str], None] = print
    broker: EmbeddedBroker | None = None
    database_url: str = ""
    bootstrap_servers: str = ""
    children: dict[str, asyncio.subprocess.Process] = field(default_factory=dict)
    health_ports: dict[str, int] = field(default_factory=dict)

    @property
    def stack_file(self) -> Path:
        return self.settings.state_dir / "stack.json"

    async def start_infrastructure(self) -> None:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        self.database_url = database_url(self.settings)
        self.say(f"postgres   {'embedded, data in ' + str(self.settings.state_dir / 'postgres') if self.settings.embedded_database else 'DATABASE_URL'}"
                 f" ({time.monotonic() - started:.1f} s)")
        if self.settings.embedded_broker:
            self.broker = EmbeddedBroker(self.settings.state_dir / "tansu.log")
            await self.broker.start()
            self.bootstrap_servers = self.broker.bootstrap_servers
            self.say(f"kafka      embedded Tansu broker on {self.bootstrap_servers} (memory storage)")
        else:
            self.bootstrap_servers = self.settings.kafka_bootstrap_servers or ""
            self.say(f"kafka      {self.bootstrap_servers}")
        self.settings = self.settings.model_copy(update={"kafka_bootstrap_servers": self.bootstrap_servers})
        pool = await create_pool(self.settings, max_size=2)
        try:
            async with pool.acquire() as conn:
                applied = await migrate(conn)
        finally:
            await pool.close()
        self.say(f"migrations {', '.join(applied) if applied else 'up to date'}")
        await ensure_topics(self.settings)
        self.stack_file.write_text(json.dumps({
            "kafka_bootstrap_servers": self.bootstrap_servers, "pid": os.getpid(),
        }))

    def child_env(self, service: str, port: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "CONDUIT_STATE_DIR": str(self.settings.state_dir),
            "CONDUIT_HEALTH_PORT": str(port),
        })
        if not self.settings.embedded_database:
            env["DATABASE_URL"] = self.database_url
        return env

    async def start_services(self, names: tuple[str, ...] = SERVICE_NAMES) -> None:
        for name in names:
            port = free_port()
            self.health_ports[name] = port
            self.children[name] = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "conduit", "run", name, env=self.child_env(name, port),
            )
        await self.wait_ready()

    async def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.children)
        async with aiohttp.ClientSession() as http:
            while pending and time.monotonic() < deadline:
                for name in list(pending):
                    if self.children[name].returncode is not None:
                        raise RuntimeError(f"service {name} exited during start-up (code {self.children[name].returncode})")
                    try:
                        async with http.get(f"http://127.0.0.1:{self.health_ports[name]}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                            if r.status == 200:
                                pending.discard(name)
                                self.say(f"{name:<10} ready, health on http://127.0.0.1:{self.health_ports[name]}/readyz")
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        pass
                if pending:
                    await asyncio.sleep(0.2)  # polling child readiness over HTTP, bounded by the deadline
        if pending:
            raise RuntimeError(f"not ready within {timeout:.0f} s: {', '.join(sorted(pending))}")

    async def wait_until_stopped(self, stopping: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(p.wait()) for p in self.children.values()]
        stop = asyncio.ensure_future(stopping.wait())
        done, _ = await asyncio.wait([stop, *waiters], return_when=asyncio.FIRST_COMPLETED)
        for w in [stop, *waiters]:
            w.cancel()
        for name, proc in self.children.items():
            if proc.returncode is not None:
                self.say(f"{name} exited with code {proc.returncode}; stopping the stack")

    async def stop(self) -> None:
        for proc in self.children.values():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.children.items():
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self.broker is not None:
            await self.broker.stop()
        if self.stack_file.exists():
            self.stack_file.unlink()
        self.say("stopped")


async def run_up(settings: Settings, say: Callable[[str], None] = print) -> None:
    stack = Stack(settings, say)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stack.start_infrastructure()
        await stack.start_services()
        say(f"conduit is up: {len(stack.children)} services, state in {settings.state_dir}. Ctrl-C stops it.")
        await stack.wait_until_stopped(stopping)
    finally:
        await stack.stop()
