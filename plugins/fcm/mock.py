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
``exceeded_max_concurrent_streams``).

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
  connections_open, protocols (``h2``/``http/1.1``: connections, requests). ``DELETE`` zeroes it.

With ``--workers`` admin changes reach every worker, and accepted and stats merge all of them.
Admin requests are not counted. Not modelled: IAM and API-disabled errors, per-device and
per-topic rates, THIRD_PARTY_AUTH_ERROR, project numbers in the path, topic management.

For tests: `MockFcmProcess` runs the mock as a child process and gives its address, token URI,
CA file and admin clients (`MockAdmin`, `AsyncMockAdmin`); `ServiceAccount` makes service
accounts (the JSON key file for the SDKs, the entry for the mock, signed assertions).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import http
import os
import random
import re
import secrets
import socket
import ssl
import sys
import tempfile
import time
import traceback
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import h11
import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from h2.connection import ConnectionInputs
from hyperframe.frame import GoAwayFrame

from plugins._mock_tls import (
    AsyncMockAdminBase,
    MockAdminBase,
    MockAdminError,
    MockProcess,
    _install_stop,
    _IpcClient,
    _key_pem,
    _locked,
    _Decoder,
    _PlainEncoder,
    _print_ready,
    _quiet_exception_handler,
    _run,
    _split_listen,
    _supervise,
    _tune_hpack,
    _write_atomic,
    ensure_certificates,
)

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
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"

DEFAULT_FAULTS: dict[str, Any] = {
    "accept_any_token": False,
    "quota_per_minute": None,
    "retry_after_s": 60,
    "ratio_503": 0.0,
    "retry_after_s_503": None,
    "ratio_500": 0.0,
    "ratio_502_html": 0.0,
    "seed": 0,
    "latency_ms": 0,
    "token_lifetime_s": 3599,
    "revoke_tokens_before": None,
    "record_accepted": True,
    "max_concurrent_streams": 100,
}

_MAX_KEPT_BODY = 256 * 1024
_CONNECTION_WINDOW = 16 * 1024 * 1024
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_SEND_PATH = re.compile(rb"/v1/projects/([^/?#]+)/messages:send")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*")
_TOPIC_RE = re.compile(r"[a-zA-Z0-9\-_.~%]+")
_CONDITION_TOPIC_RE = re.compile(r"'([^']*)'\s+in\s+topics")
_LABEL_RE = re.compile(r"[a-zA-Z0-9\-_.~%]{1,50}")
_COLOR_RE = re.compile(r"#[0-9a-fA-F]{6}")
_DURATION_RE = re.compile(r"(-?)(\d{1,12})(?:\.(\d{1,9}))?s")
_TIMESTAMP_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
_TARGETS = ("token", "topic", "condition", "fid")
_MAX_TTL_S = 2_419_200

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


def _pretty(doc: Any) -> bytes:
    """JSON as Google's APIs write it: two-space indents and a final newline."""
    return msgspec.json.format(_json_encode(doc), indent=2) + b"\n"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64url_decode(data: str | bytes) -> bytes:
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


# --------------------------------------------------------------------------------------------
# The Message schema (providers.md 2.3): proto field names; lowerCamelCase is accepted too


class _Type:
    """A scalar, enum, map or list field type; ``name`` is what Google's errors call it."""

    __slots__ = ("kind", "name", "values", "item")

    def __init__(self, kind: str, name: str, values: tuple[str, ...] = (), item: _Type | None = None) -> None:
        self.kind = kind
        self.name = name
        self.values = values
        self.item = item


class _Schema:
    """A protobuf message: its fields by proto name, and every accepted spelling."""

    __slots__ = ("name", "fields", "names")

    def __init__(self, name: str, fields: dict[str, _Type | _Schema]) -> None:
        self.name = f"type.googleapis.com/{name}"
        self.fields = fields
        self.names: dict[str, str] = {}
        for field in fields:
            head, *rest = field.split("_")
            self.names[field] = field
            self.names[head + "".join(part[:1].upper() + part[1:] for part in rest)] = field


def _enum(name: str, *values: str) -> _Type:
    return _Type("enum", f"type.googleapis.com/google.firebase.fcm.v1.{name}", values)


_STRING = _Type("string", "TYPE_STRING")
_BOOL = _Type("bool", "TYPE_BOOL")
_INT32 = _Type("int32", "TYPE_INT32")
_FLOAT = _Type("float", "TYPE_FLOAT")
_DURATION = _Type("duration", "type.googleapis.com/google.protobuf.Duration")
_TIMESTAMP = _Type("timestamp", "type.googleapis.com/google.protobuf.Timestamp")
_STRUCT = _Type("struct", "type.googleapis.com/google.protobuf.Struct")
_STRING_MAP = _Type("map", "TYPE_STRING", item=_STRING)
_STRING_LIST = _Type("list", "TYPE_STRING", item=_STRING)
_DURATION_LIST = _Type("list", _DURATION.name, item=_DURATION)

_FCM = "google.firebase.fcm.v1."
_COLOR = _Schema("google.type.Color", {"red": _FLOAT, "green": _FLOAT, "blue": _FLOAT, "alpha": _FLOAT})
_LIGHT_SETTINGS = _Schema(
    _FCM + "LightSettings", {"color": _COLOR, "light_on_duration": _DURATION, "light_off_duration": _DURATION}
)
_ANDROID_NOTIFICATION = _Schema(
    _FCM + "AndroidNotification",
    {
        "title": _STRING,
        "body": _STRING,
        "icon": _STRING,
        "color": _STRING,
        "sound": _STRING,
        "tag": _STRING,
        "click_action": _STRING,
        "body_loc_key": _STRING,
        "body_loc_args": _STRING_LIST,
        "title_loc_key": _STRING,
        "title_loc_args": _STRING_LIST,
        "channel_id": _STRING,
        "ticker": _STRING,
        "sticky": _BOOL,
        "event_time": _TIMESTAMP,
        "local_only": _BOOL,
        "notification_priority": _enum(
            "AndroidNotification.NotificationPriority",
            "PRIORITY_UNSPECIFIED", "PRIORITY_MIN", "PRIORITY_LOW", "PRIORITY_DEFAULT", "PRIORITY_HIGH", "PRIORITY_MAX",
        ),
        "default_sound": _BOOL,
        "default_vibrate_timings": _BOOL,
        "default_light_settings": _BOOL,
        "vibrate_timings": _DURATION_LIST,
        "visibility": _enum("AndroidNotification.Visibility", "VISIBILITY_UNSPECIFIED", "PRIVATE", "PUBLIC", "SECRET"),
        "notification_count": _INT32,
        "light_settings": _LIGHT_SETTINGS,
        "image": _STRING,
        "bypass_proxy_notification": _BOOL,
        "proxy": _enum("AndroidNotification.Proxy", "PROXY_UNSPECIFIED", "ALLOW", "DENY", "IF_PRIORITY_LOWERED"),
    },
)
_ANDROID = _Schema(
    _FCM + "AndroidConfig",
    {
        "collapse_key": _STRING,
        "priority": _enum("AndroidMessagePriority", "NORMAL", "HIGH"),
        "ttl": _DURATION,
        "restricted_package_name": _STRING,
        "data": _STRING_MAP,
        "notification": _ANDROID_NOTIFICATION,
        "fcm_options": _Schema(_FCM + "AndroidFcmOptions", {"analytics_label": _STRING}),
        "direct_boot_ok": _BOOL,
        "bandwidth_constrained_ok": _BOOL,
        "restricted_satellite_ok": _BOOL,
    },
)
_APNS = _Schema(
    _FCM + "ApnsConfig",
    {
        "headers": _STRING_MAP,
        "payload": _STRUCT,
        "fcm_options": _Schema(_FCM + "ApnsFcmOptions", {"analytics_label": _STRING, "image": _STRING}),
        "live_activity_token": _STRING,
    },
)
_WEBPUSH = _Schema(
    _FCM + "WebpushConfig",
    {
        "headers": _STRING_MAP,
        "data": _STRING_MAP,
        "notification": _STRUCT,
        "fcm_options": _Schema(_FCM + "WebpushFcmOptions", {"link": _STRING, "analytics_label": _STRING}),
    },
)
_MESSAGE = _Schema(
    _FCM + "Message",
    {
        "name": _STRING,
        "data": _STRING_MAP,
        "notification": _Schema(_FCM + "Notification", {"title": _STRING, "body": _STRING, "image": _STRING}),
        "android": _ANDROID,
        "webpush": _WEBPUSH,
        "apns": _APNS,
        "fcm_options": _Schema(_FCM + "FcmOptions", {"analytics_label": _STRING}),
        "token": _STRING,
        "topic": _STRING,
        "condition": _STRING,
        "fid": _STRING,
    },
)
_REQUEST = _Schema(_FCM + "SendMessageRequest", {"validate_only": _BOOL, "message": _MESSAGE})

