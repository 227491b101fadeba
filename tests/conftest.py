"""Shared fixtures: a real server in this process (Trio) or in a child process (for signals,
kill -9 and clients on other event loops). Everything listens on 127.0.0.1, port 0."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path

import pytest
import trio
import trio.testing

from plugins.fcm.mock import MockFcmProcess
from protocols.trio_client import Client, open_client
from server import Server, load_config
from server.testing import ServerProcess


def make_config(data: Path, **overrides):
    """A configuration on 127.0.0.1, port 0, without API keys (``auth = "none"``) unless
    ``auth="keys"`` is passed."""
    values = {"data": str(data), "listen": ["127.0.0.1:0"], "auth": "none", **overrides}
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


@pytest.fixture
def clock(mock_clock: trio.testing.MockClock) -> trio.testing.MockClock:
    """Trio's mock clock at real speed (sockets, threads and child processes behave as they
    do), for tests that jump it over long waits (a server given ``clock_of(clock)``)."""
    mock_clock.rate = 1
    return mock_clock


#: The mock clock's zero, as a server's time (`clock_of`): 22:00 in Tokyo, 08:00 in New York.
BASE_US = int(datetime.fromisoformat("2026-12-08T13:00:00+00:00").timestamp() * 1e6)


def clock_of(clock: trio.testing.MockClock) -> Callable[[], int]:
    """A server clock (µs) that follows ``clock`` from `BASE_US` (any thread may read it)."""
    return lambda: BASE_US + int(clock.current_time() * 1e6)


@pytest.fixture(scope="module")
def fcm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MockFcmProcess]:
    """The mock FCM in its own process, one per test module (tests set its project and faults)."""
    with MockFcmProcess(tmp_path_factory.mktemp("fcm")) as mock:
        yield mock


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

    def spawn(*extra: str, data: Path | None = None, env: dict[str, str] | None = None, start: bool = True,
              auth: str = "none") -> ServerProcess:
        proc = ServerProcess(data or tmp_path / "data", *extra, env=env, auth=auth)
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


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, written to ``folder``:
    (certificate path, key path), both PEM."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pigeon test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
