"""Pigeon's mock providers from a test's side: `MockProcess` runs a mock (`plugins.apns.mock`,
`plugins.fcm.mock`) as a child process, and `MockAdminBase` and `AsyncMockAdminBase` are the
admin clients (httpx over HTTP/2) that each mock extends with its own calls.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import msgspec

from plugins._mock_tls import client_ssl_context

__all__ = ["AsyncMockAdminBase", "MockAdminBase", "MockAdminError", "MockProcess"]

_json_encode = msgspec.json.encode


class MockAdminError(Exception):
    """An admin call failed: ``status`` and the mock's ``error`` text."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status}: {error}")
        self.status = status
        self.error = error


def _admin_result(response: Any) -> Any:
    try:
        doc = response.json()
    except ValueError:
        doc = {"error": response.text}
    if response.status_code >= 400:
        raise MockAdminError(response.status_code, doc.get("error", "") if isinstance(doc, dict) else str(doc))
    return doc


class MockAdminBase:
    """Blocking admin client (httpx over HTTP/2). Call it as ``admin(method, path, json)`` or
    use the named methods; errors raise `MockAdminError`. Each mock adds its own methods."""

    def __init__(self, base_url: str, ca_file: Path) -> None:
        import httpx

        self._client = httpx.Client(base_url=base_url, http2=True, verify=client_ssl_context(ca_file), timeout=30.0)

    def __call__(self, method: str, path: str, json: Any = None) -> Any:
        return self.request(method, path, json)

    def request(self, method: str, path: str, json: Any = None) -> Any:
        if not path.startswith("/"):
            path = "/_mock/" + path
        content = None if json is None else _json_encode(json)
        return _admin_result(self._client.request(method, path, content=content))

    def state(self) -> dict[str, Any]:
        return self.request("GET", "/_mock/state")

    def set_faults(self, **faults: Any) -> dict[str, Any]:
        return self.request("PUT", "/_mock/faults", faults)

    def reset_faults(self) -> dict[str, Any]:
        return self.request("DELETE", "/_mock/faults")

    def accepted(self) -> list[dict[str, Any]]:
        return self.request("GET", "/_mock/accepted")

    def clear_accepted(self) -> int:
        return self.request("DELETE", "/_mock/accepted")["cleared"]

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/_mock/stats")

    def clear_stats(self) -> None:
        self.request("DELETE", "/_mock/stats")

    def close(self) -> None:
        self._client.close()


