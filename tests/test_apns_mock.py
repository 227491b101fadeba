"""Tests of the mock APNs server itself (plugins/apns/mock.py).

The mock runs as a child process on 127.0.0.1, port 0 (`MockApnsProcess`). Requests go over
TLS through `RawH2`, a small blocking HTTP/2 client built on hpack/hyperframe that sees every
frame: h2's own client state machine drops the answers that follow a GOAWAY, which is exactly
what some of these tests look at. Every wait has a deadline.
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import hpack
import httpx
import pytest
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from plugins.apns.mock import (
    DEFAULT_FAULTS,
    MockAdminError,
    MockApnsProcess,
    SigningKey,
    issue_client_certificate,
)

TOPIC = "com.example.app"
OTHER_TOPIC = "com.example.other"
TOKEN = "0123456789abcdef" * 4
VOIP_TOKEN = "1123456789abcdef" * 4
OTHER_TOKEN = "2123456789abcdef" * 4
GONE_TOKEN = "3123456789abcdef" * 4
LATER_TOKEN = "4123456789abcdef" * 4
PROD_TOKEN = "5123456789abcdef" * 4
UNKNOWN_TOKEN = "f123456789abcdef" * 4
GONE_AT_MS = 1_700_000_000_000
REFUSED_STREAM = 7
MAX_CONCURRENT_STREAMS = 0x3
TIMEOUT = 10.0


def token_table() -> dict[str, Any]:
    return {
        TOKEN: [TOPIC],
        VOIP_TOKEN: [f"{TOPIC}.voip"],
        OTHER_TOKEN: [OTHER_TOPIC],
        GONE_TOKEN: {"topics": [TOPIC], "unregistered_at_ms": GONE_AT_MS},
        LATER_TOKEN: {"topics": [TOPIC], "unregistered_at_ms": int(time.time() * 1000) + 3_600_000},
        PROD_TOKEN: {"topics": [TOPIC], "environment": "production"},
    }


# --------------------------------------------------------------------------------------------
# A raw HTTP/2 client


@dataclass
class Response:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    data_frames: int = 0
    done: bool = False
    reset: int | None = None
    arrived_after_goaway: bool = False

    @property
    def reason(self) -> str | None:
        return json.loads(self.body)["reason"] if self.body else None


class RawH2:
    """A blocking HTTP/2-over-TLS client that records every frame the server sends."""

    def __init__(
        self,
        mock: MockApnsProcess,
        *,
        jwt: str | None = None,
        alpn: bool = True,
        cert: tuple[Path, Path] | None = None,
        port: int | None = None,
    ) -> None:
        ctx = mock.ssl_context(alpn=alpn)
        if cert is not None:
            ctx.load_cert_chain(cert[0], cert[1])
        raw = socket.create_connection(("127.0.0.1", port or mock.port), timeout=TIMEOUT)
        try:
            self.sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        except BaseException:
            raw.close()
            raise
        self.jwt = jwt
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""
        self.next_stream = 1
        self.settings: dict[int, int] = {}
        self.settings_frames = 0
        self.goaway: tuple[int, int, bytes] | None = None
        self.responses: dict[int, Response] = {}
        self.eof = False
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    @property
    def alpn(self) -> str | None:
        return self.sock.selected_alpn_protocol()

    def open_stream(self, headers: list[tuple[str, str]], body: bytes = b"") -> int:
        sid = self.next_stream
        self.next_stream += 2
        self.responses[sid] = Response()
        frame = HeadersFrame(sid)
        frame.data = self.encoder.encode(headers)
        frame.flags.add("END_HEADERS")
        frames: list[Frame] = [frame]
        if not body:
            frame.flags.add("END_STREAM")
        while body:
            chunk, body = body[:16384], body[16384:]
            data = DataFrame(sid, chunk)
            if not body:
                data.flags.add("END_STREAM")
            frames.append(data)
        self.sock.sendall(b"".join(f.serialize() for f in frames))
        return sid

    def _read_frame(self) -> Frame | None:
        while True:
            if len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) >= 9 + length:
                    frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                    self.buffer = self.buffer[9 + length :]
                    return frame
            data = self.sock.recv(65536)
            if not data:
                self.eof = True
                return None
            self.buffer += data

    def pump(self) -> bool:
        """Handle one frame from the server; False at end of stream."""
        frame = self._read_frame()
        if frame is None:
            return False
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.settings.update(frame.settings)
                self.settings_frames += 1
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                self.sock.sendall(ack.serialize())
        elif isinstance(frame, PingFrame):
            if "ACK" not in frame.flags:
                pong = PingFrame(0, frame.opaque_data)
                pong.flags.add("ACK")
                self.sock.sendall(pong.serialize())
        elif isinstance(frame, GoAwayFrame):
            self.goaway = (frame.last_stream_id, frame.error_code, frame.additional_data)
        elif isinstance(frame, HeadersFrame):
            resp = self.responses.setdefault(frame.stream_id, Response())
            for name, value in self.decoder.decode(frame.data):
                if name == ":status":
                    resp.status = int(value)
                else:
                    resp.headers[name] = value
            resp.arrived_after_goaway = self.goaway is not None
            resp.done = "END_STREAM" in frame.flags
        elif isinstance(frame, DataFrame):
            resp = self.responses.setdefault(frame.stream_id, Response())
            resp.body += frame.data
            resp.data_frames += 1
            resp.done = "END_STREAM" in frame.flags
            if frame.flow_controlled_length:
                self.sock.sendall(
                    WindowUpdateFrame(0, window_increment=frame.flow_controlled_length).serialize()
                    + WindowUpdateFrame(frame.stream_id, window_increment=frame.flow_controlled_length).serialize()
                )
        elif isinstance(frame, RstStreamFrame):
            resp = self.responses.setdefault(frame.stream_id, Response())
            resp.reset = frame.error_code
            resp.done = True
        return True

    def wait(self, *sids: int, timeout: float = TIMEOUT) -> list[Response]:
        deadline = time.monotonic() + timeout
        while not all(self.responses[s].done for s in sids):
            if time.monotonic() > deadline:
                raise AssertionError(f"no answer in time for streams {[s for s in sids if not self.responses[s].done]}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not self.pump():
                break
        return [self.responses[s] for s in sids]

    def wait_settings(self, count: int = 1, timeout: float = TIMEOUT) -> dict[int, int]:
        deadline = time.monotonic() + timeout
        while self.settings_frames < count:
            assert time.monotonic() < deadline, "no SETTINGS in time"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            assert self.pump(), "connection closed before SETTINGS"
        return self.settings

    def drain(self, timeout: float = TIMEOUT) -> None:
        """Read until the server closes the connection."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            assert time.monotonic() < deadline, "the server did not close the connection"
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            self.pump()

    def send(self, token: str = TOKEN, body: bytes = b'{"aps":{"alert":"hi"}}', **options: Any) -> Response:
        return self.wait(self.open_stream(apns_headers(token, jwt=self.jwt, **options), body))[0]


