"""What a mock provider's process serves besides HTTP/2 (`plugins._mock_h2`): its state, its
admin API, its workers' share of both, and serving until stopped.

- `MockFaults`: the fault and switch values a mock reads on its request path, as attributes.
- `MockApp`: everything one process serves. State changes are commands (``{"op": ...,
  "body": ...}``), validated by ``check`` and then applied by ``apply`` here and, through the
  parent, in every other worker; lists and counters are gathered from every worker. The admin
  API (``/_mock/state``, ``faults``, ``accepted``, ``stats``; a mock adds its own routes) and
  the graceful shutdown are here too.
- `serve`: a mock's main coroutine (certificates, the listening socket, ``--config``, the
  ready line, then serving until SIGTERM/SIGINT or stdin EOF).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import msgspec

from plugins._mock_h2 import H2ServerConnection, tune_hpack
from plugins._mock_process import IpcClient, install_stop, print_ready, quiet_exception_handler, split_listen
from plugins._mock_tls import ensure_certificates, server_ssl_context

__all__ = ["AdminRoutes", "MockApp", "MockFaults", "merge_counts", "serve"]

_json_decode = msgspec.json.decode

ConnT = TypeVar("ConnT", bound=H2ServerConnection)
AppT = TypeVar("AppT", bound="MockApp[Any]")
#: An admin handler takes the request's JSON body (None when empty) and gives (status, JSON).
AdminHandler = Callable[[Any], Awaitable[tuple[int, Any]]]
#: Admin path -> method -> handler.
AdminRoutes = dict[bytes, dict[bytes, AdminHandler]]


class MockFaults:
    """The fault/switch values, as attributes for the request path. A mock's subclass lists
    them all in `defaults` and ``__slots__`` and declares their types; these both mocks have."""

    __slots__ = ()
    defaults: ClassVar[dict[str, Any]] = {}

    accept_any_token: bool
    max_concurrent_streams: int
    seed: int
    latency_ms: float
    record_accepted: bool
    #: The connection faults (`server` side: ``H2ServerConnection._stream_faults``).
    goaway_after_streams: int | None
    goaway_reason: str
    reset_after_streams: int | None

    def __init__(self) -> None:
        for name, value in self.defaults.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.defaults}


def merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters, nested dicts included."""
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, dict):
                out[name] = merge_counts([out.get(name, {}), value])
            else:
                out[name] = out.get(name, 0) + value
    return out


