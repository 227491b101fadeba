"""The mock APNs' connections (`plugins.apns.mock`): what Apple does with a connection and with
a request, over the mocks' HTTP/2 server connection (`plugins._mock_h2`). Here are the stream
refusals and the injected faults (GOAWAY, TCP reset, stall, latency) and the request checks, in
Apple's order (the docstring of `plugins.apns.mock` lists them).
"""

from __future__ import annotations

import random
import re
import ssl
import time
from typing import Any

import h2.events
import msgspec
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.stream import StreamClosedBy
from hyperframe.frame import Frame, HeadersFrame, RstStreamFrame

from plugins._mock_h2 import H2_CONFIG, H2ServerConnection, Headers, ServerH2Connection, Stream
from plugins.apns._mock_auth import PUSH_TYPE_SUFFIX, CertInfo
from plugins.apns._mock_state import Accepted, App

__all__ = ["Connection", "Response"]

_PRIORITIES = frozenset({b"10", b"5", b"1"})
_PAYLOAD_LIMIT = 4096
_VOIP_PAYLOAD_LIMIT = 5120
_UUID_RE = re.compile(rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ECHOABLE_RE = re.compile(rb"[\x21-\x7e]{1,128}")
_TOKEN_RE = re.compile(rb"[0-9a-fA-F]{64}")
_ANY_TOKEN_RE = re.compile(rb"(?:[0-9a-fA-F]{2})+")
_STATUS = {code: str(code).encode() for code in (200, 400, 403, 404, 405, 410, 413, 429, 500, 503)}

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

#: An answer: (status, reason or None for 200, apns-id, a 410's timestamp, a 200's record).
Response = tuple[int, bytes | None, bytes, int | None, Accepted | None]

_ids = random.Random()


def _new_id() -> bytes:
    """A random (version 4) UUID in canonical lower-case form (from a seeded PRNG: a mock's
    ids need not be unguessable, and os.urandom cost 8% of the mock's time)."""
    n = _ids.getrandbits(128) & ~(0xF << 76 | 0x3 << 62) | 0x4 << 76 | 0x2 << 62
    h = b"%032x" % n
    return b"%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


class _Refused(Exception):
    """A request APNs refuses: the answer's status and reason (``timestamp``: a 410's, in ms)."""

    def __init__(self, status: int, reason: bytes, timestamp: int | None = None) -> None:
        self.status = status
        self.reason = reason
        self.timestamp = timestamp


def _header_map(headers: Headers) -> tuple[dict[bytes, bytes], bool]:
    """The headers by name (the last of each), and whether a name came twice."""
    h: dict[bytes, bytes] = {}
    duplicate = False
    for name, value in headers:
        if name in h:
            duplicate = True
        h[name] = value
    return h, duplicate


def _is_admin(headers: Headers) -> bool:
    for name, value in headers:
        if name == b":path":
            return value.startswith(b"/_mock/")
    return False


class _H2Connection(ServerH2Connection):
    """The mock's h2 connection refuses streams over the limit (and above a GOAWAY's last
    stream id) with RST_STREAM(REFUSED_STREAM), as APNs does, instead of failing the whole
    connection."""

    def __init__(self, app: App, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.refuse_above: int | None = None

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        sid = frame.stream_id
        if sid not in self.streams and (
            (self.refuse_above is not None and sid > self.refuse_above)
            or len(self.unanswered) >= self.local_settings.max_concurrent_streams
        ):
            try:
                self.decoder.decode(frame.data, raw=True)  # keep HPACK state in step
            except Exception as exc:
                raise ProtocolError(f"bad header block: {exc}") from exc
            self.highest_inbound_stream_id = max(self.highest_inbound_stream_id, sid)
            self._closed_streams[sid] = StreamClosedBy.SEND_RST_STREAM
            rst = RstStreamFrame(sid)
            rst.error_code = ErrorCodes.REFUSED_STREAM
            self.app.n_refused += 1
            frames: list[Frame] = [rst]
            return frames, []
        return super()._receive_headers_frame(frame)


class Connection(H2ServerConnection):
    """One client connection of the mock APNs."""

    app: App
    h2: _H2Connection | None
    initial_window_size = 65535
    max_header_list_size = 8000
    max_kept_body = 64 * 1024

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.cert: CertInfo | None = None
        self.nstreams = 0
        self.max_open = 0
        self.goaway_last: int | None = None
        self.team: str | None = None
        self.jwt_current: bytes | None = None
        self.jwt_since = 0.0
        self.validated = False

    # -- the connection

    def opened(self, sslobj: ssl.SSLObject | None) -> None:
        if sslobj is not None:
            if sslobj.selected_alpn_protocol() not in (None, "h2"):
                self.transport.close()
                self.closed = True
                return
            der = sslobj.getpeercert(binary_form=True)
            if der:
                self.cert = self.app.cert_info(der)
        self.start_h2()
        self.app.conns.add(self)

    def new_h2(self) -> _H2Connection:
        return _H2Connection(self.app, config=H2_CONFIG)

    def stream_limit(self) -> int:
        f = self.app.f
        if f.one_stream_until_valid_token and self.cert is None and not self.validated:
            return 1
        return f.max_concurrent_streams

    def drop(self) -> None:
        self.abort()

    def connection_closed(self) -> None:
        self.app.closed_max_streams[str(self.id)] = self.max_open

    def goaway(self, last_stream_id: int, reason: str) -> None:
        """GOAWAY with JSON debug data ``{"reason": reason}``; later streams are refused."""
        assert self.h2 is not None
        self.goaway_last = last_stream_id
        self.h2.refuse_above = last_stream_id
        self.send_goaway(last_stream_id, _json_encode({"reason": reason}))
        self.app.n_goaways += 1

    def shutdown(self) -> None:
        """GOAWAY ``Shutdown``, answer what is answerable, then close."""
        if self.closed or self.h2 is None:
            return
        if self.goaway_last is None:
            self.goaway(self.h2.highest_inbound_stream_id, "Shutdown")
        else:
            self.close_if_drained()

    # -- streams

    def request_started(self, sid: int, headers: Headers) -> None:
        conn = self.h2
        assert conn is not None
        if self.goaway_last is not None and sid > self.goaway_last:
            # Arrived in the same read as the GOAWAY's stream: refuse it like the later ones.
            self.app.n_refused += 1
            self.refuse(sid)
            return
        admin = _is_admin(headers)
        self.streams[sid] = Stream(headers, keep_body=admin)  # admin bodies are kept whole
        self.max_open = max(self.max_open, len(conn.unanswered))
        if not admin:
            self._stream_faults(sid)


    def request_complete(self, sid: int, stream: Stream) -> None:
        if stream.keep_body:  # an admin request: only those keep their whole body
            h = dict(stream.headers)
            self.start_admin(sid, h.get(b":method", b""), h.get(b":path", b""), stream.body())
            return
        app = self.app
        app.n_requests += 1
        resp = self._check(sid, stream.headers, stream.body(), stream.size)
        f = app.f
        if f.stall:
            app.stalled.append((self, sid, resp))
        elif f.latency_ms:
            self.later(f.latency_ms / 1000.0, self.answer, sid, resp)
        else:
            self.answer(sid, resp)

    def answer(self, sid: int, resp: Response) -> None:
        """Success: HEADERS with END_STREAM; an error: HEADERS, then ``{"reason": ...}``."""
        status, reason, apns_id, timestamp, record = resp
        app = self.app
        if reason is None:
            headers = [(b":status", b"200"), (b"apns-id", apns_id)]
            if app.sandbox:
                headers.append((b"apns-unique-id", _new_id()))
            if self.send_response(sid, headers):
                app.n_accepted += 1
                if record is not None and app.f.record_accepted:
                    app.accepted.append(record)
            return
        if timestamp is None:
            body = b'{"reason":"%s"}' % reason
        else:
            body = b'{"reason":"%s","timestamp":%d}' % (reason, timestamp)
        headers = [(b":status", _STATUS[status]), (b"content-type", b"application/json"), (b"apns-id", apns_id)]
        if self.send_response(sid, headers, body):
            name = reason.decode()
            app.rejected[name] = app.rejected.get(name, 0) + 1

    # -- the APNs checks

    def _check(self, sid: int, headers: Headers, body: bytes, size: int) -> Response:
        h, duplicate = _header_map(headers)
        apns_id = h.get(b"apns-id")
        if apns_id is None:
            apns_id = _new_id()
        elif _UUID_RE.fullmatch(apns_id) is None:
            echo = apns_id if _ECHOABLE_RE.fullmatch(apns_id) else _new_id()
            return (400, b"DuplicateHeaders" if duplicate else b"BadMessageId", echo, None, None)
        try:
            if duplicate:
                raise _Refused(400, b"DuplicateHeaders")
            topic = self._check_headers(h)
            token = self._check_device(h, topic)
            auth = self._check_auth(h, topic)
            self._check_payload(h, topic, body, size)
            self._draw_fault()
        except _Refused as refused:
            return (refused.status, refused.reason, apns_id, refused.timestamp, None)
        record: Accepted | None = None
        if self.app.f.record_accepted:
            record = (
                token,
                topic,
                h.get(b"apns-push-type"),
                h.get(b"apns-priority"),
                h.get(b"apns-expiration"),
                h.get(b"apns-collapse-id"),
                apns_id,
                body,
                self.id,
                sid,
                auth,
                time.time_ns(),
            )
        return (200, None, apns_id, None, record)

    def _check_headers(self, h: dict[bytes, bytes]) -> bytes:
        """Method, topic, collapse id, expiration, priority, push type; returns the topic."""
        if h.get(b":method") != b"POST":
            raise _Refused(405, b"MethodNotAllowed")
        cert = self.cert
        topic = h.get(b"apns-topic")
        if topic is None:
            if cert is None or len(cert.topics) != 1:
                raise _Refused(400, b"MissingTopic")
            topic = cert.topics[0]
        collapse = h.get(b"apns-collapse-id")
        if collapse is not None and len(collapse) > 64:
            raise _Refused(400, b"BadCollapseId")
        expiration = h.get(b"apns-expiration")
        if expiration is not None and not expiration.isdigit():
            raise _Refused(400, b"BadExpirationDate")
        priority = h.get(b"apns-priority")
        if priority is not None and priority not in _PRIORITIES:
            raise _Refused(400, b"BadPriority")
        push_type = h.get(b"apns-push-type")
        if push_type is not None:
            if push_type not in PUSH_TYPE_SUFFIX:
                raise _Refused(400, b"InvalidPushType")
            if push_type == b"background" and priority == b"10":
                raise _Refused(400, b"BadPriority")
        return topic

    def _check_device(self, h: dict[bytes, bytes], topic: bytes) -> bytes:
        """Path, device token, its registration, the topic's push-type suffix; returns the token."""
        app = self.app
        path = h.get(b":path", b"")
        if not path.startswith(b"/3/device") or (len(path) > 9 and path[9:10] != b"/"):
            raise _Refused(404, b"BadPath")
        token = path[10:]
        if not token:
            raise _Refused(400, b"MissingDeviceToken")
        if (_TOKEN_RE if app.f.strict_token_length else _ANY_TOKEN_RE).fullmatch(token) is None:
            raise _Refused(400, b"BadDeviceToken")
        token = token.lower()
        info = app.tokens.get(token)
        if info is None:
            if not app.f.accept_any_token:
                raise _Refused(400, b"BadDeviceToken")
        else:
            if info.environment is not None and info.environment != app.environment:
                raise _Refused(400, b"BadDeviceToken")
            gone = info.unregistered_at_ms
            if gone is not None and gone <= time.time() * 1000:
                raise _Refused(410, b"Unregistered", gone)
            if topic not in info.topics:
                raise _Refused(400, b"DeviceTokenNotForTopic")
        push_type = h.get(b"apns-push-type")
        if push_type is not None:
            suffix = PUSH_TYPE_SUFFIX[push_type]
            if suffix is not None and not topic.endswith(suffix):
                raise _Refused(400, b"DeviceTokenNotForTopic")
        return token

    def _check_auth(self, h: dict[bytes, bytes], topic: bytes) -> str:
        """The connection's client certificate, else the provider token; returns the auth label."""
        cert = self.cert
        if cert is None:
            return self._check_provider_token(h, topic)
        if self.app.environment not in cert.environments:
            raise _Refused(403, b"BadCertificateEnvironment")
        if topic not in cert.topics:
            raise _Refused(400, b"TopicDisallowed")
        return "certificate"

    def _check_provider_token(self, h: dict[bytes, bytes], topic: bytes) -> str:
        app = self.app
        f = app.f
        authorization = h.get(b"authorization")
        if authorization is None or authorization[:6].lower() != b"bearer":
            raise _Refused(403, b"MissingProviderToken")
        jwt = authorization[6:].strip()
        if not jwt:
            raise _Refused(403, b"MissingProviderToken")
        entry = app.jwt_cache.get(jwt)
        if entry is None:
            entry = app.verify_jwt(jwt)
        reason, key, iat = entry
        if reason is not None:
            raise _Refused(403, reason)
        assert key is not None
        if key.environment is not None and key.environment != app.environment:
            raise _Refused(403, f.bad_environment_key_reason.encode())
        if self.team is None:
            self.team = key.team_id
        elif key.team_id != self.team:
            raise _Refused(403, b"InvalidProviderToken")
        now = time.time()
        if now - iat > f.token_max_age_s:
            raise _Refused(403, b"ExpiredProviderToken")
        if jwt != self.jwt_current:
            if self.jwt_current is not None and now - self.jwt_since < f.token_update_interval_s:
                raise _Refused(429, b"TooManyProviderTokenUpdates")
            self.jwt_current = jwt
            self.jwt_since = now
        if key.topics is not None and not key.covers(topic):
            raise _Refused(403, b"InvalidProviderToken")
        if not self.validated:
            self.validated = True
            if f.one_stream_until_valid_token:
                self.update_stream_limit()
        return "token:" + key.key_id

    def _check_payload(self, h: dict[bytes, bytes], topic: bytes, body: bytes, size: int) -> None:
        if size == 0:
            raise _Refused(400, b"PayloadEmpty")
        push_type = h.get(b"apns-push-type")
        voip = push_type == b"voip" or (push_type is None and topic.endswith(b".voip"))
        if size > (_VOIP_PAYLOAD_LIMIT if voip else _PAYLOAD_LIMIT):
            raise _Refused(413, b"PayloadTooLarge")
        try:
            doc = _json_decode(body)
        except msgspec.DecodeError:
            doc = None
        if type(doc) is not dict:
            raise _Refused(400, b"BadPayload")

    def _draw_fault(self) -> None:
        """``ratio_429`` and ``ratio_503``: one draw for an otherwise accepted request."""
        f = self.app.f
        if f.ratio_429 or f.ratio_503:
            draw = self.app.rng.random()
            if draw < f.ratio_429:
                raise _Refused(429, b"TooManyRequests")
            if draw < f.ratio_429 + f.ratio_503:
                raise _Refused(503, b"ServiceUnavailable")