def apns_headers(
    token: str = TOKEN,
    *,
    jwt: str | None = None,
    topic: str | None = TOPIC,
    push_type: str | None = "alert",
    method: str = "POST",
    path: str | None = None,
    authorization: str | None = None,
    extra: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> list[tuple[str, str]]:
    headers = [
        (":method", method),
        (":scheme", "https"),
        (":path", path if path is not None else f"/3/device/{token}"),
        (":authority", "api.sandbox.push.apple.com"),
    ]
    if topic is not None:
        headers.append(("apns-topic", topic))
    if push_type is not None:
        headers.append(("apns-push-type", push_type))
    if authorization is not None:
        headers.append(("authorization", authorization))
    elif jwt is not None:
        headers.append(("authorization", f"bearer {jwt}"))
    return headers + list(extra)


def is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("KEYID00001", "TEAM000001")


@pytest.fixture(scope="module")
def other_key() -> SigningKey:
    return SigningKey.generate("KEYID00002", "TEAM000002")


@pytest.fixture(scope="module")
def mock_process(tmp_path_factory: pytest.TempPathFactory, key: SigningKey) -> Iterator[MockApnsProcess]:
    config = {"keys": [key.spec()], "tokens": token_table()}
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), config=config, client_certs="optional") as mock:
        yield mock


@pytest.fixture
def mock(mock_process: MockApnsProcess, key: SigningKey) -> MockApnsProcess:
    """The shared sandbox mock, reset to its initial state."""
    admin = mock_process.admin
    admin.reset_faults()
    admin.set_keys([key.spec()])
    admin.clear_tokens()
    admin.set_tokens(token_table())
    admin.clear_accepted()
    admin.clear_stats()
    return mock_process


@pytest.fixture
def client(mock: MockApnsProcess, key: SigningKey) -> Iterator[RawH2]:
    with RawH2(mock, jwt=key.token()) as c:
        yield c


# --------------------------------------------------------------------------------------------
# Transport and success


def test_success_is_one_headers_frame_with_apns_id_and_unique_id(client: RawH2) -> None:
    sent_id = str(uuid.uuid4())
    resp = client.send(extra=[("apns-id", sent_id)])
    assert resp.status == 200
    assert resp.done and resp.data_frames == 0 and resp.body == b""
    assert resp.headers["apns-id"] == sent_id
    assert is_uuid(resp.headers["apns-unique-id"])
    assert "content-type" not in resp.headers
    assert client.alpn == "h2"


def test_generated_apns_id_when_none_sent(client: RawH2) -> None:
    first, second = client.send(), client.send()
    assert first.status == second.status == 200
    assert is_uuid(first.headers["apns-id"]) and first.headers["apns-id"] != second.headers["apns-id"]


def test_upper_case_apns_id_is_accepted_and_echoed(client: RawH2) -> None:
    sent_id = str(uuid.uuid4()).upper()
    resp = client.send(extra=[("apns-id", sent_id)])
    assert resp.status == 200 and resp.headers["apns-id"] == sent_id


def test_http2_with_prior_knowledge_without_alpn(mock: MockApnsProcess, key: SigningKey) -> None:
    with RawH2(mock, jwt=key.token(), alpn=False) as c:
        assert c.alpn is None
        assert c.send().status == 200


