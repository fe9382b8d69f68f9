"""One lifecycle for every service, after arq and Mailman's runners.

``start`` opens resources in order (pool, producer, consumer); ``run`` works until asked to stop;
``stop`` closes in reverse.  SIGTERM or SIGINT sets the stopping event: the service stops fetching,
finishes the work in flight, commits, then closes, inside Kubernetes' grace period.  Burst mode runs
until there is no more work, then returns: end-to-end tests use it instead of sleeps.  Constructors
do no I/O.  Each service also serves ``/healthz``, ``/readyz`` and ``/metrics``.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shared.metrics import SERVICE_UP

log = logging.getLogger(__name__)


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def run(self, stopping: asyncio.Event, *, burst: bool = False) -> None: ...

    async def stop(self) -> None: ...

    async def readiness(self) -> dict[str, str]:
        """Name -> 'ok' or a short problem; ready when every value is 'ok'."""
        ...


class HealthServer:
    """The probes and metrics endpoint a Kubernetes pod exposes."""

    def __init__(self, service: Service, port: int, host: str = "0.0.0.0") -> None:
        self._service = service
        self._port = port
        self._host = host
        self._runner: web.AppRunner | None = None
        self.started = False
        # Set once a stop began: a draining service takes no new work, so it says it is not ready.
        self.stopping: asyncio.Event | None = None
        self.bound_port: int | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        self.bound_port = server.sockets[0].getsockname()[1] if server and server.sockets else self._port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"service": self._service.name, "status": "alive"})

    async def _readyz(self, _: web.Request) -> web.Response:
        if not self.started:
            return web.json_response({"status": "starting"}, status=503)
        if self.stopping is not None and self.stopping.is_set():
            return web.json_response({"status": "stopping"}, status=503)
        try:
            checks = await asyncio.wait_for(self._service.readiness(), timeout=5)
        except Exception as exc:  # noqa: BLE001 - a probe answers, it never raises
            checks = {"readiness": f"failed: {type(exc).__name__}"}
        ready = all(v == "ok" for v in checks.values())
        return web.json_response({"status": "ready" if ready else "not ready", "checks": checks}, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def run_service(service: Service, *, health_port: int | None = None, burst: bool = False,
                      stopping: asyncio.Event | None = None, health_host: str = "0.0.0.0") -> None:
    """Start, run until stopped (SIGTERM/SIGINT) or, in burst mode, until idle; then stop cleanly."""
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stopping.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread: the caller stops us
            pass
    health = HealthServer(service, health_port, health_host) if health_port is not None else None
    if health is not None:
        health.stopping = stopping
    try:
        if health is not None:
            await health.start()
        await service.start()
        if health is not None:
            health.started = True
        SERVICE_UP.labels(service.name).set(1)
        log.info("%s started", service.name)
        await service.run(stopping, burst=burst)
    finally:
        stopping.set()
        SERVICE_UP.labels(service.name).set(0)
        await service.stop()
        if health is not None:
            await health.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)
        log.info("%s stopped", service.name)
