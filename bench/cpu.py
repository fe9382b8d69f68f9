"""Where a benchmark window's CPU went, machine-wide: every process, grouped by program.

A figure on this 2-core machine is bounded by the CPU that the whole pipeline (Conduit and its
peers) spends per message: ``CpuSampler`` reads ``/proc/stat`` and every process's ``/proc/PID/stat``
a few times a second from a thread, and ``window(start, end)`` gives the CPU seconds spent between
two wall-clock times (interpolated between samples), in total and per program.  One sample reads
~200 small files (~3 ms here), so the sampler costs ~1% of a core, counted in "this process".
"""
from __future__ import annotations

import bisect
import os
import threading
import time
from collections import Counter
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _machine_busy() -> float:
    """CPU seconds spent on anything but idle and I/O wait since boot, over all cores."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICK


def _processes() -> dict[int, tuple[str, float]]:
    """Every live process's program name and CPU seconds so far."""
    found: dict[int, tuple[str, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue   # gone meanwhile
        fields = text[text.rindex(")") + 2:].split()
        found[int(entry.name)] = (text[text.index("(") + 1:text.rindex(")")], (int(fields[11]) + int(fields[12])) / TICK)
    return found


def _program(name: str) -> str:
    """A process's program: kernel threads rename themselves with their current work
    (``kworker/0:2-events``), and Tansu's binary carries its version (``tansu-v0.6.0-...``)."""
    return name.split("/")[0].split("-v")[0]


class CpuSampler:
    def __init__(self, interval: float = 0.25) -> None:
        self._interval = interval
        self._samples: list[tuple[float, float, Counter[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        seen: dict[int, tuple[str, float]] = {}
        while True:
            # A process that exited keeps what it had spent at its last sample (CPU never goes back).
            seen.update(_processes())
            programs: Counter[str] = Counter()
            for pid, (name, seconds) in seen.items():
                programs["this process" if pid == me else _program(name)] += seconds
            self._samples.append((time.time(), _machine_busy(), programs))
            if self._stop.wait(self._interval) and len(self._samples) > 1:
                return

    def window(self, start: float, end: float) -> tuple[float, Counter[str]]:
        """(machine CPU seconds, CPU seconds per program) between two ``time.time()`` values.

        What a process spent between its last sample and its exit counts for the machine only."""
        times = [s[0] for s in self._samples]

        def at(t: float) -> tuple[float, Counter[str]]:
            i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
            (t0, busy0, p0), (t1, busy1, p1) = self._samples[i - 1], self._samples[i]
            f = 0.0 if t1 == t0 else min(max((t - t0) / (t1 - t0), 0.0), 1.0)
            return busy0 + f * (busy1 - busy0), Counter({k: p0.get(k, 0) + f * (p1.get(k, 0) - p0.get(k, 0))
                                                         for k in set(p0) | set(p1)})

        busy_start, programs_start = at(start)
        busy_end, programs_end = at(end)
        spent = Counter({k: programs_end.get(k, 0) - programs_start.get(k, 0) for k in programs_end})
        return busy_end - busy_start, Counter({k: v for k, v in spent.items() if v > 0.005})


def report(busy: float, seconds: float, programs: Counter[str], count: int, unit: str = "message") -> str:
    """Two lines for a bench's output: the window's CPU over every process, and the rate it bounds."""
    cores = os.cpu_count() or 1
    shares = ", ".join(f"{name} {spent / count * 1e6:.0f}" for name, spent in programs.most_common(5))
    return (f"  CPU in that window, every process: {busy:.2f} s over {seconds:.2f} s on {cores} cores "
            f"({busy / (seconds * cores):.0%} busy), {busy / count * 1e6:.0f} us per {unit} ({shares})\n"
            f"  at that cost per {unit}, {cores} cores fully busy would allow at most {count * cores / busy:8.0f} msg/s")
