"""Loopback ports for the real test peers.

Many helpers and test runs share one machine, so no peer ever gets a fixed port: either the
peer binds port 0 itself and we read back what the kernel gave it (`listening_ports`), or,
for a peer that cannot be told "port 0" (Dovecot), we ask the kernel for free ports just
before starting it (`free_ports`) and the launcher retries with new ones if it lost the race.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on `host` that was free a moment ago."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """`count` distinct TCP ports on `host` that were free a moment ago.

    All sockets stay open until every port is chosen, so the ports are distinct.
    """
    with ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def listening_ports(pid: int) -> list[int]:
    """TCP ports that process `pid` listens on (Linux /proc), sorted.

    Lets a peer started with port 0 (smtp-sink) tell us its port without any race.
    Returns [] when the process is gone or listens on nothing yet.
    """
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    try:
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue  # the fd closed while we looked
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)  # column titles
                for line in f:
                    fields = line.split()
                    # fields: sl local_address rem_address st ... inode (index 9); 0A = LISTEN
                    if fields[3] == "0A" and fields[9] in inodes:
                        ports.add(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return sorted(ports)
