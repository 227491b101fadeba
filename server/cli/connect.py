"""How a client command reaches its server, and why it could not.

`run_client` connects (``--server``, ``--tls``, ``--ca``; ``--timeout`` bounds connecting), runs
the command's action, and turns a failure to connect into `Unreachable`, whose message says
what is at that address instead (nothing, a TLS port, an HTTP server, a silent one) and what
to do about it.

The API key is ``--api-key``, else ``PIGEON_API_KEY``, else the admin key of the server this
machine is configured for (the file beside the data folder the configuration names, as
``pigeon serve`` reads it: ``PIGEON_CONFIG``, ``./pigeon.toml``, ``PIGEON_DATA``), else the
admin key file a server on this machine names in ``server.health`` (to loopback and unix
connections only; only its owner can read it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import ssl
from pathlib import Path

import trio

from protocols._client_core import parse_target
from protocols.errors import ConnectionClosed, NotPigeonServer, PigeonProtocolError, Status
from protocols.trio_client import open_client

from server.cli.inputs import UsageError
from server.runtime.errors import ConfigError

__all__ = ["PROBE_S", "Unreachable", "run_client"]


class Unreachable(Exception):
    """The server could not be reached or is not a Pigeon server; printed as it is, exit status 1."""


async def run_client(args: argparse.Namespace) -> None:
    """Connect to ``args.server`` and run the command's action (``args.action``) on it."""
    try:
        parse_target(args.server)
    except ValueError as exc:
        raise UsageError(f"--server: {exc}") from None
    try:
        context = None if _plaintext(args) else ssl.create_default_context(cafile=args.ca)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--ca {args.ca}: cannot load it as a CA certificate: {getattr(exc, 'strerror', None) or exc}") from None
    connected = False
    source = "nowhere"
    try:
        # --timeout bounds connecting, and then each call (in the commands), not the whole command:
        # a long import or listing may take as long as it needs while the server keeps answering.
        with trio.CancelScope(deadline=trio.current_time() + args.timeout) as connecting:
            async with contextlib.AsyncExitStack() as stack:
                key, source = api_key(args)
                client = await stack.enter_async_context(
                    open_client(args.server, ssl_context=context, client_name="pigeon-cli", api_key=key or "",
                                sandbox=getattr(args, "sandbox", None)))
                connected = True
                connecting.deadline = math.inf
                await args.action(client, args)
        if connecting.cancelled_caught:
            raise trio.TooSlowError
    except (OSError, PigeonProtocolError, trio.TooSlowError) as exc:
        if connected:
            raise
        if isinstance(exc, ConnectionClosed) and exc.status is Status.UNAUTHENTICATED:
            raise Unreachable(f"{args.server} refused the API key from {source}: {exc}") from None
        raise Unreachable(await _unreachable(args, exc)) from None


def api_key(args: argparse.Namespace) -> tuple[str | None, str]:
    """The key and where it came from: ``--api-key``, ``PIGEON_API_KEY``, or the admin key
    file of the server configured on this machine (None when there is none)."""
    if getattr(args, "api_key", None):
        return args.api_key.strip(), "--api-key"
    if os.environ.get("PIGEON_API_KEY"):
        return os.environ["PIGEON_API_KEY"].strip(), "PIGEON_API_KEY"
    from server.access.keys import admin_key_path, read_key_file
    from server.runtime.config import load_config

    try:
        config = load_config(env=os.environ)
        path = Path(config.admin_key_file) if config.admin_key_file else admin_key_path(config.data)
        return read_key_file(path), f"the admin key file {path}"
    except ConfigError:
        return None, "nowhere"


async def _unreachable(args: argparse.Namespace, exc: BaseException) -> str:
    """Why the server at ``args.server`` could not be talked to, with what to do about it."""
    server = args.server
    start = "start one with `pigeon serve`, or point --server (or PIGEON_SERVER) at yours"
    if isinstance(exc, OSError) and _refused(exc):
        return f"no server is listening at {server}: {start}"
    if isinstance(exc, NotPigeonServer):
        return _speaks_tls(server) if exc.speaks == "tls" else f"{server} is {exc}"  # "not a Pigeon server: ..."
    silent = isinstance(exc, trio.TooSlowError) or (isinstance(exc, ConnectionClosed) and exc.status is Status.UNAVAILABLE)
    if silent and _plaintext(args):
        # It took the connection but did not welcome us (a Pigeon server that refuses one says
        # why with another status): ask it in the protocols it may speak.
        host, port = parse_target(server)
        if host != "unix":
            speaks = await _probe(host, int(port))
            if speaks == "tls":
                return _speaks_tls(server)
            if speaks is not None:
                return f"{server} is not a Pigeon server: it answered in HTTP ({speaks})"
    if isinstance(exc, trio.TooSlowError):
        return f"no answer from {server} within {args.timeout:g}s"
    if isinstance(exc, OSError):
        return f"cannot connect to {server}: {exc}"
    return f"cannot talk to the server at {server}: {exc}"


def _plaintext(args: argparse.Namespace) -> bool:
    """Whether the client spoke without TLS (only then may the server be a TLS port)."""
    return not (args.tls or args.ca)


def _speaks_tls(server: str) -> str:
    return f"{server} speaks TLS: use --tls (and --ca FILE unless its certificate comes from a CA this system trusts)"


def _refused(exc: BaseException) -> bool:
    """Whether connecting failed because nothing listens there (trio reports the attempts of
    ``open_tcp_stream`` as the cause of one OSError)."""
    if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_refused(e) for e in exc.exceptions)
    return exc.__cause__ is not None and _refused(exc.__cause__)


#: How long each probe of a server that did not welcome us may take.
PROBE_S = 2.0


async def _probe(host: str, port: int) -> str | None:
    """What a server that took a connection but sent no welcome speaks: ``"tls"`` if it completes
    a TLS handshake, the first line of its answer if it answers an HTTP request, else None."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a question about the protocol, not about trust; nothing is sent
    with trio.move_on_after(PROBE_S):
        try:
            stream = trio.SSLStream(await trio.open_tcp_stream(host, port), context, server_hostname=host)
            try:
                await stream.do_handshake()
                return "tls"
            finally:
                await trio.aclose_forcefully(stream)
        except (OSError, trio.BrokenResourceError):
            pass
    with trio.move_on_after(PROBE_S):
        try:
            plain = await trio.open_tcp_stream(host, port)
            try:
                await plain.send_all(b"HEAD / HTTP/1.0\r\n\r\n")
                answer = b""
                while b"\n" not in answer and len(answer) < 1024:
                    data = await plain.receive_some(1024)
                    if not data:
                        break
                    answer += data
            finally:
                await trio.aclose_forcefully(plain)
        except (OSError, trio.BrokenResourceError):
            return None
        if answer.startswith(b"HTTP/"):
            return answer.splitlines()[0].decode("latin-1")
    return None

