"""A mock of Firebase Cloud Messaging HTTP v1 and Google's OAuth2 token endpoint, for tests and
benchmarks (providers.md section 2).

Run it::

    python -m plugins.fcm.mock --dir STATE --listen 127.0.0.1:0 [--config state.json] [--workers N] [--hostname NAME ...]

Once it accepts connections it prints one line on stdout, ``mock-fcm ready on HOST:PORT``.
It serves HTTPS with its own CA, like the mock APNs (`plugins._mock_tls`): ``STATE/ca.pem``
(created once and kept) signs a server certificate issued at each start for 127.0.0.1, ::1,
localhost and every ``--hostname``. Each connection speaks HTTP/2 (ALPN ``h2``, or the HTTP/2
preface without ALPN) or HTTP/1.1 with keep-alive (ALPN ``http/1.1``, or no ALPN and an HTTP/1.1
request line): firebase-admin sends with ``requests`` (HTTP/1.1) and, in its async API, with
httpx over HTTP/2. ``--workers N`` runs N processes on the same port (SO_REUSEPORT) sharing
their state through the parent. SIGTERM, SIGINT and (with ``--exit-on-stdin-eof``) stdin EOF
stop it: HTTP/2 connections get GOAWAY, then everything in flight is answered.

Token endpoint, ``POST /token`` (form ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&
assertion=JWT``; other methods get 405; status 400 unless given), checked in this order:
``unsupported_grant_type``; ``invalid_request`` (no assertion); ``invalid_grant`` "Invalid JWT
Signature." (not a JWT, alg not RS256); 401 ``invalid_client`` (``iss`` is no registered
service account's client_email, or header ``kid`` is not one of its private_key_ids);
``invalid_grant`` "Invalid JWT Signature." (signature); ``invalid_grant`` "Invalid JWT: Token
must be a short-lived token (60 minutes) and in a reasonable timeframe. ..." (iat more than
60 s ahead, exp not after now, exp - iat over 3600 s, either missing); ``invalid_grant``
"Invalid JWT: Failed audience check. ..." (aud neither ``https://oauth2.googleapis.com/token``
nor this mock's own ``https://HOST:PORT/token``); ``invalid_scope`` (no scope, or neither
``.../auth/firebase.messaging`` nor ``.../auth/cloud-platform``). Success: 200
``{"access_token": "ya29.…", "expires_in": token_lifetime_s, "token_type": "Bearer"}``. The
access token carries project, client, issue and expiry times under an HMAC whose key is
``STATE/token-secret`` (created once), so every worker and every restart on the same STATE
accepts it.

Send, ``POST /v1/projects/{project_id}/messages:send``, checked in this order:

1. authentication: 401 UNAUTHENTICATED "Request is missing required authentication
   credential. ..." (no or empty ``Authorization: Bearer``); 401 UNAUTHENTICATED "Request had
   invalid authentication credentials. ..." (not a token of this mock, expired, or issued before
   ``revoke_tokens_before``); 403 PERMISSION_DENIED (a token of another project). These carry
   no ``details`` (Google's front end answers them, not FCM);
2. quota: 429 RESOURCE_EXHAUSTED, FcmError QUOTA_EXCEEDED plus a QuotaFailure detail and
   ``Retry-After: retry_after_s``, once a project sent ``quota_per_minute`` messages in the
   current 60 s window (a fixed window from the first message; every authenticated send that
   is not answered 429 counts, 4xx included, as with FCM). With ``--workers N`` each worker
   enforces ``quota_per_minute / N``;
3. the request body (400 INVALID_ARGUMENT, a BadRequest detail, no FcmError): JSON; every field
   of SendMessageRequest and Message (providers.md 2.3) in snake_case or lowerCamelCase; unknown
   names ("Invalid JSON payload received. Unknown name \\"foo\\" at 'message': Cannot find
   field."); wrong types ("Invalid value at 'message.data[0].value' (TYPE_STRING), 12");
   enums in any case or as numbers; protobuf Duration (``"3.5s"``) and Timestamp (RFC 3339)
   strings; at most one of token/topic/condition/fid;
4. the message (400 INVALID_ARGUMENT, FcmError INVALID_ARGUMENT and a BadRequest naming the
   field): "Recipient of the message is not set."; topic name (``[a-zA-Z0-9-_.~%]+``);
   condition (1 to 5 quoted topics); reserved keys in data and android.data (``from``,
   ``message_type``, ``google*``, ``gcm*``); android.ttl within 0..2419200 s; android
   notification color ``#rrggbb``; light_settings color components within 0..1; analytics
   labels (``[a-zA-Z0-9-_.~%]{1,50}``); webpush fcm_options.link HTTPS;
5. size: the message re-encoded as compact JSON without its target over 4096 bytes (2048 for
   topic and condition messages) -> 400 INVALID_ARGUMENT "Request contains an invalid argument."
   with no details;
6. the token (or fid): unregistered for the project -> 404 NOT_FOUND "Requested entity was not
   found." FcmError UNREGISTERED; registered only for another project -> 403 PERMISSION_DENIED
   "SenderId mismatch" FcmError SENDER_ID_MISMATCH; unknown (unless ``accept_any_token``) ->
   400 INVALID_ARGUMENT "The registration token is not a valid FCM registration token",
   FcmError INVALID_ARGUMENT and BadRequest ``message.token``;
7. the fault ratios, one draw from ``random.Random(seed + worker)``: ``ratio_503`` (503
   UNAVAILABLE, FcmError UNAVAILABLE, ``Retry-After`` when ``retry_after_s_503`` is set),
   ``ratio_500`` (500 INTERNAL, FcmError INTERNAL), ``ratio_502_html`` (502 with an HTML body,
   ``content-type: text/html; charset=UTF-8``).

Success: 200 ``{"name": "projects/<project>/messages/0:<unique id>%<hex>"}``; with
``validate_only`` the name ends ``messages/fake_message_id`` and nothing is recorded. Bodies are
pretty-printed as Google's are; errors are google.rpc.Status JSON ``{"error": {"code",
"message", "status", "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
"errorCode"}, {"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field",
"description"}]}]}}`` with ``content-type: application/json; charset=UTF-8``. Other paths: 404
NOT_FOUND. Texts Google does not document (the 403 for another project, the quota message,
the texts of step 4, the audience and scope errors) are the mock's own.

State (``--config FILE.json`` and the admin API)::

    {"projects": {"<project_id>": {
        "service_accounts": [{"client_email": "...", "private_key_id": "<kid>",
                              "public_key_pem": "-----BEGIN PUBLIC KEY-----..."}],  # a private key PEM works too
        "tokens": {"<registration token>": {"unregistered": false}}}},
     "faults": {...}}                                                               # see DEFAULT_FAULTS

A client_email belongs to one project; its access tokens are for that project.

Faults and switches (``DEFAULT_FAULTS``): ``accept_any_token`` (unknown tokens succeed);
``quota_per_minute`` (null: none); ``retry_after_s`` (the 429's Retry-After; null: none);
``ratio_503``, ``retry_after_s_503``, ``ratio_500``, ``ratio_502_html``, ``seed``;
``latency_ms`` (delay before each send's answer; not the token endpoint's); ``token_lifetime_s``
(expires_in of new access tokens); ``revoke_tokens_before`` (epoch seconds: older access tokens
get 401, to test renewal); ``record_accepted`` (keep the accepted list; off for long
benchmarks); ``max_concurrent_streams`` (HTTP/2 SETTINGS, 100 like FCM; pushed to open
connections when changed; a client opening more gets GOAWAY PROTOCOL_ERROR
``exceeded_max_concurrent_streams``). Connection faults, as the mock APNs has them (same names),
counted on HTTP/2 send streams (not the token endpoint's or the admin API's):
``goaway_after_streams`` N (at the Nth send stream of a connection send GOAWAY NO_ERROR,
last_stream_id = that stream, debug data ``goaway_reason``, none by default; answer the
streams up to it, refuse later ones with RST_STREAM REFUSED_STREAM, then close);
``reset_after_streams`` N (the (N+1)th send stream aborts the TCP connection with RST,
unanswered streams are lost); ``stall`` (answer no send, over HTTP/2 or HTTP/1.1, until set
back to false, then answer everything held; the token endpoint still answers).

Admin API: on the same port (HTTP/2 or HTTP/1.1), paths under ``/_mock/``, JSON in and out, no
auth; 400 ``{"error": ...}`` for bad input, and nothing half-applied:

- ``GET /_mock/state``: projects, faults, workers.
- ``PUT /_mock/projects``: ``{project_id: {"service_accounts": [...], "tokens": {...}}}``: creates
  the projects; ``service_accounts`` (when given) replaces the project's list, ``tokens`` merge.
- ``PUT /_mock/tokens``: ``{"project": P, "tokens": {token: {"unregistered": bool} | null}}``
  merges (null removes). ``DELETE`` with ``{"project": P}`` clears that project's tokens,
  without a body every project's.
- ``PUT /_mock/faults``: merge; ``DELETE`` restores the defaults. (Every PUT/DELETE above
  answers with the new state.)
- ``GET /_mock/accepted``: every message accepted (not validate_only), in order: project,
  token, topic, condition, fid, message (as received, field names in snake_case, enums upper
  case), name, client_email, protocol, connection, worker, received_at_ns. ``DELETE`` clears it.
- ``GET /_mock/stats``: requests (sends), successes, validate_only, errors (by FcmError code,
  else status), token_grants, token_errors (by OAuth error), connections_opened,
  connections_open, protocols (``h2``/``http/1.1``: connections, requests), goaways_sent,
  resets, refused_streams, stalled (answers held now). ``DELETE`` zeroes it.

With ``--workers`` admin changes reach every worker, and accepted and stats merge all of them.
Admin requests are not counted. Not modelled: IAM and API-disabled errors, per-device and
per-topic rates, THIRD_PARTY_AUTH_ERROR, project numbers in the path, topic management.

For tests: `MockFcmProcess` runs the mock as a child process and gives its address, token URI,
CA file and admin clients (`MockAdmin`, `AsyncMockAdmin`); `ServiceAccount` makes service
accounts (the JSON key file for the SDKs, the entry for the mock, signed assertions).

The code: this module is the command line and the test helpers; what FCM does is in
`plugins.fcm._mock_api` (the token endpoint, send, the replies), `_mock_schema` (the Message
schema), `_mock_state` (state, counters, admin API) and `_mock_http` (HTTP/2 or HTTP/1.1),
over the machinery both mocks share: `plugins._mock_h2` (the HTTP/2 server connection),
`_mock_app`, `_mock_process`, `_mock_tls` and `_mock_harness`.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import time
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from plugins._mock_app import serve
from plugins._mock_harness import AsyncMockAdminBase, MockAdminBase, MockAdminError, MockProcess
from plugins._mock_process import parse_arguments, process_arguments, run_main, split_listen, state_arguments
from plugins._mock_tls import key_pem, public_key_pem
from plugins.fcm._mock_api import CLOUD_PLATFORM_SCOPE, FCM_SCOPE, GOOGLE_TOKEN_URI, JWT_BEARER, b64url
from plugins.fcm._mock_http import Connection
from plugins.fcm._mock_state import DEFAULT_FAULTS, App, token_secret

__all__ = [
    "CLOUD_PLATFORM_SCOPE",
    "DEFAULT_FAULTS",
    "FCM_SCOPE",
    "GOOGLE_TOKEN_URI",
    "JWT_BEARER",
    "READY_PREFIX",
    "AsyncMockAdmin",
    "MockAdmin",
    "MockAdminError",
    "MockFcmProcess",
    "ServiceAccount",
    "main",
]

READY_PREFIX = "mock-fcm ready on "

_json_encode = msgspec.json.encode


# --------------------------------------------------------------------------------------------
# Entry points


def _audiences(host: str, port: int, hostnames: Iterable[str]) -> list[str]:
    """The ``aud`` values the token endpoint takes: Google's, and this mock's own token URLs."""
    out = [GOOGLE_TOKEN_URI]
    for name in (host, "localhost", "127.0.0.1", "::1", *hostnames):
        shown = f"[{name}]" if ":" in name else name
        out.append(f"https://{shown}:{port}/token")
    return out


async def _serve(args: argparse.Namespace) -> int:
    folder = Path(args.dir)

    def new_app(port: int, worker: int, workers: int) -> App:
        audiences = _audiences(split_listen(args.listen)[0], port, args.hostname)
        return App(token_secret(folder), audiences, worker=worker, workers=workers)

    return await serve(
        args,
        name="mock-fcm",
        ready_prefix=READY_PREFIX,
        new_app=new_app,
        connection=Connection,
        alpn=["h2", "http/1.1"],
        banner=f"mock-fcm: state in {folder}",
    )


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m plugins.fcm.mock", description="A mock FCM HTTP v1 API and OAuth2 token endpoint (see the module docstring)."
    )
    state_arguments(parser, dir_help="state directory (CA, server certificate, token secret); default: a new temporary directory")
    process_arguments(parser, config_help="JSON file with the initial state (projects, faults)")
    return parse_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    """``python -m plugins.fcm.mock``: run the mock until SIGTERM/SIGINT (or stdin EOF)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_main(_parse_args(argv), argv, _serve, name="mock-fcm", script=__file__, ready_prefix=READY_PREFIX)