_BAD = object()
Violation = tuple[str | None, str]  # (field path or None, description)


def _show(value: Any) -> str:
    text = _json_encode(value).decode()
    return text if len(text) <= 100 else text[:97] + "..."


def _at(path: str) -> str:
    return f" at '{path}'" if path else ""


def _parse_object(doc: dict[str, Any], schema: _Schema, path: str, errors: list[Violation]) -> dict[str, Any]:
    """``doc`` checked against ``schema``, with proto field names; problems go to ``errors``."""
    out: dict[str, Any] = {}
    names = schema.names
    fields = schema.fields
    for key, value in doc.items():
        name = names.get(key)
        if name is None:
            errors.append((path or None, f'Invalid JSON payload received. Unknown name "{key}"{_at(path)}: Cannot find field.'))
            continue
        if value is None:
            continue
        parsed = _parse_value(value, fields[name], path, name, key, errors)
        if parsed is not _BAD:
            out[name] = parsed
    if schema is _MESSAGE:
        given = [name for name in _TARGETS if name in out]
        if len(given) > 1:
            errors.append(
                (path, f"Invalid JSON payload received. Oneof field 'target' is already set. Cannot set '{given[1]}'")
            )
    return out


def _parse_value(value: Any, spec: _Type | _Schema, parent: str, name: str, key: str, errors: list[Violation]) -> Any:
    path = f"{parent}.{name}" if parent else name
    t = type(value)
    if type(spec) is _Schema:
        if t is dict:
            return _parse_object(value, spec, path, errors)
    else:
        kind = spec.kind
        if kind == "string":
            if t is str:
                return value
        elif kind == "map":
            if t is dict:
                for index, item in enumerate(value.values()):
                    if type(item) is not str:
                        where = f"{path}[{index}].value"
                        errors.append((where, f"Invalid value at '{where}' (TYPE_STRING), {_show(item)}"))
                return value
        elif kind == "list":
            if t is list:
                assert spec.item is not None
                items = []
                for index, item in enumerate(value):
                    parsed = _parse_scalar(item, spec.item)
                    if parsed is _BAD:
                        where = f"{path}[{index}]"
                        errors.append((where, f"Invalid value at '{where}' ({spec.item.name}), {_show(item)}"))
                    items.append(parsed)
                return items
        elif kind == "struct":
            if t is dict:
                return value
        else:
            parsed = _parse_scalar(value, spec)
            if parsed is not _BAD:
                return parsed
    if t is list:
        errors.append(
            (
                parent or None,
                f'Invalid JSON payload received. Unknown name "{key}"{_at(parent)}: Proto field is not repeating, cannot start list.',
            )
        )
    else:
        errors.append((path, f"Invalid value at '{path}' ({spec.name}), {_show(value)}"))
    return _BAD


def _parse_scalar(value: Any, spec: _Type) -> Any:
    t = type(value)
    kind = spec.kind
    if kind == "string":
        return value if t is str else _BAD
    if kind == "bool":
        return value if t is bool else _BAD
    if kind == "int32":
        if t is str and re.fullmatch(r"-?\d{1,10}", value):
            value, t = int(value), int
        elif t is float and value.is_integer():
            value, t = int(value), int
        return value if t is int and -(2**31) <= value < 2**31 else _BAD
    if kind == "float":
        if t is int or t is float:
            return value
        if t is str:
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if kind == "enum":
        if t is str:
            upper = value.upper()
            return upper if upper in spec.values else _BAD
        if t is int and 0 <= value < len(spec.values):
            return spec.values[value]
        return _BAD
    if kind == "duration":
        return value if t is str and _DURATION_RE.fullmatch(value) else _BAD
    if kind == "timestamp":
        match = _TIMESTAMP_RE.fullmatch(value) if t is str else None
        if match is None:
            return _BAD
        try:
            dt.datetime.fromisoformat(match.group(1))
        except ValueError:
            return _BAD
        return value
    return _BAD  # pragma: no cover - every kind is handled above


def _duration_s(text: str) -> float:
    match = _DURATION_RE.fullmatch(text)
    assert match is not None
    sign, whole, frac = match.groups()
    seconds = int(whole) + (int(frac.ljust(9, "0")) / 1e9 if frac else 0.0)
    return -seconds if sign else seconds


def _reserved(key: str) -> bool:
    low = key.lower()
    return low in ("from", "message_type") or low.startswith(("google", "gcm"))


def _check_label(options: Any, path: str) -> Violation | None:
    label = options.get("analytics_label") if options else None
    if label is not None and not _LABEL_RE.fullmatch(label):
        return (f"{path}.analytics_label", f"Invalid analytics_label: {label!r}")
    return None


def _message_error(msg: dict[str, Any]) -> Violation | None:
    """The first thing FCM would refuse in a well-formed Message (step 4), or None."""
    if not any(msg.get(name) for name in _TARGETS):
        return ("message", "Recipient of the message is not set.")
    topic = msg.get("topic")
    if topic and not _TOPIC_RE.fullmatch(topic):
        return ("message.topic", f"Invalid topic name: {topic!r}")
    condition = msg.get("condition")
    if condition:
        topics = _CONDITION_TOPIC_RE.findall(condition)
        if not 1 <= len(topics) <= 5 or not all(_TOPIC_RE.fullmatch(t) for t in topics):
            return ("message.condition", f"Invalid condition (1 to 5 'topic' in topics terms): {condition!r}")
    for key in msg.get("data") or ():
        if _reserved(key):
            return ("message.data", f"Invalid data payload key: {key}")
    error = _check_label(msg.get("fcm_options"), "message.fcm_options")
    if error:
        return error
    android = msg.get("android")
    if android:
        ttl = android.get("ttl")
        if ttl is not None and not 0 <= _duration_s(ttl) <= _MAX_TTL_S:
            return ("message.android.ttl", f"TTL must be between 0s and {_MAX_TTL_S}s, not {ttl}")
        for key in android.get("data") or ():
            if _reserved(key):
                return ("message.android.data", f"Invalid data payload key: {key}")
        error = _check_label(android.get("fcm_options"), "message.android.fcm_options")
        if error:
            return error
        notification = android.get("notification")
        if notification:
            color = notification.get("color")
            if color is not None and not _COLOR_RE.fullmatch(color):
                return ("message.android.notification.color", f"Invalid color {color!r}: expected #rrggbb")
            light = (notification.get("light_settings") or {}).get("color") or {}
            for part, amount in light.items():
                if not 0.0 <= amount <= 1.0:
                    where = f"message.android.notification.light_settings.color.{part}"
                    return (where, f"Color components must be between 0 and 1, not {amount}")
    apns = msg.get("apns")
    if apns:
        error = _check_label(apns.get("fcm_options"), "message.apns.fcm_options")
        if error:
            return error
    webpush = msg.get("webpush")
    if webpush:
        options = webpush.get("fcm_options") or {}
        link = options.get("link")
        if link is not None and not link.startswith("https://"):
            return ("message.webpush.fcm_options.link", f"The link must be an HTTPS URL: {link!r}")
        error = _check_label(options, "message.webpush.fcm_options")
        if error:
            return error
    return None


