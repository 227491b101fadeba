"""The server: builds the actors, supervises them, and shuts them down gracefully.

Start order (stop order is the reverse): store, access, reporting, delivery, journeys,
ingestion, listener. The listener starts last, so a client is only accepted once everything it may call
is ready, and it stops first, so nothing new arrives while the rest drains and commits.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import ssl
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import trio

from server.access import methods as access_methods
from server.access.keys import PEPPER_KEY, admin_key_path
from server.access.service import Access
from server.api.listener import Listener, is_loopback, parse_address
from server.api.registry import CallContext, Methods, Router
from server.delivery import methods as delivery_methods
from server.delivery.apps import reseal_app
from server.delivery.service import Delivery
from server.journeys import methods as journey_methods
from server.journeys.engine import Journeys
from server.messages import methods as message_methods
from server.messages.catalog import Catalog
from server.messages.pipeline import recover
from server.profiles import methods as profile_methods
from server.profiles.budget import IngestBudget
from server.profiles.ingest import Ingestion
from server.profiles.sealing import bare
from server.profiles.sandboxes import Space
from server.profiles.store import ProfileStore
from server.reports import methods as report_methods
from server.reports.reporting import Reporting
from server.runtime import methods as runtime_methods
from server.runtime.config import Config
from server.runtime.errors import ActorError, ConfigError, ServerError
from server.runtime.masterkey import default_path
from server.runtime.plugins import Plugins
from server.runtime.supervisor import ChildSpec, Supervisor, SupervisorOptions

__all__ = ["Server", "serve", "VERSION"]

log = logging.getLogger("pigeon")

T = TypeVar("T")

try:
    VERSION = version("pigeon-push")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    VERSION = "0.0.0"


#: The protocol's methods, by domain: each lists its own in its ``methods`` module.
METHODS: tuple[Methods, ...] = (
    runtime_methods.methods,
    profile_methods.methods,
    delivery_methods.methods,
    message_methods.methods,
    report_methods.methods,
    journey_methods.methods,
    access_methods.methods,
)


def build_router(server: Server) -> Router:
    router = Router()
    for methods in METHODS:
        router.include(methods, server)
    return router


def _now_us() -> int:
    return time.time_ns() // 1000


class Server:
    """One Pigeon node.

    Args:
        config: the settings.
        clock: current time in µs since the epoch (tests move it).
        plugins: the plugin manager (default: built-in plugins and the ``pigeon`` entry points).
    """

    def __init__(self, config: Config, *, clock: Callable[[], int] = _now_us, plugins: Plugins | None = None) -> None:
        _check_config(config)  # a configuration error stops here, before the data folder exists
        self.config = config
        self.version = VERSION
        self.started_at = time.monotonic()
        self.stopping = False
        self._stop = trio.Event()
        #: Executions (sends) a pipeline of this process is running: recovery leaves them alone.
        self.running_executions: set[str] = set()
        #: Set once the start's recovery has read the outbox's leftovers (the journey engine
        #: stages nothing before: its entries would look like leftovers).
        self.outbox_read = trio.Event()
        retention_us = int(config.store.retention_days * 86_400 * 1_000_000)
        self.store = ProfileStore(
            config.data,
            map_size=config.store.map_size_mb * 1024 * 1024,
            max_batch=config.store.max_batch,
            max_registrations=config.store.max_registrations,
            retention_us=retention_us,
            sweep_interval=config.store.sweep_interval_s,
            clock=clock,
            sync=config.store.sync,
            master_key_file=Path(config.master_key_file) if config.master_key_file else default_path(config.data),
            sealed={"apps": reseal_app, "keys": bare(PEPPER_KEY)},
        )
        self.access = Access(
            self.store, enabled=config.auth == "keys",
            admin_key_file=Path(config.admin_key_file) if config.admin_key_file else admin_key_path(config.data),
            refusal_delay_max_s=config.refusal_delay_max_s,
        )
        self.catalog = Catalog()
        self.reporting = Reporting(self.store)
        self.plugins = plugins if plugins is not None else Plugins()
        self.channels = self.plugins.channels(config)
        self.delivery = Delivery(self.reporting, self.store, self.channels)
        self.journeys = Journeys(self)
        self.ingestion = Ingestion(
            self.store, on_committed=self.journeys.events_committed, clock=clock, retention_us=retention_us,
            on_interactions=self.reporting.record_many,
            budget=IngestBudget(max_events=config.ingest.backlog_events, max_bytes=config.ingest.backlog_mb << 20),
            dedupe_window_us=round(config.ingest.dedupe_window_s * 1_000_000),
        )
        self.listener = Listener(
            build_router(self),
            listen=config.listen,
            ssl_context=self._ssl_context(),
            server_name=f"pigeon/{VERSION}",
            max_frame=config.max_frame,
            max_calls=config.max_calls,
            max_connections=config.max_connections,
            max_connections_per_peer=config.max_connections_per_peer,
            max_handshakes=config.max_handshakes,
            write_timeout=config.write_timeout_s,
            handshake_timeout=config.handshake_timeout_s,
            busy_handshake_timeout=config.busy_handshake_timeout_s,
            reply_buffer=config.reply_buffer_mb * 1024 * 1024,
            authenticate=self.access.authenticate,
            throttle=self.access.throttle,
        )
        s = config.supervisor
        self.supervisor = Supervisor(
            "root",
            [
                ChildSpec(self.store),
                ChildSpec(self.access),
                ChildSpec(self.reporting),
                ChildSpec(self.delivery),
                ChildSpec(self.journeys),
                ChildSpec(self.ingestion),
                ChildSpec(self.listener),
            ],
            SupervisorOptions(
                intensity=s.intensity, period=s.period_s, backoff_min=s.backoff_min_s, backoff_max=s.backoff_max_s
            ),
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None and key is None:
            return None
        if cert is None or key is None:
            raise ConfigError("TLS needs both tls_cert and tls_key")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate {cert!r} and key {key!r}: {exc}") from None
        return context

    def space(self, ctx: CallContext) -> Space:
        """The sandbox a call works in (its connection's)."""
        return self.store.space(ctx.sandbox)

    @property
    def addresses(self) -> list[str]:
        return self.listener.addresses

    async def run(self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `request_stop`; then stop within the configured grace time."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run)
            async with trio.open_nursery() as background:
                self._background = background
                background.start_soon(self._recover)
                log.info("pigeon %s ready on %s (data in %s)", self.version, ", ".join(self.addresses), self.config.data)
                task_status.started(self)
                await self._stop.wait()
                log.info("stopping: no new calls; finishing those in flight")
                # Executions stop between batches' commits; the outbox resumes them at the next start.
                background.cancel_scope.cancel()
            await self.supervisor.stop(self.config.shutdown_grace_s)
            log.info("stopped")

    async def _recover(self) -> None:
        try:
            await recover(self)
        except ServerError as exc:
            log.error("could not resume the sends in progress: %s", exc)
        finally:
            self.outbox_read.set()

    async def run_in_background(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` in the server's own nursery and return its result: it goes on if
        the caller is cancelled (until the server stops)."""
        done = trio.Event()
        outcome: list[Any] = []

        async def runner() -> None:
            try:
                outcome.append(("ok", await fn(*args)))
            except BaseException as exc:
                outcome.append(("error", exc))
                if not isinstance(exc, Exception):
                    raise
            finally:
                done.set()

        assert self._background is not None, "the server is not running"
        self._background.start_soon(runner)
        await done.wait()
        kind, value = outcome[0]
        if kind == "error":
            if isinstance(value, Exception):
                raise value
            raise ActorError("the server is stopping; the send resumes where it stopped at its next start")
        return value

    _background: trio.Nursery | None = None

    async def wait_stopping(self) -> None:
        """Return once a stop is requested."""
        await self._stop.wait()

    def request_stop(self) -> None:
        self.stopping = True
        self._stop.set()
        self.reporting.wake()  # report watches end


def _check_config(config: Config) -> None:
    """Raise `ConfigError` for a setting the server would fail on once started: an address it
    cannot listen on (``:99999``), a CA file it cannot read."""

    for address in config.listen:
        try:
            parse_address(address)
        except ValueError as exc:
            raise ConfigError(f"configuration key 'listen': {exc}") from None
    _check_listen_rule(config)
    files = {"apns.production.ca_file": config.apns.production.ca_file, "apns.sandbox.ca_file": config.apns.sandbox.ca_file,
             "fcm.ca_file": config.fcm.ca_file}
    for key, path in files.items():
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"configuration key {key!r}: cannot read the file {path!r}")


def _check_listen_rule(config: Config) -> None:
    """Beyond loopback, keys and TLS: refuse a TCP address that is not loopback without them,
    unless ``insecure_plaintext_network`` says the network is private (then warn)."""
    for address in config.listen:
        host, _ = parse_address(address)
        if host == "unix" or is_loopback(host):
            continue
        if config.auth == "none":
            raise ConfigError(f"configuration key 'listen': {address} is not a loopback address, and auth = \"none\" "
                              "lets anyone who reaches it call every method: it is allowed on loopback and unix "
                              "addresses only (set auth = \"keys\")")
        if config.tls_cert is None or config.tls_key is None:
            if not config.insecure_plaintext_network:
                raise ConfigError(f"configuration key 'listen': {address} is not a loopback address and TLS is off: "
                                  "API keys would cross the network in the clear. Set tls_cert and tls_key, or "
                                  "insecure_plaintext_network = true for a private network")
            log.warning("insecure_plaintext_network = true: listening on %s without TLS; API keys and data cross "
                        "the network in the clear", address)


#: Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 10_000
#: Seconds between full collections, which `tune_gc` leaves to `collect_periodically`.
GC_FULL_INTERVAL_S = 60.0


def tune_gc() -> None:
    """Collect the young generation less often, run full collections on a timer only, and
    never scan what start-up built.

    Sending a notification allocates hundreds of short-lived objects (h2 frames and events,
    headers); with CPython's default threshold (700) the collector runs every few
    notifications: 50,000 cost 13% less CPU per notification on bench/apns.py, and 10,000 the
    same as 50,000 on bench/campaign.py (72-77 us a send either way, side by side). But a full
    collection walks every object alive, and under load that is every call in progress: 50
    connections flooding events.ingest kept ~160,000 objects alive, CPython started a full
    collection every ~0.4 s, and each stopped the server for ~100 ms (a third of its time).
    So full collections run only every `GC_FULL_INTERVAL_S` (cyclic garbage that lived long
    enough to reach the oldest generation waits that long), and the young generations are
    collected at 10,000 (at 50,000 each young collection walked most of the calls in
    progress too). bench/hostile.py's flood, side by side: a bystander's call p99 107 -> 71 ms,
    max 202 -> 75 ms, and 15% more events acknowledged.
    """
    gc.collect()
    gc.freeze()
    _, middle, _ = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, 2**30)


async def collect_periodically() -> NoReturn:
    """The full collections `tune_gc` took away from CPython's own schedule."""
    while True:
        await trio.sleep(GC_FULL_INTERVAL_S)
        gc.collect()


async def serve(
    config: Config, *, ready_file: str | None = None, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
) -> int:
    """Run a server until SIGINT or SIGTERM, then stop it gracefully.

    A second signal cancels whatever is still running. Returns the exit status: 0 after a
    graceful stop, 1 after a forced one.

    Args:
        ready_file: once the server listens, its addresses (the port chosen for ``:0``
            included) are written there, one a line, in one step (a reader never sees half of
            it); the file is removed when the server stops.
    """
    server = Server(config)
    tune_gc()
    forced = False
    if ready_file is not None:
        Path(ready_file).unlink(missing_ok=True)  # left by a server that was killed
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    nonlocal forced
                    async for signum in signals:
                        if not server.stopping:
                            log.info("received %s", signal.Signals(signum).name)
                            server.request_stop()
                        else:
                            log.warning("received %s again; exiting now", signal.Signals(signum).name)
                            forced = True
                            nursery.cancel_scope.cancel()

                async def run(*, task_status: trio.TaskStatus[Server]) -> None:
                    await server.run(task_status=task_status)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(collect_periodically)
                await nursery.start(run)
                if ready_file is not None:
                    _write_ready_file(ready_file, server.addresses)
                task_status.started(server)
    finally:
        if ready_file is not None:
            Path(ready_file).unlink(missing_ok=True)
    return 1 if forced else 0


def _write_ready_file(path: str, addresses: list[str]) -> None:
    """Write the addresses to ``path`` through a temporary file renamed over it, so that a
    reader waiting for the file finds it whole."""
    target = Path(path)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    partial.write_text("".join(f"{address}\n" for address in addresses))
    partial.replace(target)
