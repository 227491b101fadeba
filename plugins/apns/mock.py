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
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import os
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import msgspec
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from h2.errors import ErrorCodes
from h2.stream import StreamClosedBy
from hyperframe.frame import GoAwayFrame, RstStreamFrame

from plugins._mock_tls import (
    AsyncMockAdminBase,
    MockAdminBase,
    MockAdminError,
    MockProcess,
    _install_stop,
    _IpcClient,
    _issue,
    _key_pem,
    _load_or_create_ca,
    _locked,
    _Decoder,
    _PlainEncoder,
    _print_ready,
    _quiet_exception_handler,
    _run,
    _split_listen,
    _supervise,
    _tune_hpack,
    ensure_certificates,
)

__all__ = [
    "DEFAULT_FAULTS",
    "READY_PREFIX",
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

#: Apple's certificate extensions: the topic list, and the environment markers.
TOPIC_OID = ObjectIdentifier("1.2.840.113635.100.6.3.6")
SANDBOX_OID = ObjectIdentifier("1.2.840.113635.100.6.3.1")
PRODUCTION_OID = ObjectIdentifier("1.2.840.113635.100.6.3.2")

#: Push type -> the suffix its apns-topic must carry (None: the bundle ID itself, or anything for mdm).
PUSH_TYPE_SUFFIX: dict[bytes, bytes | None] = {
    b"alert": None,
    b"background": None,
    b"complication": b".complication",
    b"controls": b".push-type.controls",
    b"fileprovider": b".pushkit.fileprovider",
    b"liveactivity": b".push-type.liveactivity",
    b"location": b".location-query",
    b"mdm": None,
    b"pushtotalk": b".voip-ptt",
    b"voip": b".voip",
    b"widgets": b".push-type.widgets",
}
_TOPIC_SUFFIXES = sorted({s for s in PUSH_TYPE_SUFFIX.values() if s}, key=len, reverse=True)
_PRIORITIES = frozenset({b"10", b"5", b"1"})
_PAYLOAD_LIMIT = 4096
_VOIP_PAYLOAD_LIMIT = 5120

DEFAULT_FAULTS: dict[str, Any] = {
    "accept_any_token": False,
    "strict_token_length": True,
    "max_concurrent_streams": 1000,
    "one_stream_until_valid_token": False,
    "goaway_after_streams": None,
    "goaway_reason": "Shutdown",
    "reset_after_streams": None,
    "ratio_429": 0.0,
    "ratio_503": 0.0,
    "seed": 0,
    "latency_ms": 0,
    "stall": False,
    "token_max_age_s": 3600,
    "token_update_interval_s": 1200,
    "record_accepted": True,
    "bad_environment_key_reason": "BadEnvironmentKeyIdInToken",
}

_UUID_RE = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ECHOABLE_RE = re.compile(rb"[\x21-\x7e]{1,128}")
_TOKEN_RE = re.compile(rb"[0-9a-fA-F]{64}")
_ANY_TOKEN_RE = re.compile(rb"(?:[0-9a-fA-F]{2})+")
_HEX_RE = re.compile(r"(?:[0-9a-fA-F]{2})+")
_STATUS = {code: str(code).encode() for code in (200, 400, 403, 404, 405, 410, 413, 429, 500, 503)}
_CONNECTION_WINDOW = 16 * 1024 * 1024
_MAX_KEPT_BODY = 64 * 1024

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


_ids = random.Random()


def _new_id() -> bytes:
    """A random (version 4) UUID in canonical lower-case form (from a seeded PRNG: a mock's
    ids need not be unguessable, and os.urandom cost 8% of the mock's time)."""
    n = _ids.getrandbits(128) & ~(0xF << 76 | 0x3 << 62) | 0x4 << 76 | 0x2 << 62
    h = b"%032x" % n
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


# --------------------------------------------------------------------------------------------
# State


class _Faults:
    """The fault/switch values, as attributes for the request path."""

    __slots__ = tuple(DEFAULT_FAULTS)

    def __init__(self) -> None:
        for name, value in DEFAULT_FAULTS.items():
            setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DEFAULT_FAULTS}


def _check_faults(update: Any) -> dict[str, Any]:
    """Validate a faults update; raise ValueError/TypeError naming the first bad entry."""
    if not isinstance(update, dict):
        raise TypeError("faults must be a JSON object")
    for name, value in update.items():
        if name not in DEFAULT_FAULTS:
            raise ValueError(f"unknown fault {name!r}")
        default = DEFAULT_FAULTS[name]
        if name in ("goaway_after_streams", "reset_after_streams"):
            ok = value is None or (type(value) is int and value >= 0)
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif name.startswith("ratio_"):
            ok = type(value) in (int, float) and 0.0 <= value <= 1.0
        elif isinstance(default, int):
            ok = type(value) in (int, float) and value >= 0 and (name != "max_concurrent_streams" or value >= 1)
            if name in ("max_concurrent_streams", "seed"):
                ok = ok and type(value) is int
        else:
            ok = isinstance(value, str) and bool(value)
        if not ok:
            raise ValueError(f"bad value for fault {name!r}: {value!r}")
    return update


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    team_id: str
    public_key: ec.EllipticCurvePublicKey
    topics: frozenset[bytes] | None
    environment: str | None

    def covers(self, topic: bytes) -> bool:
        if self.topics is None or topic in self.topics:
            return True
        for suffix in _TOPIC_SUFFIXES:
            if topic.endswith(suffix) and topic[: -len(suffix)] in self.topics:
                return True
        return False

    def to_json(self) -> dict[str, Any]:
        pem = self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {
            "key_id": self.key_id,
            "team_id": self.team_id,
            "public_key_pem": pem.decode(),
            "topics": None if self.topics is None else sorted(t.decode() for t in self.topics),
            "environment": self.environment,
        }


