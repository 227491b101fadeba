"""Shared by the benchmark scenarios: a server in a child process, stats, latency summaries.

The server under test runs as its own process (``python -m server._cli serve``) on a fresh
data folder; load comes from this process over loopback, on asyncio with uvloop, so on a
2-core machine the server and the load generator each get a core. CPU figures are the server
process's own accounting (``server.stats`` reads ``getrusage``).
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from hdrh.histogram import HdrHistogram

from protocols import api
from protocols.asyncio_client import Client

__all__ = ["ServerUnderTest", "Latencies", "write_results", "server_cpu", "machine"]

_READY = re.compile(r"ready on (\S+?)(?:,| |\Z)")


class ServerUnderTest:
    """``pigeon serve`` on a temporary data folder, as a context manager."""

    def __init__(self, *extra: str, env: dict[str, str] | None = None, address: str | None = None) -> None:
        """With ``address``, use that running server instead of starting one."""
        self.external = address
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.address = ""
        self.log: list[str] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="pigeon-bench-")
        self.data = Path(self._tmp.name) / "data"

    def __enter__(self) -> ServerUnderTest:
        if self.external:
            self.address = self.external
            return self
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server._cli", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0",
             *self.extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=self.env,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = _READY.search(line)
                if match:
                    self.address = match.group(1)
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(30) or not self.address:
            self.proc.kill()
            raise RuntimeError("the server did not start:\n" + "".join(self.log))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.external:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._pump.join(5)
        if self.proc.stderr:
            self.proc.stderr.close()
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