# --------------------------------------------------------------------------------------------
# Test helpers: service accounts, the mock in a child process, admin clients


@dataclass(frozen=True)
class ServiceAccount:
    """A Google service account with an RSA key, as the Firebase console issues them.

    ``ServiceAccount.generate()`` makes one; ``info(token_uri)`` is its JSON key file (for
    ``firebase_admin.credentials.Certificate``); ``spec()`` its entry in the mock's
    ``service_accounts``; ``assertion()`` signs the JWT that the token endpoint takes.
    """

    project_id: str
    client_email: str
    private_key_id: str
    client_id: str
    private_key: rsa.RSAPrivateKey

    @classmethod
    def generate(
        cls, project_id: str = "mock-project", client_email: str | None = None, private_key_id: str | None = None
    ) -> ServiceAccount:
        """A new account with an RSA-2048 key; the email and key id are random unless given."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        email = client_email or f"firebase-adminsdk-{secrets.token_hex(3)[:5]}@{project_id}.iam.gserviceaccount.com"
        client_id = str(10**20 + secrets.randbelow(9 * 10**20))
        return cls(project_id, email, private_key_id or secrets.token_hex(20), client_id, key)

    @property
    def private_key_pem(self) -> str:
        return key_pem(self.private_key).decode()

    @property
    def public_key_pem(self) -> str:
        return public_key_pem(self.private_key).decode()

    def info(self, token_uri: str = GOOGLE_TOKEN_URI) -> dict[str, Any]:
        """The service-account JSON key file, pointing at ``token_uri``."""
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": self.private_key_id,
            "private_key": self.private_key_pem,
            "client_email": self.client_email,
            "client_id": self.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
            + urllib.parse.quote(self.client_email, safe=""),
            "universe_domain": "googleapis.com",
        }

    def spec(self) -> dict[str, Any]:
        """This account as an entry of a project's ``service_accounts`` in the mock."""
        return {"client_email": self.client_email, "private_key_id": self.private_key_id, "public_key_pem": self.public_key_pem}

    def assertion(
        self,
        *,
        iat: float | None = None,
        lifetime: int = 3600,
        scope: str | None = FCM_SCOPE,
        aud: str = GOOGLE_TOKEN_URI,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A signed RS256 assertion as google-auth makes it (``kid``, ``iss``, ``scope``,
        ``aud``, ``iat``, ``exp = iat + lifetime``); ``header``/``claims`` override or add."""
        now = int(time.time() if iat is None else iat)
        head = {"alg": "RS256", "typ": "JWT", "kid": self.private_key_id, **(header or {})}
        body: dict[str, Any] = {"iss": self.client_email, "aud": aud, "iat": now, "exp": now + lifetime}
        if scope is not None:
            body["scope"] = scope
        body.update(claims or {})
        signing_input = f"{b64url(_json_encode(head))}.{b64url(_json_encode(body))}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"


def _account_specs(accounts: Iterable[ServiceAccount | dict[str, Any]]) -> list[dict[str, Any]]:
    return [a.spec() if isinstance(a, ServiceAccount) else a for a in accounts]


class MockAdmin(MockAdminBase):
    """Blocking admin client of the mock FCM (httpx over HTTP/2); errors raise `MockAdminError`."""

    def set_project(
        self,
        project_id: str,
        service_accounts: Iterable[ServiceAccount | dict[str, Any]] | None = None,
        tokens: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Create or update a project: ``service_accounts`` (when given) replaces its list,
        ``tokens`` (``{token: {"unregistered": bool} | null}``) merge. Returns the state."""
        spec: dict[str, Any] = {}
        if service_accounts is not None:
            spec["service_accounts"] = _account_specs(service_accounts)
        if tokens is not None:
            spec["tokens"] = tokens
        return self.request("PUT", "/_mock/projects", {project_id: spec})

    def set_tokens(self, project: str, tokens: dict[str, Any]) -> dict[str, Any]:
        return self.request("PUT", "/_mock/tokens", {"project": project, "tokens": tokens})

    def clear_tokens(self, project: str | None = None) -> dict[str, Any]:
        return self.request("DELETE", "/_mock/tokens", None if project is None else {"project": project})


class AsyncMockAdmin(AsyncMockAdminBase):
    """`MockAdmin` for async code (asyncio or Trio, through httpx/anyio); use ``async with``."""

    async def set_project(
        self,
        project_id: str,
        service_accounts: Iterable[ServiceAccount | dict[str, Any]] | None = None,
        tokens: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {}
        if service_accounts is not None:
            spec["service_accounts"] = _account_specs(service_accounts)
        if tokens is not None:
            spec["tokens"] = tokens
        return await self.request("PUT", "/_mock/projects", {project_id: spec})

    async def set_tokens(self, project: str, tokens: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PUT", "/_mock/tokens", {"project": project, "tokens": tokens})

    async def clear_tokens(self, project: str | None = None) -> dict[str, Any]:
        return await self.request("DELETE", "/_mock/tokens", None if project is None else {"project": project})


class MockFcmProcess(MockProcess[MockAdmin, AsyncMockAdmin]):
    """The mock FCM in a child process, on 127.0.0.1 and a free port by default.

    ::

        sa = ServiceAccount.generate("my-project")
        config = {"projects": {"my-project": {"service_accounts": [sa.spec()], "tokens": {"tok-1": {}}}}}
        with MockFcmProcess(tmp_path / "fcm", config=config) as mock:
            mock.url, mock.token_uri, mock.ca_file   # https://127.0.0.1:PORT, .../token, DIR/ca.pem
            credentials.Certificate(sa.info(mock.token_uri))
            mock.admin.set_faults(latency_ms=5)
            mock.admin.accepted()

    ``async with MockFcmProcess(...) as mock`` works too (start/stop run in a worker thread;
    Trio or asyncio); use ``mock.async_admin()`` for admin calls that do not block the loop.

    Args:
        dir: state directory (CA, server certificate, token secret, config); default: a new
            temporary one.
        config: the initial state (see the module docstring); written to ``dir/config.json``.
        workers: processes sharing the port.
        hostnames: extra names for the server certificate.
        listen: ``HOST:PORT``.
        extra_args: more command-line arguments.
        env: environment variables to add.

    Attributes:
        address, host, port, url: where it listens, once started.
        token_uri: the token endpoint (``url + "/token"``), for service-account files.
        ca_file: the CA certificate clients must trust.
        stderr_lines: what the mock wrote on stderr so far.
        returncode: the exit status once stopped.
    """

    name = "mock-fcm"
    ready_prefix = READY_PREFIX
    script = __file__
    admin_class = MockAdmin
    async_admin_class = AsyncMockAdmin

    def __init__(
        self,
        dir: str | os.PathLike[str] | None = None,
        *,
        config: dict[str, Any] | None = None,
        workers: int = 1,
        listen: str = "127.0.0.1:0",
        hostnames: Iterable[str] = (),
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(dir, config=config, workers=workers, hostnames=hostnames, listen=listen, extra_args=extra_args, env=env)

    @property
    def token_uri(self) -> str:
        return f"{self.url}/token"


if __name__ == "__main__":
    sys.exit(main())