def _parse_key(spec: Any) -> _Key:
    if not isinstance(spec, dict):
        raise TypeError("a key must be a JSON object")
    key_id, team_id, pem = spec.get("key_id"), spec.get("team_id"), spec.get("public_key_pem")
    if not (isinstance(key_id, str) and key_id and isinstance(team_id, str) and team_id and isinstance(pem, str)):
        raise ValueError("a key needs key_id, team_id and public_key_pem strings")
    try:
        public: Any = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        try:
            public = serialization.load_pem_private_key(pem.encode(), None).public_key()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"key {key_id}: public_key_pem is not a PEM key") from exc
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, ec.SECP256R1):
        raise TypeError(f"key {key_id}: not a P-256 key (ES256 needs one)")
    topics = spec.get("topics")
    if topics is not None and not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
        raise ValueError(f"key {key_id}: topics must be a list of strings or null")
    environment = spec.get("environment")
    if environment not in (None, "sandbox", "production"):
        raise ValueError(f"key {key_id}: environment must be sandbox, production or null")
    unknown = set(spec) - {"key_id", "team_id", "public_key_pem", "topics", "environment"}
    if unknown:
        raise ValueError(f"key {key_id}: unknown fields {sorted(unknown)}")
    return _Key(key_id, team_id, public, None if topics is None else frozenset(t.encode() for t in topics), environment)


def _parse_keys(doc: Any) -> dict[str, _Key]:
    if isinstance(doc, dict) and set(doc) == {"keys"}:
        doc = doc["keys"]
    if not isinstance(doc, list):
        raise TypeError("keys must be a list (or {'keys': [...]})")
    keys = [_parse_key(spec) for spec in doc]
    return {key.key_id: key for key in keys}


@dataclass(frozen=True, slots=True)
class _Token:
    topics: frozenset[bytes]
    unregistered_at_ms: int | None
    environment: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "topics": sorted(t.decode() for t in self.topics),
            "unregistered_at_ms": self.unregistered_at_ms,
            "environment": self.environment,
        }


def _parse_tokens(doc: Any) -> dict[bytes, _Token | None]:
    if not isinstance(doc, dict):
        raise TypeError("tokens must be a JSON object {token_hex: spec | null}")
    out: dict[bytes, _Token | None] = {}
    for token, spec in doc.items():
        if not _HEX_RE.fullmatch(token):
            raise ValueError(f"token {token!r} is not hex")
        if spec is None:
            out[token.lower().encode()] = None
            continue
        if isinstance(spec, list):
            spec = {"topics": spec}
        if not isinstance(spec, dict):
            raise TypeError(f"token {token}: spec must be an object, a list of topics or null")
        topics = spec.get("topics", [])
        unregistered = spec.get("unregistered_at_ms")
        environment = spec.get("environment")
        if not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
            raise ValueError(f"token {token}: topics must be a list of strings")
        if unregistered is not None and type(unregistered) is not int:
            raise ValueError(f"token {token}: unregistered_at_ms must be an integer or null")
        if environment not in (None, "sandbox", "production"):
            raise ValueError(f"token {token}: environment must be sandbox, production or null")
        unknown = set(spec) - {"topics", "unregistered_at_ms", "environment"}
        if unknown:
            raise ValueError(f"token {token}: unknown fields {sorted(unknown)}")
        out[token.lower().encode()] = _Token(frozenset(t.encode() for t in topics), unregistered, environment)
    return out


@dataclass(frozen=True, slots=True)
class _CertInfo:
    topics: tuple[bytes, ...]
    environments: frozenset[str]


