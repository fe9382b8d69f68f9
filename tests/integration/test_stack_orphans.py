"""`conduit up` killed with SIGKILL leaves nothing running: its services, its Tansu broker, its guard and
its embedded PostgreSQL stop by themselves (Linux), and the next `conduit up` on the folder starts cleanly.

The stack runs as a user runs it: the real command, a state folder of the test's own, no DATABASE_URL
(so the embedded PostgreSQL of that folder) and no broker set (so the embedded one).
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.test_cli_robustness import ROOT, Up, state  # noqa: F401 - state is a fixture
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")

SERVICES = {"ingest", "evaluate", "dispatch", "exchange_sync"}


@pytest.fixture
def env(state: Path) -> dict[str, str]:
    """A user's environment: a state folder of the test's own and nothing configured."""
    env = {**os.environ, "CONDUIT_STATE_DIR": str(state / "conduit"), "CONDUIT_LOG_LEVEL": "WARNING",
           "PYTHONPATH": str(ROOT), "CONDUIT_STOP_GRACE_SECONDS": "10"}
    for name in ("DATABASE_URL", "KAFKA_BOOTSTRAP_SERVERS", "CONDUIT_TOPIC_PREFIX", "CALF_TANSU_BIN"):
        env.pop(name, None)
    return env


def postmaster_pid(state_dir: Path) -> int | None:
    try:
        return int((state_dir / "postgres" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def stack_processes(state_dir: Path, known: set[int]) -> list[str]:
    """What still runs of the stack of ``state_dir`` ("pid command" each): the processes seen before
    (services, broker, PostgreSQL's), and any naming the folder in its command line or environment."""
    found = {}
    for proc in psutil.process_iter(["cmdline", "environ", "status"]):
        info = proc.info
        if info["status"] == psutil.STATUS_ZOMBIE:   # ended; only its exit status is left to read
            continue
        command = " ".join(info["cmdline"] or ())
        if (proc.pid in known or str(state_dir) in command
                or (info["environ"] or {}).get("CONDUIT_STATE_DIR") == str(state_dir)):
            found[proc.pid] = command
    return [f"{pid} {command}" for pid, command in sorted(found.items())]


async def nothing_left(state_dir: Path, known: set[int], after: str, timeout: float = 60) -> None:
    left: list[str] = []

    async def none() -> bool:
        left[:] = stack_processes(state_dir, known)
        return not left

    try:
        await eventually(none, timeout=timeout, interval=0.2, what="the stack's processes to end")
    except AssertionError:
        raise AssertionError(f"{len(left)} processes of the stack still running {timeout:.0f} s after {after}:\n"
                             + "\n".join(left)) from None


def stop_postgres(state_dir: Path) -> None:
    """Whatever the test found: a PostgreSQL left running is stopped (fast shutdown), not left behind."""
    pid = postmaster_pid(state_dir)
    if pid is None:
        return
    try:
        server = psutil.Process(pid)
        server.send_signal(signal.SIGINT)
        server.wait(30)
    except psutil.NoSuchProcess:
        pass


async def test_a_stack_killed_with_sigkill_leaves_nothing_running_and_starts_again(env: dict[str, str]) -> None:
    first, second = Up(env), Up(env)
    state_dir = first.state_dir
    try:
        await first.start()   # once it says "conduit is up": every service answered /readyz
        children = first.children()
        assert set(children) == SERVICES | {"broker"}, children
        postgres = postmaster_pid(state_dir)
        assert postgres is not None, "no embedded PostgreSQL for the state folder"
        known = {*children.values(), postgres, *(c.pid for c in psutil.Process(postgres).children())}

        # Not `await first.proc.wait()`: on Python 3.11 it also waits for its output pipes, which
        # children left running would hold open.  The scan below counts `conduit up` itself too.
        first.proc.kill()
        await nothing_left(state_dir, known, "conduit up was killed with SIGKILL")

        # The same folder: its lock was released with the dead process, its record is stale.
        await second.start()
        assert second.record()["pid"] == second.proc.pid
        assert set(second.children()) == SERVICES | {"broker"}
        second.proc.send_signal(signal.SIGTERM)
        assert await second.exited(timeout=60) == 0, second.out + second.err
        assert not [line for line in second.err if line.startswith("error") or "Traceback" in line], second.err
        # Its clean stop stops the database too: the killed stack's pid no longer keeps it running.
        await nothing_left(state_dir, set(), "the second conduit up stopped")
    finally:
        await first.close()
        await second.close()
        stop_postgres(state_dir)


# --- the parent-death signal and the guard on their own ----------------------------------------------

SLEEPER = [sys.executable, "-c", "import time; time.sleep(300)"]


async def ended(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill(process: psutil.Process) -> None:
    try:
        process.kill()
    except psutil.NoSuchProcess:
        pass


async def test_a_child_gets_sigterm_when_its_parent_is_killed() -> None:
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import subprocess, sys\n"
        "from conduit.orphans import stop_with_this_process\n"
        f"child = subprocess.Popen({SLEEPER!r}, preexec_fn=stop_with_this_process())\n"
        "print(child.pid, flush=True)\n"
        "child.wait()\n",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    child = psutil.Process(int(await asyncio.wait_for(parent.stdout.readline(), 30)))
    try:
        parent.kill()
        await parent.wait()
        await eventually(lambda: ended(child), timeout=20, what="the child of a killed parent to end")
    finally:
        kill(child)


async def test_a_child_whose_parent_died_before_it_was_told_does_not_run() -> None:
    # The child's parent is not the process that asked for the signal, as when that one died between
    # the fork and prctl and the child was adopted: it ends at once (128 + SIGTERM) instead of running.
    code = ("import os, subprocess, sys\n"
            "from conduit import orphans\n"
            "own = os.getpid\n"
            "os.getpid = lambda: 1\n"
            "in_child = orphans.stop_with_this_process()\n"
            "os.getpid = own\n"
            f"print(subprocess.run({SLEEPER!r}, preexec_fn=in_child, timeout=60).returncode)\n")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT, stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0 and out.split() == [str(128 + signal.SIGTERM).encode()], out


async def test_the_guard_stops_what_is_left_when_its_pipe_closes_without_stopped() -> None:
    stubborn = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(flush=True); "
        "time.sleep(300)", stdout=asyncio.subprocess.PIPE)
    await asyncio.wait_for(stubborn.stdout.readline(), 30)   # SIGTERM ignored from now on
    plain = await asyncio.create_subprocess_exec(*SLEEPER)
    kept = await asyncio.create_subprocess_exec(*SLEEPER)
    children = [psutil.Process(p.pid) for p in (stubborn, plain, kept)]

    async def guard(orders: str, *flags: str) -> int:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit.orphans", "--grace", "2", *flags,
                                                    cwd=ROOT, stdin=asyncio.subprocess.PIPE)
        await asyncio.wait_for(proc.communicate(orders.encode()), 60)   # closes the pipe, as `conduit up` ending
        return proc.returncode

    try:
        # A stack that stopped cleanly: its guard leaves everything be.
        assert await guard(f"child {kept.pid}\nstopped\n") == 0
        started = time.monotonic()
        # A `conduit up` that died: SIGTERM (--terminate: as where the kernel sends none), then SIGKILL
        # after the grace period to what still runs.
        assert await guard(f"child {stubborn.pid}\nchild {plain.pid}\n", "--terminate") == 0
        assert time.monotonic() - started >= 2
        assert await asyncio.wait_for(plain.wait(), 10) == -signal.SIGTERM
        assert await asyncio.wait_for(stubborn.wait(), 10) == -signal.SIGKILL
        assert kept.returncode is None and not await ended(children[2])
    finally:
        for child in children:
            kill(child)
        for proc in (stubborn, plain, kept):
            await proc.wait()
