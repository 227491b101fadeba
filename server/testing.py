"""Helpers for testing against a real Pigeon server (for this project and for plugin authors).

    with ServerProcess(tmp_path / "data") as server:
        async with open_client(server.address) as client:
            ...

`ServerProcess` runs ``pigeon serve`` in a child process on 127.0.0.1 with a free port, waits
until it is ready (its ``--ready-file`` names the port), and collects its log; it can be
signalled, killed and started again on the same data folder.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess"]


class ServerProcess:
    """``pigeon serve --data DATA --listen 127.0.0.1:0 *extra`` in a child process.

    Args:
        data: the data folder.
        extra: more command-line arguments.
        env: environment variables to add (``PIGEON_*`` settings).
        auth: the ``auth`` setting (``PIGEON_AUTH``) unless ``env`` sets it: ``none`` by default
            (on loopback any client may call anything); ``keys`` to test with API keys (the
            first admin key is then in `admin_key`).

    Attributes:
        address: ``HOST:PORT`` once started.
        log: the server's log lines so far.
    """

    def __init__(self, data: Path, *extra: str, env: dict[str, str] | None = None, auth: str = "none") -> None:
        self.data = data
        self.extra = extra
        self.env = {**os.environ, "PIGEON_AUTH": auth, **(env or {})}
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self._pump: threading.Thread | None = None
        self._ready_dir: str | None = None

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Start the server and wait until it is ready (raises RuntimeError with its log if not)."""
        self.log = []
        self.address = ""
        self._ready_dir = tempfile.mkdtemp(prefix="pigeon-ready-")
        ready = Path(self._ready_dir) / "ready"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--data", str(self.data), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready), *self.extra],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env=self.env,
        )
        proc = self.proc

        def pump() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.log.append(line)

        self._pump = threading.Thread(target=pump, daemon=True)
        self._pump.start()
        deadline = time.monotonic() + timeout
        while not ready.exists():  # written whole, once the server listens
            if proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError("the server did not start:\n" + "".join(self.log))
            time.sleep(0.01)
        self.address = ready.read_text().split()[0]
        return self

    @property
    def admin_key(self) -> str:
        """The admin key the server wrote beside its data folder at its first start (``auth =
        "keys"``)."""
        folder = Path(self.data).resolve()
        return folder.with_name(folder.name + ".admin-key").read_text().strip()

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit; return its status (negative: killed by a signal)."""
        assert self.proc is not None
        code = self.proc.wait(timeout)
        self._release()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._release()

    def stop(self) -> int:
        """SIGTERM, then wait: the exit status of a graceful stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return self.wait()

    def _release(self) -> None:
        """Let the log pump reach the end of the output, then close the pipe."""
        if self.proc is not None and self.proc.stderr is not None:
            if self._pump is not None:
                self._pump.join(5)
            self.proc.stderr.close()
        if self._ready_dir is not None:
            shutil.rmtree(self._ready_dir, ignore_errors=True)
            self._ready_dir = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.stop()
        finally:
            self.kill()