def _der_read(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(tag, content) of each DER element in ``data``."""
    i = 0
    while i < len(data):
        tag = data[i]
        length = data[i + 1]
        i += 2
        if length & 0x80:
            count = length & 0x7F
            length = int.from_bytes(data[i : i + count], "big")
            i += count
        yield tag, data[i : i + length]
        i += length


def _der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _cert_info(der: bytes) -> _CertInfo:
    cert = x509.load_der_x509_certificate(der)
    topics: list[bytes] = []
    try:
        value = cert.extensions.get_extension_for_oid(TOPIC_OID).value
    except x509.ExtensionNotFound:
        pass
    else:
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        for tag, content in _der_read(raw):
            if tag == 0x30:
                topics.extend(c for t, c in _der_read(content) if t == 0x0C)
    if not topics:
        topics = [str(a.value).encode() for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)]
    oids = {ext.oid for ext in cert.extensions}
    environments = {name for oid, name in ((SANDBOX_OID, "sandbox"), (PRODUCTION_OID, "production")) if oid in oids}
    return _CertInfo(tuple(topics), frozenset(environments or ("sandbox", "production")))


def _b64url_decode(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _verify_es256(public_key: ec.EllipticCurvePublicKey, signed: bytes, signature: bytes) -> bool:
    """Both JWS raw R||S (64 bytes) and ASN.1 DER signatures, as APNs accepts both."""
    candidates = [signature]
    if len(signature) == 64:
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        candidates.insert(0, encode_dss_signature(r, s))
    for der in candidates:
        try:
            public_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
            return True
        except (InvalidSignature, ValueError):
            continue
    return False


_INVALID_TOKEN = (b"InvalidProviderToken", None, 0)


class _App:
    """Everything one process serves: state, counters, connections, faults."""

    def __init__(self, environment: str, *, worker: int = 0, workers: int = 1) -> None:
        self.environment = environment
        self.sandbox = environment == "sandbox"
        self.worker = worker
        self.workers = workers
        self.keys: dict[str, _Key] = {}
        self.tokens: dict[bytes, _Token] = {}
        self.f = _Faults()
        self.rng = random.Random(worker)
        self.jwt_cache: dict[bytes, tuple[bytes | None, _Key | None, int]] = {}
        self.cert_cache: dict[bytes, _CertInfo] = {}
        self.accepted: list[tuple[Any, ...]] = []
        self.conns: set[_Connection] = set()
        self.stalled: list[tuple[_Connection, int, tuple[Any, ...]]] = []
        self.ipc: _IpcClient | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self._conn_seq = 0
        self.h2_config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.clear_stats()

    # -- counters

    def clear_stats(self) -> None:
        self.n_requests = 0
        self.n_accepted = 0
        self.rejected: dict[str, int] = {}
        self.n_conns_opened = 0
        self.n_goaways = 0
        self.n_resets = 0
        self.n_refused = 0
        self.closed_max_streams: dict[str, int] = {}
        for conn in self.conns:
            conn.max_open = len(conn.h2.unanswered) if conn.h2 is not None else 0

    def stats_local(self) -> dict[str, Any]:
        per_conn = dict(self.closed_max_streams)
        for conn in self.conns:
            per_conn[str(conn.id)] = conn.max_open
        return {
            "requests": self.n_requests,
            "accepted": self.n_accepted,
            "rejected": dict(self.rejected),
            "connections_opened": self.n_conns_opened,
            "connections_open": len(self.conns),
            "goaways_sent": self.n_goaways,
            "resets": self.n_resets,
            "refused_streams": self.n_refused,
            "stalled": len(self.stalled),
            "max_concurrent_streams": per_conn,
        }

    def next_connection_id(self) -> int:
        self._conn_seq += 1
        self.n_conns_opened += 1
        return (self._conn_seq - 1) * self.workers + self.worker + 1

    exception_handler = staticmethod(_quiet_exception_handler)

    # -- state

    def load(self, doc: Any) -> None:
        """Apply a config document (the --config file)."""
        if not isinstance(doc, dict):
            raise TypeError("the config must be a JSON object")
        unknown = set(doc) - {"keys", "tokens", "accept_any_token", "faults"}
        if unknown:
            raise ValueError(f"unknown config entries {sorted(unknown)}")
        faults = dict(doc.get("faults") or {})
        if "accept_any_token" in doc:
            faults["accept_any_token"] = doc["accept_any_token"]
        for cmd in (
            {"op": "keys", "body": doc.get("keys", [])},
            {"op": "tokens", "body": doc.get("tokens", {})},
            {"op": "faults", "body": faults},
        ):
            self.check(cmd)
            self.apply(cmd)

    def check(self, cmd: dict[str, Any]) -> None:
        """Validate a change before it is applied anywhere (raises ValueError or TypeError)."""
        op, body = cmd["op"], cmd.get("body")
        if op == "keys":
            _parse_keys(body)
        elif op == "tokens":
            _parse_tokens(body)
        elif op == "faults":
            _check_faults(body)
            ratio = body.get("ratio_429", self.f.ratio_429) + body.get("ratio_503", self.f.ratio_503)
            if ratio > 1.0:
                raise ValueError("ratio_429 + ratio_503 must not exceed 1")

    def apply(self, cmd: dict[str, Any]) -> None:
        op, body = cmd["op"], cmd.get("body")
        if op == "keys":
            self.keys = _parse_keys(body)
            self.jwt_cache.clear()
        elif op == "tokens":
            for token, info in _parse_tokens(body).items():
                if info is None:
                    self.tokens.pop(token, None)
                else:
                    self.tokens[token] = info
        elif op == "tokens_clear":
            self.tokens.clear()
        elif op in ("faults", "faults_reset"):
            update = dict(DEFAULT_FAULTS) if op == "faults_reset" else body
            was_stalled, old_limit = self.f.stall, self.f.max_concurrent_streams
            for name, value in update.items():
                setattr(self.f, name, value)
            if "seed" in update or op == "faults_reset":
                self.rng = random.Random(self.f.seed + self.worker)
            if self.f.max_concurrent_streams != old_limit:
                for conn in list(self.conns):
                    conn.update_stream_limit()
            if was_stalled and not self.f.stall:
                self.release_stalled()
        elif op == "accepted_clear":
            self.accepted.clear()
        elif op == "stats_clear":
            self.clear_stats()
        else:
            raise ValueError(f"unknown operation {op!r}")

    def state_json(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "workers": self.workers,
            "keys": [key.to_json() for key in self.keys.values()],
            "tokens": {token.decode(): info.to_json() for token, info in self.tokens.items()},
            "accept_any_token": self.f.accept_any_token,
            "faults": self.f.to_json(),
        }

    def accepted_local(self) -> list[dict[str, Any]]:
        out = []
        for token, topic, push_type, priority, expiration, collapse, apns_id, body, conn, sid, auth, t_ns in self.accepted:
            out.append(
                {
                    "token": token.decode(),
                    "topic": topic.decode(errors="replace"),
                    "push_type": None if push_type is None else push_type.decode(errors="replace"),
                    "priority": None if priority is None else int(priority),
                    "expiration": None if expiration is None else int(expiration),
                    "collapse_id": None if collapse is None else collapse.decode(errors="replace"),
                    "apns_id": apns_id.decode(),
                    "payload": _json_decode(body),
                    "connection": conn,
                    "stream_id": sid,
                    "auth": auth,
                    "worker": self.worker,
                    "received_at_ns": t_ns,
                }
            )
        return out

    def collect_local(self, what: str) -> Any:
        if what == "accepted":
            return self.accepted_local()
        if what == "stats":
            return self.stats_local()
        raise ValueError(f"cannot collect {what!r}")

    async def collect(self, what: str) -> list[Any]:
        parts = [self.collect_local(what)]
        if self.ipc is not None:
            parts.extend(await self.ipc.request("gather", what=what))
        return parts

    async def change(self, cmd: dict[str, Any]) -> None:
        self.check(cmd)
        self.apply(cmd)
        if self.ipc is not None:
            await self.ipc.request("bcast", cmd=cmd)

    def release_stalled(self) -> None:
        held, self.stalled = self.stalled, []
        touched = set()
        for conn, sid, resp in held:
            if not conn.closed:
                conn.send_response(sid, resp)
                touched.add(conn)
        for conn in touched:
            conn.flush()

    def verify_jwt(self, token: bytes) -> tuple[bytes | None, _Key | None, int]:
        if len(self.jwt_cache) > 10000:
            self.jwt_cache.clear()
        entry = self._verify_jwt(token)
        self.jwt_cache[token] = entry
        return entry

    def _verify_jwt(self, token: bytes) -> tuple[bytes | None, _Key | None, int]:
        try:
            h64, c64, s64 = token.split(b".")
            header = _json_decode(_b64url_decode(h64))
            claims = _json_decode(_b64url_decode(c64))
            signature = _b64url_decode(s64)
        except (ValueError, binascii.Error, msgspec.DecodeError):
            return _INVALID_TOKEN
        if not isinstance(header, dict) or not isinstance(claims, dict) or header.get("alg") != "ES256":
            return _INVALID_TOKEN
        kid = header.get("kid")
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None or not _verify_es256(key.public_key, h64 + b"." + c64, signature):
            return _INVALID_TOKEN
        iat = claims.get("iat")
        if claims.get("iss") != key.team_id or type(iat) not in (int, float):
            return _INVALID_TOKEN
        return (None, key, int(iat))

    def cert_info(self, der: bytes) -> _CertInfo:
        info = self.cert_cache.get(der)
        if info is None:
            info = self.cert_cache[der] = _cert_info(der)
        return info

    async def admin(self, method: bytes, path: bytes, body: bytes) -> tuple[int, Any]:
        route = path.split(b"?", 1)[0].rstrip(b"/")
        try:
            doc = _json_decode(body) if body.strip() else None
            if route == b"/_mock/state" and method == b"GET":
                return 200, self.state_json()
            if route == b"/_mock/keys" and method == b"PUT":
                await self.change({"op": "keys", "body": doc})
                return 200, self.state_json()
            if route == b"/_mock/tokens" and method in (b"PUT", b"DELETE"):
                await self.change({"op": "tokens", "body": doc} if method == b"PUT" else {"op": "tokens_clear"})
                return 200, self.state_json()
            if route == b"/_mock/faults" and method in (b"PUT", b"DELETE"):
                await self.change({"op": "faults", "body": doc} if method == b"PUT" else {"op": "faults_reset"})
                return 200, self.state_json()
            if route == b"/_mock/accepted" and method == b"GET":
                parts = await self.collect("accepted")
                merged = [item for part in parts for item in part]
                merged.sort(key=lambda item: item["received_at_ns"])
                return 200, merged
            if route == b"/_mock/accepted" and method == b"DELETE":
                count = sum(len(p) for p in await self.collect("accepted")) if self.workers > 1 else len(self.accepted)
                await self.change({"op": "accepted_clear"})
                return 200, {"cleared": count}
            if route == b"/_mock/stats" and method == b"GET":
                return 200, _merge_stats(await self.collect("stats"))
            if route == b"/_mock/stats" and method == b"DELETE":
                await self.change({"op": "stats_clear"})
                return 200, {"cleared": True}
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            return 400, {"error": str(exc)}
        known = {b"/_mock/state", b"/_mock/keys", b"/_mock/tokens", b"/_mock/faults", b"/_mock/accepted", b"/_mock/stats"}
        if route in known:
            return 405, {"error": f"method {method.decode()} not allowed on {route.decode()}"}
        return 404, {"error": f"no admin endpoint {route.decode(errors='replace')}"}

    async def shutdown(self, grace: float) -> None:
        """GOAWAY ``Shutdown`` on every connection, answer what is answerable, then close."""
        for conn in list(self.conns):
            conn.shutdown()
        deadline = time.monotonic() + grace
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            conn.abort()


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, dict):
                bucket = out.setdefault(name, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            else:
                out[name] = out.get(name, 0) + value
    per_conn = out.get("max_concurrent_streams", {})
    out["max_concurrent_streams_observed"] = max(per_conn.values(), default=0)
    out["workers"] = len(parts)
    return out


# --------------------------------------------------------------------------------------------
# HTTP/2 connection


class _H2Connection(h2.connection.H2Connection):
    """h2's server connection with three changes for the mock:

    - streams over the limit (and above a GOAWAY's last stream id) are refused with
      RST_STREAM(REFUSED_STREAM) instead of failing the whole connection;
    - the open-stream count is the mock's own (h2 counts by walking every stream);
    - the mock forgets finished streams itself (`_Connection._forget`).
    """

    def __init__(self, app: _App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.unanswered: set[int] = set()
        self.refuse_above: int | None = None

    @property
    def open_inbound_streams(self) -> int:  # type: ignore[override]
        return len(self.unanswered)

    def _receive_headers_frame(self, frame: Any) -> Any:
        sid = frame.stream_id
        if sid not in self.streams and (
            (self.refuse_above is not None and sid > self.refuse_above)
            or len(self.unanswered) >= self.local_settings.max_concurrent_streams
        ):
            try:
                self.decoder.decode(frame.data, raw=True)  # keep HPACK state in step
            except Exception as exc:
                raise h2.exceptions.ProtocolError(f"bad header block: {exc}") from exc
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, sid)
            self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
            rst = RstStreamFrame(sid)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            self.app.n_refused += 1
            return [rst], []
        is_new = sid not in self.streams
        result = super()._receive_headers_frame(frame)
        if is_new:
            self.unanswered.add(sid)  # counted at once: later frames of this read see it
        return result


_RequestReceived = h2.events.RequestReceived
_DataReceived = h2.events.DataReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_ConnectionTerminated = h2.events.ConnectionTerminated


class _Connection(asyncio.Protocol):
    """One client connection (asyncio protocol around an h2 connection)."""

    def __init__(self, app: _App) -> None:
        self.app = app
        self.transport: Any = None
        self.h2: _H2Connection | None = None
        self.id = 0
        self.cert: _CertInfo | None = None
        self.requests: dict[int, list[Any]] = {}  # sid -> [headers, chunks, size, admin]
        self.outq: dict[int, tuple[bytes, int]] = {}  # sid -> (body, bytes sent) held by flow control
        self.nstreams = 0
        self.max_open = 0
        self.goaway_last: int | None = None
        self.closed = False
        self.in_batch = False
        self.close_pending = False
        self.team: str | None = None
        self.jwt_current: bytes | None = None
        self.jwt_since = 0.0
        self.validated = False

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        app = self.app
        self.transport = transport
        self.id = app.next_connection_id()
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is not None:
            if sslobj.selected_alpn_protocol() not in (None, "h2"):
                transport.close()
                self.closed = True
                return
            der = sslobj.getpeercert(binary_form=True)
            if der:
                self.cert = app.cert_info(der)
        conn = self.h2 = _H2Connection(app, config=app.h2_config)
        conn.encoder = _PlainEncoder()
        conn.decoder = _Decoder()  # type: ignore[assignment]
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._stream_limit(),
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65535,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 8000,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        transport.write(conn.data_to_send())
        app.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.h2 is not None and self in self.app.conns:
            self.app.conns.discard(self)
            self.app.closed_max_streams[str(self.id)] = self.max_open
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(conn.data_to_send())
            self.close()
            return
        self.in_batch = True
        try:
            for ev in events:
                t = type(ev)
                if t is _DataReceived:
                    req = self.requests.get(ev.stream_id)
                    if req is not None:
                        if req[3] or req[2] <= _MAX_KEPT_BODY:  # oversize payloads are only counted
                            req[1].append(ev.data)
                        req[2] += len(ev.data)
                    if ev.flow_controlled_length:
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif t is _RequestReceived:
                    self._on_request(ev.stream_id, ev.headers)
                elif t is _StreamEnded:
                    self._on_end(ev.stream_id)
                elif t is _StreamReset:
                    self._on_reset(ev.stream_id)
                elif t is _WindowUpdated:
                    if self.outq:
                        self._pump()
                elif t is _ConnectionTerminated:
                    self.close()
                if self.closed:
                    return
        except Exception:  # noqa: BLE001 - a bug in the mock: report it, drop only this connection
            traceback.print_exc(file=sys.stderr)
            self.abort()
            return
        finally:
            self.in_batch = False
        self.flush()
        if self.close_pending:
            self.close()

    # -- helpers

    def _stream_limit(self) -> int:
        f = self.app.f
        if f.one_stream_until_valid_token and self.cert is None and not self.validated:
            return 1
        return f.max_concurrent_streams

    def update_stream_limit(self) -> None:
        if self.closed or self.h2 is None:
            return
        limit = self._stream_limit()
        if self.h2.local_settings.max_concurrent_streams != limit:
            self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
            if not self.in_batch:
                self.flush()

    def flush(self) -> None:
        if self.closed or self.h2 is None:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.transport.close()
        self.connection_lost(None)

    def abort(self) -> None:
        """Drop the TCP connection with a RST (SO_LINGER 0), answering nothing more."""
        if self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        with contextlib.suppress(OSError, AttributeError, TypeError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed = True
        self.transport.abort()
        self.connection_lost(None)

    def send_goaway(self, last_stream_id: int, reason: str) -> None:
        """GOAWAY with JSON debug data, written by hand: h2 would refuse to answer after it."""
        assert self.h2 is not None
        self.goaway_last = last_stream_id
        self.h2.refuse_above = last_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = last_stream_id
        frame.error_code = 0
        frame.additional_data = _json_encode({"reason": reason})
        self.transport.write(self.h2.data_to_send() + frame.serialize())
        self.app.n_goaways += 1
        if not self.h2.unanswered:
            self._close_soon()

    def shutdown(self) -> None:
        if self.closed or self.h2 is None:
            return
        if self.goaway_last is None:
            self.send_goaway(self.h2.highest_inbound_stream_id, "Shutdown")
        elif not self.h2.unanswered:
            self._close_soon()

    def _close_soon(self) -> None:
        if self.in_batch:
            self.close_pending = True
        else:
            self.close()

    def _forget(self, sid: int) -> None:
        conn = self.h2
        assert conn is not None
        conn.unanswered.discard(sid)
        stream = conn.streams.get(sid)
        if stream is not None and stream.closed:
            del conn.streams[sid]
            conn._closed_streams[sid] = stream.closed_by
        if self.goaway_last is not None and not conn.unanswered:
            self._close_soon()

    # -- streams

    def _on_request(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        conn = self.h2
        assert conn is not None
        if self.goaway_last is not None and sid > self.goaway_last:
            # Arrived in the same read as the GOAWAY's stream: refuse it like the later ones.
            conn.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            self.app.n_refused += 1
            self._forget(sid)
            return
        admin = False
        for name, value in headers:
            if name == b":path":
                admin = value.startswith(b"/_mock/")
                break
        self.requests[sid] = [headers, [], 0, admin]
        self.max_open = max(self.max_open, len(conn.unanswered))
        if admin:
            return
        self.nstreams += 1
        f = self.app.f
        if f.reset_after_streams is not None and self.nstreams > f.reset_after_streams:
            self.app.n_resets += 1
            self.flush()
            self.abort()
            return
        if f.goaway_after_streams is not None and self.goaway_last is None and self.nstreams >= f.goaway_after_streams:
            self.send_goaway(sid, f.goaway_reason)

    def _on_reset(self, sid: int) -> None:
        self.requests.pop(sid, None)
        self.outq.pop(sid, None)
        self._forget(sid)

    def _on_end(self, sid: int) -> None:
        req = self.requests.pop(sid, None)
        if req is None:
            return
        headers, chunks, size, admin = req
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if admin:
            task = asyncio.get_running_loop().create_task(self._admin(sid, headers, body))
            self.app.tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.app.tasks.discard)
            return
        app = self.app
        app.n_requests += 1
        resp = self._check(sid, headers, body, size)
        f = app.f
        if f.stall:
            app.stalled.append((self, sid, resp))
        elif f.latency_ms:
            asyncio.get_running_loop().call_later(f.latency_ms / 1000.0, self._send_late, sid, resp)
        else:
            self.send_response(sid, resp)

    def _send_late(self, sid: int, resp: tuple[Any, ...]) -> None:
        if not self.closed:
            self.send_response(sid, resp)
            self.flush()
            if self.close_pending:
                self.close()

    def send_response(self, sid: int, resp: tuple[Any, ...]) -> None:
        conn = self.h2
        if self.closed or conn is None or sid not in conn.unanswered:
            return
        status, reason, apns_id, timestamp, record = resp
        app = self.app
        try:
            if status == 200:
                headers = [(b":status", b"200"), (b"apns-id", apns_id)]
                if app.sandbox:
                    headers.append((b"apns-unique-id", _new_id()))
                conn.send_headers(sid, headers, end_stream=True)
                app.n_accepted += 1
                if record is not None and app.f.record_accepted:
                    app.accepted.append(record)
                self._forget(sid)
                return
            if timestamp is None:
                body = b'{"reason":"%s"}' % reason
            else:
                body = b'{"reason":"%s","timestamp":%d}' % (reason, timestamp)
            conn.send_headers(
                sid, [(b":status", _STATUS[status]), (b"content-type", b"application/json"), (b"apns-id", apns_id)]
            )
        except h2.exceptions.StreamClosedError:
            self._forget(sid)
            return
        name = reason.decode()
        app.rejected[name] = app.rejected.get(name, 0) + 1
        self.outq[sid] = (body, 0)
        self._pump()

    def _send_json(self, sid: int, status: int, doc: Any) -> None:
        conn = self.h2
        if self.closed or conn is None or sid not in conn.unanswered:
            return
        body = _json_encode(doc)
        try:
            conn.send_headers(
                sid,
                [(b":status", str(status).encode()), (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            )
        except h2.exceptions.StreamClosedError:
            self._forget(sid)
            return
        self.outq[sid] = (body, 0)
        self._pump()
        self.flush()

    def _pump(self) -> None:
        """Send queued bodies as far as flow control allows; finish the streams that are done."""
        conn = self.h2
        assert conn is not None
        for sid in list(self.outq):
            data, offset = self.outq[sid]
            try:
                while True:
                    n = min(len(data) - offset, conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if n <= 0 and offset < len(data):
                        break
                    conn.send_data(sid, data[offset : offset + n], end_stream=offset + n == len(data))
                    offset += n
                    if offset == len(data):
                        break
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
                offset = len(data)
            if offset < len(data):
                self.outq[sid] = (data, offset)
            else:
                del self.outq[sid]
                self._forget(sid)

    async def _admin(self, sid: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        h = dict(headers)
        try:
            status, doc = await self.app.admin(h.get(b":method", b""), h.get(b":path", b""), body)
        except Exception as exc:  # noqa: BLE001 - report it to the admin client
            status, doc = 500, {"error": f"{type(exc).__name__}: {exc}"}
        self._send_json(sid, status, doc)
        if self.close_pending:
            self.close()

    # -- the APNs checks

    def _check(self, sid: int, headers: list[tuple[bytes, bytes]], body: bytes, size: int) -> tuple[Any, ...]:
        app = self.app
        f = app.f
        h: dict[bytes, bytes] = {}
        duplicate = False
        for name, value in headers:
            if name in h:
                duplicate = True
            h[name] = value
        apns_id = h.get(b"apns-id")
        if apns_id is None:
            apns_id = _new_id()
        elif _UUID_RE.fullmatch(apns_id) is None:
            echo = apns_id if _ECHOABLE_RE.fullmatch(apns_id) else _new_id()
            return (400, b"DuplicateHeaders" if duplicate else b"BadMessageId", echo, None, None)
        if duplicate:
            return (400, b"DuplicateHeaders", apns_id, None, None)
        if h.get(b":method") != b"POST":
            return (405, b"MethodNotAllowed", apns_id, None, None)
        cert = self.cert
        topic = h.get(b"apns-topic")
        if topic is None:
            if cert is None or len(cert.topics) != 1:
                return (400, b"MissingTopic", apns_id, None, None)
            topic = cert.topics[0]
        collapse = h.get(b"apns-collapse-id")
        if collapse is not None and len(collapse) > 64:
            return (400, b"BadCollapseId", apns_id, None, None)
        expiration = h.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            return (400, b"BadExpirationDate", apns_id, None, None)
        priority = h.get(b"apns-priority")
        if priority is not None and priority not in _PRIORITIES:
            return (400, b"BadPriority", apns_id, None, None)
        push_type = h.get(b"apns-push-type")
        if push_type is not None:
            if push_type not in PUSH_TYPE_SUFFIX:
                return (400, b"InvalidPushType", apns_id, None, None)
            if push_type == b"background" and priority == b"10":
                return (400, b"BadPriority", apns_id, None, None)
        path = h.get(b":path", b"")
        if not path.startswith(b"/3/device") or (len(path) > 9 and path[9:10] != b"/"):
            return (404, b"BadPath", apns_id, None, None)
        token = path[10:]
        if not token:
            return (400, b"MissingDeviceToken", apns_id, None, None)
        if (_TOKEN_RE if f.strict_token_length else _ANY_TOKEN_RE).fullmatch(token) is None:
            return (400, b"BadDeviceToken", apns_id, None, None)
        token = token.lower()
        info = app.tokens.get(token)
        if info is None:
            if not f.accept_any_token:
                return (400, b"BadDeviceToken", apns_id, None, None)
        else:
            if info.environment is not None and info.environment != app.environment:
                return (400, b"BadDeviceToken", apns_id, None, None)
            gone = info.unregistered_at_ms
            if gone is not None and gone <= time.time() * 1000:
                return (410, b"Unregistered", apns_id, gone, None)
            if topic not in info.topics:
                return (400, b"DeviceTokenNotForTopic", apns_id, None, None)
        if push_type is not None:
            suffix = PUSH_TYPE_SUFFIX[push_type]
            if suffix is not None and not topic.endswith(suffix):
                return (400, b"DeviceTokenNotForTopic", apns_id, None, None)
        if cert is not None:
            if app.environment not in cert.environments:
                return (403, b"BadCertificateEnvironment", apns_id, None, None)
            if topic not in cert.topics:
                return (400, b"TopicDisallowed", apns_id, None, None)
            auth = "certificate"
        else:
            authorization = h.get(b"authorization")
            if authorization is None or authorization[:6].lower() != b"bearer":
                return (403, b"MissingProviderToken", apns_id, None, None)
            jwt = authorization[6:].strip()
            if not jwt:
                return (403, b"MissingProviderToken", apns_id, None, None)
            entry = app.jwt_cache.get(jwt)
            if entry is None:
                entry = app.verify_jwt(jwt)
            if entry[0] is not None:
                return (403, entry[0], apns_id, None, None)
            key = entry[1]
            assert key is not None
            if key.environment is not None and key.environment != app.environment:
                return (403, f.bad_environment_key_reason.encode(), apns_id, None, None)
            if self.team is None:
                self.team = key.team_id
            elif key.team_id != self.team:
                return (403, b"InvalidProviderToken", apns_id, None, None)
            now = time.time()
            if now - entry[2] > f.token_max_age_s:
                return (403, b"ExpiredProviderToken", apns_id, None, None)
            if jwt != self.jwt_current:
                if self.jwt_current is not None and now - self.jwt_since < f.token_update_interval_s:
                    return (429, b"TooManyProviderTokenUpdates", apns_id, None, None)
                self.jwt_current = jwt
                self.jwt_since = now
            if key.topics is not None and not key.covers(topic):
                return (403, b"InvalidProviderToken", apns_id, None, None)
            if not self.validated:
                self.validated = True
                if f.one_stream_until_valid_token:
                    self.update_stream_limit()
            auth = "token:" + key.key_id
        if size == 0:
            return (400, b"PayloadEmpty", apns_id, None, None)
        voip = push_type == b"voip" or (push_type is None and topic.endswith(b".voip"))
        if size > (_VOIP_PAYLOAD_LIMIT if voip else _PAYLOAD_LIMIT):
            return (413, b"PayloadTooLarge", apns_id, None, None)
        try:
            doc = _json_decode(body)
        except msgspec.DecodeError:
            doc = None
        if type(doc) is not dict:
            return (400, b"BadPayload", apns_id, None, None)
        if f.ratio_429 or f.ratio_503:
            draw = app.rng.random()
            if draw < f.ratio_429:
                return (429, b"TooManyRequests", apns_id, None, None)
            if draw < f.ratio_429 + f.ratio_503:
                return (503, b"ServiceUnavailable", apns_id, None, None)
        record = None
        if f.record_accepted:
            record = (token, topic, push_type, priority, expiration, collapse, apns_id, body, self.id, sid, auth, time.time_ns())
        return (200, None, apns_id, None, record)


# --------------------------------------------------------------------------------------------
# Certificates


def issue_client_certificate(
    folder: str | os.PathLike[str],
    topic: str,
    *,
    environment: str,
    voip: bool = False,
    expired: bool = False,
) -> tuple[bytes, bytes]:
    """An "Apple Push Services"-like TLS client certificate signed by the mock CA in ``folder``.

    Args:
        folder: the mock's state directory (its CA is created there if missing).
        topic: the app's bundle ID; subject UID and CN ``Apple Push Services: <topic>``.
        environment: ``sandbox``, ``production`` or ``both`` (Apple's environment extensions
            1.2.840.113635.100.6.3.1 / .2); the mock answers BadCertificateEnvironment otherwise.
        voip: issue a "VoIP Services" certificate whose only topic is ``<topic>.voip`` (so
            requests may omit apns-topic). Otherwise the topic extension
            1.2.840.113635.100.6.3.6 lists ``topic``, ``topic.voip`` and ``topic.complication``.
        expired: make it expired a day ago (the TLS handshake then fails, as with APNs).

    Returns:
        (certificate PEM, private key PEM).
    """
    if environment not in ("sandbox", "production", "both"):
        raise ValueError("environment must be sandbox, production or both")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        ca_key, ca_cert = _load_or_create_ca(folder)
    if voip:
        topics = [(f"{topic}.voip", "voip")]
        common_name = f"VoIP Services: {topic}"
    else:
        topics = [(topic, "app"), (f"{topic}.voip", "voip"), (f"{topic}.complication", "complication")]
        common_name = f"Apple Push Services: {topic}"
    topic_der = _der(
        0x30, b"".join(_der(0x0C, t.encode()) + _der(0x30, _der(0x0C, kind.encode())) for t, kind in topics)
    )
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
        (x509.UnrecognizedExtension(TOPIC_OID, topic_der), False),
    ]
    if environment in ("sandbox", "both"):
        extensions.append((x509.UnrecognizedExtension(SANDBOX_OID, b"\x05\x00"), False))
    if environment in ("production", "both"):
        extensions.append((x509.UnrecognizedExtension(PRODUCTION_OID, b"\x05\x00"), False))
    now = dt.datetime.now(dt.UTC)
    if expired:
        not_before, not_after = now - dt.timedelta(days=366), now - dt.timedelta(days=1)
    else:
        not_before, not_after = now - dt.timedelta(days=1), now + dt.timedelta(days=365)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.USER_ID, topic),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "MOCKTEAM01"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pigeon mock"),
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        ]
    )
    return _issue(ca_key, ca_cert, subject, extensions=extensions, not_before=not_before, not_after=not_after)


def _server_ssl_context(folder: Path, client_certs: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    ctx.set_alpn_protocols(["h2"])
    if client_certs != "none":
        ctx.load_verify_locations(folder / "ca.pem")
        ctx.verify_mode = ssl.CERT_REQUIRED if client_certs == "required" else ssl.CERT_OPTIONAL
    return ctx


# --------------------------------------------------------------------------------------------
# Provider keys for tests


@dataclass(frozen=True)
class SigningKey:
    """A provider signing key (the ``.p8`` of Apple's token auth) for tests.

    ``SigningKey.generate()`` makes one; ``spec()`` is its entry for the mock's keys;
    ``token()`` mints a provider token (JWT) signed with it.
    """

    key_id: str
    team_id: str
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, key_id: str = "MOCKKEY001", team_id: str = "MOCKTEAM01") -> SigningKey:
        return cls(key_id, team_id, ec.generate_private_key(ec.SECP256R1()))

    @property
    def private_key_pem(self) -> str:
        return _key_pem(self.private_key).decode()

    @property
    def public_key_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def spec(self, topics: Iterable[str] | None = None, environment: str | None = None) -> dict[str, Any]:
        """This key as an entry of the mock's ``keys`` (``topics=None``: team-scoped)."""
        return {
            "key_id": self.key_id,
            "team_id": self.team_id,
            "public_key_pem": self.public_key_pem,
            "topics": None if topics is None else list(topics),
            "environment": environment,
        }

    def token(
        self,
        *,
        iat: float | None = None,
        der: bool = False,
        header: dict[str, Any] | None = None,
        claims: dict[str, Any] | None = None,
    ) -> str:
        """A provider token: ES256, ``kid`` = key_id, ``iss`` = team_id, ``iat`` = now.

        ``der=True`` encodes the signature as ASN.1 DER (like Pushy) instead of raw R||S;
        ``header``/``claims`` override or add fields.
        """
        head = {"alg": "ES256", "kid": self.key_id, **(header or {})}
        body = {"iss": self.team_id, "iat": int(time.time() if iat is None else iat), **(claims or {})}
        signing_input = f"{_b64url(_json_encode(head))}.{_b64url(_json_encode(body))}"
        signature = self.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        if not der:
            r, s = decode_dss_signature(signature)
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signing_input}.{_b64url(signature)}"


# --------------------------------------------------------------------------------------------
# Entry points


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    _tune_hpack()
    folder = Path(args.dir)
    worker = args.worker_index
    if worker is None:
        ensure_certificates(folder, args.hostname, common_name="mock-apns")
    app = _App(args.environment, worker=worker or 0, workers=args.worker_count if worker is not None else 1)
    if args.config:
        try:
            app.load(_json_decode(Path(args.config).read_bytes()))
        except (OSError, ValueError, TypeError, msgspec.DecodeError) as exc:
            print(f"mock-apns: bad --config {args.config}: {exc}", file=sys.stderr, flush=True)
            return 2
    loop.set_exception_handler(app.exception_handler)
    ctx = _server_ssl_context(folder, args.client_certs)
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        host, port = _split_listen(args.listen)
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=1024)
    host, port = sock.getsockname()[:2]
    server = await loop.create_server(lambda: _Connection(app), sock=sock, ssl=ctx, ssl_handshake_timeout=10)
    stop = asyncio.Event()
    if args.ipc_fd is not None:
        app.ipc = _IpcClient(app, socket.socket(fileno=args.ipc_fd), stop.set)
        await app.ipc.start()
        app.ipc.send({"op": "ready"})
        _install_stop(loop, stop, watch_stdin=False)
    else:
        _install_stop(loop, stop, watch_stdin=args.exit_on_stdin_eof)
        print(
            f"mock-apns: environment {args.environment}, state in {folder}, client certificates {args.client_certs}",
            file=sys.stderr,
            flush=True,
        )
        _print_ready(READY_PREFIX, host, port)
    await stop.wait()
    server.close()
    await app.shutdown(grace=2.0)
    return 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pigeon mock-apns", description="A mock APNs HTTP/2 provider API (see the module docstring).")
    parser.add_argument("--dir", help="state directory (CA, server certificate); default: a new temporary directory")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--environment", choices=("sandbox", "production"), default="sandbox")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--config", help="JSON file with the initial state (keys, tokens, faults)")
    parser.add_argument("--hostname", action="append", default=[], help="extra name for the server certificate")
    parser.add_argument("--client-certs", choices=("none", "optional", "required"), default="none",
                        help="request TLS client certificates signed by the mock CA (certificate auth)")
    parser.add_argument("--exit-on-stdin-eof", action="store_true", help="stop when stdin closes (for parent processes)")
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ipc-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    return args



def main(argv: list[str] | None = None) -> int:
    """``pigeon mock-apns`` / ``python -m plugins.apns.mock``: run the mock until SIGTERM/SIGINT."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.dir is None:
        args.dir = tempfile.mkdtemp(prefix="mock-apns-")
        argv += ["--dir", args.dir]
    if args.worker_index is None and args.workers > 1:
        return _run(_supervise(args, argv, name="mock-apns", script=__file__, ready_prefix=READY_PREFIX))
    return _run(_serve(args))




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


class MockApnsProcess(MockProcess):
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

    @property
    def admin(self) -> MockAdmin:
        """A blocking admin client (created on first use, closed by stop())."""
        return super().admin

    def async_admin(self) -> AsyncMockAdmin:
        """A new async admin client; close it (``async with``) before the loop ends."""
        return super().async_admin()


if __name__ == "__main__":
    sys.exit(main())