def test_settings_advertise_apple_values(client: RawH2) -> None:
    settings = client.wait_settings()
    assert settings[MAX_CONCURRENT_STREAMS] == 1000
    assert settings[0x1] == 4096  # HEADER_TABLE_SIZE
    assert settings[0x5] == 16384  # MAX_FRAME_SIZE
    assert settings[0x6] == 8000  # MAX_HEADER_LIST_SIZE


def test_httpx_client_is_served(mock: MockApnsProcess, key: SigningKey) -> None:
    headers = {"apns-topic": TOPIC, "apns-push-type": "alert", "authorization": f"bearer {key.token()}"}
    with httpx.Client(http2=True, verify=mock.ssl_context(), timeout=TIMEOUT) as http:
        resp = http.post(f"{mock.url}/3/device/{TOKEN}", content=b'{"aps":{"alert":"x"}}', headers=headers)
    assert resp.http_version == "HTTP/2"
    assert resp.status_code == 200 and is_uuid(resp.headers["apns-id"])


def test_accepted_notification_is_recorded(mock: MockApnsProcess, client: RawH2, key: SigningKey) -> None:
    sent_id = str(uuid.uuid4())
    extra = [("apns-id", sent_id), ("apns-priority", "5"), ("apns-expiration", "0"), ("apns-collapse-id", "c1")]
    resp = client.send(body=b'{"aps":{"alert":"hi"},"k":1}', extra=extra)
    assert resp.status == 200
    [item] = mock.admin.accepted()
    assert item == {
        "token": TOKEN,
        "topic": TOPIC,
        "push_type": "alert",
        "priority": 5,
        "expiration": 0,
        "collapse_id": "c1",
        "apns_id": sent_id,
        "payload": {"aps": {"alert": "hi"}, "k": 1},
        "connection": item["connection"],
        "stream_id": 1,
        "auth": f"token:{key.key_id}",
        "worker": 0,
        "received_at_ns": item["received_at_ns"],
    }
    assert item["connection"] >= 1


# --------------------------------------------------------------------------------------------
# Validation, in Apple's (Pushy's) order


def _error(resp: Response) -> tuple[int | None, str | None]:
    assert resp.done
    if resp.status != 200:
        assert resp.headers["content-type"] == "application/json"
        assert resp.headers["apns-id"]
        assert resp.data_frames >= 1
    return resp.status, resp.reason


CASES: list[tuple[str, dict[str, Any], bytes | None, int, str]] = [
    ("bad apns-id", {"extra": [("apns-id", "not-a-uuid")]}, None, 400, "BadMessageId"),
    ("GET", {"method": "GET"}, b"", 405, "MethodNotAllowed"),
    ("no topic", {"topic": None}, None, 400, "MissingTopic"),
    ("collapse id of 65 bytes", {"extra": [("apns-collapse-id", "c" * 65)]}, None, 400, "BadCollapseId"),
    ("expiration not a number", {"extra": [("apns-expiration", "tomorrow")]}, None, 400, "BadExpirationDate"),
    ("priority 7", {"extra": [("apns-priority", "7")]}, None, 400, "BadPriority"),
    ("background at priority 10", {"push_type": "background", "extra": [("apns-priority", "10")]}, None, 400, "BadPriority"),
    ("unknown push type", {"push_type": "bogus"}, None, 400, "InvalidPushType"),
    ("no token", {"path": "/3/device/"}, None, 400, "MissingDeviceToken"),
    ("no token, no slash", {"path": "/3/device"}, None, 400, "MissingDeviceToken"),
    ("malformed token", {"path": "/3/device/xyz"}, None, 400, "BadDeviceToken"),
    ("short token", {"path": "/3/device/abcd"}, None, 400, "BadDeviceToken"),
    ("unknown token", {"token": UNKNOWN_TOKEN}, None, 400, "BadDeviceToken"),
    ("token of the other environment", {"token": PROD_TOKEN}, None, 400, "BadDeviceToken"),
    ("token for another topic", {"token": OTHER_TOKEN}, None, 400, "DeviceTokenNotForTopic"),
    ("voip push type, topic without .voip", {"token": TOKEN, "push_type": "voip"}, None, 400, "DeviceTokenNotForTopic"),
    ("liveactivity without suffix", {"push_type": "liveactivity"}, None, 400, "DeviceTokenNotForTopic"),
    ("other path", {"path": f"/3/other/{TOKEN}"}, None, 404, "BadPath"),
    ("other version", {"path": f"/4/device/{TOKEN}"}, None, 404, "BadPath"),
    ("duplicate topic", {"extra": [("apns-topic", TOPIC)]}, None, 400, "DuplicateHeaders"),
    ("no authorization", {"authorization": None, "jwt": None}, None, 403, "MissingProviderToken"),
    ("empty bearer", {"authorization": "bearer "}, None, 403, "MissingProviderToken"),
    ("not bearer", {"authorization": "basic abc"}, None, 403, "MissingProviderToken"),
    ("garbage token", {"authorization": "bearer not.a.jwt"}, None, 403, "InvalidProviderToken"),
    ("empty payload", {}, b"", 400, "PayloadEmpty"),
    ("payload not JSON", {}, b"hello", 400, "BadPayload"),
    ("payload a JSON array", {}, b"[1,2]", 400, "BadPayload"),
    ("payload of 4097 bytes", {}, b'{"a":"' + b"x" * 4089 + b'"}', 413, "PayloadTooLarge"),
    ("voip payload of 5121 bytes", {"token": VOIP_TOKEN, "topic": f"{TOPIC}.voip", "push_type": "voip"},
     b'{"a":"' + b"x" * 5113 + b'"}', 413, "PayloadTooLarge"),
]