# --------------------------------------------------------------------------------------------
# Replies

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
_QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
_JSON = (b"content-type", b"application/json; charset=UTF-8")
_OAUTH_JSON = [
    (b"content-type", b"application/json; charset=utf-8"),
    (b"cache-control", b"no-cache, no-store, max-age=0, must-revalidate"),
    (b"pragma", b"no-cache"),
]
_SEE = "See https://developers.google.com/identity/sign-in/web/devconsole-project."
_MISSING_CREDENTIALS = (
    "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie "
    f"or other valid authentication credential. {_SEE}"
)
_INVALID_CREDENTIALS = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
    f"or other valid authentication credential. {_SEE}"
)
_SHORT_LIVED = (
    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. "
    "Check your iat and exp values in the JWT claim."
)
_HTML_502 = (
    b"<!DOCTYPE html>\n<html lang=en>\n  <meta charset=utf-8>\n"
    b"  <title>Error 502 (Server Error)!!1</title>\n"
    b"  <p><b>502.</b> <ins>That\xe2\x80\x99s an error.</ins>\n"
    b"  <p>The server encountered a temporary error and could not complete your request.<p>"
    b"Please try again in 30 seconds.  <ins>That\xe2\x80\x99s all we know.</ins>\n"
)
_STATUS_BYTES = {code: str(code).encode() for code in (200, 400, 401, 403, 404, 405, 429, 500, 502, 503)}
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}


class _Reply:
    """One HTTP answer; ``key`` is what stats count it under, ``late`` applies ``latency_ms``."""

    __slots__ = ("status", "headers", "body", "key", "late")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, key: str = "", late: bool = False) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.key = key
        self.late = late


