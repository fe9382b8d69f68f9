"""A benchmark's scratch folder: created private to the run, removed when the process exits."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def bench_workdir(*, memory: bool = False) -> Path:
    """A new folder for one run's peers.  It is removed at exit, after the embedded PostgreSQL's own
    at-exit stop (atexit runs last-registered first, and the server registers its stop later, when
    it starts): removing the folder first would leave that server running without its data.
    Readable by others (0755) because Dovecot's and PostgreSQL's users must reach into it.

    ``memory``: on tmpfs (/dev/shm) where there is one, for what a peer writes only so the bench can
    check it (a sink's dumps): on this machine's virtual disk, dumping each message made smtp-sink
    itself the bottleneck (1,650-2,200 msg/s from smtp-source, 5,000-6,600 on tmpfs)."""
    shm = Path("/dev/shm")
    where = str(shm) if memory and shm.is_dir() and os.access(shm, os.W_OK) else None
    workdir = Path(tempfile.mkdtemp(prefix="conduit-bench-", dir=where))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    workdir.chmod(0o755)
    return workdir
