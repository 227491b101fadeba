"""A mock of Apple's APNs HTTP/2 provider API, for tests and benchmarks.

Run it (``pigeon mock-apns`` takes the same arguments)::

    python -m plugins.apns.mock --dir STATE --listen 127.0.0.1:0 --environment sandbox \\
        [--config state.json] [--workers N] [--client-certs none|optional|required] [--hostname NAME ...]

Once it accepts connections it prints one line on stdout, ``mock-apns ready on HOST:PORT``.
It speaks HTTP/2 over TLS; it offers ALPN ``h2`` and also serves clients that send no ALPN
(HTTP/2 with prior knowledge, like Pushy and aioapns). ``STATE`` receives ``ca.pem``/``ca.key``
(the mock's own CA, created once and kept) and ``server.pem``/``server.key`` (issued at each
start for 127.0.0.1, ::1, localhost and every ``--hostname``), so clients trust the mock with
``cafile=STATE/ca.pem``. One process serves one environment; ``sandbox`` adds ``apns-unique-id``
to successes. ``--workers N`` runs N processes on the same port (SO_REUSEPORT) that share
their state through the parent, for benchmarks.

Checks, in this order (Pushy's mock order, providers.md 1.14; status 400 unless given):
``DuplicateHeaders``; ``BadMessageId`` (apns-id not a UUID); 405 ``MethodNotAllowed``;
``MissingTopic`` (optional with a single-topic client certificate); ``BadCollapseId`` (> 64
bytes); ``BadExpirationDate`` (not an integer); ``BadPriority`` (not 10/5/1, or 10 with push type
background); ``InvalidPushType``; 404 ``BadPath`` (not ``/3/device/...``); ``MissingDeviceToken``;
``BadDeviceToken`` (not 64 hex digits, unknown, or registered for the other environment);
410 ``Unregistered`` with ``timestamp`` (ms) once ``unregistered_at_ms`` has passed;
``DeviceTokenNotForTopic`` (token not registered for the topic, or the topic lacks the push
type's suffix, e.g. ``.voip`` or ``.push-type.liveactivity``); then authentication:

- client certificate (when the connection has one): 403 ``BadCertificateEnvironment``,
  ``TopicDisallowed`` (topic not listed in the certificate);
- provider token: 403 ``MissingProviderToken`` (no/empty ``authorization: bearer``),
  403 ``InvalidProviderToken`` (unparseable, alg not ES256, unknown kid, bad signature - raw
  R||S and DER both accepted -, iss not the key's team, team differs from the connection's
  first, topic not covered by a topic-scoped key), 403 ``BadEnvironmentKeyIdInToken`` (key
  restricted to the other environment), 403 ``ExpiredProviderToken`` (iat older than
  ``token_max_age_s``), 429 ``TooManyProviderTokenUpdates`` (a different token less than
  ``token_update_interval_s`` after the connection's current one was first used; the
  current token keeps working);

then the payload: ``PayloadEmpty``; 413 ``PayloadTooLarge`` (> 4096 bytes, > 5120 for voip);
``BadPayload`` (not a JSON object; not an Apple reason - Apple documents none for this - but
a sender bug worth seeing). Then the fault ratios (429 ``TooManyRequests``, 503
``ServiceUnavailable``). Success: HEADERS with END_STREAM, ``:status 200``, ``apns-id`` (the
request's, or a new UUID) and, in sandbox, ``apns-unique-id``. Errors: ``:status``,
``content-type: application/json``, ``apns-id``, then DATA ``{"reason": ...}`` (plus
``"timestamp"`` for 410).

State (``--config FILE.json`` and the admin API)::

    {"keys": [{"key_id": "ABC123DEFG", "team_id": "TEAM123456",
               "public_key_pem": "-----BEGIN PUBLIC KEY-----...",   # a PKCS#8 private key works too
               "topics": ["com.example.app"] | null,                 # null: team-scoped
               "environment": "sandbox" | "production" | null}],
     "tokens": {"<64 hex>": {"topics": ["com.example.app"], "unregistered_at_ms": null,
                             "environment": null}},                  # or just a list of topics
     "accept_any_token": false,                                      # every well-formed token valid
     "faults": {...}}                                                # see DEFAULT_FAULTS

Faults and switches (``DEFAULT_FAULTS``): ``accept_any_token``; ``strict_token_length`` (64
hex digits, else any even-length hex); ``max_concurrent_streams`` (SETTINGS, pushed to open
connections when changed; streams beyond it are refused with RST_STREAM REFUSED_STREAM);
``one_stream_until_valid_token`` (Apple's 1-stream start on token connections opened
after it is set; raised once a request passes token authentication);
``goaway_after_streams`` N (at the Nth stream of a connection send GOAWAY, last_stream_id =
that stream, debug data ``{"reason": goaway_reason}``; answer the streams up to it, refuse
later ones, then close); ``reset_after_streams`` N (the (N+1)th stream aborts the TCP
connection with RST, unanswered streams are lost); ``ratio_429``/``ratio_503`` (share of
otherwise accepted requests answered 429 TooManyRequests / 503 ServiceUnavailable, drawn from
``random.Random(seed + worker)``); ``latency_ms`` (delay before each answer); ``stall``
(answer nothing until set back to false, then answer everything held); ``token_max_age_s``;
``token_update_interval_s``; ``record_accepted`` (keep the accepted list; off for long
benchmarks); ``bad_environment_key_reason``.

Admin API: HTTP/2 on the same port, paths under ``/_mock/``, JSON in and out, no auth;
answers 400 ``{"error": ...}`` for bad input:

- ``GET /_mock/state``: environment, keys, tokens, accept_any_token, faults.
- ``PUT /_mock/keys``: replace the signing keys (a list, or ``{"keys": [...]}``); returns the state.
- ``PUT /_mock/tokens``: merge ``{token: spec | null}`` (null removes); ``DELETE`` removes all.
- ``PUT /_mock/faults``: merge faults/switches; ``DELETE`` restores the defaults.
  (Every PUT/DELETE on keys, tokens and faults answers with the new state.)
- ``GET /_mock/accepted``: every accepted notification in order: token, topic, push_type,
  priority, expiration, collapse_id, apns_id, payload (parsed), connection, stream_id,
  auth (``token:<kid>`` or ``certificate``), worker, received_at_ns. ``DELETE`` clears it.
- ``GET /_mock/stats``: requests, accepted, rejected (by reason), connections_opened,
  connections_open, goaways_sent, resets, refused_streams, stalled,
  max_concurrent_streams (per connection) and its maximum. ``DELETE`` zeroes the counters.

Connection numbers are unique across workers. Admin requests are neither counted nor
subject to the stream faults. Not modelled: UnrelatedKeyIdInToken, IdleTimeout, Forbidden,
ExpiredToken, the "one stream after a rejection" throttle, and per-token 429s other than the
ratio.

For tests: `MockApnsProcess` runs the mock as a child process and gives its address, CA file
and an admin client (`MockAdmin`, `AsyncMockAdmin`); `SigningKey` makes provider keys and
tokens; `issue_client_certificate` signs "Apple Push Services"-like client certificates.

The code: this module is the command line and the test helpers; what APNs does is in
`plugins.apns._mock_server` (connections, stream faults, the checks), `_mock_state` (state,
counters, admin API) and `_mock_auth` (keys, provider tokens, client certificates), over the
machinery both mocks share: `plugins._mock_h2` (the HTTP/2 server connection), `_mock_app`,
`_mock_process`, `_mock_tls` and `_mock_harness`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from plugins._mock_app import serve
from plugins._mock_harness import AsyncMockAdminBase, MockAdminBase, MockAdminError, MockProcess
from plugins._mock_process import parse_arguments, process_arguments, run_main, state_arguments
from plugins._mock_tls import ensure_certificates
from plugins.apns._mock_auth import (
    PRODUCTION_OID,
    PUSH_TYPE_SUFFIX,
    SANDBOX_OID,
    TOPIC_OID,
    SigningKey,
    issue_client_certificate,
)
from plugins.apns._mock_server import Connection
from plugins.apns._mock_state import DEFAULT_FAULTS, App

__all__ = [
    "DEFAULT_FAULTS",
    "PRODUCTION_OID",
    "PUSH_TYPE_SUFFIX",
    "READY_PREFIX",
    "SANDBOX_OID",
    "TOPIC_OID",
    "AsyncMockAdmin",
    "MockAdmin",
    "MockAdminError",
    "MockApnsProcess",
    "SigningKey",
    "ensure_certificates",
    "issue_client_certificate",
    "main",
]

READY_PREFIX = "mock-apns ready on "


# --------------------------------------------------------------------------------------------
# Entry points


async def _serve(args: argparse.Namespace) -> int:
    environment = args.environment
    return await serve(
        args,
        name="mock-apns",
        ready_prefix=READY_PREFIX,
        new_app=lambda port, worker, workers: App(environment, worker=worker, workers=workers),
        connection=Connection,
        alpn=["h2"],
        client_certs=args.client_certs,
        banner=f"mock-apns: environment {environment}, state in {Path(args.dir)}, client certificates {args.client_certs}",
    )


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pigeon mock-apns", description="A mock APNs HTTP/2 provider API (see the module docstring).")
    state_arguments(parser, dir_help="state directory (CA, server certificate); default: a new temporary directory")
    parser.add_argument("--environment", choices=("sandbox", "production"), default="sandbox")
    process_arguments(parser, config_help="JSON file with the initial state (keys, tokens, faults)")
    parser.add_argument("--client-certs", choices=("none", "optional", "required"), default="none",
                        help="request TLS client certificates signed by the mock CA (certificate auth)")
    return parse_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    """``pigeon mock-apns`` / ``python -m plugins.apns.mock``: run the mock until SIGTERM/SIGINT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(_parse_args(argv), argv, _serve, name="mock-apns", script=__file__, ready_prefix=READY_PREFIX)