def _google_error(
    code: int,
    status: str,
    message: str,
    *,
    fcm: str | None = None,
    violations: list[Violation] | None = None,
    extra: list[dict[str, Any]] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> _Reply:
    details: list[dict[str, Any]] = []
    if fcm is not None:
        details.append({"@type": _FCM_ERROR, "errorCode": fcm})
    if violations:
        field_violations = [
            {"field": field, "description": text} if field else {"description": text} for field, text in violations
        ]
        details.append({"@type": _BAD_REQUEST, "fieldViolations": field_violations})
    details.extend(extra or ())
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return _Reply(code, [_JSON, *(headers or ())], _pretty({"error": error}), fcm or status, late=True)


def _oauth_error(code: int, error: str, description: str) -> _Reply:
    return _Reply(code, _OAUTH_JSON, _pretty({"error": error, "error_description": description}), error)


_REPLY_MISSING = _google_error(
    401,
    "UNAUTHENTICATED",
    _MISSING_CREDENTIALS,
    headers=[(b"www-authenticate", b'Bearer realm="https://accounts.google.com/"')],
)
_REPLY_INVALID = _google_error(
    401,
    "UNAUTHENTICATED",
    _INVALID_CREDENTIALS,
    headers=[(b"www-authenticate", b'Bearer realm="https://accounts.google.com/", error="invalid_token"')],
)
_REPLY_UNREGISTERED = _google_error(404, "NOT_FOUND", "Requested entity was not found.", fcm="UNREGISTERED")
_REPLY_MISMATCH = _google_error(403, "PERMISSION_DENIED", "SenderId mismatch", fcm="SENDER_ID_MISMATCH")
_REPLY_TOO_BIG = _google_error(400, "INVALID_ARGUMENT", "Request contains an invalid argument.")
_REPLY_500 = _google_error(500, "INTERNAL", "Internal error encountered.", fcm="INTERNAL")
_REPLY_502 = _Reply(502, [(b"content-type", b"text/html; charset=UTF-8")], _HTML_502, "BAD_GATEWAY", late=True)
_REPLY_NOT_FOUND = _google_error(404, "NOT_FOUND", "Method not found.")
_INVALID_TOKEN_TEXT = "The registration token is not a valid FCM registration token"


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


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


_FAULT_CHECKS: dict[str, Any] = {
    "accept_any_token": lambda v: isinstance(v, bool),
    "quota_per_minute": lambda v: v is None or (type(v) is int and v >= 0),
    "retry_after_s": lambda v: v is None or (type(v) is int and v >= 0),
    "ratio_503": lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    "retry_after_s_503": lambda v: v is None or (type(v) is int and v >= 0),
    "ratio_500": lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    "ratio_502_html": lambda v: _is_number(v) and 0.0 <= v <= 1.0,
    "seed": lambda v: type(v) is int,
    "latency_ms": lambda v: _is_number(v) and v >= 0,
    "token_lifetime_s": lambda v: type(v) is int and v >= 1,
    "revoke_tokens_before": lambda v: v is None or _is_number(v),
    "record_accepted": lambda v: isinstance(v, bool),
    "max_concurrent_streams": lambda v: type(v) is int and v >= 1,
}


def _check_faults(update: Any, current: _Faults) -> None:
    """Validate a faults update; raise ValueError/TypeError naming the first bad entry."""
    if not isinstance(update, dict):
        raise TypeError("faults must be a JSON object")
    for name, value in update.items():
        check = _FAULT_CHECKS.get(name)
        if check is None:
            raise ValueError(f"unknown fault {name!r}")
        if not check(value):
            raise ValueError(f"bad value for fault {name!r}: {value!r}")
    ratios = sum(update.get(name, getattr(current, name)) for name in ("ratio_503", "ratio_500", "ratio_502_html"))
    if ratios > 1.0:
        raise ValueError("ratio_503 + ratio_500 + ratio_502_html must not exceed 1")


@dataclass(frozen=True, slots=True)
class _Account:
    client_email: str
    private_key_id: str
    public_key: rsa.RSAPublicKey

    def to_json(self) -> dict[str, Any]:
        pem = self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return {"client_email": self.client_email, "private_key_id": self.private_key_id, "public_key_pem": pem.decode()}


def _parse_account(spec: Any) -> _Account:
    if not isinstance(spec, dict):
        raise TypeError("a service account must be a JSON object")
    email, kid, pem = spec.get("client_email"), spec.get("private_key_id"), spec.get("public_key_pem")
    if not (isinstance(email, str) and _NAME_RE.fullmatch(email) and isinstance(kid, str) and kid and isinstance(pem, str)):
        raise ValueError("a service account needs client_email, private_key_id and public_key_pem strings")
    unknown = set(spec) - {"client_email", "private_key_id", "public_key_pem"}
    if unknown:
        raise ValueError(f"service account {email}: unknown fields {sorted(unknown)}")
    try:
        public: Any = serialization.load_pem_public_key(pem.encode())
    except ValueError:
        try:
            public = serialization.load_pem_private_key(pem.encode(), None).public_key()
        except (ValueError, TypeError) as exc:
            raise ValueError(f"service account {email}: public_key_pem is not a PEM key") from exc
    if not isinstance(public, rsa.RSAPublicKey):
        raise TypeError(f"service account {email}: not an RSA key (RS256 needs one)")
    return _Account(email, kid, public)


def _parse_token_specs(doc: Any) -> dict[str, bool | None]:
    """``{token: {"unregistered": bool} | null}`` -> ``{token: unregistered | None (remove)}``."""
    if not isinstance(doc, dict):
        raise TypeError("tokens must be a JSON object {token: {'unregistered': bool} | null}")
    out: dict[str, bool | None] = {}
    for token, spec in doc.items():
        if not token or not token.isprintable() or " " in token:
            raise ValueError(f"token {token!r} is empty or has spaces or control characters")
        if spec is None:
            out[token] = None
            continue
        if not isinstance(spec, dict) or set(spec) - {"unregistered"}:
            raise ValueError(f"token {token}: spec must be {{'unregistered': bool}} or null")
        unregistered = spec.get("unregistered", False)
        if not isinstance(unregistered, bool):
            raise ValueError(f"token {token}: unregistered must be a boolean")
        out[token] = unregistered
    return out


def _parse_projects(doc: Any) -> dict[str, tuple[list[_Account] | None, dict[str, bool | None]]]:
    """``{project: {"service_accounts"?, "tokens"?}}`` -> ``{project: (accounts or None, tokens)}``."""
    if not isinstance(doc, dict):
        raise TypeError("projects must be a JSON object {project_id: {service_accounts, tokens}}")
    out = {}
    for project, spec in doc.items():
        if not _NAME_RE.fullmatch(project):
            raise ValueError(f"bad project id {project!r}")
        if spec is None:
            spec = {}
        if not isinstance(spec, dict):
            raise TypeError(f"project {project}: must be a JSON object")
        unknown = set(spec) - {"service_accounts", "tokens"}
        if unknown:
            raise ValueError(f"project {project}: unknown fields {sorted(unknown)}")
        accounts = spec.get("service_accounts")
        if accounts is not None:
            if not isinstance(accounts, list):
                raise TypeError(f"project {project}: service_accounts must be a list")
            accounts = [_parse_account(a) for a in accounts]
        out[project] = (accounts, _parse_token_specs(spec.get("tokens") or {}))
    return out


class _Project:
    __slots__ = ("id", "accounts", "tokens", "name_prefix", "name_suffix", "quota")

    def __init__(self, project_id: str) -> None:
        self.id = project_id
        self.accounts: list[_Account] = []
        self.tokens: dict[str, bool] = {}  # token -> unregistered
        digest = hashlib.sha256(project_id.encode()).hexdigest()[:8]
        self.name_prefix = f"projects/{project_id}/messages/".encode()
        self.name_suffix = f"%{digest}{digest}".encode()
        self.quota = [0.0, 0]  # window start, messages counted

    def to_json(self) -> dict[str, Any]:
        return {
            "service_accounts": [a.to_json() for a in self.accounts],
            "tokens": {token: {"unregistered": gone} for token, gone in self.tokens.items()},
        }


def _token_secret(folder: Path) -> bytes:
    """The key of the access tokens' HMAC: ``folder/token-secret``, created once."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "token-secret"
    with _locked(folder):
        if not path.exists():
            _write_atomic(path, secrets.token_hex(32).encode() + b"\n", 0o600)
        return bytes.fromhex(path.read_text().strip())


class _App:
    """Everything one process serves: state, counters, connections, faults."""

    def __init__(self, secret: bytes, audiences: Iterable[str], *, worker: int = 0, workers: int = 1) -> None:
        self.secret = secret
        self.audiences = frozenset([GOOGLE_TOKEN_URI, *audiences])
        self.worker = worker
        self.workers = workers
        self.projects: dict[str, _Project] = {}
        self.accounts: dict[str, tuple[str, dict[str, _Account]]] = {}  # email -> (project, kid -> account)
        self.f = _Faults()
        self.rng = random.Random(worker)
        self.token_cache: dict[bytes, tuple[str, str, int, int] | None] = {}
        self.accepted: list[tuple[Any, ...]] = []
        self.conns: set[_Connection] = set()
        self.ipc: _IpcClient | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.id_base = f"0:{time.time_ns() // 1000}{worker:02d}"
        self.seq = 0
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
        self.n_successes = 0
        self.n_validate_only = 0
        self.errors: dict[str, int] = {}
        self.n_grants = 0
        self.token_errors: dict[str, int] = {}
        self.n_conns_opened = 0
        self.protocols = {"h2": {"connections": 0, "requests": 0}, "http/1.1": {"connections": 0, "requests": 0}}

    def stats_local(self) -> dict[str, Any]:
        return {
            "requests": self.n_requests,
            "successes": self.n_successes,
            "validate_only": self.n_validate_only,
            "errors": dict(self.errors),
            "token_grants": self.n_grants,
            "token_errors": dict(self.token_errors),
            "connections_opened": self.n_conns_opened,
            "connections_open": len(self.conns),
            "protocols": {name: dict(counts) for name, counts in self.protocols.items()},
        }

    def next_connection_id(self) -> int:
        self._conn_seq += 1
        self.n_conns_opened += 1
        return (self._conn_seq - 1) * self.workers + self.worker + 1

    # -- state

    def load(self, doc: Any) -> None:
        """Apply a config document (the --config file)."""
        if not isinstance(doc, dict):
            raise TypeError("the config must be a JSON object")
        unknown = set(doc) - {"projects", "faults"}
        if unknown:
            raise ValueError(f"unknown config entries {sorted(unknown)}")
        for cmd in ({"op": "projects", "body": doc.get("projects") or {}}, {"op": "faults", "body": doc.get("faults") or {}}):
            self.check(cmd)
            self.apply(cmd)

    def _account_index(self, update: dict[str, Any]) -> dict[str, tuple[str, dict[str, _Account]]]:
        """The client_email index after ``update`` (parsed projects); a client_email may
        belong to one project only."""
        lists = {pid: p.accounts for pid, p in self.projects.items()}
        for pid, (accounts, _) in update.items():
            if accounts is not None:
                lists[pid] = accounts
        index: dict[str, tuple[str, dict[str, _Account]]] = {}
        for pid, accounts in lists.items():
            for account in accounts:
                owner, keys = index.setdefault(account.client_email, (pid, {}))
                if owner != pid:
                    raise ValueError(f"service account {account.client_email} already belongs to project {owner}")
                keys[account.private_key_id] = account
        return index

    def _tokens_update(self, body: Any) -> tuple[str, dict[str, bool | None]]:
        if not isinstance(body, dict) or set(body) != {"project", "tokens"}:
            raise ValueError('tokens updates look like {"project": P, "tokens": {token: {"unregistered": bool} | null}}')
        project = body["project"]
        if not isinstance(project, str) or not _NAME_RE.fullmatch(project):
            raise ValueError(f"bad project id {project!r}")
        return project, _parse_token_specs(body["tokens"])

    def check(self, cmd: dict[str, Any]) -> None:
        """Validate a change before it is applied anywhere (raises ValueError or TypeError)."""
        op, body = cmd["op"], cmd.get("body")
        if op == "projects":
            self._account_index(_parse_projects(body))
        elif op == "tokens":
            self._tokens_update(body)
        elif op == "tokens_clear":
            if body is not None and not (isinstance(body, dict) and set(body) == {"project"} and isinstance(body["project"], str)):
                raise ValueError('clearing tokens takes no body or {"project": P}')
        elif op == "faults":
            _check_faults(body, self.f)

    def _project(self, project_id: str) -> _Project:
        project = self.projects.get(project_id)
        if project is None:
            project = self.projects[project_id] = _Project(project_id)
        return project

    def apply(self, cmd: dict[str, Any]) -> None:
        op, body = cmd["op"], cmd.get("body")
        if op == "projects":
            update = _parse_projects(body)
            self.accounts = self._account_index(update)
            for pid, (accounts, tokens) in update.items():
                project = self._project(pid)
                if accounts is not None:
                    project.accounts = accounts
                self._merge_tokens(project, tokens)
        elif op == "tokens":
            pid, tokens = self._tokens_update(body)
            self._merge_tokens(self._project(pid), tokens)
        elif op == "tokens_clear":
            for project in self.projects.values():
                if body is None or project.id == body["project"]:
                    project.tokens.clear()
        elif op in ("faults", "faults_reset"):
            update = dict(DEFAULT_FAULTS) if op == "faults_reset" else body
            old_limit = self.f.max_concurrent_streams
            for name, value in update.items():
                setattr(self.f, name, value)
            if "seed" in update or op == "faults_reset":
                self.rng = random.Random(self.f.seed + self.worker)
            if "quota_per_minute" in update:
                for project in self.projects.values():
                    project.quota = [0.0, 0]
            if self.f.max_concurrent_streams != old_limit:
                for conn in list(self.conns):
                    conn.update_stream_limit()
        elif op == "accepted_clear":
            self.accepted.clear()
        elif op == "stats_clear":
            self.clear_stats()
        else:
            raise ValueError(f"unknown operation {op!r}")

    @staticmethod
    def _merge_tokens(project: _Project, tokens: dict[str, bool | None]) -> None:
        for token, gone in tokens.items():
            if gone is None:
                project.tokens.pop(token, None)
            else:
                project.tokens[token] = gone

    def state_json(self) -> dict[str, Any]:
        return {
            "workers": self.workers,
            "projects": {pid: project.to_json() for pid, project in self.projects.items()},
            "faults": self.f.to_json(),
        }

    def accepted_local(self) -> list[dict[str, Any]]:
        out = []
        for project, kind, message, name, email, protocol, conn, t_ns in self.accepted:
            item: dict[str, Any] = {"project": project}
            for target in _TARGETS:
                item[target] = message[target] if target == kind else None
            item.update(
                message=message,
                name=name,
                client_email=email,
                protocol=protocol,
                connection=conn,
                worker=self.worker,
                received_at_ns=t_ns,
            )
            out.append(item)
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

    async def admin(self, method: bytes, path: bytes, body: bytes) -> tuple[int, Any]:
        route = path.split(b"?", 1)[0].rstrip(b"/")
        try:
            doc = _json_decode(body) if body.strip() else None
            if route == b"/_mock/state" and method == b"GET":
                return 200, self.state_json()
            if route == b"/_mock/projects" and method == b"PUT":
                await self.change({"op": "projects", "body": doc})
                return 200, self.state_json()
            if route == b"/_mock/tokens" and method in (b"PUT", b"DELETE"):
                await self.change({"op": "tokens" if method == b"PUT" else "tokens_clear", "body": doc})
                return 200, self.state_json()
            if route == b"/_mock/faults" and method in (b"PUT", b"DELETE"):
                await self.change({"op": "faults", "body": doc} if method == b"PUT" else {"op": "faults_reset"})
                return 200, self.state_json()
            if route == b"/_mock/accepted" and method == b"GET":
                merged = [item for part in await self.collect("accepted") for item in part]
                merged.sort(key=lambda item: item["received_at_ns"])
                return 200, merged
            if route == b"/_mock/accepted" and method == b"DELETE":
                count = sum(len(p) for p in await self.collect("accepted")) if self.workers > 1 else len(self.accepted)
                await self.change({"op": "accepted_clear"})
                return 200, {"cleared": count}
            if route == b"/_mock/stats" and method == b"GET":
                merged = _merge_counts(await self.collect("stats"))
                merged["workers"] = self.workers
                return 200, merged
            if route == b"/_mock/stats" and method == b"DELETE":
                await self.change({"op": "stats_clear"})
                return 200, {"cleared": True}
        except (ValueError, TypeError, msgspec.DecodeError) as exc:
            return 400, {"error": str(exc)}
        known = {b"/_mock/state", b"/_mock/projects", b"/_mock/tokens", b"/_mock/faults", b"/_mock/accepted", b"/_mock/stats"}
        if route in known:
            return 405, {"error": f"method {method.decode()} not allowed on {route.decode()}"}
        return 404, {"error": f"no admin endpoint {route.decode(errors='replace')}"}

    async def shutdown(self, grace: float) -> None:
        """GOAWAY on HTTP/2 connections, answer what is in flight, then close."""
        for conn in list(self.conns):
            conn.shutdown()
        deadline = time.monotonic() + grace
        while self.conns and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.conns):
            conn.close()

    # -- requests

    def handle(self, protocol: str, conn_id: int, method: bytes, path: bytes, auth: bytes | None, body: bytes, size: int) -> _Reply:
        self.protocols[protocol]["requests"] += 1
        route = path.split(b"?", 1)[0]
        if route == b"/token":
            reply = self.token_endpoint(method, body) if method == b"POST" else _oauth_error(405, "invalid_request", "POST only")
            if reply.status == 200:
                self.n_grants += 1
            else:
                self.token_errors[reply.key] = self.token_errors.get(reply.key, 0) + 1
            return reply
        self.n_requests += 1
        match = _SEND_PATH.fullmatch(route)
        if match is None or method != b"POST":
            reply = _REPLY_NOT_FOUND
        else:
            reply = self.send(protocol, conn_id, match.group(1).decode(errors="replace"), auth, body, size)
        if reply.status == 200:
            self.n_successes += 1
        else:
            self.errors[reply.key] = self.errors.get(reply.key, 0) + 1
        return reply

    # -- the token endpoint

    def token_endpoint(self, method: bytes, body: bytes) -> _Reply:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        grant_type = form.get("grant_type", [""])[-1]
        if grant_type != JWT_BEARER:
            return _oauth_error(400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}")
        assertion = form.get("assertion", [""])[-1]
        if not assertion:
            return _oauth_error(400, "invalid_request", "Missing required parameter: assertion")
        bad_signature = _oauth_error(400, "invalid_grant", "Invalid JWT Signature.")
        try:
            h64, c64, s64 = assertion.split(".")
            header = _json_decode(_b64url_decode(h64))
            claims = _json_decode(_b64url_decode(c64))
            signature = _b64url_decode(s64)
        except (ValueError, binascii.Error, msgspec.DecodeError):
            return bad_signature
        if type(header) is not dict or type(claims) is not dict or header.get("alg") != "RS256":
            return bad_signature
        owner = self.accounts.get(claims.get("iss")) if isinstance(claims.get("iss"), str) else None
        account = owner[1].get(header.get("kid")) if owner is not None and isinstance(header.get("kid"), str) else None
        if owner is None or account is None:
            return _oauth_error(401, "invalid_client", "The OAuth client was not found.")
        try:
            account.public_key.verify(signature, f"{h64}.{c64}".encode(), padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return bad_signature
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not (_is_number(iat) and _is_number(exp)) or iat > now + 60 or exp <= now or exp - iat > 3600 or exp <= iat:
            return _oauth_error(400, "invalid_grant", _SHORT_LIVED)
        if claims.get("aud") not in self.audiences:
            return _oauth_error(
                400, "invalid_grant", f"Invalid JWT: Failed audience check. The right audience is {GOOGLE_TOKEN_URI}"
            )
        scope = claims.get("scope")
        if not isinstance(scope, str) or not scope.split():
            return _oauth_error(400, "invalid_scope", "Empty or missing scope not allowed.")
        if not {FCM_SCOPE, CLOUD_PLATFORM_SCOPE} & set(scope.split()):
            return _oauth_error(400, "invalid_scope", "Invalid OAuth scope or ID token audience provided.")
        lifetime = self.f.token_lifetime_s
        issued_ms = int(now * 1000)
        token = self.mint(owner[0], account.client_email, issued_ms, issued_ms + lifetime * 1000)
        return _Reply(200, _OAUTH_JSON, _pretty({"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}))

    def mint(self, project: str, client_email: str, issued_ms: int, expires_ms: int) -> str:
        payload = f"{project}\n{client_email}\n{issued_ms}\n{expires_ms}".encode()
        mac = hmac.new(self.secret, payload, hashlib.sha256).digest()[:18]
        return f"ya29.m.{_b64url(payload)}.{_b64url(mac)}"

    def verify_access_token(self, token: bytes) -> tuple[str, str, int, int] | None:
        """(project, client_email, issued_ms, expires_ms) of one of this mock's tokens, or None."""
        if len(self.token_cache) > 10000:
            self.token_cache.clear()
        entry = None
        try:
            prefix, p64, m64 = token.rsplit(b".", 2)
            payload = _b64url_decode(p64)
            if prefix == b"ya29.m" and hmac.compare_digest(
                _b64url_decode(m64), hmac.new(self.secret, payload, hashlib.sha256).digest()[:18]
            ):
                project, email, issued, expires = payload.decode().split("\n")
                entry = (project, email, int(issued), int(expires))
        except (ValueError, binascii.Error):
            entry = None
        self.token_cache[token] = entry
        return entry

    # -- send

    def send(self, protocol: str, conn_id: int, project_id: str, auth: bytes | None, body: bytes, size: int) -> _Reply:
        f = self.f
        if auth is None or auth[:7].lower() != b"bearer " or not auth[7:].strip():
            return _REPLY_MISSING
        token = auth[7:].strip()
        info = self.token_cache.get(token, False)
        if info is False:
            info = self.verify_access_token(token)
        if info is None:
            return _REPLY_INVALID
        owner, email, issued_ms, expires_ms = info
        now = time.time()
        if expires_ms <= now * 1000:
            return _REPLY_INVALID
        if f.revoke_tokens_before is not None and issued_ms < f.revoke_tokens_before * 1000:
            return _REPLY_INVALID
        if owner != project_id:
            return _google_error(
                403,
                "PERMISSION_DENIED",
                f"Permission 'cloudmessaging.messages.create' denied on resource "
                f"'//cloudresourcemanager.googleapis.com/projects/{project_id}' (or it may not exist).",
            )
        project = self.projects.get(project_id)
        if project is None:  # a token from an earlier run on the same STATE, for a project not loaded now
            project = _Project(project_id)
        if f.quota_per_minute is not None:
            window = project.quota
            if now - window[0] >= 60.0:
                window[0], window[1] = now, 0
            if window[1] >= f.quota_per_minute / self.workers:
                return self._quota_exceeded(project_id)
            window[1] += 1
        if size > _MAX_KEPT_BODY:
            return _REPLY_TOO_BIG
        try:
            doc = _json_decode(body) if body.strip() else {}
        except msgspec.DecodeError:
            text = "Invalid JSON payload received. Unexpected token."
            return _google_error(400, "INVALID_ARGUMENT", text, violations=[(None, text)])
        if type(doc) is not dict:
            text = "Invalid JSON payload received. Expected a JSON object."
            return _google_error(400, "INVALID_ARGUMENT", text, violations=[(None, text)])
        errors: list[Violation] = []
        request = _parse_object(doc, _REQUEST, "", errors)
        if errors:
            return _google_error(400, "INVALID_ARGUMENT", "\n".join(text for _, text in errors), violations=errors)
        message = request.get("message", {})
        problem = _message_error(message)
        if problem is not None:
            return _google_error(400, "INVALID_ARGUMENT", problem[1], fcm="INVALID_ARGUMENT", violations=[problem])
        kind = next(name for name in _TARGETS if message.get(name))
        target = message[kind]
        sized = {k: v for k, v in message.items() if k != kind}
        if len(_json_encode(sized)) > (2048 if kind in ("topic", "condition") else 4096):
            return _REPLY_TOO_BIG
        if kind in ("token", "fid"):
            gone = project.tokens.get(target)
            if gone:
                return _REPLY_UNREGISTERED
            if gone is None:
                if any(target in p.tokens for p in self.projects.values() if p is not project):
                    return _REPLY_MISMATCH
                if not f.accept_any_token:
                    field = f"message.{kind}"
                    return _google_error(
                        400,
                        "INVALID_ARGUMENT",
                        _INVALID_TOKEN_TEXT,
                        fcm="INVALID_ARGUMENT",
                        violations=[(field, "Invalid registration token")],
                    )
        if f.ratio_503 or f.ratio_500 or f.ratio_502_html:
            draw = self.rng.random()
            if draw < f.ratio_503:
                retry = f.retry_after_s_503
                return _google_error(
                    503,
                    "UNAVAILABLE",
                    "The service is currently unavailable.",
                    fcm="UNAVAILABLE",
                    headers=None if retry is None else [(b"retry-after", str(retry).encode())],
                )
            if draw < f.ratio_503 + f.ratio_500:
                return _REPLY_500
            if draw < f.ratio_503 + f.ratio_500 + f.ratio_502_html:
                return _REPLY_502
        if request.get("validate_only"):
            self.n_validate_only += 1
            name = project.name_prefix + b"fake_message_id"
        else:
            self.seq += 1
            name = project.name_prefix + b"%s%08d%s" % (self.id_base.encode(), self.seq, project.name_suffix)
            if f.record_accepted:
                self.accepted.append((project_id, kind, message, name.decode(), email, protocol, conn_id, time.time_ns()))
        return _Reply(200, [_JSON], b'{\n  "name": "%s"\n}\n' % name, late=True)

    def _quota_exceeded(self, project_id: str) -> _Reply:
        retry = self.f.retry_after_s
        consumer = f"project:{project_id}"
        return _google_error(
            429,
            "RESOURCE_EXHAUSTED",
            f"Quota exceeded for quota metric 'Send requests' and limit 'Send requests per minute' "
            f"of service 'fcm.googleapis.com' for consumer '{consumer}'.",
            fcm="QUOTA_EXCEEDED",
            extra=[
                {
                    "@type": _QUOTA_FAILURE,
                    "violations": [{"subject": consumer, "description": "Send requests per minute"}],
                }
            ],
            headers=None if retry is None else [(b"retry-after", str(retry).encode())],
        )


def _merge_counts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum counters, nested dicts included."""
    out: dict[str, Any] = {}
    for part in parts:
        for name, value in part.items():
            if isinstance(value, dict):
                out[name] = _merge_counts([out.get(name, {}), value])
            else:
                out[name] = out.get(name, 0) + value
    return out


# --------------------------------------------------------------------------------------------
# Connections: HTTP/2 (h2) or HTTP/1.1 (h11)


class _H2Connection(h2.connection.H2Connection):
    """h2's server connection, counting open streams itself (h2 walks every stream) and
    naming the reason in the GOAWAY it sends when a client opens too many."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unanswered: set[int] = set()
        self.goaway_debug = b""

    @property
    def open_inbound_streams(self) -> int:  # type: ignore[override]
        return len(self.unanswered)

    def _receive_headers_frame(self, frame: Any) -> Any:
        sid = frame.stream_id
        is_new = sid not in self.streams
        try:
            result = super()._receive_headers_frame(frame)
        except h2.exceptions.TooManyStreamsError:
            self.goaway_debug = b"exceeded_max_concurrent_streams"
            raise
        if is_new:
            self.unanswered.add(sid)
        return result

    def _terminate_connection(self, error_code: Any) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.highest_inbound_stream_id
        frame.error_code = error_code
        frame.additional_data = self.goaway_debug
        self.state_machine.process_input(ConnectionInputs.SEND_GOAWAY)
        self._prepare_for_sending([frame])


_RequestReceived = h2.events.RequestReceived
_DataReceived = h2.events.DataReceived
_StreamEnded = h2.events.StreamEnded
_StreamReset = h2.events.StreamReset
_WindowUpdated = h2.events.WindowUpdated
_ConnectionTerminated = h2.events.ConnectionTerminated


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/2 or HTTP/1.1, chosen by ALPN or by the first bytes."""

    def __init__(self, app: _App) -> None:
        self.app = app
        self.transport: Any = None
        self.id = 0
        self.protocol = ""
        self.h2: _H2Connection | None = None
        self.h11: h11.Connection | None = None
        self.pending = b""
        self.requests: dict[int, list[Any]] = {}  # h2: sid -> [method, path, auth, chunks, size]
        self.outq: dict[int, tuple[bytes, int]] = {}  # h2: sid -> (body, bytes sent) held by flow control
        self.h1_request: list[Any] | None = None
        self.h1_busy = False
        self.closed = False
        self.closing = False
        self.in_batch = False

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.id = self.app.next_connection_id()
        self.app.conns.add(self)
        sslobj = transport.get_extra_info("ssl_object")
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if alpn == "h2":
            self._start_h2()
        elif alpn == "http/1.1":
            self._start_h1()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.conns.discard(self)

    def eof_received(self) -> bool | None:
        if self.h11 is not None and not self.closed:
            self.h11.receive_data(b"")
            self._h1_next()
        return None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.protocol:
            data = self.pending + data
            if len(data) < len(_PREFACE) and _PREFACE.startswith(data):
                self.pending = data
                return
            self.pending = b""
            if data.startswith(_PREFACE):
                self._start_h2()
            else:
                self._start_h1()
        self.in_batch = True
        try:
            if self.h2 is not None:
                self._h2_received(data)
            else:
                self._h1_received(data)
        except Exception:  # noqa: BLE001 - a bug in the mock: report it, drop only this connection
            traceback.print_exc(file=sys.stderr)
            self.close()
        finally:
            self.in_batch = False
        if not self.closed and self.h2 is not None:
            self.flush()
            if self.closing and not self.h2.unanswered:
                self.close()

    # -- both protocols

    def _dispatch(self, ref: int | None, method: bytes, path: bytes, auth: bytes | None, body: bytes, size: int) -> None:
        if path.startswith(b"/_mock/"):
            task = asyncio.get_running_loop().create_task(self._admin(ref, method, path, body))
            self.app.tasks.add(task)  # the loop keeps only weak references to tasks
            task.add_done_callback(self.app.tasks.discard)
            return
        app = self.app
        reply = app.handle(self.protocol, self.id, method, path, auth, body, size)
        if reply.late and app.f.latency_ms:
            asyncio.get_running_loop().call_later(app.f.latency_ms / 1000.0, self._send_late, ref, reply)
        else:
            self._send(ref, reply)

    def _send(self, ref: int | None, reply: _Reply) -> None:
        if ref is None:
            self._h1_send(reply)
        else:
            self._h2_send(ref, reply)

    def _send_late(self, ref: int | None, reply: _Reply) -> None:
        if self.closed:
            return
        self._send(ref, reply)
        if self.h2 is not None:
            self.flush()
            if self.closing and not self.h2.unanswered:
                self.close()

    async def _admin(self, ref: int | None, method: bytes, path: bytes, body: bytes) -> None:
        try:
            status, doc = await self.app.admin(method, path, body)
        except Exception as exc:  # noqa: BLE001 - report it to the admin client
            status, doc = 500, {"error": f"{type(exc).__name__}: {exc}"}
        self._send_late(ref, _Reply(status, [(b"content-type", b"application/json")], _json_encode(doc)))

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.transport.close()
        self.app.conns.discard(self)

    def shutdown(self) -> None:
        """Stop taking requests: GOAWAY on HTTP/2; close HTTP/1.1 after the current answer."""
        if self.closed or self.closing:
            return
        self.closing = True
        if self.h2 is not None:
            frame = GoAwayFrame(0)
            frame.last_stream_id = self.h2.highest_inbound_stream_id
            frame.error_code = 0
            self.transport.write(self.h2.data_to_send() + frame.serialize())
            if not self.h2.unanswered:
                self.close()
        elif not self.h1_busy:
            self.close()

    def flush(self) -> None:
        if self.closed or self.h2 is None:
            return
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def update_stream_limit(self) -> None:
        conn = self.h2
        if self.closed or conn is None:
            return
        limit = self.app.f.max_concurrent_streams
        if conn.local_settings.max_concurrent_streams != limit:
            conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limit})
            if not self.in_batch:
                self.flush()

    # -- HTTP/2

    def _start_h2(self) -> None:
        app = self.app
        self.protocol = "h2"
        app.protocols["h2"]["connections"] += 1
        conn = self.h2 = _H2Connection(config=app.h2_config)
        conn.encoder = _PlainEncoder()
        conn.decoder = _Decoder()  # type: ignore[assignment]
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: app.f.max_concurrent_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1048576,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: 16384,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.transport.write(conn.data_to_send())

    def _h2_received(self, data: bytes) -> None:
        conn = self.h2
        assert conn is not None
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.transport.write(conn.data_to_send())
            self.close()
            return
        for ev in events:
            t = type(ev)
            if t is _DataReceived:
                req = self.requests.get(ev.stream_id)
                if req is not None:
                    if req[4] <= _MAX_KEPT_BODY:  # oversize bodies are only counted
                        req[3].append(ev.data)
                    req[4] += len(ev.data)
                if ev.flow_controlled_length:
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif t is _RequestReceived:
                method = path = auth = None
                for name, value in ev.headers:
                    if name == b":method":
                        method = value
                    elif name == b":path":
                        path = value
                    elif name == b"authorization":
                        auth = value
                self.requests[ev.stream_id] = [method or b"", path or b"", auth, [], 0]
            elif t is _StreamEnded:
                req = self.requests.pop(ev.stream_id, None)
                if req is not None:
                    chunks = req[3]
                    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    self._dispatch(ev.stream_id, req[0], req[1], req[2], body, req[4])
            elif t is _StreamReset:
                self.requests.pop(ev.stream_id, None)
                self.outq.pop(ev.stream_id, None)
                self._forget(ev.stream_id)
            elif t is _WindowUpdated:
                if self.outq:
                    self._pump()
            elif t is _ConnectionTerminated:
                self.close()
            if self.closed:
                return

    def _h2_send(self, sid: int, reply: _Reply) -> None:
        conn = self.h2
        if self.closed or conn is None or sid not in conn.unanswered:
            return
        body = reply.body
        headers = [(b":status", _STATUS_BYTES.get(reply.status) or str(reply.status).encode()), *reply.headers]
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            conn.send_headers(sid, headers, end_stream=not body)
        except h2.exceptions.StreamClosedError:
            self._forget(sid)
            return
        if body:
            self.outq[sid] = (body, 0)
            self._pump()
        else:
            self._forget(sid)

    def _pump(self) -> None:
        """Send queued bodies as far as flow control allows; finish the streams that are done."""
        conn = self.h2
        assert conn is not None
        for sid in list(self.outq):
            data, offset = self.outq[sid]
            try:
                while offset < len(data):
                    n = min(len(data) - offset, conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if n <= 0:
                        break
                    conn.send_data(sid, data[offset : offset + n], end_stream=offset + n == len(data))
                    offset += n
            except (h2.exceptions.StreamClosedError, h2.exceptions.FlowControlError):
                offset = len(data)
            if offset < len(data):
                self.outq[sid] = (data, offset)
            else:
                del self.outq[sid]
                self._forget(sid)

    def _forget(self, sid: int) -> None:
        conn = self.h2
        assert conn is not None
        conn.unanswered.discard(sid)
        stream = conn.streams.get(sid)
        if stream is not None and stream.closed:
            del conn.streams[sid]
            conn._closed_streams[sid] = stream.closed_by
        if self.closing and not conn.unanswered and not self.in_batch:
            self.close()

    # -- HTTP/1.1

    def _start_h1(self) -> None:
        self.protocol = "http/1.1"
        self.app.protocols["http/1.1"]["connections"] += 1
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=65536)

    def _h1_received(self, data: bytes) -> None:
        assert self.h11 is not None
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the client's EOF
            self.close()
            return
        self._h1_next()

    def _h1_next(self) -> None:
        conn = self.h11
        assert conn is not None
        while not self.h1_busy and not self.closed:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._h1_bad_request(exc)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            t = type(event)
            if t is h11.Request:
                auth = None
                for name, value in event.headers:
                    if name == b"authorization":
                        auth = value
                self.h1_request = [event.method, event.target, auth, [], 0]
            elif t is h11.Data:
                req = self.h1_request
                if req is not None:
                    if req[4] <= _MAX_KEPT_BODY:
                        req[3].append(event.data)
                    req[4] += len(event.data)
            elif t is h11.EndOfMessage:
                req, self.h1_request = self.h1_request, None
                if req is not None:
                    self.h1_busy = True
                    self._dispatch(None, req[0], req[1], req[2], b"".join(req[3]), req[4])
            elif t is h11.ConnectionClosed:
                self.close()
                return

    def _h1_send(self, reply: _Reply) -> None:
        conn = self.h11
        if self.closed or conn is None:
            return
        body = reply.body
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        if self.closing:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=_REASONS.get(reply.status, b"")))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        self.transport.write(out)
        self.h1_busy = False
        if self.closing or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            self.close()
            return
        conn.start_next_cycle()
        if not self.in_batch:
            self._h1_next()

    def _h1_bad_request(self, exc: h11.RemoteProtocolError) -> None:
        conn = self.h11
        assert conn is not None
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"bad request: {exc}\n".encode()
            headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
            self.transport.write(
                conn.send(h11.Response(status_code=exc.error_status_hint, headers=headers))
                + conn.send(h11.Data(data=body))
                + conn.send(h11.EndOfMessage())
            )
        self.close()


# --------------------------------------------------------------------------------------------
# Entry points


def _server_ssl_context(folder: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(folder / "server.pem", folder / "server.key")
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx


def _audiences(host: str, port: int, hostnames: Iterable[str]) -> list[str]:
    """This mock's own token URLs, accepted as ``aud`` besides Google's."""
    out = []
    for name in (host, "localhost", "127.0.0.1", "::1", *hostnames):
        shown = f"[{name}]" if ":" in name else name
        out.append(f"https://{shown}:{port}/token")
    return out


async def _serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    _tune_hpack()
    folder = Path(args.dir)
    worker = args.worker_index
    if worker is None:
        ensure_certificates(folder, args.hostname, common_name="mock-fcm")
    if args.listen_fd is not None:
        sock = socket.socket(fileno=args.listen_fd)
    else:
        host, port = _split_listen(args.listen)
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=1024)
    host, port = sock.getsockname()[:2]
    app = _App(
        _token_secret(folder),
        _audiences(_split_listen(args.listen)[0], port, args.hostname),
        worker=worker or 0,
        workers=args.worker_count if worker is not None else 1,
    )
    if args.config:
        try:
            app.load(_json_decode(Path(args.config).read_bytes()))
        except (OSError, ValueError, TypeError, msgspec.DecodeError) as exc:
            print(f"mock-fcm: bad --config {args.config}: {exc}", file=sys.stderr, flush=True)
            return 2
    loop.set_exception_handler(_quiet_exception_handler)
    server = await loop.create_server(lambda: _Connection(app), sock=sock, ssl=_server_ssl_context(folder), ssl_handshake_timeout=10)
    stop = asyncio.Event()
    if args.ipc_fd is not None:
        app.ipc = _IpcClient(app, socket.socket(fileno=args.ipc_fd), stop.set)
        await app.ipc.start()
        app.ipc.send({"op": "ready"})
        _install_stop(loop, stop, watch_stdin=False)
    else:
        _install_stop(loop, stop, watch_stdin=args.exit_on_stdin_eof)
        print(f"mock-fcm: state in {folder}", file=sys.stderr, flush=True)
        _print_ready(READY_PREFIX, host, port)
    await stop.wait()
    server.close()
    await app.shutdown(grace=2.0)
    return 0


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m plugins.fcm.mock", description="A mock FCM HTTP v1 API and OAuth2 token endpoint (see the module docstring)."
    )
    parser.add_argument("--dir", help="state directory (CA, server certificate, token secret); default: a new temporary directory")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    parser.add_argument("--config", help="JSON file with the initial state (projects, faults)")
    parser.add_argument("--hostname", action="append", default=[], help="extra name for the server certificate")
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
    """``python -m plugins.fcm.mock``: run the mock until SIGTERM/SIGINT (or stdin EOF)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    if args.dir is None:
        args.dir = tempfile.mkdtemp(prefix="mock-fcm-")
        argv += ["--dir", args.dir]
    if args.worker_index is None and args.workers > 1:
        return _run(_supervise(args, argv, name="mock-fcm", script=__file__, ready_prefix=READY_PREFIX))
    return _run(_serve(args))


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
        return _key_pem(self.private_key).decode()  # type: ignore[arg-type]

    @property
    def public_key_pem(self) -> str:
        return (
            self.private_key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

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
        signing_input = f"{_b64url(_json_encode(head))}.{_b64url(_json_encode(body))}"
        signature = self.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


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


class MockFcmProcess(MockProcess):
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

    @property
    def admin(self) -> MockAdmin:
        """A blocking admin client (created on first use, closed by stop())."""
        return super().admin

    def async_admin(self) -> AsyncMockAdmin:
        """A new async admin client; close it (``async with``) before the loop ends."""
        return super().async_admin()


if __name__ == "__main__":
    sys.exit(main())
