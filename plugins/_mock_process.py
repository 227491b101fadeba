"""A mock provider's own process (`plugins.apns.mock`, `plugins.fcm.mock`): its command line,
its ready line, stopping, and workers.

- Command line: `state_arguments`, `process_arguments` and `parse_arguments` build the options
  both mocks take (each adds its own between them); `run_main` runs a mock's ``serve``
  coroutine, or supervises workers; `split_listen` parses ``--listen``.
- Stopping: `install_stop` sets an event on SIGTERM/SIGINT or stdin EOF.
- Workers (``--workers N``): `supervise` binds N sockets to one port (SO_REUSEPORT), starts one
  worker process per socket and relays between them over socketpairs: a worker's admin change
  is applied by every other worker ("bcast", the app's ``apply(cmd)``) and lists and counters
  are gathered from all of them ("gather", the app's ``collect_local(what)``). `IpcClient` is
  a worker's end of its socketpair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import msgspec

from plugins._mock_tls import ensure_certificates

__all__ = [
    "IpcClient",
    "install_stop",
    "parse_arguments",
    "print_ready",
    "process_arguments",
    "quiet_exception_handler",
    "run",
    "run_main",
    "split_listen",
    "state_arguments",
    "supervise",
]

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


# --------------------------------------------------------------------------------------------
# Entry-point plumbing


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as (host, port); exits with a message if malformed."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def print_ready(prefix: str, host: str, port: int) -> None:
    """The ready line on stdout (`plugins._mock_harness.MockProcess` waits for it)."""
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"{prefix}{shown}:{port}\n")
    sys.stdout.flush()


def install_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, *, watch_stdin: bool) -> None:
    """Set ``stop`` on SIGTERM or SIGINT and, with ``watch_stdin``, once stdin reaches EOF."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if watch_stdin:
        fd = sys.stdin.fileno()

        def on_stdin() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, on_stdin)


def quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Failed TLS handshakes and dropped clients are the clients' business: stay quiet."""
    exc = context.get("exception")
    message = str(context.get("message", ""))
    if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)) or "SSL" in message or "handshake" in message:
        return
    loop.default_exception_handler(context)


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run the mock's main coroutine on uvloop (asyncio's own loop where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)


def state_arguments(parser: argparse.ArgumentParser, *, dir_help: str) -> None:
    """``--dir`` and ``--listen``, the first options of both mocks."""
    parser.add_argument("--dir", help=dir_help)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")


def process_arguments(parser: argparse.ArgumentParser, *, config_help: str) -> None:
    """``--workers``, ``--config`` and ``--hostname``."""
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--config", help=config_help)
    parser.add_argument("--hostname", action="append", default=[], help="extra name for the server certificate")


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Add ``--exit-on-stdin-eof`` and the workers' hidden options last, then parse ``argv``."""
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (for parent processes)")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ipc-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args


def run_main(
    args: argparse.Namespace,
    argv: list[str],
    serve: Callable[[argparse.Namespace], Coroutine[Any, Any, int]],
    *,
    name: str,
    script: str,
    ready_prefix: str,
) -> int:
    """A mock's ``main``: ``serve(args)`` in this process, or, for ``--workers`` N > 1, the
    parent of N workers (``script`` run again with ``argv``). Without ``--dir`` the state goes
    to a new temporary directory (``name-...``), the workers' too."""
    if args.dir is None:
        args.dir = tempfile.mkdtemp(prefix=f"{name}-")
        argv += ["--dir", args.dir]
    if args.worker_index is None and args.workers > 1:
        return run(supervise(args, argv, name=name, script=script, ready_prefix=ready_prefix))
    return run(serve(args))


# --------------------------------------------------------------------------------------------
# Workers: the parent keeps one socketpair per worker and relays admin changes and gathers.