@pytest.mark.parametrize(("name", "options", "body", "status", "reason"), CASES, ids=[c[0] for c in CASES])
def test_rejections(
    client: RawH2, key: SigningKey, name: str, options: dict[str, Any], body: bytes | None, status: int, reason: str
) -> None:
    options = dict(options)
    token = options.pop("token", TOKEN)
    jwt = options.pop("jwt", client.jwt)
    headers = apns_headers(token, jwt=jwt, **options)
    sid = client.open_stream(headers, b'{"aps":{"alert":"hi"}}' if body is None else body)
    [resp] = client.wait(sid)
    assert _error(resp) == (status, reason)


def test_rejection_counts_and_request_id(mock: MockApnsProcess, client: RawH2) -> None:
    sent_id = str(uuid.uuid4())
    resp = client.send(UNKNOWN_TOKEN, extra=[("apns-id", sent_id)])
    assert resp.headers["apns-id"] == sent_id
    assert json.loads(resp.body) == {"reason": "BadDeviceToken"}
    stats = mock.admin.stats()
    assert stats["requests"] == 1 and stats["accepted"] == 0
    assert stats["rejected"] == {"BadDeviceToken": 1}
    assert mock.admin.accepted() == []


def test_validation_order_puts_token_checks_before_auth(client: RawH2) -> None:
    # Pushy's order: an unknown token is reported even when the request has no provider token.
    resp = client.wait(client.open_stream(apns_headers(UNKNOWN_TOKEN), b"{}"))[0]
    assert _error(resp) == (400, "BadDeviceToken")


def test_unregistered_token_has_timestamp_in_ms(client: RawH2) -> None:
    resp = client.send(GONE_TOKEN)
    assert _error(resp) == (410, "Unregistered")
    assert json.loads(resp.body) == {"reason": "Unregistered", "timestamp": GONE_AT_MS}


def test_token_unregistered_in_the_future_still_works(client: RawH2) -> None:
    assert client.send(LATER_TOKEN).status == 200


def test_collapse_id_of_64_bytes_is_fine(client: RawH2) -> None:
    assert client.send(extra=[("apns-collapse-id", "c" * 64)]).status == 200


def test_payload_limits(client: RawH2) -> None:
    exactly_4096 = b'{"a":"' + b"x" * 4088 + b'"}'
    assert len(exactly_4096) == 4096
    assert client.send(body=exactly_4096).status == 200
    voip_5120 = b'{"a":"' + b"x" * 5112 + b'"}'
    assert client.send(VOIP_TOKEN, topic=f"{TOPIC}.voip", push_type="voip", body=voip_5120).status == 200
    voip_topic_no_type = client.send(VOIP_TOKEN, topic=f"{TOPIC}.voip", push_type=None, body=voip_5120)
    assert voip_topic_no_type.status == 200


def test_push_types_with_their_topic_suffixes(mock: MockApnsProcess, client: RawH2) -> None:
    suffixes = {
        "complication": ".complication",
        "controls": ".push-type.controls",
        "fileprovider": ".pushkit.fileprovider",
        "liveactivity": ".push-type.liveactivity",
        "location": ".location-query",
        "pushtotalk": ".voip-ptt",
        "voip": ".voip",
        "widgets": ".push-type.widgets",
    }
    mock.admin.set_tokens({TOKEN: [TOPIC, *(TOPIC + s for s in suffixes.values())]})
    for push_type, suffix in suffixes.items():
        assert client.send(topic=TOPIC + suffix, push_type=push_type).status == 200, push_type
    assert client.send(push_type="background", extra=[("apns-priority", "5")]).status == 200
    assert client.send(push_type="mdm").status == 200


# --------------------------------------------------------------------------------------------
# Provider tokens


def test_raw_and_der_signatures_are_both_accepted(mock: MockApnsProcess, key: SigningKey) -> None:
    for der in (False, True):
        jwt = key.token(der=der)
        signature = jwt.rsplit(".", 1)[1]
        assert (len(signature) == 86) is (not der)  # 64 raw bytes in base64url
        with RawH2(mock, jwt=jwt) as c:
            assert c.send().status == 200


@pytest.mark.parametrize(
    "variant", ["unknown kid", "bad signature", "wrong team", "alg HS256", "no iat", "signed by another key"]
)
def test_invalid_provider_tokens(mock: MockApnsProcess, key: SigningKey, other_key: SigningKey, variant: str) -> None:
    if variant == "unknown kid":
        jwt = key.token(header={"kid": "NOSUCHKEY1"})
    elif variant == "bad signature":
        head, claims, signature = key.token().split(".")
        jwt = f"{head}.{claims}.{signature[:-6]}AAAAAA"
    elif variant == "wrong team":
        jwt = key.token(claims={"iss": "OTHERTEAM1"})
    elif variant == "alg HS256":
        jwt = key.token(header={"alg": "HS256"})
    elif variant == "no iat":
        jwt = key.token(claims={"iat": None})
    else:
        jwt = SigningKey(key.key_id, key.team_id, other_key.private_key).token()
    with RawH2(mock, jwt=jwt) as c:
        assert _error(c.send()) == (403, "InvalidProviderToken")