class MockApp(Generic[ConnT]):
    """Everything one process serves: state, counters, connections, faults.

    A mock's subclass sets `faults_class` and writes `load` (the ``--config`` document),
    `check` and `apply_state` (its own commands), `state_json`, `accepted_local` and
    `stats_local`, and adds its admin routes (`admin_routes`). ``accepted`` holds what it
    accepted, in its own form (`accepted_local` turns it to JSON).
    """

    faults_class: ClassVar[type[MockFaults]] = MockFaults

    #: GOAWAYs sent and connections reset by the stream faults (each mock counts them).
    n_goaways: int
    n_resets: int

    def __init__(self, *, worker: int = 0, workers: int = 1) -> None:
        self.worker = worker
        self.workers = workers
        self.f = self.faults_class()
        self.rng = random.Random(worker)
        self.accepted: list[Any] = []
        self.conns: set[ConnT] = set()
        self.ipc: IpcClient | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._conn_seq = 0
        self.clear_stats()

    # -- counters

    def clear_stats(self) -> None:
        self.n_conns_opened = 0

    def stats_local(self) -> dict[str, Any]:
        raise NotImplementedError

    def merge_stats(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Every worker's `stats_local` as one document."""
        merged = merge_counts(parts)
        merged["workers"] = self.workers
        return merged

    def next_connection_id(self) -> int:
        """Connection numbers are unique across workers."""
        self._conn_seq += 1
        self.n_conns_opened += 1
        return (self._conn_seq - 1) * self.workers + self.worker + 1

    # -- state

    def load(self, doc: Any) -> None:
        """Apply a config document (the --config file)."""
        raise NotImplementedError

    def check(self, cmd: dict[str, Any]) -> None:
        """Validate a change before it is applied anywhere (raises ValueError or TypeError)."""
        raise NotImplementedError

    def apply(self, cmd: dict[str, Any]) -> None:
        """Apply a checked change (here, and in each other worker as the parent relays it)."""
        op, body = cmd["op"], cmd.get("body")
        if op == "faults":
            self.set_faults(cmd["body"])
        elif op == "faults_reset":
            self.set_faults(dict(self.f.defaults))
        elif op == "accepted_clear":
            self.accepted.clear()
        elif op == "stats_clear":
            self.clear_stats()
        else:
            self.apply_state(op, body)

    def apply_state(self, op: str, body: Any) -> None:
        """Apply one of the mock's own commands."""
        raise ValueError(f"unknown operation {op!r}")

    def set_faults(self, update: dict[str, Any]) -> None:
        """Set fault values (checked): a new ``seed`` restarts the draws, and a new
        ``max_concurrent_streams`` goes to every open connection."""
        old_limit = self.f.max_concurrent_streams
        for name, value in update.items():
            setattr(self.f, name, value)
        if "seed" in update:
            self.rng = random.Random(self.f.seed + self.worker)
        if self.f.max_concurrent_streams != old_limit:
            for conn in list(self.conns):
                conn.update_stream_limit()

    def state_json(self) -> dict[str, Any]:
        raise NotImplementedError

    def accepted_local(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    # -- workers

    def collect_local(self, what: str) -> Any:
        if what == "accepted":
            return self.accepted_local()
        if what == "stats":
            return self.stats_local()
        raise ValueError(f"cannot collect {what!r}")

    async def collect(self, what: str) -> list[Any]:
        """This worker's `collect_local` and every other worker's."""
        parts = [self.collect_local(what)]
        if self.ipc is not None:
            parts.extend(await self.ipc.request("gather", what=what))
        return parts

    async def change(self, cmd: dict[str, Any]) -> None:
        """Check and apply a change here, then in every other worker."""
        self.check(cmd)
        self.apply(cmd)
        if self.ipc is not None:
            await self.ipc.request("bcast", cmd=cmd)

    # -- the admin API

    def admin_routes(self) -> AdminRoutes:
        """The admin endpoints; a mock adds its own to these."""
        return {
            b"/_mock/state": {b"GET": self._get_state},
            b"/_mock/faults": {
                b"PUT": lambda doc: self.changed({"op": "faults", "body": doc}),
                b"DELETE": lambda doc: self.changed({"op": "faults_reset"}),
            },
            b"/_mock/accepted": {b"GET": self._get_accepted, b"DELETE": self._clear_accepted},
            b"/_mock/stats": {b"GET": self._get_stats, b"DELETE": self._clear_stats},
        }

    async def admin(self, method: bytes, path: bytes, body: bytes) -> tuple[int, Any]:
        """(status, JSON answer) of an admin request: 400 for bad input, 405, 404."""
        route = path.split(b"?", 1)[0].rstrip(b"/")
        routes = self.admin_routes()
        try:
            doc = _json_decode(body) if body.strip() else None
            handler = routes.get(route, {}).get(method)
            if handler is not None:
                return await handler(doc)
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            return 400, {"error": str(exc)}
        if route in routes:
            return 405, {"error": f"method {method.decode()} not allowed on {route.decode()}"}
        return 404, {"error": f"no admin endpoint {route.decode(errors='replace')}"}

    async def changed(self, cmd: dict[str, Any]) -> tuple[int, Any]:
        """Make a change everywhere; answer with the new state."""
        await self.change(cmd)
        return 200, self.state_json()

    async def _get_state(self, doc: Any) -> tuple[int, Any]:
        return 200, self.state_json()

    async def _get_accepted(self, doc: Any) -> tuple[int, Any]:
        merged = [item for part in await self.collect("accepted") for item in part]
        merged.sort(key=lambda item: item["received_at_ns"])
        return 200, merged

    async def _clear_accepted(self, doc: Any) -> tuple[int, Any]:
        count = sum(len(p) for p in await self.collect("accepted")) if self.workers > 1 else len(self.accepted)
        await self.change({"op": "accepted_clear"})
        return 200, {"cleared": count}

    async def _get_stats(self, doc: Any) -> tuple[int, Any]:
        return 200, self.merge_stats(await self.collect("stats"))

    async def _clear_stats(self, doc: Any) -> tuple[int, Any]:
        await self.change({"op": "stats_clear"})
        return 200, {"cleared": True}

    # -- the end

    async def shutdown(self, grace: float) -> None:
        """Every connection stops taking requests (`H2ServerConnection.shutdown`) and answers
        what it holds; those still open after ``grace`` seconds are dropped."""
        for conn in list(self.conns):
            conn.shutdown()
        deadline = time.monotonic() + grace
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            conn.drop()


def _listening_socket(args: argparse.Namespace) -> socket.socket:
    if args.listen_fd is not None:  # a worker: the parent bound it
        return socket.socket(fileno=args.listen_fd)
    host, port = split_listen(args.listen)
    return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=1024)


async def serve(
    args: argparse.Namespace,
    *,
    name: str,
    ready_prefix: str,
    new_app: Callable[[int, int, int], AppT],
    connection: Callable[[AppT], H2ServerConnection],
    alpn: list[str],
    client_certs: str = "none",
    banner: str,
) -> int:
    """Serve a mock until SIGTERM/SIGINT (or stdin EOF, or the parent's end for a worker).

    ``new_app(port, worker, workers)`` makes the app, ``connection(app)`` each connection;
    ``alpn`` and ``client_certs`` set up TLS (`server_ssl_context`). A mock run alone prints
    ``banner`` on stderr and the ready line (``ready_prefix``) on stdout; a worker tells the
    parent instead. Returns the exit status: 2 for a bad ``--config``.
    """
    loop = asyncio.get_running_loop()
    tune_hpack()
    folder = Path(args.dir)
    worker = args.worker_index
    if worker is None:
        ensure_certificates(folder, args.hostname, common_name=name)
    sock = _listening_socket(args)
    host, port = sock.getsockname()[:2]
    app = new_app(port, worker or 0, args.worker_count if worker is not None else 1)
    if args.config:
        try:
            app.load(_json_decode(Path(args.config).read_bytes()))
        except (OSError, ValueError, TypeError, msgspec.DecodeError) as exc:
            print(f"{name}: bad --config {args.config}: {exc}", file=sys.stderr, flush=True)
            return 2
    loop.set_exception_handler(quiet_exception_handler)
    ctx = server_ssl_context(folder, alpn, client_certs)
    server = await loop.create_server(lambda: connection(app), sock=sock, ssl=ctx, ssl_handshake_timeout=10)
    stop = asyncio.Event()
    if args.ipc_fd is not None:
        app.ipc = IpcClient(app, socket.socket(fileno=args.ipc_fd), stop.set)
        await app.ipc.start()
        app.ipc.send({"op": "ready"})
        install_stop(loop, stop, watch_stdin=False)
    else:
        install_stop(loop, stop, watch_stdin=args.exit_on_stdin_eof)
        print(banner, file=sys.stderr, flush=True)
        print_ready(ready_prefix, host, port)
    await stop.wait()
    server.close()
    await app.shutdown(grace=2.0)
    return 0