def _frame(msg: dict[str, Any]) -> bytes:
    data = _json_encode(msg)
    return struct.pack(">I", len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    msg: dict[str, Any] = _json_decode(await reader.readexactly(size))
    return msg


class WorkerApp(Protocol):
    """What a worker's app does for the parent: apply a change, report its own lists and counters."""

    def apply(self, cmd: dict[str, Any]) -> None: ...

    def collect_local(self, what: str) -> Any: ...


class IpcClient:
    """A worker's link to the parent; ``on_lost`` is called once the parent is gone."""

    def __init__(self, app: WorkerApp, sock: socket.socket, on_lost: Callable[[], object]) -> None:
        self.app = app
        self.sock = sock
        self.on_lost = on_lost
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.seq = 0
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_unix_connection(sock=self.sock)
        self.task = asyncio.get_running_loop().create_task(self._run(reader))

    def send(self, msg: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(_frame(msg))

    async def request(self, op: str, **fields: Any) -> Any:
        self.seq += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[self.seq] = future
        self.send({"op": op, "id": self.seq, **fields})
        return await asyncio.wait_for(future, 60)

    async def _run(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                msg = await _read_frame(reader)
                op = msg["op"]
                if op == "reply":
                    future = self.pending.pop(msg["id"], None)
                    if future is not None and not future.done():
                        future.set_result(msg.get("result"))
                elif op == "apply":
                    self.app.apply(msg["cmd"])
                    self.send({"op": "reply", "id": msg["id"], "result": None})
                elif op == "collect":
                    self.send({"op": "reply", "id": msg["id"], "result": self.app.collect_local(msg["what"])})
        except (asyncio.IncompleteReadError, ConnectionError):
            self.on_lost()


class _WorkerLink:
    """The parent's end of one worker's socketpair."""

    def __init__(self, index: int, proc: asyncio.subprocess.Process, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.index = index
        self.proc = proc
        self.reader = reader
        self.writer = writer
        self.ready = asyncio.Event()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.seq = 0

    async def ask(self, msg: dict[str, Any]) -> Any:
        self.seq += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[self.seq] = future
        self.writer.write(_frame({**msg, "id": self.seq}))
        return await asyncio.wait_for(future, 60)


def _bind_sockets(listen: str, count: int) -> tuple[str, int, list[socket.socket]]:
    """``count`` listening sockets on one port (the first one's, for port 0), SO_REUSEPORT."""
    host, port = split_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(count):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        sock.listen(1024)
        sockets.append(sock)
    return host, port, sockets


class _Supervisor:
    """The parent of the workers: starts them, relays between them, stops them."""

    def __init__(self, args: argparse.Namespace, argv: list[str], *, name: str, script: str) -> None:
        self.args = args
        self.argv = argv
        self.name = name
        self.script = str(Path(script).resolve())
        self.folder = Path(args.dir)
        self.links: list[_WorkerLink] = []
        self.tasks: list[asyncio.Task[Any]] = []
        # Set by watch(): each worker's exit, every worker ready, and the stop signal.
        self.exits: list[asyncio.Task[int]] = []
        self.ready: asyncio.Future[Any] | None = None
        self.stopper: asyncio.Task[bool] | None = None

    async def start_worker(self, index: int, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        parent_end, child_end = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            self.script,
            *self.argv,
            "--dir",
            str(self.folder),
            "--worker-index",
            str(index),
            "--worker-count",
            str(self.args.workers),
            "--listen-fd",
            str(sock.fileno()),
            "--ipc-fd",
            str(child_end.fileno()),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(sock.fileno(), child_end.fileno()),
        )
        child_end.close()
        sock.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent_end)
        link = _WorkerLink(index, proc, reader, writer)
        self.links.append(link)
        self.tasks.append(loop.create_task(self.relay(link)))

    async def relay(self, link: _WorkerLink) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                msg = await _read_frame(link.reader)
                op = msg["op"]
                if op == "ready":
                    link.ready.set()
                elif op == "reply":
                    future = link.pending.pop(msg["id"], None)
                    if future is not None and not future.done():
                        future.set_result(msg.get("result"))
                elif op in ("bcast", "gather"):
                    self.tasks.append(loop.create_task(self.fan_out(link, msg)))
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def fan_out(self, source: _WorkerLink, msg: dict[str, Any]) -> None:
        others = [link for link in self.links if link is not source]
        if msg["op"] == "bcast":
            await asyncio.gather(*(link.ask({"op": "apply", "cmd": msg["cmd"]}) for link in others))
            result = None
        else:
            result = await asyncio.gather(*(link.ask({"op": "collect", "what": msg["what"]}) for link in others))
        source.writer.write(_frame({"op": "reply", "id": msg["id"], "result": result}))

    async def watch(self, ready_line: Callable[[], None]) -> int:
        """Wait for every worker's ready (then call ``ready_line``) and for the stop; 1 when a
        worker exits first or the workers do not start within 60 s."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        install_stop(loop, stop, watch_stdin=self.args.exit_on_stdin_eof)
        self.exits = [loop.create_task(link.proc.wait()) for link in self.links]
        self.ready = ready = asyncio.gather(*(link.ready.wait() for link in self.links))
        self.stopper = stopper = loop.create_task(stop.wait())
        first: list[asyncio.Future[Any]] = [ready, stopper, *self.exits]
        done, _ = await asyncio.wait(first, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            print(f"{self.name}: workers did not start", file=sys.stderr, flush=True)
            return 1
        ready_line()
        then: list[asyncio.Future[Any]] = [stopper, *self.exits]
        done, _ = await asyncio.wait(then, return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            print(f"{self.name}: a worker exited; stopping", file=sys.stderr, flush=True)
            return 1
        return 0

    async def stop(self) -> None:
        """SIGTERM every worker, SIGKILL those still running 10 s later; end the relays."""
        assert self.ready is not None and self.stopper is not None, "watch() first"
        for link in self.links:
            if link.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    link.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.exits), 10)
        for link in self.links:
            if link.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    link.proc.kill()
                await link.proc.wait()
        pending: list[asyncio.Future[Any]] = [self.ready, self.stopper, *self.tasks]
        for task in pending:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.ready
        for link in self.links:
            link.writer.close()


async def supervise(args: argparse.Namespace, argv: list[str], *, name: str, script: str, ready_prefix: str) -> int:
    """The parent of ``args.workers`` worker processes (``script`` run with ``argv`` plus the
    hidden ``--worker-index``, ``--worker-count``, ``--listen-fd`` and ``--ipc-fd`` options).

    ``args`` needs ``dir``, ``hostname``, ``listen``, ``workers`` and ``exit_on_stdin_eof``.
    Prints the ready line once every worker is ready; stops them all on SIGTERM/SIGINT (or
    stdin EOF), or when one exits. ``name`` prefixes its messages on stderr.
    """
    ensure_certificates(Path(args.dir), args.hostname, common_name=name)
    host, port, sockets = _bind_sockets(args.listen, args.workers)
    supervisor = _Supervisor(args, argv, name=name, script=script)
    for index, sock in enumerate(sockets):
        await supervisor.start_worker(index, sock)
    code = await supervisor.watch(lambda: print_ready(ready_prefix, host, port))
    await supervisor.stop()
    return code