def test_expired_provider_token(mock: MockApnsProcess, key: SigningKey) -> None:
    with RawH2(mock, jwt=key.token(iat=time.time() - 3601)) as c:
        assert _error(c.send()) == (403, "ExpiredProviderToken")
    with RawH2(mock, jwt=key.token(iat=time.time() - 3500)) as c:
        assert c.send().status == 200


def test_token_updates_within_20_minutes_are_refused(mock: MockApnsProcess, key: SigningKey) -> None:
    first, second = key.token(), key.token(iat=time.time() - 5)
    assert first != second
    with RawH2(mock, jwt=first) as c:
        assert c.send().status == 200
        c.jwt = second
        assert _error(c.send()) == (429, "TooManyProviderTokenUpdates")
        c.jwt = first
        assert c.send().status == 200  # the connection's current token keeps working
    mock.admin.set_faults(token_update_interval_s=0)
    with RawH2(mock, jwt=first) as c:
        assert c.send().status == 200
        c.jwt = second
        assert c.send().status == 200


def test_topic_scoped_key(mock: MockApnsProcess, key: SigningKey) -> None:
    mock.admin.set_keys([key.spec(topics=[OTHER_TOPIC])])
    with RawH2(mock, jwt=key.token()) as c:
        assert _error(c.send()) == (403, "InvalidProviderToken")
        assert c.send(OTHER_TOKEN, topic=OTHER_TOPIC).status == 200
    mock.admin.set_keys([key.spec(topics=[TOPIC])])
    with RawH2(mock, jwt=key.token()) as c:
        assert c.send().status == 200
        # The bundle ID covers its suffixed topics.
        assert c.send(VOIP_TOKEN, topic=f"{TOPIC}.voip", push_type="voip").status == 200


def test_second_team_on_a_connection_is_refused(mock: MockApnsProcess, key: SigningKey, other_key: SigningKey) -> None:
    mock.admin.set_keys([key.spec(), other_key.spec()])
    mock.admin.set_faults(token_update_interval_s=0)
    with RawH2(mock, jwt=key.token()) as c:
        assert c.send().status == 200
        c.jwt = other_key.token()
        assert _error(c.send()) == (403, "InvalidProviderToken")


def test_key_restricted_to_the_other_environment(mock: MockApnsProcess, key: SigningKey) -> None:
    mock.admin.set_keys([key.spec(environment="production")])
    with RawH2(mock, jwt=key.token()) as c:
        assert _error(c.send()) == (403, "BadEnvironmentKeyIdInToken")
    mock.admin.set_faults(bad_environment_key_reason="BadEnvironmentKeyInToken")
    with RawH2(mock, jwt=key.token()) as c:
        assert _error(c.send()) == (403, "BadEnvironmentKeyInToken")


# --------------------------------------------------------------------------------------------
# Certificate authentication


def _write_cert(folder: Path, name: str, pair: tuple[bytes, bytes]) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    cert.write_bytes(pair[0])
    key.write_bytes(pair[1])
    return cert, key


def test_client_certificate_auth(mock: MockApnsProcess, tmp_path: Path) -> None:
    cert = _write_cert(tmp_path, "app", issue_client_certificate(mock.dir, TOPIC, environment="sandbox"))
    with RawH2(mock, cert=cert) as c:
        assert c.send().status == 200  # no authorization header needed
        assert c.send(VOIP_TOKEN, topic=f"{TOPIC}.voip", push_type="voip").status == 200
        assert _error(c.send(topic=None)) == (400, "MissingTopic")  # three topics: apns-topic required
        assert _error(c.send(OTHER_TOKEN, topic=OTHER_TOPIC)) == (400, "TopicDisallowed")
        assert c.send(authorization="bearer ignored.with.certificates").status == 200
    auths = {item["auth"] for item in mock.admin.accepted()}
    assert auths == {"certificate"}


def test_certificate_for_the_other_environment(mock: MockApnsProcess, tmp_path: Path) -> None:
    cert = _write_cert(tmp_path, "prod", issue_client_certificate(mock.dir, TOPIC, environment="production"))
    with RawH2(mock, cert=cert) as c:
        assert _error(c.send()) == (403, "BadCertificateEnvironment")
    both = _write_cert(tmp_path, "both", issue_client_certificate(mock.dir, TOPIC, environment="both"))
    with RawH2(mock, cert=both) as c:
        assert c.send().status == 200


def test_voip_certificate_has_one_topic_so_apns_topic_may_be_omitted(mock: MockApnsProcess, tmp_path: Path) -> None:
    cert = _write_cert(tmp_path, "voip", issue_client_certificate(mock.dir, TOPIC, environment="sandbox", voip=True))
    with RawH2(mock, cert=cert) as c:
        assert c.send(VOIP_TOKEN, topic=None, push_type="voip").status == 200
        assert _error(c.send()) == (400, "TopicDisallowed")
    [item] = mock.admin.accepted()
    assert item["topic"] == f"{TOPIC}.voip"


