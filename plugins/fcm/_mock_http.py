"""The mock FCM's connections (`plugins.fcm.mock`): HTTP/2 over the mocks' server connection
(`plugins._mock_h2`), or HTTP/1.1 with keep-alive (h11), chosen by ALPN or, without ALPN, by
the first bytes (the HTTP/2 preface or not). Both hand each request to `plugins.fcm._mock_api`.
Here are the injected connection faults too: GOAWAY and TCP reset after a number of HTTP/2
send streams, and stall (answers held), as the mock APNs has them (`plugins.apns._mock_server`).
"""

from __future__ import annotations

import ssl
from typing import Any

import h11
import h2.events
from h2.connection import ConnectionInputs
from h2.errors import ErrorCodes
from h2.exceptions import TooManyStreamsError
from hyperframe.frame import Frame, GoAwayFrame, HeadersFrame

from plugins._mock_h2 import H2_CONFIG, H2ServerConnection, Headers, ServerH2Connection, Stream
from plugins.fcm._mock_api import MAX_BODY, REASONS, STATUS_BYTES, Reply, handle
from plugins.fcm._mock_state import App

__all__ = ["Connection"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _is_send(headers: Headers) -> bool:
    """Whether a request is for FCM's API (not the token endpoint's, nor the admin API's)."""
    for name, value in headers:
        if name == b":path":
            return not value.startswith((b"/_mock/", b"/token"))
    return True


class _H2Connection(ServerH2Connection):
    """Names the reason in the GOAWAY it sends when a client opens too many streams (as FCM
    does: PROTOCOL_ERROR ``exceeded_max_concurrent_streams``)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.goaway_debug = b""

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[h2.events.Event]]:
        try:
            return super()._receive_headers_frame(frame)
        except TooManyStreamsError:
            self.goaway_debug = b"exceeded_max_concurrent_streams"
            raise

    def _terminate_connection(self, error_code: ErrorCodes) -> None:
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.highest_inbound_stream_id
        frame.error_code = error_code
        frame.additional_data = self.goaway_debug
        self.state_machine.process_input(ConnectionInputs.SEND_GOAWAY)
        self._prepare_for_sending([frame])


class Connection(H2ServerConnection):
    """One client connection: HTTP/2 or HTTP/1.1, chosen by ALPN or by the first bytes."""

    app: App
    h2: _H2Connection | None
    initial_window_size = 1048576
    max_header_list_size = 65536
    max_kept_body = MAX_BODY

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.protocol = ""
        self.h11: h11.Connection | None = None
        self.pending = b""
        self.h1_request: Stream | None = None
        self.h1_busy = False
        #: HTTP/2 send streams opened (the stream faults count them).
        self.nstreams = 0
        #: The last stream id of the GOAWAY sent (``goaway_after_streams``), once sent.
        self.goaway_last: int | None = None

    # -- both protocols

    def opened(self, sslobj: ssl.SSLObject | None) -> None:
        self.app.conns.add(self)
        alpn = sslobj.selected_alpn_protocol() if sslobj is not None else None
        if alpn == "h2":
            self._start_h2()
        elif alpn == "http/1.1":
            self._start_h1()

    def eof_received(self) -> bool | None:
        if self.h11 is not None and not self.closed:
            self.h11.receive_data(b"")
            self._h1_next()
        return None

    def received(self, data: bytes) -> None:
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
        if self.h2 is not None:
            self.h2_received(data)
        else:
            self._h1_received(data)

    def _complete(self, ref: int | None, stream: Stream) -> None:
        """A whole request (``ref``: its HTTP/2 stream, None over HTTP/1.1): the admin API's, or
        the provider's (answered at once, or after ``latency_ms``)."""
        method = path = auth = None
        for name, value in stream.headers:
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b"authorization":
                auth = value
        method, path, body = method or b"", path or b"", stream.body()
        if path.startswith(b"/_mock/"):
            self.start_admin(ref, method, path, body)
            return
        app = self.app
        reply = handle(app, self.protocol, self.id, method, path, auth, body, stream.size)
        if reply.late and app.f.stall:
            app.stalled.append((self, ref, reply))
        elif reply.late and app.f.latency_ms:
            self.later(app.f.latency_ms / 1000.0, self._send, ref, reply)
        else:
            self._send(ref, reply)

    def answer_late(self, ref: int | None, reply: Reply) -> None:
        """Answer a request held back (``stall``), outside a read."""
        self._send(ref, reply)
        if ref is not None:
            self.settle()

    def _send(self, ref: int | None, reply: Reply) -> None:
        if ref is None:
            self._h1_send(reply)
        else:
            self._h2_send(ref, reply)

    def send_admin(self, ref: int | None, status: int, body: bytes) -> None:
        self._send(ref, Reply(status, [(b"content-type", b"application/json")], body))

    def shutdown(self) -> None:
        """Stop taking requests: GOAWAY on HTTP/2; close HTTP/1.1 after the current answer."""
        if self.closed or self.draining:
            return
        if self.h2 is not None:
            super().shutdown()
            return
        self.draining = True
        if not self.h1_busy:
            self.close()

    # -- HTTP/2

    def new_h2(self) -> _H2Connection:
        return _H2Connection(config=H2_CONFIG)

    def _start_h2(self) -> None:
        self.protocol = "h2"
        self.app.protocols["h2"]["connections"] += 1
        self.start_h2()

    def request_started(self, sid: int, headers: Headers) -> None:
        if self.goaway_last is not None and sid > self.goaway_last:
            # After our GOAWAY (in the same read, or a client that did not heed it): refused.
            self.app.n_refused += 1
            self.refuse(sid)
            return
        self.streams[sid] = Stream(headers)
        if _is_send(headers):
            self._stream_faults(sid)

    def goaway(self, last_stream_id: int, reason: str) -> None:
        """GOAWAY with ``reason`` as its debug data; later streams are refused."""
        self.goaway_last = last_stream_id
        self.app.n_goaways += 1
        self.send_goaway(last_stream_id, reason.encode())

    def request_complete(self, sid: int, stream: Stream) -> None:
        self._complete(sid, stream)

    def _h2_send(self, sid: int, reply: Reply) -> None:
        body = reply.body
        headers = [(b":status", STATUS_BYTES.get(reply.status) or str(reply.status).encode()), *reply.headers]
        headers.append((b"content-length", str(len(body)).encode()))
        self.send_response(sid, headers, body)

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
            if isinstance(event, h11.Request):
                # The request line as HTTP/2 pseudo-headers, so both protocols read requests alike.
                headers: Headers = [(b":method", event.method), (b":path", event.target), *event.headers]
                self.h1_request = Stream(headers)
            elif isinstance(event, h11.Data):
                req = self.h1_request
                if req is not None:
                    if req.size <= self.max_kept_body:
                        req.chunks.append(event.data)
                    req.size += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                req, self.h1_request = self.h1_request, None
                if req is not None:
                    self.h1_busy = True
                    self._complete(None, req)
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _h1_send(self, reply: Reply) -> None:
        conn = self.h11
        if self.closed or conn is None:
            return
        body = reply.body
        headers = [*reply.headers, (b"content-length", str(len(body)).encode())]
        if self.draining:
            headers.append((b"connection", b"close"))
        out = conn.send(h11.Response(status_code=reply.status, headers=headers, reason=REASONS.get(reply.status, b"")))
        if body:
            out += conn.send(h11.Data(data=body))
        out += conn.send(h11.EndOfMessage())
        self.transport.write(out)
        self.h1_busy = False
        if self.draining or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
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
