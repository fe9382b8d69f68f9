"""Running `conduit` as a user runs it (a subprocess) against a test's database and broker."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from shared.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


async def conduit_cli(settings: Settings, *args: str) -> tuple[int, str, str]:
    """``conduit ARGS``: exit code, standard output, standard error."""
    env = {**os.environ, "CONDUIT_STATE_DIR": str(settings.state_dir), "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers or "",
           "CONDUIT_TOPIC_PREFIX": settings.topic_prefix, "PYTHONPATH": str(ROOT)}
    env.pop("DATABASE_URL", None)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "conduit", *args, env=env, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()