class AsyncMockAdminBase:
    """`MockAdminBase` for async code (asyncio or Trio, through httpx/anyio); use ``async with``."""

    def __init__(self, base_url: str, ca_file: Path) -> None:
        import httpx

        self._client = httpx.AsyncClient(base_url=base_url, http2=True, verify=client_ssl_context(ca_file), timeout=30.0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def __call__(self, method: str, path: str, json: Any = None) -> Any:
        return await self.request(method, path, json)

    async def request(self, method: str, path: str, json: Any = None) -> Any:
        if not path.startswith("/"):
            path = "/_mock/" + path
        content = None if json is None else _json_encode(json)
        return _admin_result(await self._client.request(method, path, content=content))

    async def state(self) -> dict[str, Any]:
        return await self.request("GET", "/_mock/state")

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        return await self.request("PUT", "/_mock/faults", faults)

    async def reset_faults(self) -> dict[str, Any]:
        return await self.request("DELETE", "/_mock/faults")

    async def accepted(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/_mock/accepted")

    async def clear_accepted(self) -> int:
        return (await self.request("DELETE", "/_mock/accepted"))["cleared"]

    async def stats(self) -> dict[str, Any]:
        return await self.request("GET", "/_mock/stats")

    async def clear_stats(self) -> None:
        await self.request("DELETE", "/_mock/stats")

    async def aclose(self) -> None:
        await self._client.aclose()


A = TypeVar("A", bound="MockAdminBase")
AA = TypeVar("AA", bound="AsyncMockAdminBase")


class MockProcess(Generic[A, AA]):
    """A mock server in a child process, on 127.0.0.1 and a free port by default.

    Subclasses set `name`, `ready_prefix`, `script` and the admin client classes, and may add
    command-line arguments (`arguments`). ``with`` and ``async with`` start and stop it (the
    async form runs start/stop in a worker thread, so it works on Trio and asyncio).

    Args:
        dir: state directory (CA, server certificate, config); default: a new temporary one.
        config: the initial state; written to ``dir/config.json`` and passed as ``--config``.
        workers: processes sharing the port.
        hostnames: extra names for the server certificate.
        listen: ``HOST:PORT``.
        extra_args: more command-line arguments.
        env: environment variables to add.

    Attributes:
        address, host, port, url: where it listens, once started.
        ca_file: the CA certificate clients must trust.
        stderr_lines: what the mock wrote on stderr so far.
        returncode: the exit status once stopped.
    """

    #: Shown in messages and used for temporary directories (``mock-apns``).
    name: ClassVar[str] = "mock"
    #: The start of the ready line on stdout.
    ready_prefix: ClassVar[str] = "mock ready on "
    #: The mock's module file, run as a script.
    script: ClassVar[str] = ""
    #: The mock's admin clients (`admin`, `async_admin`).
    admin_class: type[A]
    async_admin_class: type[AA]

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        *,
        config: dict[str, Any] | None = None,
        workers: int = 1,
        hostnames: Iterable[str] = (),
        listen: str = "127.0.0.1:0",
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.dir = Path(dir) if dir is not None else Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.config = config
        self.workers = workers
        self.hostnames = tuple(hostnames)
        self.listen = listen
        self.extra_args = tuple(extra_args)
        self.env = env or {}
        self.address = ""
        self.host = ""
        self.port = 0
        self.stderr_lines: list[str] = []
        self.returncode: int | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._threads: list[threading.Thread] = []
        self._admin: A | None = None

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def url(self) -> str:
        return f"https://{self.address}"

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    @property
    def pid(self) -> int | None:
        """The mock's process id (with ``workers`` > 1, the parent of the workers)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def arguments(self) -> list[str]:
        """The subclass's own command-line arguments."""
        return []

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            str(Path(self.script).resolve()),
            "--dir",
            str(self.dir),
            "--listen",
            self.listen,
            "--workers",
            str(self.workers),
            *self.arguments(),
            "--exit-on-stdin-eof",
        ]
        for name in self.hostnames:
            cmd += ["--hostname", name]
        if self.config is not None:
            cmd += ["--config", str(self.dir / "config.json")]
        return cmd + list(self.extra_args)

    def start(self, timeout: float = 30.0) -> Self:
        """Start the mock and wait for its ready line; raise RuntimeError (with its stderr) if it fails."""
        if self.running:
            raise RuntimeError("the mock is already running")
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.config is not None:
            (self.dir / "config.json").write_bytes(_json_encode(self.config))
        self.address, self.host, self.port, self.returncode = "", "", 0, None
        self.stderr_lines = []
        self._proc = proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **self.env},
        )
        ready = threading.Event()

        def read_stdout() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith(self.ready_prefix) and not self.address:
                    self.address = line[len(self.ready_prefix) :].strip()
                    ready.set()
            ready.set()

        def read_stderr() -> None:
            assert proc.stderr is not None
            for line in proc.stderr:
                self.stderr_lines.append(line)

        self._threads = [
            threading.Thread(target=read_stdout, daemon=True, name=f"{self.name}-stdout"),
            threading.Thread(target=read_stderr, daemon=True, name=f"{self.name}-stderr"),
        ]
        for thread in self._threads:
            thread.start()
        if not ready.wait(timeout) or not self.address:
            self.kill()
            raise RuntimeError(f"{self.name} did not start (exit {self.returncode}):\n{self.stderr}")
        host, _, port = self.address.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        return self

    @property
    def admin(self) -> A:
        """A blocking admin client (created on first use, closed by stop())."""
        if self._admin is None:
            self._admin = self.admin_class(self.url, self.ca_file)
        return self._admin

    def async_admin(self) -> AA:
        """A new async admin client; close it (``async with``) before the loop ends."""
        return self.async_admin_class(self.url, self.ca_file)

    def ssl_context(self, *, alpn: bool = True) -> ssl.SSLContext:
        """A client SSL context trusting the mock's CA (offering ALPN h2 unless ``alpn=False``)."""
        return client_ssl_context(self.ca_file, alpn=alpn)

    def stop(self, timeout: float = 10.0) -> int:
        """Graceful stop (stdin closed, then SIGTERM, then SIGKILL); returns the exit status."""
        self._close_admin()
        proc = self._proc
        if proc is None:
            return self.returncode or 0
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(timeout / 2)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(timeout / 2)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        self._release()
        return proc.returncode

    def kill(self) -> None:
        self._close_admin()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._release()

    def _close_admin(self) -> None:
        if self._admin is not None:
            with contextlib.suppress(Exception):
                self._admin.close()
            self._admin = None

    def _release(self) -> None:
        proc = self._proc
        if proc is None:
            return
        for thread in self._threads:
            thread.join(5)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.returncode = proc.returncode
        self._proc = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()

    async def __aenter__(self) -> Self:
        import anyio.to_thread

        return await anyio.to_thread.run_sync(self.start)

    async def __aexit__(self, *exc_info: object) -> None:
        import anyio.to_thread

        try:
            await anyio.to_thread.run_sync(self.stop)
        finally:
            self.kill()
