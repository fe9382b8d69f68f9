"""A benchmark's scratch folder: created private to the run, removed when the process exits."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


def bench_workdir() -> Path:
    """A new folder for one run's peers.  It is removed at exit, after the embedded PostgreSQL's own
    at-exit stop (atexit runs last-registered first, and the server registers its stop later, when
    it starts): removing the folder first would leave that server running without its data.
    Readable by others (0755) because Dovecot's and PostgreSQL's users must reach into it."""
    workdir = Path(tempfile.mkdtemp(prefix="conduit-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    workdir.chmod(0o755)
    return workdir