# --------------------------------------------------------------------------------------------
# Test helpers: the mock in a child process, and admin clients


class MockAdmin(MockAdminBase):
    """Blocking admin client (httpx over HTTP/2). Call it as ``admin(method, path, json)`` or
    use the named methods; errors raise `MockAdminError`."""

    def set_keys(self, keys: list[dict[str, Any]]) -> dict[str, Any]:
        return self.request("PUT", "/_mock/keys", keys)

    def add_key(self, key: SigningKey | dict[str, Any], topics: Iterable[str] | None = None) -> dict[str, Any]:
        spec = key.spec(topics) if isinstance(key, SigningKey) else key
        keys = [k for k in self.state()["keys"] if k["key_id"] != spec["key_id"]]
        return self.set_keys([*keys, spec])

    def set_tokens(self, tokens: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", "/_mock/tokens", tokens)

    def clear_tokens(self) -> dict[str, Any]:
        return self.request("DELETE", "/_mock/tokens")


class AsyncMockAdmin(AsyncMockAdminBase):
    """`MockAdmin` for async code (asyncio or Trio, through httpx/anyio); use ``async with``."""

    async def set_keys(self, keys: list[dict[str, Any]]) -> dict[str, Any]:
        return await self.request("PUT", "/_mock/keys", keys)

    async def add_key(self, key: SigningKey | dict[str, Any], topics: Iterable[str] | None = None) -> dict[str, Any]:
        spec = key.spec(topics) if isinstance(key, SigningKey) else key
        keys = [k for k in (await self.state())["keys"] if k["key_id"] != spec["key_id"]]
        return await self.set_keys([*keys, spec])

    async def set_tokens(self, tokens: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", "/_mock/tokens", tokens)

    async def clear_tokens(self) -> dict[str, Any]:
        return await self.request("DELETE", "/_mock/tokens")


class MockApnsProcess(MockProcess[MockAdmin, AsyncMockAdmin]):
    """The mock APNs server in a child process, on 127.0.0.1 and a free port by default.

    ::

        key = SigningKey.generate()
        with MockApnsProcess(tmp_path / "apns", config={"keys": [key.spec()], "tokens": {TOKEN: ["com.example.app"]}}) as mock:
            mock.address, mock.ca_file        # "127.0.0.1:PORT", DIR/ca.pem
            mock.admin.set_faults(latency_ms=5)
            mock.admin.accepted()

    ``async with MockApnsProcess(...) as mock`` works too (start/stop run in a worker thread;
    Trio or asyncio); use ``mock.async_admin()`` for admin calls that do not block the loop.

    Args:
        dir: state directory (CA, server certificate, config); default: a new temporary one.
        environment: ``sandbox`` (adds apns-unique-id) or ``production``.
        config: the initial state (see the module docstring); written to ``dir/config.json``.
        workers: processes sharing the port.
        client_certs: ``none``, ``optional`` or ``required`` (certificate auth).
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

    name = "mock-apns"
    ready_prefix = READY_PREFIX
    script = __file__
    admin_class = MockAdmin
    async_admin_class = AsyncMockAdmin

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        *,
        environment: str = "sandbox",
        config: dict[str, Any] | None = None,
        workers: int = 1,
        client_certs: str = "none",
        hostnames: Iterable[str] = (),
        listen: str = "127.0.0.1:0",
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(dir, config=config, workers=workers, hostnames=hostnames, listen=listen, extra_args=extra_args, env=env)
        self.environment = environment
        self.client_certs = client_certs

    def arguments(self) -> list[str]:
        return ["--environment", self.environment, "--client-certs", self.client_certs]


if __name__ == "__main__":
    sys.exit(main())
