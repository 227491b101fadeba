"""Machinery shared by Pigeon's mock provider servers (`plugins.apns.mock`, `plugins.fcm.mock`).

- TLS: `ensure_certificates` keeps a CA in the state directory (``ca.pem``/``ca.key``, created
  once and kept) and issues a fresh server certificate (``server.pem``/``server.key``) for
  127.0.0.1, ::1, localhost and any extra host names at each start. Clients trust a mock with
  ``cafile=STATE/ca.pem``; two mocks may share one CA.
- HPACK speed-ups (`_PlainEncoder`, `_Decoder`; `_tune_hpack` for the mock's own process).
- Process plumbing: ``--listen`` parsing, the ready line, stopping on SIGTERM/SIGINT or stdin
  EOF, uvloop.
- Workers (``--workers N``): `_supervise` binds N sockets to one port (SO_REUSEPORT), starts one
  worker process per socket and relays between them over socketpairs: a worker's admin change
  is applied by every other worker ("bcast", the app's ``apply(cmd)``) and lists and counters
  are gathered from all of them ("gather", the app's ``collect_local(what)``).
- Test helpers: `MockProcess` runs a mock as a child process; `MockAdminBase` and
  `AsyncMockAdminBase` are the admin clients (httpx over HTTP/2) that each mock extends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import fcntl
import functools
import ipaddress
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, ClassVar, Self

import hpack
import msgspec
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocols.h2client import HeaderListTooLong, HpackDecoder, HpackError, decode_huffman

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


# --------------------------------------------------------------------------------------------
# HPACK speed-ups for the server process (pure-Python HPACK is most of the per-request cost)

_STATIC_STATUS = {b"200": 8, b"204": 9, b"206": 10, b"304": 11, b"400": 12, b"404": 13, b"500": 14}


def _hpack_length(n: int) -> bytes:
    if n < 127:
        return bytes((n,))
    out = bytearray((127,))
    n -= 127
    while n >= 128:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class _PlainEncoder(hpack.Encoder):
    """Encodes response headers as literals without indexing and without Huffman coding.

    Every response carries fresh ids, so the dynamic table would only churn. The first
    block announces a dynamic table size of 0, which is valid whatever the client's
    SETTINGS_HEADER_TABLE_SIZE is.
    """

    def __init__(self) -> None:
        super().__init__()
        self._announced = False

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        out = bytearray()
        if not self._announced:
            out += b"\x20"
            self._announced = True
        for name, value in headers:
            if name == b":status":
                index = _STATIC_STATUS.get(value)
                if index is not None:
                    out.append(0x80 | index)
                    continue
                out += b"\x08" + _hpack_length(len(value)) + value
            else:
                out += b"\x00" + _hpack_length(len(name)) + name + _hpack_length(len(value)) + value
        return bytes(out)


class _Decoder(HpackDecoder):
    """hpack's `Decoder` as h2 uses it, done by the client codec's decoder (a quarter of the
    cost), raising what hpack raises. Huffman strings are cached (tokens and paths repeat)."""

    huffman = staticmethod(functools.lru_cache(maxsize=4096)(decode_huffman))

    @property
    def max_allowed_table_size(self) -> int:
        return self.max_table_size

    @max_allowed_table_size.setter
    def max_allowed_table_size(self, value: int) -> None:
        self.max_table_size = value

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:  # type: ignore[override]
        try:
            return super().decode(data)
        except HpackError as exc:
            from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError

            raise (OversizedHeaderListError if type(exc) is HeaderListTooLong else HPACKDecodingError)(str(exc)) from None


class _NoLog:
    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass


def _tune_hpack() -> None:
    """Make h2 cheaper in the mock's own process (never call it in a test process): no
    debug-log calls in hpack, and no ``repr`` of every frame received for a trace log that
    h2 builds whether or not anyone logs it (6% of the mock's time)."""
    import h2.connection
    import hpack.hpack
    import hpack.table

    hpack.hpack.log = _NoLog()  # type: ignore[assignment]
    hpack.table.log = _NoLog()  # type: ignore[assignment]
    h2.connection.repr = lambda frame: ""  # type: ignore[attr-defined]



# --------------------------------------------------------------------------------------------
# Certificates


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _load_or_create_ca(folder: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_pem, ca_key = folder / "ca.pem", folder / "ca.key"
    if ca_pem.exists() and ca_key.exists():
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return key, x509.load_pem_x509_certificate(ca_pem.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Pigeon mock CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pigeon mock"),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_atomic(ca_key, _key_pem(key), 0o600)
    _write_atomic(ca_pem, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    *,
    extensions: Iterable[tuple[x509.ExtensionType, bool]],
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def ensure_certificates(
    folder: str | os.PathLike[str], hostnames: Iterable[str] = (), *, common_name: str = "pigeon-mock"
) -> Path:
    """Create the mock CA in ``folder`` unless it exists, and issue a fresh server certificate.

    The server certificate (subject CN ``common_name``) names localhost, 127.0.0.1, ::1 and
    ``hostnames`` (DNS names or IP addresses). Returns the CA certificate's path (``folder/ca.pem``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        ca_key, ca_cert = _load_or_create_ca(folder)
        names: list[x509.GeneralName] = []
        for host in ("localhost", "127.0.0.1", "::1", *hostnames):
            try:
                general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
            except ValueError:
                general = x509.DNSName(host)
            if general not in names:
                names.append(general)
        now = dt.datetime.now(dt.UTC)
        cert_pem, key_pem = _issue(
            ca_key,
            ca_cert,
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
            extensions=[
                (x509.SubjectAlternativeName(names), False),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            ],
            not_before=now - dt.timedelta(days=1),
            not_after=now + dt.timedelta(days=365),
        )
        _write_atomic(folder / "server.key", key_pem, 0o600)
        _write_atomic(folder / "server.pem", cert_pem)
    return folder / "ca.pem"



# --------------------------------------------------------------------------------------------
# Workers: the parent keeps one socketpair per worker and relays admin changes and gathers.


def _frame(msg: dict[str, Any]) -> bytes:
    data = _json_encode(msg)
    return struct.pack(">I", len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    (size,) = struct.unpack(">I", await reader.readexactly(4))
    return _json_decode(await reader.readexactly(size))


class _IpcClient:
    """A worker's link to the parent. ``app`` has ``apply(cmd)`` and ``collect_local(what)``."""

    def __init__(self, app: Any, sock: socket.socket, on_lost: Any) -> None:
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


async def _supervise(args: argparse.Namespace, argv: list[str], *, name: str, script: str, ready_prefix: str) -> int:
    """The parent of ``args.workers`` worker processes (``script`` run with ``argv`` plus the
    hidden ``--worker-index``, ``--worker-count``, ``--listen-fd`` and ``--ipc-fd`` options).

    ``args`` needs ``dir``, ``hostname``, ``listen``, ``workers`` and ``exit_on_stdin_eof``.
    Prints the ready line once every worker is ready; stops them all on SIGTERM/SIGINT (or
    stdin EOF), or when one exits. ``name`` prefixes its messages on stderr.
    """
    loop = asyncio.get_running_loop()
    folder = Path(args.dir)
    ensure_certificates(folder, args.hostname, common_name=name)
    host, port = _split_listen(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets = []
    for _ in range(args.workers):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        port = sock.getsockname()[1]
        sock.listen(1024)
        sockets.append(sock)
    links: list[_WorkerLink] = []
    tasks: list[asyncio.Task[Any]] = []

    async def relay(link: _WorkerLink) -> None:
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
                    tasks.append(loop.create_task(fan_out(link, msg)))
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    async def fan_out(source: _WorkerLink, msg: dict[str, Any]) -> None:
        others = [link for link in links if link is not source]
        if msg["op"] == "bcast":
            await asyncio.gather(*(link.ask({"op": "apply", "cmd": msg["cmd"]}) for link in others))
            result = None
        else:
            result = await asyncio.gather(*(link.ask({"op": "collect", "what": msg["what"]}) for link in others))
        source.writer.write(_frame({"op": "reply", "id": msg["id"], "result": result}))

    script = str(Path(script).resolve())
    for index, sock in enumerate(sockets):
        parent_end, child_end = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            script,
            *argv,
            "--dir",
            str(folder),
            "--worker-index",
            str(index),
            "--worker-count",
            str(args.workers),
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
        links.append(link)
        tasks.append(loop.create_task(relay(link)))

    stop = asyncio.Event()
    _install_stop(loop, stop, watch_stdin=args.exit_on_stdin_eof)
    exits = [loop.create_task(link.proc.wait()) for link in links]
    ready = asyncio.gather(*(link.ready.wait() for link in links))
    stopper = loop.create_task(stop.wait())
    done, _ = await asyncio.wait([ready, stopper, *exits], timeout=60, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if ready in done:
        _print_ready(ready_prefix, host, port)
        done, _ = await asyncio.wait([stopper, *exits], return_when=asyncio.FIRST_COMPLETED)
        if stopper not in done:
            print(f"{name}: a worker exited; stopping", file=sys.stderr, flush=True)
            code = 1
    else:
        print(f"{name}: workers did not start", file=sys.stderr, flush=True)
        code = 1
    for link in links:
        if link.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                link.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*exits), 10)
    for link in links:
        if link.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                link.proc.kill()
            await link.proc.wait()
    for task in [ready, stopper, *tasks]:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ready
    for link in links:
        link.writer.close()
    return code



# --------------------------------------------------------------------------------------------
# Entry-point plumbing


def _split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise SystemExit(f"--listen must be HOST:PORT, not {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _print_ready(prefix: str, host: str, port: int) -> None:
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"{prefix}{shown}:{port}\n")
    sys.stdout.flush()


def _install_stop(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, *, watch_stdin: bool) -> None:
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


def _quiet_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Failed TLS handshakes and dropped clients are the clients' business: stay quiet."""
    exc = context.get("exception")
    message = str(context.get("message", ""))
    if isinstance(exc, (ssl.SSLError, ConnectionError, TimeoutError)) or "SSL" in message or "handshake" in message:
        return
    loop.default_exception_handler(context)


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    return uvloop.run(coro)



# --------------------------------------------------------------------------------------------
# Test helpers: a mock in a child process, and admin client bases


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


def _client_context(ca_file: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    ctx.set_alpn_protocols(["h2"])
    return ctx


class MockAdminBase:
    """Blocking admin client (httpx over HTTP/2). Call it as ``admin(method, path, json)`` or
    use the named methods; errors raise `MockAdminError`. Each mock adds its own methods."""

    def __init__(self, base_url: str, ca_file: Path) -> None:
        import httpx

        self._client = httpx.Client(base_url=base_url, http2=True, verify=_client_context(ca_file), timeout=30.0)

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

        self._client = httpx.AsyncClient(base_url=base_url, http2=True, verify=_client_context(ca_file), timeout=30.0)

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


class MockProcess:
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
    admin_class: ClassVar[type[MockAdminBase]] = MockAdminBase
    async_admin_class: ClassVar[type[AsyncMockAdminBase]] = AsyncMockAdminBase

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
        self._admin: Any = None

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
    def admin(self) -> Any:
        """A blocking admin client (created on first use, closed by stop())."""
        if self._admin is None:
            self._admin = self.admin_class(self.url, self.ca_file)
        return self._admin

    def async_admin(self) -> Any:
        """A new async admin client; close it (``async with``) before the loop ends."""
        return self.async_admin_class(self.url, self.ca_file)

    def ssl_context(self, *, alpn: bool = True) -> ssl.SSLContext:
        """A client SSL context trusting the mock's CA (offering ALPN h2 unless ``alpn=False``)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if alpn:
            ctx.set_alpn_protocols(["h2"])
        return ctx

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