def _assert_connection_refused(mock: MockApnsProcess, cert: tuple[Path, Path]) -> None:
    """The server drops the connection (TLS 1.3 reports a bad client certificate after the
    client's handshake is done, so this shows on the first read as an alert or end of stream)."""
    try:
        with RawH2(mock, cert=cert) as c:
            resp = c.send()
    except (ssl.SSLError, ConnectionError):
        return
    assert not resp.done and c.eof


def test_expired_certificate_is_refused(mock: MockApnsProcess, tmp_path: Path) -> None:
    cert = _write_cert(tmp_path, "old", issue_client_certificate(mock.dir, TOPIC, environment="sandbox", expired=True))
    _assert_connection_refused(mock, cert)
    assert mock.admin.stats()["requests"] == 0


def test_certificate_from_another_ca_is_refused(mock: MockApnsProcess, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    cert = _write_cert(tmp_path, "stranger", issue_client_certificate(stranger, TOPIC, environment="sandbox"))
    _assert_connection_refused(mock, cert)


# --------------------------------------------------------------------------------------------
# Faults


def test_max_concurrent_streams_is_advertised_and_updated(mock: MockApnsProcess, key: SigningKey) -> None:
    with RawH2(mock, jwt=key.token()) as old:
        assert old.wait_settings()[MAX_CONCURRENT_STREAMS] == 1000
        mock.admin.set_faults(max_concurrent_streams=7)
        assert old.wait_settings(2)[MAX_CONCURRENT_STREAMS] == 7  # pushed to open connections
        with RawH2(mock, jwt=key.token()) as new:
            assert new.wait_settings()[MAX_CONCURRENT_STREAMS] == 7


def test_streams_over_the_limit_are_refused(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(max_concurrent_streams=2, stall=True)
    client.wait_settings(2)  # the update is acknowledged before the streams go out
    sids = [client.open_stream(apns_headers(jwt=client.jwt), b'{"aps":{}}') for _ in range(3)]
    [third] = client.wait(sids[2])
    assert third.reset == REFUSED_STREAM
    assert mock.admin.stats()["stalled"] == 2
    mock.admin.set_faults(stall=False)
    assert [r.status for r in client.wait(*sids[:2])] == [200, 200]
    stats = mock.admin.stats()
    assert stats["refused_streams"] == 1
    assert stats["max_concurrent_streams_observed"] == 2


def test_one_stream_until_a_valid_token(mock: MockApnsProcess, key: SigningKey) -> None:
    mock.admin.set_faults(one_stream_until_valid_token=True)
    with RawH2(mock, jwt=key.token()) as c:
        assert c.wait_settings()[MAX_CONCURRENT_STREAMS] == 1
        assert c.send().status == 200
        assert c.wait_settings(2)[MAX_CONCURRENT_STREAMS] == 1000


def test_goaway_after_n_streams_answers_up_to_last_stream_id(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(goaway_after_streams=3, latency_ms=200)
    sids = [client.open_stream(apns_headers(jwt=client.jwt), b'{"aps":{}}') for _ in range(5)]
    responses = client.wait(*sids)
    assert client.goaway is not None
    last_stream_id, error_code, debug = client.goaway
    assert last_stream_id == sids[2] and error_code == 0
    assert json.loads(debug) == {"reason": "Shutdown"}
    for resp in responses[:3]:
        assert resp.status == 200 and resp.arrived_after_goaway
    for resp in responses[3:]:
        assert resp.status is None and resp.reset == REFUSED_STREAM
    client.drain()  # then the server closes the connection
    assert len(mock.admin.accepted()) == 3
    assert mock.admin.stats()["goaways_sent"] == 1


def test_goaway_reason_is_configurable(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(goaway_after_streams=1, goaway_reason="ServiceUnavailable")
    assert client.send().status == 200
    client.drain()
    assert client.goaway is not None and json.loads(client.goaway[2]) == {"reason": "ServiceUnavailable"}


def test_reset_after_n_streams(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(reset_after_streams=2)
    assert client.send().status == 200
    assert client.send().status == 200
    with pytest.raises((ConnectionError, ssl.SSLError, AssertionError, OSError)):
        resp = client.send()
        assert resp.done, "no answer expected"
    assert client.goaway is None
    assert mock.admin.stats()["resets"] == 1
    assert len(mock.admin.accepted()) == 2


def test_429_and_503_ratios_are_deterministic(mock: MockApnsProcess, key: SigningKey) -> None:
    def run() -> list[int | None]:
        mock.admin.set_faults(ratio_429=0.3, ratio_503=0.2, seed=42)
        with RawH2(mock, jwt=key.token()) as c:
            return [c.send().status for _ in range(200)]

    first, second = run(), run()
    assert first == second
    assert set(first) == {200, 429, 503}
    assert 35 <= first.count(429) <= 85 and 20 <= first.count(503) <= 60
    rejected = mock.admin.stats()["rejected"]
    assert rejected["TooManyRequests"] == 2 * first.count(429)
    assert rejected["ServiceUnavailable"] == 2 * first.count(503)


def test_all_429(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(ratio_429=1.0)
    assert _error(client.send()) == (429, "TooManyRequests")
    mock.admin.set_faults(ratio_429=0.0, ratio_503=1.0)
    assert _error(client.send()) == (503, "ServiceUnavailable")


def test_latency(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(latency_ms=300)
    started = time.monotonic()
    assert client.send().status == 200
    assert time.monotonic() - started >= 0.29


def test_stall_holds_answers_until_released(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(stall=True)
    sid = client.open_stream(apns_headers(jwt=client.jwt), b'{"aps":{}}')
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        client.sock.settimeout(0.1)
        try:
            client.pump()
        except TimeoutError:
            pass
    assert not client.responses[sid].done
    assert mock.admin.stats()["stalled"] == 1
    mock.admin.set_faults(stall=False)
    assert client.wait(sid)[0].status == 200
    assert mock.admin.stats()["stalled"] == 0


def test_accept_any_token(mock: MockApnsProcess, client: RawH2) -> None:
    mock.admin.set_faults(accept_any_token=True)
    assert client.send(UNKNOWN_TOKEN).status == 200
    assert _error(client.send(GONE_TOKEN)) == (410, "Unregistered")  # registered tokens keep their state
    assert _error(client.send(path="/3/device/abcd")) == (400, "BadDeviceToken")
    mock.admin.set_faults(strict_token_length=False)
    assert client.send(path="/3/device/abcd").status == 200


# --------------------------------------------------------------------------------------------
# Admin API


def test_admin_state(mock: MockApnsProcess, key: SigningKey) -> None:
    state = mock.admin.state()
    assert state["environment"] == "sandbox" and state["workers"] == 1
    assert state["faults"] == DEFAULT_FAULTS
    assert state["accept_any_token"] is False
    [k] = state["keys"]
    assert k["key_id"] == key.key_id and k["team_id"] == key.team_id and k["topics"] is None
    assert state["tokens"][GONE_TOKEN] == {"topics": [TOPIC], "unregistered_at_ms": GONE_AT_MS, "environment": None}


def test_admin_keys_replace_and_accept_private_keys(mock: MockApnsProcess, key: SigningKey, other_key: SigningKey) -> None:
    spec = dict(other_key.spec(topics=[TOPIC]), public_key_pem=other_key.private_key_pem)
    state = mock.admin.set_keys([spec])
    assert [k["key_id"] for k in state["keys"]] == [other_key.key_id]
    assert state["keys"][0]["public_key_pem"] == other_key.public_key_pem
    with RawH2(mock, jwt=key.token()) as c:
        assert _error(c.send()) == (403, "InvalidProviderToken")  # replaced, not merged
    with RawH2(mock, jwt=other_key.token()) as c:
        assert c.send().status == 200
    mock.admin.add_key(key)
    assert {k["key_id"] for k in mock.admin.state()["keys"]} == {key.key_id, other_key.key_id}


def test_admin_tokens_merge_and_delete(mock: MockApnsProcess, client: RawH2) -> None:
    new = "9" * 64
    state = mock.admin.set_tokens({new: [TOPIC], TOKEN: None})
    assert new in state["tokens"] and TOKEN not in state["tokens"] and GONE_TOKEN in state["tokens"]
    assert client.send(new).status == 200
    assert _error(client.send(TOKEN)) == (400, "BadDeviceToken")
    mock.admin.set_tokens({TOKEN: {"topics": [TOPIC], "unregistered_at_ms": 1}})
    assert json.loads(client.send(TOKEN).body) == {"reason": "Unregistered", "timestamp": 1}
    assert mock.admin.clear_tokens()["tokens"] == {}


def test_admin_rejects_bad_input(mock: MockApnsProcess) -> None:
    bad_calls = [
        ("PUT", "/_mock/faults", {"no_such_fault": 1}),
        ("PUT", "/_mock/faults", {"ratio_429": 2}),
        ("PUT", "/_mock/faults", {"ratio_429": 0.6, "ratio_503": 0.6}),
        ("PUT", "/_mock/keys", [{"key_id": "X"}]),
        ("PUT", "/_mock/keys", [{"key_id": "X", "team_id": "T", "public_key_pem": "nope"}]),
        ("PUT", "/_mock/tokens", {"not-hex": [TOPIC]}),
        ("PUT", "/_mock/tokens", {TOKEN: {"topics": "x"}}),
    ]
    for method, path, body in bad_calls:
        with pytest.raises(MockAdminError) as info:
            mock.admin(method, path, body)
        assert info.value.status == 400 and info.value.error
    with pytest.raises(MockAdminError) as info:
        mock.admin("GET", "/_mock/nothing")
    assert info.value.status == 404
    with pytest.raises(MockAdminError) as info:
        mock.admin("POST", "/_mock/stats")
    assert info.value.status == 405
    assert mock.admin.state()["faults"] == DEFAULT_FAULTS  # nothing half-applied


def test_admin_faults_merge_and_reset(mock: MockApnsProcess) -> None:
    faults = mock.admin.set_faults(latency_ms=5)["faults"]
    faults = mock.admin.set_faults(ratio_503=0.1)["faults"]
    assert faults["latency_ms"] == 5 and faults["ratio_503"] == 0.1
    assert mock.admin.reset_faults()["faults"] == DEFAULT_FAULTS


def test_admin_accepted_order_and_clear(mock: MockApnsProcess, key: SigningKey) -> None:
    with RawH2(mock, jwt=key.token()) as a, RawH2(mock, jwt=key.token()) as b:
        for i in range(3):
            assert a.send(body=b'{"n":%d}' % (2 * i)).status == 200
            assert b.send(body=b'{"n":%d}' % (2 * i + 1)).status == 200
    items = mock.admin.accepted()
    assert [item["payload"]["n"] for item in items] == list(range(6))
    assert len({item["connection"] for item in items}) == 2
    assert [item["stream_id"] for item in items[::2]] == [1, 3, 5]
    assert mock.admin.clear_accepted() == 6
    assert mock.admin.accepted() == []


def test_admin_stats(mock: MockApnsProcess, key: SigningKey) -> None:
    with RawH2(mock, jwt=key.token()) as c:
        c.wait_settings()
        sids = [c.open_stream(apns_headers(jwt=c.jwt), b'{"aps":{}}') for _ in range(4)]
        c.wait(*sids)
        c.send(UNKNOWN_TOKEN)
        c.send(GONE_TOKEN)
    stats = mock.admin.stats()
    assert stats["requests"] == 6 and stats["accepted"] == 4
    assert stats["rejected"] == {"BadDeviceToken": 1, "Unregistered": 1}
    assert stats["connections_opened"] >= 1
    assert 1 <= stats["max_concurrent_streams_observed"] <= 4
    assert all(isinstance(v, int) for v in stats["max_concurrent_streams"].values())
    mock.admin.clear_stats()
    assert mock.admin.stats()["requests"] == 0


async def test_async_admin_client_on_trio(mock: MockApnsProcess) -> None:
    async with mock.async_admin() as admin:
        state = await admin.set_faults(latency_ms=1)
        assert state["faults"]["latency_ms"] == 1
        assert (await admin.stats())["workers"] == 1


# --------------------------------------------------------------------------------------------
# Other processes: production, workers, bad configuration


def test_production_environment(tmp_path: Path, key: SigningKey) -> None:
    config = {"keys": [key.spec()], "tokens": {TOKEN: [TOPIC], PROD_TOKEN: {"topics": [TOPIC], "environment": "sandbox"}}}
    with MockApnsProcess(tmp_path / "prod", environment="production", config=config) as mock:
        with RawH2(mock, jwt=key.token()) as c:
            resp = c.send()
            assert resp.status == 200 and "apns-unique-id" not in resp.headers
            assert _error(c.send(PROD_TOKEN)) == (400, "BadDeviceToken")
        assert mock.admin.state()["environment"] == "production"
    assert mock.returncode == 0


def test_two_workers_share_the_port_and_the_state(tmp_path: Path, key: SigningKey) -> None:
    config = {"keys": [key.spec()], "tokens": {TOKEN: [TOPIC]}}
    with MockApnsProcess(tmp_path / "workers", config=config, workers=2) as mock:
        late = "8" * 64
        mock.admin.set_tokens({late: [TOPIC]})  # applied by one worker, relayed to the other
        connections = [RawH2(mock, jwt=key.token()) for _ in range(40)]
        try:
            for c in connections:
                assert c.send().status == 200
                assert c.send(late).status == 200
        finally:
            for c in connections:
                c.close()
        items = mock.admin.accepted()
        assert len(items) == 80
        assert {item["worker"] for item in items} == {0, 1}
        assert len({item["connection"] for item in items}) == 40
        stats = mock.admin.stats()
        assert stats["workers"] == 2 and stats["requests"] == 80 and stats["accepted"] == 80
        mock.admin.set_faults(ratio_429=1.0)
        for _ in range(6):
            with RawH2(mock, jwt=key.token()) as c:
                assert _error(c.send()) == (429, "TooManyRequests")
        assert mock.admin.clear_accepted() == 80
        assert mock.admin.accepted() == []
    assert mock.returncode == 0


def test_bad_config_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="bad --config"):
        MockApnsProcess(tmp_path / "bad", config={"keys": "nope"}).start()


def test_state_directory_keeps_its_ca(tmp_path: Path) -> None:
    with MockApnsProcess(tmp_path / "ca") as first:
        ca = first.ca_file.read_bytes()
    with MockApnsProcess(tmp_path / "ca", hostnames=["apns.test"]) as second:
        assert second.ca_file.read_bytes() == ca
        with RawH2(second) as c:
            assert _error(c.send()) == (400, "BadDeviceToken")


async def test_async_context_manager_on_trio(tmp_path: Path, key: SigningKey) -> None:
    async with MockApnsProcess(tmp_path / "async", config={"keys": [key.spec()]}) as mock:
        assert mock.running and mock.port > 0
        async with mock.async_admin() as admin:
            state = await admin.add_key(SigningKey.generate("KEYID00009", "TEAM000009"))
            assert {k["key_id"] for k in state["keys"]} == {key.key_id, "KEYID00009"}
    assert not mock.running and mock.returncode == 0
