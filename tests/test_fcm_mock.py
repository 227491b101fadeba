"""Tests of the mock FCM itself (plugins/fcm/mock.py): the OAuth2 token endpoint, the v1 send
method over HTTP/2 and HTTP/1.1, the errors and their exact bodies, faults, the admin API,
workers.

The mock runs as a child process on 127.0.0.1, port 0 (`MockFcmProcess`), once for the module
and reset before each test. Clients are httpx (HTTP/2 and HTTP/1.1) and, where the bytes matter
(no ALPN, SETTINGS, GOAWAY, pipelining), a raw TLS socket. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hpack
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, RstStreamFrame, SettingsFrame

from plugins.fcm.mock import (
    CLOUD_PLATFORM_SCOPE,
    DEFAULT_FAULTS,
    JWT_BEARER,
    READY_PREFIX,
    MockAdminError,
    MockFcmProcess,
    ServiceAccount,
)

PROJECT = "proj-a"
OTHER_PROJECT = "proj-b"
TOKEN = "dQw4w9WgXcQ:APA91bGood-token_1"
GONE = "dQw4w9WgXcQ:APA91bGone-token_2"
OTHER_TOKEN = "dQw4w9WgXcQ:APA91bOther-project_3"
UNKNOWN = "dQw4w9WgXcQ:APA91bUnknown_4"
TIMEOUT = 10.0
NAME_RE = re.compile(r"projects/proj-a/messages/0:\d+%[0-9a-f]{16}")
MAX_CONCURRENT_STREAMS = 0x3
REFUSED_STREAM = 0x7


def project_tokens() -> dict[str, dict[str, Any]]:
    return {
        PROJECT: {TOKEN: {}, GONE: {"unregistered": True}},
        OTHER_PROJECT: {OTHER_TOKEN: {"unregistered": False}},
    }


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def sa() -> ServiceAccount:
    return ServiceAccount.generate(PROJECT)


@pytest.fixture(scope="module")
def other_sa() -> ServiceAccount:
    return ServiceAccount.generate(OTHER_PROJECT)


@pytest.fixture(scope="module")
def mock_process(tmp_path_factory: pytest.TempPathFactory, sa: ServiceAccount, other_sa: ServiceAccount) -> Iterator[MockFcmProcess]:
    tokens = project_tokens()
    config = {
        "projects": {
            PROJECT: {"service_accounts": [sa.spec()], "tokens": tokens[PROJECT]},
            OTHER_PROJECT: {"service_accounts": [other_sa.spec()], "tokens": tokens[OTHER_PROJECT]},
        }
    }
    with MockFcmProcess(tmp_path_factory.mktemp("fcm"), config=config) as mock:
        yield mock


@pytest.fixture
def mock(mock_process: MockFcmProcess, sa: ServiceAccount, other_sa: ServiceAccount) -> MockFcmProcess:
    """The shared mock, reset to its initial state."""
    admin = mock_process.admin
    admin.reset_faults()
    admin.clear_tokens()
    tokens = project_tokens()
    admin.set_project(PROJECT, [sa], tokens[PROJECT])
    admin.set_project(OTHER_PROJECT, [other_sa], tokens[OTHER_PROJECT])
    admin.clear_accepted()
    admin.clear_stats()
    return mock_process


@pytest.fixture
def h2c(mock: MockFcmProcess) -> Iterator[httpx.Client]:
    with httpx.Client(http2=True, verify=trust(mock.ca_file), timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def h1c(mock: MockFcmProcess) -> Iterator[httpx.Client]:
    with httpx.Client(verify=trust(mock.ca_file), timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
def access(mock: MockFcmProcess, sa: ServiceAccount) -> str:
    return access_token(mock, sa)


def trust(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


def grant(mock: MockFcmProcess, form: dict[str, str], client: httpx.Client | None = None) -> httpx.Response:
    if client is None:
        with httpx.Client(verify=trust(mock.ca_file), timeout=TIMEOUT) as c:
            return c.post(mock.token_uri, data=form)
    return client.post(mock.token_uri, data=form)


def access_token(mock: MockFcmProcess, account: ServiceAccount, **assertion: Any) -> str:
    resp = grant(mock, {"grant_type": JWT_BEARER, "assertion": account.assertion(**assertion)})
    assert resp.status_code == 200, resp.text
    return resp.json()["access_token"]


def send(
    client: httpx.Client,
    mock: MockFcmProcess,
    body: Any,
    access: str | None,
    *,
    project: str = PROJECT,
    raw: bytes | None = None,
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if access is not None:
        headers["authorization"] = f"Bearer {access}"
    content = raw if raw is not None else json.dumps(body).encode()
    return client.post(f"{mock.url}/v1/projects/{project}/messages:send", content=content, headers=headers)


def msg(**fields: Any) -> dict[str, Any]:
    return {"message": {"token": TOKEN, **fields}}


def error(resp: httpx.Response) -> dict[str, Any]:
    assert resp.headers["content-type"] == "application/json; charset=UTF-8"
    doc = resp.json()
    assert set(doc) == {"error"}
    assert doc["error"]["code"] == resp.status_code
    return doc["error"]


def fcm_code(err: dict[str, Any]) -> str | None:
    for detail in err.get("details", []):
        if detail["@type"] == "type.googleapis.com/google.firebase.fcm.v1.FcmError":
            return detail["errorCode"]
    return None


def violations(err: dict[str, Any]) -> list[dict[str, str]]:
    for detail in err.get("details", []):
        if detail["@type"] == "type.googleapis.com/google.rpc.BadRequest":
            return detail["fieldViolations"]
    return []


class RawConn:
    """A TLS socket to the mock that reads HTTP/2 frames or HTTP/1.1 bytes, with deadlines."""

    def __init__(self, mock: MockFcmProcess, alpn: list[str] | None) -> None:
        ctx = ssl.create_default_context(cafile=str(mock.ca_file))
        if alpn:
            ctx.set_alpn_protocols(alpn)
        raw = socket.create_connection(("127.0.0.1", mock.port), timeout=TIMEOUT)
        self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        self.buffer = b""

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def _recv(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def frames_until(self, done: Any, timeout: float = TIMEOUT) -> list[Frame]:
        deadline = time.monotonic() + timeout
        frames: list[Frame] = []
        while True:
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                frames.append(frame)
                if done(frame):
                    return frames
            assert time.monotonic() < deadline, f"no matching frame in time: {frames}"
            if not self._recv(deadline):
                return frames

    def read_until(self, marker: bytes, count: int = 1, timeout: float = TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while self.buffer.count(marker) < count:
            assert time.monotonic() < deadline, f"no {marker!r} in time: {self.buffer!r}"
            assert self._recv(deadline), f"closed early: {self.buffer!r}"
        return self.buffer


# --------------------------------------------------------------------------------------------
# The token endpoint


def test_token_grant(mock: MockFcmProcess, sa: ServiceAccount, h2c: httpx.Client) -> None:
    resp = grant(mock, {"grant_type": JWT_BEARER, "assertion": sa.assertion()}, h2c)
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert resp.headers["content-type"] == "application/json; charset=utf-8"
    doc = resp.json()
    assert set(doc) == {"access_token", "expires_in", "token_type"}
    assert doc["access_token"].startswith("ya29.") and doc["token_type"] == "Bearer" and doc["expires_in"] == 3599
    assert resp.text.startswith("{\n  ")  # pretty-printed, as Google's
    assert mock.admin.stats()["token_grants"] == 1


def test_token_lifetime_and_other_accepted_assertions(mock: MockFcmProcess, sa: ServiceAccount) -> None:
    mock.admin.set_faults(token_lifetime_s=120)
    for assertion in (
        sa.assertion(aud=mock.token_uri),  # the mock's own token URL
        sa.assertion(aud=f"https://localhost:{mock.port}/token"),
        sa.assertion(scope=f"openid {CLOUD_PLATFORM_SCOPE}"),
        sa.assertion(iat=time.time() + 30),  # clock skew
        sa.assertion(lifetime=60),
    ):
        resp = grant(mock, {"grant_type": JWT_BEARER, "assertion": assertion})
        assert resp.status_code == 200, resp.text
        assert resp.json()["expires_in"] == 120


def _bad_assertions(sa: ServiceAccount, other: ServiceAccount) -> dict[str, tuple[str, int, str, str]]:
    impostor = ServiceAccount.generate(PROJECT, sa.client_email, sa.private_key_id)
    now = time.time()
    short = "Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim."
    return {
        "signature": (impostor.assertion(), 400, "invalid_grant", "Invalid JWT Signature."),
        "tampered": (sa.assertion()[:-4] + "AAAA", 400, "invalid_grant", "Invalid JWT Signature."),
        "not_a_jwt": ("not.a.jwt", 400, "invalid_grant", "Invalid JWT Signature."),
        "alg": (sa.assertion(header={"alg": "HS256"}), 400, "invalid_grant", "Invalid JWT Signature."),
        "kid": (sa.assertion(header={"kid": "0" * 40}), 401, "invalid_client", "The OAuth client was not found."),
        "no_kid": (sa.assertion(header={"kid": None}), 401, "invalid_client", "The OAuth client was not found."),
        "iss": (sa.assertion(claims={"iss": "nobody@x.iam.gserviceaccount.com"}), 401, "invalid_client", "The OAuth client was not found."),
        "iss_other": (sa.assertion(claims={"iss": other.client_email}), 401, "invalid_client", "The OAuth client was not found."),
        "lifetime": (sa.assertion(lifetime=3601), 400, "invalid_grant", short),
        "expired": (sa.assertion(iat=now - 7200), 400, "invalid_grant", short),
        "future": (sa.assertion(iat=now + 300), 400, "invalid_grant", short),
        "no_exp": (sa.assertion(claims={"exp": None}), 400, "invalid_grant", short),
        "aud": (
            sa.assertion(aud="https://example.com/token"),
            400,
            "invalid_grant",
            "Invalid JWT: Failed audience check. The right audience is https://oauth2.googleapis.com/token",
        ),
        "no_scope": (sa.assertion(scope=None), 400, "invalid_scope", "Empty or missing scope not allowed."),
        "scope": (
            sa.assertion(scope="https://www.googleapis.com/auth/userinfo.email"),
            400,
            "invalid_scope",
            "Invalid OAuth scope or ID token audience provided.",
        ),
    }


BAD_ASSERTIONS = [
    "signature", "tampered", "not_a_jwt", "alg", "kid", "no_kid", "iss", "iss_other",
    "lifetime", "expired", "future", "no_exp", "aud", "no_scope", "scope",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_ASSERTIONS)
def test_bad_assertions(mock: MockFcmProcess, sa: ServiceAccount, other_sa: ServiceAccount, case: str) -> None:
    assertion, status, code, description = _bad_assertions(sa, other_sa)[case]
    resp = grant(mock, {"grant_type": JWT_BEARER, "assertion": assertion})
    assert resp.status_code == status
    assert resp.json() == {"error": code, "error_description": description}
    stats = mock.admin.stats()
    assert stats["token_grants"] == 0 and stats["token_errors"] == {code: 1}


def test_token_form_errors(mock: MockFcmProcess, sa: ServiceAccount, h1c: httpx.Client) -> None:
    resp = grant(mock, {"grant_type": "client_credentials", "assertion": sa.assertion()})
    assert (resp.status_code, resp.json()) == (
        400,
        {"error": "unsupported_grant_type", "error_description": "Invalid grant_type: client_credentials"},
    )
    resp = grant(mock, {"assertion": sa.assertion()})
    assert resp.json()["error"] == "unsupported_grant_type"
    resp = grant(mock, {"grant_type": JWT_BEARER})
    assert (resp.status_code, resp.json()) == (
        400,
        {"error": "invalid_request", "error_description": "Missing required parameter: assertion"},
    )
    assert h1c.get(mock.token_uri).status_code == 405


def test_access_token_expires(mock: MockFcmProcess, sa: ServiceAccount, h2c: httpx.Client) -> None:
    mock.admin.set_faults(token_lifetime_s=1)
    token = access_token(mock, sa)
    assert send(h2c, mock, msg(), token).status_code == 200
    time.sleep(1.1)
    resp = send(h2c, mock, msg(), token)
    assert resp.status_code == 401
    assert error(resp)["message"].startswith("Request had invalid authentication credentials.")


# --------------------------------------------------------------------------------------------
# Send: transports and success


def test_send_over_http2(mock: MockFcmProcess, h2c: httpx.Client, access: str, sa: ServiceAccount) -> None:
    resp = send(h2c, mock, msg(notification={"title": "Hi", "body": "there"}), access)
    assert resp.status_code == 200 and resp.http_version == "HTTP/2"
    assert resp.headers["content-type"] == "application/json; charset=UTF-8"
    assert set(resp.json()) == {"name"} and NAME_RE.fullmatch(resp.json()["name"])
    assert resp.text == '{\n  "name": "%s"\n}\n' % resp.json()["name"]
    [item] = mock.admin.accepted()
    assert item["project"] == PROJECT and item["token"] == TOKEN and item["topic"] is None
    assert item["message"] == {"token": TOKEN, "notification": {"title": "Hi", "body": "there"}}
    assert item["name"] == resp.json()["name"] and item["client_email"] == sa.client_email
    assert item["protocol"] == "h2" and item["worker"] == 0 and item["received_at_ns"] > 0


def test_send_over_http11_keep_alive(mock: MockFcmProcess, h1c: httpx.Client, access: str) -> None:
    mock.admin.clear_stats()  # forget the grant of `access`
    names = set()
    for _ in range(3):
        resp = send(h1c, mock, msg(), access)
        assert resp.status_code == 200 and resp.http_version == "HTTP/1.1"
        names.add(resp.json()["name"])
    assert len(names) == 3  # unique message ids
    stats = mock.admin.stats()
    assert stats["protocols"]["http/1.1"] == {"connections": 1, "requests": 3}
    assert {item["protocol"] for item in mock.admin.accepted()} == {"http/1.1"}


def test_http2_prior_knowledge_without_alpn(mock: MockFcmProcess, access: str) -> None:
    with RawConn(mock, alpn=None) as c:
        assert c.sock.selected_alpn_protocol() is None
        encoder = hpack.Encoder()
        headers = HeadersFrame(1)
        body = json.dumps(msg()).encode()
        headers.data = encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":authority", "fcm.googleapis.com"),
                (":path", f"/v1/projects/{PROJECT}/messages:send"),
                ("authorization", f"Bearer {access}"),
            ]
        )
        headers.flags.add("END_HEADERS")
        from hyperframe.frame import DataFrame

        data = DataFrame(1, body)
        data.flags.add("END_STREAM")
        c.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() + headers.serialize() + data.serialize())
        frames = c.frames_until(lambda f: "END_STREAM" in f.flags and f.stream_id == 1)
        settings = next(f for f in frames if isinstance(f, SettingsFrame) and "ACK" not in f.flags)
        assert settings.settings[MAX_CONCURRENT_STREAMS] == 100
        answer = [f for f in frames if f.stream_id == 1]
        status = dict(hpack.Decoder().decode(answer[0].data))[":status"]
        assert status == "200" and b'"name"' in answer[-1].data
    assert mock.admin.stats()["protocols"]["h2"]["requests"] == 1


def test_http11_without_alpn_and_pipelined(mock: MockFcmProcess, access: str) -> None:
    body = json.dumps(msg()).encode()
    request = (
        f"POST /v1/projects/{PROJECT}/messages:send HTTP/1.1\r\nHost: fcm.googleapis.com\r\n"
        f"Authorization: Bearer {access}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with RawConn(mock, alpn=None) as c:
        c.sock.sendall(request + request)  # two requests in one write
        data = c.read_until(b'"\n}\n', count=2)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert b"content-type: application/json; charset=UTF-8\r\n" in data
    assert len(mock.admin.accepted()) == 2


def test_malformed_http11_gets_400(mock: MockFcmProcess) -> None:
    with RawConn(mock, alpn=["http/1.1"]) as c:
        c.sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        assert c.read_until(b"\r\n\r\n").startswith(b"HTTP/1.1 400 ")


def test_other_paths_are_not_found(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    resp = h2c.post(f"{mock.url}/v1/projects/{PROJECT}/messages:list", headers={"authorization": f"Bearer {access}"})
    assert resp.status_code == 404 and error(resp)["status"] == "NOT_FOUND"
    resp = h2c.get(f"{mock.url}/v1/projects/{PROJECT}/messages:send", headers={"authorization": f"Bearer {access}"})
    assert resp.status_code == 404


# --------------------------------------------------------------------------------------------
# Authentication errors


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc"])
def test_missing_credentials(mock: MockFcmProcess, h2c: httpx.Client, header: str | None) -> None:
    headers = {} if header is None else {"authorization": header}
    resp = h2c.post(f"{mock.url}/v1/projects/{PROJECT}/messages:send", json=msg(), headers=headers)
    assert resp.status_code == 401
    assert error(resp) == {
        "code": 401,
        "message": "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "status": "UNAUTHENTICATED",
    }
    assert resp.headers["www-authenticate"] == 'Bearer realm="https://accounts.google.com/"'


@pytest.mark.parametrize("bearer", ["ya29.garbage", "ya29.m.e30.AAAA", "not-a-token", "TAMPER"])
def test_invalid_credentials(mock: MockFcmProcess, h1c: httpx.Client, access: str, bearer: str) -> None:
    if bearer == "TAMPER":
        prefix, payload, mac = access.rsplit(".", 2)
        bearer = f"{prefix}.{payload}A.{mac}"
    resp = send(h1c, mock, msg(), bearer)
    assert resp.status_code == 401
    assert error(resp) == {
        "code": 401,
        "message": "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.",
        "status": "UNAUTHENTICATED",
    }
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]


def test_token_of_another_project_is_permission_denied(mock: MockFcmProcess, h2c: httpx.Client, other_sa: ServiceAccount) -> None:
    resp = send(h2c, mock, msg(), access_token(mock, other_sa))
    assert resp.status_code == 403
    err = error(resp)
    assert err["status"] == "PERMISSION_DENIED" and "details" not in err
    assert "cloudmessaging.messages.create" in err["message"]
    assert mock.admin.stats()["errors"] == {"PERMISSION_DENIED": 1}


def test_revoke_tokens_before(mock: MockFcmProcess, h2c: httpx.Client, sa: ServiceAccount, access: str) -> None:
    assert send(h2c, mock, msg(), access).status_code == 200
    mock.admin.set_faults(revoke_tokens_before=time.time())
    assert send(h2c, mock, msg(), access).status_code == 401
    assert send(h2c, mock, msg(), access_token(mock, sa)).status_code == 200  # a new token works


# --------------------------------------------------------------------------------------------
# Registration-token outcomes


def test_unregistered(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    resp = send(h2c, mock, msg(token=GONE), access)
    assert resp.status_code == 404
    assert error(resp) == {
        "code": 404,
        "message": "Requested entity was not found.",
        "status": "NOT_FOUND",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNREGISTERED"}],
    }


def test_sender_id_mismatch(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    resp = send(h2c, mock, msg(token=OTHER_TOKEN), access)
    assert resp.status_code == 403
    assert error(resp) == {
        "code": 403,
        "message": "SenderId mismatch",
        "status": "PERMISSION_DENIED",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "SENDER_ID_MISMATCH"}],
    }


def test_invalid_registration_token(mock: MockFcmProcess, h1c: httpx.Client, access: str) -> None:
    resp = send(h1c, mock, msg(token=UNKNOWN), access)
    assert resp.status_code == 400
    assert error(resp) == {
        "code": 400,
        "message": "The registration token is not a valid FCM registration token",
        "status": "INVALID_ARGUMENT",
        "details": [
            {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"},
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": "message.token", "description": "Invalid registration token"}],
            },
        ],
    }


def test_fid_target_is_checked_like_a_token(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    assert send(h2c, mock, {"message": {"fid": TOKEN}}, access).status_code == 200
    resp = send(h2c, mock, {"message": {"fid": UNKNOWN}}, access)
    assert resp.status_code == 400 and violations(error(resp))[0]["field"] == "message.fid"
    assert mock.admin.accepted()[0]["fid"] == TOKEN


def test_accept_any_token(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    mock.admin.set_faults(accept_any_token=True)
    assert send(h2c, mock, msg(token=UNKNOWN), access).status_code == 200
    assert send(h2c, mock, msg(token=GONE), access).status_code == 404
    assert send(h2c, mock, msg(token=OTHER_TOKEN), access).status_code == 403


def test_topic_and_condition_targets(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    assert send(h2c, mock, {"message": {"topic": "news.sport_1~%"}}, access).status_code == 200
    condition = "'a' in topics && ('b' in topics || 'c' in topics)"
    assert send(h2c, mock, {"message": {"condition": condition}}, access).status_code == 200
    topic, cond = mock.admin.accepted()
    assert (topic["topic"], topic["token"], cond["condition"]) == ("news.sport_1~%", None, condition)


def test_validation_comes_before_the_token_check(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    resp = send(h2c, mock, msg(token=GONE, data={"n": 1}), access)
    assert resp.status_code == 400 and fcm_code(error(resp)) is None


# --------------------------------------------------------------------------------------------
# The Message: spellings and validation


FULL_SNAKE = {
    "validate_only": False,
    "message": {
        "token": TOKEN,
        "data": {"k": "v"},
        "notification": {"title": "T", "body": "B", "image": "https://example.com/i.png"},
        "fcm_options": {"analytics_label": "label-1"},
        "android": {
            "collapse_key": "ck",
            "priority": "high",
            "ttl": "3.5s",
            "restricted_package_name": "com.example",
            "data": {"a": "b"},
            "fcm_options": {"analytics_label": "a"},
            "direct_boot_ok": True,
            "bandwidth_constrained_ok": False,
            "restricted_satellite_ok": False,
            "notification": {
                "title": "t", "body": "b", "icon": "i", "color": "#a0B1c2", "sound": "default", "tag": "tg",
                "click_action": "OPEN", "body_loc_key": "bk", "body_loc_args": ["1", "2"], "title_loc_key": "tk",
                "title_loc_args": ["x"], "channel_id": "ch", "ticker": "tick", "sticky": True,
                "event_time": "2024-05-01T12:00:00.123456Z", "local_only": False, "notification_priority": "priority_high",
                "default_sound": True, "default_vibrate_timings": False, "default_light_settings": False,
                "vibrate_timings": ["0.1s", "2s"], "visibility": "public", "notification_count": 3,
                "light_settings": {"color": {"red": 0.5, "green": 0, "blue": 1, "alpha": 1}, "light_on_duration": "1s",
                                   "light_off_duration": "0.5s"},
                "image": "https://example.com/a.png", "bypass_proxy_notification": False, "proxy": "if_priority_lowered",
            },
        },
        "apns": {
            "headers": {"apns-priority": "10"},
            "payload": {"aps": {"alert": {"title": "x"}, "badge": 2}, "custom": [1, 2]},
            "fcm_options": {"analytics_label": "ios", "image": "https://example.com/i.png"},
            "live_activity_token": "la",
        },
        "webpush": {
            "headers": {"TTL": "15", "Urgency": "high"},
            "data": {"w": "1"},
            "notification": {"title": "w", "actions": [{"action": "a", "title": "A"}]},
            "fcm_options": {"link": "https://example.com", "analytics_label": "web"},
        },
    },
}  # fmt: skip


def _camel(doc: Any, *, keep: bool = False) -> Any:
    """Rename proto field names to lowerCamelCase (not inside maps and Structs)."""
    if not isinstance(doc, dict) or keep:
        return doc
    out = {}
    for key, value in doc.items():
        head, *rest = key.split("_")
        opaque = key in ("data", "headers", "payload") or (key == "notification" and "actions" in value)
        out[head + "".join(p.title() for p in rest)] = _camel(value, keep=opaque)
    return out


def test_snake_and_camel_case_spellings(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    camel = _camel(FULL_SNAKE)
    assert "validateOnly" in camel and "collapseKey" in camel["message"]["android"]
    assert "notificationPriority" in camel["message"]["android"]["notification"]
    for body in (FULL_SNAKE, camel):
        resp = send(h2c, mock, body, access)
        assert resp.status_code == 200, resp.text
    snake, from_camel = (item["message"] for item in mock.admin.accepted())
    assert snake == from_camel
    android = snake["android"]
    assert android["priority"] == "HIGH"  # enums are upper case once received
    assert android["notification"]["notification_priority"] == "PRIORITY_HIGH"
    assert android["notification"]["proxy"] == "IF_PRIORITY_LOWERED"
    assert snake["apns"]["payload"]["custom"] == [1, 2]


VALID_VARIANTS = [
    {"android": {"ttl": "0s"}},
    {"android": {"ttl": "2419200s"}},
    {"android": {"ttl": "3.000000001s"}},
    {"android": {"priority": 1}},  # enums as numbers
    {"android": {"priority": "NORMAL"}},
    {"android": {"notification": {"notification_count": "7"}}},  # int32 as a string
    {"android": {"notification": {"event_time": "2024-05-01T12:00:00+02:00"}}},
    {"data": {"collapse_key": "allowed"}},
    {"token": TOKEN, "topic": None},  # null is "not set"
]


@pytest.mark.parametrize("fields", VALID_VARIANTS, ids=[json.dumps(v) for v in VALID_VARIANTS])
def test_valid_variants(mock: MockFcmProcess, h2c: httpx.Client, access: str, fields: dict[str, Any]) -> None:
    resp = send(h2c, mock, msg(**fields), access)
    assert resp.status_code == 200, resp.text


# (body, field, description, FcmError present)
PARSE_ERRORS: list[tuple[str, Any, str | None, str]] = [
    ("top_level", {"foo": 1, "message": {"token": TOKEN}}, None, 'Invalid JSON payload received. Unknown name "foo": Cannot find field.'),
    ("in_message", msg(foo=1), "message", "Invalid JSON payload received. Unknown name \"foo\" at 'message': Cannot find field."),
    ("nested", msg(android={"notification": {"colour": "#ffffff"}}), "message.android.notification",
     "Invalid JSON payload received. Unknown name \"colour\" at 'message.android.notification': Cannot find field."),
    ("data_value", msg(data={"a": "x", "b": 12}), "message.data[1].value", "Invalid value at 'message.data[1].value' (TYPE_STRING), 12"),
    ("data_first", msg(data={"a": True}), "message.data[0].value", "Invalid value at 'message.data[0].value' (TYPE_STRING), true"),
    ("android_data", msg(android={"data": {"a": 1.5}}), "message.android.data[0].value",
     "Invalid value at 'message.android.data[0].value' (TYPE_STRING), 1.5"),
    ("list", {"message": {"token": [TOKEN]}}, "message",
     "Invalid JSON payload received. Unknown name \"token\" at 'message': Proto field is not repeating, cannot start list."),
    ("priority", msg(android={"priority": "urgent"}), "message.android.priority",
     "Invalid value at 'message.android.priority' (type.googleapis.com/google.firebase.fcm.v1.AndroidMessagePriority), \"urgent\""),
    ("ttl_format", msg(android={"ttl": "3"}), "message.android.ttl",
     "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), \"3\""),
    ("ttl_number", msg(android={"ttl": 3}), "message.android.ttl",
     "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration), 3"),
    ("visibility", msg(android={"notification": {"visibility": "hidden"}}), "message.android.notification.visibility",
     "Invalid value at 'message.android.notification.visibility' "
     "(type.googleapis.com/google.firebase.fcm.v1.AndroidNotification.Visibility), \"hidden\""),
    ("count", msg(android={"notification": {"notification_count": "x"}}), "message.android.notification.notification_count",
     "Invalid value at 'message.android.notification.notification_count' (TYPE_INT32), \"x\""),
    ("event_time", msg(android={"notification": {"event_time": "yesterday"}}), "message.android.notification.event_time",
     "Invalid value at 'message.android.notification.event_time' (type.googleapis.com/google.protobuf.Timestamp), \"yesterday\""),
    ("vibrate", msg(android={"notification": {"vibrate_timings": ["1s", "x"]}}), "message.android.notification.vibrate_timings[1]",
     "Invalid value at 'message.android.notification.vibrate_timings[1]' (type.googleapis.com/google.protobuf.Duration), \"x\""),
    ("bool", msg(android={"direct_boot_ok": "yes"}), "message.android.direct_boot_ok",
     "Invalid value at 'message.android.direct_boot_ok' (TYPE_BOOL), \"yes\""),
    ("validate_only", {"validate_only": "yes", "message": {"token": TOKEN}}, "validate_only",
     "Invalid value at 'validate_only' (TYPE_BOOL), \"yes\""),
    ("struct", msg(apns={"payload": "aps"}), "message.apns.payload",
     "Invalid value at 'message.apns.payload' (type.googleapis.com/google.protobuf.Struct), \"aps\""),
    ("message_type", msg(android="x"), "message.android",
     "Invalid value at 'message.android' (type.googleapis.com/google.firebase.fcm.v1.AndroidConfig), \"x\""),
    ("two_targets", {"message": {"token": TOKEN, "topic": "news"}}, "message",
     "Invalid JSON payload received. Oneof field 'target' is already set. Cannot set 'topic'"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field", "description"), PARSE_ERRORS, ids=[c[0] for c in PARSE_ERRORS])
def test_parse_errors_name_the_field(
    mock: MockFcmProcess, h2c: httpx.Client, access: str, case: str, body: Any, field: str | None, description: str
) -> None:
    resp = send(h2c, mock, body, access)
    assert resp.status_code == 400
    err = error(resp)
    assert err["status"] == "INVALID_ARGUMENT" and err["message"] == description
    assert fcm_code(err) is None  # the JSON front end refuses these, not FCM
    expected = {"description": description} if field is None else {"field": field, "description": description}
    assert violations(err) == [expected]


def test_several_parse_errors_are_all_reported(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    resp = send(h2c, mock, msg(foo=1, data={"a": 2}), access)
    err = error(resp)
    assert [v["field"] for v in violations(err)] == ["message", "message.data[0].value"]
    assert err["message"].count("\n") == 1


# (body, field, description start)
MESSAGE_ERRORS: list[tuple[str, Any, str, str]] = [
    ("no_target", {"message": {"notification": {"title": "x"}}}, "message", "Recipient of the message is not set."),
    ("empty_token", {"message": {"token": ""}}, "message", "Recipient of the message is not set."),
    ("no_message", {}, "message", "Recipient of the message is not set."),
    ("reserved_from", msg(data={"from": "x"}), "message.data", "Invalid data payload key: from"),
    ("reserved_google", msg(data={"google.c.a": "x"}), "message.data", "Invalid data payload key: google.c.a"),
    ("reserved_gcm", msg(data={"gcm.n.e": "1"}), "message.data", "Invalid data payload key: gcm.n.e"),
    ("reserved_type", msg(data={"message_type": "x"}), "message.data", "Invalid data payload key: message_type"),
    ("reserved_android", msg(android={"data": {"from": "x"}}), "message.android.data", "Invalid data payload key: from"),
    ("ttl_negative", msg(android={"ttl": "-1s"}), "message.android.ttl", "TTL must be between 0s and 2419200s"),
    ("ttl_too_long", msg(android={"ttl": "2419200.5s"}), "message.android.ttl", "TTL must be between 0s and 2419200s"),
    ("color", msg(android={"notification": {"color": "red"}}), "message.android.notification.color", "Invalid color 'red'"),
    ("light_color", msg(android={"notification": {"light_settings": {"color": {"red": 2}}}}),
     "message.android.notification.light_settings.color.red", "Color components must be between 0 and 1"),
    ("topic_prefix", {"message": {"topic": "/topics/news"}}, "message.topic", "Invalid topic name"),
    ("condition", {"message": {"condition": " || ".join(f"'t{i}' in topics" for i in range(6))}}, "message.condition",
     "Invalid condition"),
    ("label", msg(fcm_options={"analytics_label": "has space"}), "message.fcm_options.analytics_label", "Invalid analytics_label"),
    ("android_label", msg(android={"fcm_options": {"analytics_label": "x" * 51}}), "message.android.fcm_options.analytics_label",
     "Invalid analytics_label"),
    ("link", msg(webpush={"fcm_options": {"link": "http://example.com"}}), "message.webpush.fcm_options.link",
     "The link must be an HTTPS URL"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "field", "description"), MESSAGE_ERRORS, ids=[c[0] for c in MESSAGE_ERRORS])
def test_message_errors_have_fcm_error_and_field(
    mock: MockFcmProcess, h1c: httpx.Client, access: str, case: str, body: Any, field: str, description: str
) -> None:
    resp = send(h1c, mock, body, access)
    assert resp.status_code == 400
    err = error(resp)
    assert err["status"] == "INVALID_ARGUMENT" and err["message"].startswith(description)
    assert fcm_code(err) == "INVALID_ARGUMENT"
    [violation] = violations(err)
    assert violation["field"] == field and violation["description"] == err["message"]


def test_invalid_json(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    for raw in (b"{not json", b"[1, 2]"):
        resp = send(h2c, mock, None, access, raw=raw)
        err = error(resp)
        assert resp.status_code == 400 and err["message"].startswith("Invalid JSON payload received.")
        assert violations(err) == [{"description": err["message"]}]


def _sized(target: dict[str, str], size: int) -> dict[str, Any]:
    """A message whose data makes the checked size exactly ``size`` bytes."""
    base = len(json.dumps({"data": {"k": ""}}, separators=(",", ":")))
    return {"message": {**target, "data": {"k": "x" * (size - base)}}}


@pytest.mark.parametrize(("target", "limit"), [({"token": TOKEN}, 4096), ({"topic": "news"}, 2048), ({"condition": "'a' in topics"}, 2048)])
def test_size_limit(mock: MockFcmProcess, h2c: httpx.Client, access: str, target: dict[str, str], limit: int) -> None:
    assert send(h2c, mock, _sized(target, limit), access).status_code == 200
    resp = send(h2c, mock, _sized(target, limit + 1), access)
    assert resp.status_code == 400
    assert error(resp) == {"code": 400, "message": "Request contains an invalid argument.", "status": "INVALID_ARGUMENT"}


def test_huge_body_is_refused_without_parsing(mock: MockFcmProcess, h1c: httpx.Client, access: str) -> None:
    resp = send(h1c, mock, None, access, raw=b'{"message": {"token": "' + b"x" * 300_000 + b'"}}')
    assert resp.status_code == 400 and "details" not in error(resp)


def test_validate_only(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    for body in ({"validate_only": True, "message": {"token": TOKEN}}, {"validateOnly": True, "message": {"token": TOKEN}}):
        resp = send(h2c, mock, body, access)
        assert resp.status_code == 200 and resp.json() == {"name": f"projects/{PROJECT}/messages/fake_message_id"}
    assert send(h2c, mock, {"validate_only": True, "message": {"token": GONE}}, access).status_code == 404
    assert mock.admin.accepted() == []
    stats = mock.admin.stats()
    assert stats["validate_only"] == 2 and stats["successes"] == 2


# --------------------------------------------------------------------------------------------
# Faults


def test_quota_with_retry_after(mock: MockFcmProcess, h2c: httpx.Client, access: str, other_sa: ServiceAccount) -> None:
    mock.admin.set_faults(quota_per_minute=3, retry_after_s=17)
    assert send(h2c, mock, msg(data={"n": 1}), access).status_code == 400  # client errors count too
    assert [send(h2c, mock, msg(), access).status_code for _ in range(3)] == [200, 200, 429]
    resp = send(h2c, mock, msg(), access)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "17"
    err = error(resp)
    assert err["status"] == "RESOURCE_EXHAUSTED" and fcm_code(err) == "QUOTA_EXCEEDED"
    quota = [d for d in err["details"] if d["@type"] == "type.googleapis.com/google.rpc.QuotaFailure"]
    assert quota == [{"@type": "type.googleapis.com/google.rpc.QuotaFailure",
                      "violations": [{"subject": f"project:{PROJECT}", "description": "Send requests per minute"}]}]  # fmt: skip
    other = send(h2c, mock, {"message": {"token": OTHER_TOKEN}}, access_token(mock, other_sa), project=OTHER_PROJECT)
    assert other.status_code == 200  # per project
    mock.admin.set_faults(retry_after_s=None, quota_per_minute=0)
    resp = send(h2c, mock, msg(), access)
    assert resp.status_code == 429 and "retry-after" not in resp.headers
    assert mock.admin.stats()["errors"]["QUOTA_EXCEEDED"] == 3


def test_ratio_503(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    mock.admin.set_faults(ratio_503=1.0)
    resp = send(h2c, mock, msg(), access)
    assert resp.status_code == 503 and "retry-after" not in resp.headers
    assert error(resp) == {
        "code": 503,
        "message": "The service is currently unavailable.",
        "status": "UNAVAILABLE",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "UNAVAILABLE"}],
    }
    mock.admin.set_faults(retry_after_s_503=5)
    assert send(h2c, mock, msg(), access).headers["retry-after"] == "5"
    assert mock.admin.accepted() == []


def test_ratio_500(mock: MockFcmProcess, h1c: httpx.Client, access: str) -> None:
    mock.admin.set_faults(ratio_500=1.0)
    resp = send(h1c, mock, msg(), access)
    assert resp.status_code == 500
    assert error(resp) == {
        "code": 500,
        "message": "Internal error encountered.",
        "status": "INTERNAL",
        "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INTERNAL"}],
    }


@pytest.mark.parametrize("http2", [True, False])
def test_ratio_502_html(mock: MockFcmProcess, access: str, http2: bool) -> None:
    mock.admin.set_faults(ratio_502_html=1.0)
    with httpx.Client(http2=http2, verify=trust(mock.ca_file), timeout=TIMEOUT) as client:
        resp = send(client, mock, msg(), access)
    assert resp.status_code == 502 and resp.headers["content-type"] == "text/html; charset=UTF-8"
    assert resp.text.startswith("<!DOCTYPE html>") and "502" in resp.text
    assert mock.admin.stats()["errors"] == {"BAD_GATEWAY": 1}


def test_ratios_are_deterministic_per_seed(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    def run() -> list[int]:
        mock.admin.set_faults(ratio_503=0.3, ratio_500=0.3, seed=42)
        return [send(h2c, mock, msg(), access).status_code for _ in range(20)]

    first = run()
    assert set(first) == {200, 500, 503}
    assert run() == first


def test_latency(mock: MockFcmProcess, h2c: httpx.Client, h1c: httpx.Client, access: str, sa: ServiceAccount) -> None:
    mock.admin.set_faults(latency_ms=300)
    for client in (h2c, h1c):
        start = time.monotonic()
        assert send(client, mock, msg(), access).status_code == 200
        assert time.monotonic() - start >= 0.29
    start = time.monotonic()
    access_token(mock, sa)  # the token endpoint is not delayed
    assert time.monotonic() - start < 0.29


def test_max_concurrent_streams(mock: MockFcmProcess, access: str) -> None:
    with RawConn(mock, alpn=["h2"]) as c:
        assert c.sock.selected_alpn_protocol() == "h2"
        c.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())
        [*_, first] = c.frames_until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
        assert first.settings[MAX_CONCURRENT_STREAMS] == 100
        ack = SettingsFrame(0)
        ack.flags.add("ACK")
        c.sock.sendall(ack.serialize())
        mock.admin.set_faults(max_concurrent_streams=2)  # pushed to open connections
        [*_, update] = c.frames_until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
        assert update.settings[MAX_CONCURRENT_STREAMS] == 2
        c.sock.sendall(ack.serialize())  # in force once acknowledged
        encoder = hpack.Encoder()
        frames = b""
        for sid in (1, 3, 5):  # three open streams (no END_STREAM)
            headers = HeadersFrame(sid)
            headers.data = encoder.encode(
                [(":method", "POST"), (":scheme", "https"), (":authority", "x"), (":path", f"/v1/projects/{PROJECT}/messages:send")]
            )
            headers.flags.add("END_HEADERS")
            frames += headers.serialize()
        c.sock.sendall(frames)
        [*_, goaway] = c.frames_until(lambda f: isinstance(f, GoAwayFrame))
        assert goaway.error_code == 1 and goaway.additional_data == b"exceeded_max_concurrent_streams"
        assert goaway.last_stream_id == 3


class H2Wire(RawConn):
    """HTTP/2 over TLS to the mock, frame by frame: opens send streams and records what comes
    back (each stream's status or reset, the GOAWAY, the end of the connection)."""

    def __init__(self, mock: MockFcmProcess, access: str) -> None:
        super().__init__(mock, alpn=["h2"])
        assert self.sock.selected_alpn_protocol() == "h2"
        self.path = f"/v1/projects/{PROJECT}/messages:send"
        self.access = access
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.next_sid = 1
        self.status: dict[int, int] = {}
        self.resets: dict[int, int] = {}
        self.goaway: GoAwayFrame | None = None
        #: What arrived, in order: ("goaway", last id), ("status", sid), ("reset", sid).
        self.seen: list[tuple[str, int]] = []
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())

    def request(self, path: str | None = None) -> bytes:
        """HEADERS and DATA (END_STREAM) of a send, or of a POST to ``path``; returns the bytes."""
        sid, self.next_sid = self.next_sid, self.next_sid + 2
        headers = HeadersFrame(sid)
        headers.data = self.encoder.encode([
            (":method", "POST"), (":scheme", "https"), (":authority", "127.0.0.1"), (":path", path or self.path),
            ("authorization", f"Bearer {self.access}"), ("content-type", "application/json")])
        headers.flags.add("END_HEADERS")
        data = DataFrame(sid, json.dumps(msg()).encode())
        data.flags.add("END_STREAM")
        return headers.serialize() + data.serialize()

    def send(self, count: int = 1) -> list[int]:
        """Open ``count`` send streams in one write; their ids."""
        first = self.next_sid
        self.sock.sendall(b"".join(self.request() for _ in range(count)))
        return list(range(first, self.next_sid, 2))

    def _take(self, frame: Frame) -> None:
        if isinstance(frame, HeadersFrame):
            headers = dict(self.decoder.decode(frame.data))
            self.status[frame.stream_id] = int(headers[":status"])
            self.seen.append(("status", frame.stream_id))
        elif isinstance(frame, RstStreamFrame):
            self.resets[frame.stream_id] = frame.error_code
            self.seen.append(("reset", frame.stream_id))
        elif isinstance(frame, GoAwayFrame):
            self.goaway = frame
            self.seen.append(("goaway", frame.last_stream_id))

    def until(self, done: Any, timeout: float = TIMEOUT) -> bool:
        """Read frames until ``done()``; False if the time is up or the connection ended first."""
        deadline = time.monotonic() + timeout
        while not done():
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                self._take(frame)
            if done():
                return True
            if time.monotonic() >= deadline:
                return False
            try:
                if not self._recv(deadline):
                    return done()
            except TimeoutError:
                return done()
        return True

    def answered(self, *sids: int, timeout: float = TIMEOUT) -> bool:
        return self.until(lambda: all(sid in self.status or sid in self.resets for sid in sids), timeout)

    def closed(self, timeout: float = TIMEOUT) -> bool:
        """True once the server closed the connection (EOF) or reset it."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not self._recv(deadline):
                    return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            return True
        return False


def test_goaway_after_n_streams_answers_up_to_last_stream_id_and_refuses_the_rest(
        mock: MockFcmProcess, access: str) -> None:
    mock.admin.set_faults(goaway_after_streams=3, goaway_reason="max_age", latency_ms=200)
    with H2Wire(mock, access) as c:
        sids = c.send(5)  # one write: the GOAWAY goes out at the third stream, before any answer
        assert c.answered(*sids)
        assert c.goaway is not None
        assert (c.goaway.last_stream_id, c.goaway.error_code, c.goaway.additional_data) == (sids[2], 0, b"max_age")
        assert c.seen[0] == ("goaway", sids[2])
        assert [c.status.get(sid) for sid in sids[:3]] == [200, 200, 200]
        assert [c.resets.get(sid) for sid in sids[3:]] == [REFUSED_STREAM, REFUSED_STREAM]
        assert c.closed()  # then the server closes the connection
    assert len(mock.admin.accepted()) == 3
    stats = mock.admin.stats()
    assert (stats["goaways_sent"], stats["refused_streams"], stats["successes"]) == (1, 2, 3)


def test_goaway_counts_sends_only_not_token_or_admin_requests(mock: MockFcmProcess, access: str) -> None:
    mock.admin.set_faults(goaway_after_streams=1)
    with H2Wire(mock, access) as c:
        c.sock.sendall(c.request("/token") + c.request("/_mock/stats"))
        assert c.answered(1, 3) and c.goaway is None
        [sid] = c.send()
        assert c.answered(sid) and c.status[sid] == 200
        assert c.goaway is not None and c.goaway.last_stream_id == sid and c.goaway.additional_data == b""
        assert c.closed()
    assert mock.admin.stats()["goaways_sent"] == 1


def test_reset_after_n_streams_aborts_the_connection_unanswered(mock: MockFcmProcess, access: str) -> None:
    mock.admin.set_faults(reset_after_streams=2)
    with H2Wire(mock, access) as c:
        for _ in range(2):
            [sid] = c.send()
            assert c.answered(sid) and c.status[sid] == 200
        [third] = c.send()
        assert c.closed()  # a TCP RST (or its EOF), and no answer
        assert third not in c.status and third not in c.resets and c.goaway is None
    stats = mock.admin.stats()
    assert stats["resets"] == 1 and stats["successes"] == 2 and len(mock.admin.accepted()) == 2


def test_stall_holds_sends_until_released_over_http2(mock: MockFcmProcess, access: str, sa: ServiceAccount) -> None:
    mock.admin.set_faults(stall=True)
    with H2Wire(mock, access) as c:
        sids = c.send(2)
        assert not c.answered(*sids, timeout=0.5)
        assert mock.admin.stats()["stalled"] == 2
        access_token(mock, sa)  # the token endpoint still answers
        mock.admin.set_faults(stall=False)
        assert c.answered(*sids) and [c.status[sid] for sid in sids] == [200, 200]
    assert mock.admin.stats()["stalled"] == 0 and len(mock.admin.accepted()) == 2


def test_stall_holds_sends_until_released_over_http11(mock: MockFcmProcess, h1c: httpx.Client, access: str) -> None:
    mock.admin.set_faults(stall=True)
    answers: list[int] = []
    sender = threading.Thread(target=lambda: answers.append(send(h1c, mock, msg(), access).status_code))
    sender.start()
    sender.join(0.5)
    assert sender.is_alive() and mock.admin.stats()["stalled"] == 1
    mock.admin.set_faults(stall=False)
    sender.join(TIMEOUT)
    assert answers == [200] and mock.admin.stats()["stalled"] == 0


# --------------------------------------------------------------------------------------------
# Admin API


def test_admin_state_and_projects(mock: MockFcmProcess, sa: ServiceAccount) -> None:
    state = mock.admin.state()
    assert state["workers"] == 1 and state["faults"] == DEFAULT_FAULTS
    assert state["projects"][PROJECT]["service_accounts"] == [sa.spec()]
    assert state["projects"][PROJECT]["tokens"] == {TOKEN: {"unregistered": False}, GONE: {"unregistered": True}}
    second = ServiceAccount.generate(PROJECT)
    state = mock.admin.set_project(PROJECT, tokens={"new": {}})  # tokens merge, accounts stay
    assert set(state["projects"][PROJECT]["tokens"]) == {TOKEN, GONE, "new"}
    assert len(state["projects"][PROJECT]["service_accounts"]) == 1
    state = mock.admin.set_project(PROJECT, [sa, second.spec()])
    assert [a["client_email"] for a in state["projects"][PROJECT]["service_accounts"]] == [sa.client_email, second.client_email]
    assert access_token(mock, second)
    state = mock.admin.set_project("proj-c")
    assert state["projects"]["proj-c"] == {"service_accounts": [], "tokens": {}}


def test_admin_tokens(mock: MockFcmProcess, h2c: httpx.Client, access: str) -> None:
    state = mock.admin.set_tokens(PROJECT, {UNKNOWN: {}, GONE: None, TOKEN: {"unregistered": True}})
    assert state["projects"][PROJECT]["tokens"] == {TOKEN: {"unregistered": True}, UNKNOWN: {"unregistered": False}}
    assert send(h2c, mock, msg(token=UNKNOWN), access).status_code == 200
    assert send(h2c, mock, msg(token=TOKEN), access).status_code == 404
    state = mock.admin.clear_tokens(PROJECT)
    assert state["projects"][PROJECT]["tokens"] == {} and state["projects"][OTHER_PROJECT]["tokens"]
    assert mock.admin.clear_tokens()["projects"][OTHER_PROJECT]["tokens"] == {}


def test_admin_rejects_bad_input(mock: MockFcmProcess, sa: ServiceAccount, other_sa: ServiceAccount) -> None:
    ec_pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    bad_calls = [
        ("PUT", "/_mock/faults", {"no_such_fault": 1}),
        ("PUT", "/_mock/faults", {"ratio_503": 2}),
        ("PUT", "/_mock/faults", {"ratio_503": 0.6, "ratio_502_html": 0.6}),
        ("PUT", "/_mock/faults", {"quota_per_minute": -1}),
        ("PUT", "/_mock/faults", {"max_concurrent_streams": 0}),
        ("PUT", "/_mock/faults", {"goaway_after_streams": -1}),
        ("PUT", "/_mock/faults", {"reset_after_streams": "2"}),
        ("PUT", "/_mock/faults", {"goaway_reason": 5}),
        ("PUT", "/_mock/faults", {"stall": 1}),
        ("PUT", "/_mock/faults", "nope"),
        ("PUT", "/_mock/projects", {PROJECT: {"service_accounts": [{"client_email": "x@y"}]}}),
        ("PUT", "/_mock/projects", {PROJECT: {"service_accounts": [{**sa.spec(), "public_key_pem": "nope"}]}}),
        ("PUT", "/_mock/projects", {PROJECT: {"service_accounts": [{**sa.spec(), "public_key_pem": ec_pem}]}}),
        ("PUT", "/_mock/projects", {PROJECT: {"service_accounts": [sa.spec(), other_sa.spec()]}}),  # other_sa is proj-b's
        ("PUT", "/_mock/projects", {"bad/id": {}}),
        ("PUT", "/_mock/projects", {PROJECT: {"colour": 1}}),
        ("PUT", "/_mock/tokens", {TOKEN: {}}),
        ("PUT", "/_mock/tokens", {"project": PROJECT, "tokens": {"a b": {}}}),
        ("PUT", "/_mock/tokens", {"project": PROJECT, "tokens": {TOKEN: {"unregistered": "yes"}}}),
        ("DELETE", "/_mock/tokens", {"everything": True}),
    ]
    before = mock.admin.state()
    for method, path, body in bad_calls:
        with pytest.raises(MockAdminError) as info:
            mock.admin(method, path, body)
        assert info.value.status == 400 and info.value.error, (method, path, body)
    with pytest.raises(MockAdminError) as info:
        mock.admin("GET", "/_mock/nothing")
    assert info.value.status == 404
    with pytest.raises(MockAdminError) as info:
        mock.admin("POST", "/_mock/stats")
    assert info.value.status == 405
    assert mock.admin.state() == before  # nothing half-applied


def test_admin_over_http11(mock: MockFcmProcess, h1c: httpx.Client) -> None:
    resp = h1c.put(f"{mock.url}/_mock/faults", json={"latency_ms": 1})
    assert resp.status_code == 200 and resp.json()["faults"]["latency_ms"] == 1
    assert h1c.put(f"{mock.url}/_mock/faults", json={"x": 1}).status_code == 400


def test_admin_accepted_and_stats(mock: MockFcmProcess, h2c: httpx.Client, h1c: httpx.Client, access: str) -> None:
    send(h2c, mock, msg(data={"n": "1"}), access)
    send(h1c, mock, msg(data={"n": "2"}), access)
    send(h2c, mock, msg(token=GONE), access)
    send(h2c, mock, msg(token=UNKNOWN), access)
    send(h2c, mock, msg(), None)
    items = mock.admin.accepted()
    assert [item["message"]["data"]["n"] for item in items] == ["1", "2"]
    assert [item["protocol"] for item in items] == ["h2", "http/1.1"]
    stats = mock.admin.stats()
    assert stats["requests"] == 5 and stats["successes"] == 2
    assert stats["errors"] == {"UNREGISTERED": 1, "INVALID_ARGUMENT": 1, "UNAUTHENTICATED": 1}
    assert stats["token_grants"] == 1 and stats["workers"] == 1
    assert stats["protocols"]["h2"]["requests"] == 4 and stats["protocols"]["http/1.1"]["requests"] == 2
    assert stats["connections_opened"] >= 3 and stats["connections_open"] >= 2
    assert mock.admin.clear_accepted() == 2 and mock.admin.accepted() == []
    mock.admin.clear_stats()
    assert mock.admin.stats()["requests"] == 0


async def test_async_admin_client_on_trio(mock: MockFcmProcess, sa: ServiceAccount) -> None:
    async with mock.async_admin() as admin:
        state = await admin.set_faults(latency_ms=1)
        assert state["faults"]["latency_ms"] == 1
        state = await admin.set_project(PROJECT, [sa], {"async-token": {}})
        assert "async-token" in state["projects"][PROJECT]["tokens"]
        assert (await admin.set_tokens(PROJECT, {"async-token": None}))["projects"][PROJECT]["tokens"].get("async-token") is None
        assert (await admin.stats())["workers"] == 1


# --------------------------------------------------------------------------------------------
# Processes: workers, configuration, state directory, signals


def test_two_workers_share_the_port_and_the_state(tmp_path: Path, sa: ServiceAccount) -> None:
    config = {"projects": {PROJECT: {"service_accounts": [sa.spec()], "tokens": {TOKEN: {}}}}}
    with MockFcmProcess(tmp_path / "workers", config=config, workers=2) as mock:
        token = access_token(mock, sa)  # granted by one worker, valid on both
        mock.admin.set_tokens(PROJECT, {"late": {}})  # applied by one worker, relayed to the other
        for i in range(30):
            with httpx.Client(http2=i % 2 == 0, verify=trust(mock.ca_file), timeout=TIMEOUT) as client:
                assert send(client, mock, msg(), token).status_code == 200
                assert send(client, mock, msg(token="late"), token).status_code == 200
        items = mock.admin.accepted()
        assert len(items) == 60 and {item["worker"] for item in items} == {0, 1}
        assert len({item["name"] for item in items}) == 60
        stats = mock.admin.stats()
        assert stats["workers"] == 2 and stats["requests"] == 60 and stats["successes"] == 60
        assert stats["protocols"]["h2"]["requests"] + stats["protocols"]["http/1.1"]["requests"] == 61
        mock.admin.set_faults(quota_per_minute=4)  # 2 per worker
        codes = []
        for _ in range(20):
            with httpx.Client(verify=trust(mock.ca_file), timeout=TIMEOUT) as client:
                codes.append(send(client, mock, msg(), token).status_code)
        assert 2 <= codes.count(200) <= 4 and codes.count(429) == 20 - codes.count(200)
        assert mock.admin.clear_accepted() == 60 + codes.count(200)
        assert mock.admin.accepted() == []
    assert mock.returncode == 0


def test_bad_config_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="bad --config"):
        MockFcmProcess(tmp_path / "bad", config={"projects": {"p": {"service_accounts": "nope"}}}).start()


def test_state_directory_keeps_its_ca_and_token_secret(tmp_path: Path, sa: ServiceAccount) -> None:
    config = {"projects": {PROJECT: {"service_accounts": [sa.spec()], "tokens": {TOKEN: {}}}}}
    with MockFcmProcess(tmp_path / "state", config=config) as first:
        ca = first.ca_file.read_bytes()
        token = access_token(first, sa)
    with MockFcmProcess(tmp_path / "state", config=config) as second:
        assert second.ca_file.read_bytes() == ca
        with httpx.Client(verify=trust(second.ca_file), timeout=TIMEOUT) as client:
            assert send(client, second, msg(), token).status_code == 200  # tokens survive a restart
    assert (tmp_path / "state" / "token-secret").stat().st_mode & 0o777 == 0o600


def test_run_as_module_prints_one_ready_line_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "plugins.fcm.mock", "--dir", str(tmp_path / "m"), "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert re.fullmatch(re.escape(READY_PREFIX) + r"127\.0\.0\.1:\d+\n", line), line
        port = int(line.rsplit(":", 1)[1])
        with httpx.Client(verify=trust(tmp_path / "m" / "ca.pem"), timeout=TIMEOUT) as client:
            assert client.get(f"https://127.0.0.1:{port}/_mock/state").status_code == 200
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0 and out == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


async def test_async_context_manager_on_trio(tmp_path: Path, sa: ServiceAccount) -> None:
    async with MockFcmProcess(tmp_path / "async", config={"projects": {PROJECT: {"service_accounts": [sa.spec()]}}}) as mock:
        assert mock.running and mock.port > 0 and mock.token_uri == f"https://127.0.0.1:{mock.port}/token"
        async with mock.async_admin() as admin:
            assert list((await admin.state())["projects"]) == [PROJECT]
    assert not mock.running and mock.returncode == 0
