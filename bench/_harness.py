"""Shared by the benchmark scenarios: a server in a child process, stats, latency summaries.

The server under test runs as its own process (``python -m server.cli serve``) on a fresh
data folder; load comes from this process over loopback, on asyncio with uvloop, so on a
2-core machine the server and the load generator each get a core. CPU figures are the server
process's own accounting (``server.stats`` reads ``getrusage``).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from protocols import api
from protocols.asyncio_client import Client
from server.testing import ServerProcess

__all__ = ["ServerUnderTest", "Latencies", "write_results", "server_cpu", "machine", "own_cpu", "own_rss", "Progress",
           "title", "BODY", "tree_cpu"]

def own_cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def own_rss() -> int:
    """Resident memory of this process, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far of ``pid`` and each of its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    cpu: dict[int, float] = {}
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            cpu[p] = (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                stack.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, IndexError, ValueError):
            continue
    return cpu


class Progress:
    """A sender's resident memory at each tenth of its run."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.step = max(1, count // 10)
        self.rss: list[int] = []
        self.done = 0

    def add(self, n: int) -> None:
        before = self.done // self.step
        self.done += n
        if self.done // self.step > before:
            self.rss.append(own_rss())


def title(i: int) -> str:
    """The title of the push benchmarks' i-th notification."""
    return f"Order #{i} shipped"


BODY = "Your parcel is on its way and arrives on Tuesday."


class ServerUnderTest:
    """``pigeon serve`` on a temporary data folder, as a context manager; with ``address``,
    a server already running there (for example under a profiler) instead."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, address: str | None = None) -> None:
        self.external = address
        self._tmp = tempfile.TemporaryDirectory(prefix="pigeon-bench-")
        self.process = ServerProcess(Path(self._tmp.name) / "data", *extra, env=env)
        self.address = address or ""

    def __enter__(self) -> ServerUnderTest:
        if not self.external:
            self.address = self.process.start(timeout=30).address
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if not self.external:
                self.process.__exit__(*exc)
        finally:
            self._tmp.cleanup()


async def server_cpu(client: Client) -> float:
    """The server process's CPU time so far (user + system), in seconds."""
    stats = await client.call(api.GetStats())
    return stats.process.cpu_user_s + stats.process.cpu_system_s


class Latencies:
    """An HDR histogram of latencies in microseconds."""

    def __init__(self) -> None:
        self.histogram = HdrHistogram(1, 120_000_000, 3)

    def record(self, seconds: float) -> None:
        self.histogram.record_value(max(1, int(seconds * 1e6)))

    def summary(self) -> dict[str, float]:
        h = self.histogram
        return {
            "count": h.get_total_count(),
            "p50_ms": h.get_value_at_percentile(50) / 1000,
            "p90_ms": h.get_value_at_percentile(90) / 1000,
            "p99_ms": h.get_value_at_percentile(99) / 1000,
            "max_ms": h.get_max_value() / 1000,
        }


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def write_results(name: str, results: dict[str, Any], out: str | None) -> Path:
    path = Path(out) if out else Path(__file__).parent / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path
