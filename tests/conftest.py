"""Shared fixtures: a real server in this process (Trio) or in a child process (for signals,
kill -9 and clients on other event loops). Everything listens on 127.0.0.1, port 0."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from protocols.trio_client import Client, open_client
from server import Server, load_config

READY = re.compile(r"ready on (\S+?)(?:,| |\Z)")


def make_config(data: Path, **overrides):
    values = {"data": str(data), "listen": ["127.0.0.1:0"], **overrides}
    return load_config(env={}, overrides=values)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    """A server running in the test's own Trio loop."""
    srv = Server(make_config(tmp_path / "data"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        srv.request_stop()


@pytest.fixture
async def client(server: Server) -> AsyncIterator[Client]:
    async with open_client(server.addresses[0]) as c:
        yield c


class ServerProcess:
    """``pigeon serve`` in a child process; stderr is collected in ``log``."""

    def __init__(self, data: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.extra = extra
        self.env = {**os.environ, **(env or {})}
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""

    def start(self, timeout: float = 20.0) -> ServerProcess:
        self.log = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server._cli", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0", *self.extra],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        ready = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line)
                match = READY.search(line)
                if match:
                    self.address = match.group(1)
                    ready.set()
            ready.set()

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        if not ready.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError("server did not start:\n" + "".join(self.log))
        return self

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._release()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._release()

    def _release(self) -> None:
        """Let the log pump reach EOF, then close the pipe."""
        if self.proc is not None and self.proc.stderr is not None:
            self._pump.join(5)
            self.proc.stderr.close()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait()


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A started ``pigeon serve`` child process on a fresh data folder."""
    proc = ServerProcess(tmp_path / "data").start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture
def spawn_server(tmp_path: Path) -> Iterator:
    """Factory for child-process servers with custom flags; all are killed at the end."""
    procs: list[ServerProcess] = []

    def spawn(*extra: str, data: Path | None = None, env: dict[str, str] | None = None, start: bool = True) -> ServerProcess:
        proc = ServerProcess(data or tmp_path / "data", *extra, env=env)
        procs.append(proc)
        return proc.start() if start else proc

    yield spawn
    for proc in procs:
        proc.kill()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
