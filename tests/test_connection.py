"""Tests for protocols/connection.py: the sans-IO server and client state machines.

Everything is synchronous: bytes go in through ``receive_data``, frames come out of
``data_to_send``, and nothing touches a socket.
"""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.connection import (
    CallCancelled,
    CallReceived,
    ClientConnection,
    Closed,
    EndReceived,
    ErrorReceived,
    GoAwayReceived,
    HelloReceived,
    ItemReceived,
    PongReceived,
    ReplyReceived,
    ServerConnection,
    State,
    Terminated,
    Welcomed,
)
from protocols.errors import FrameTooLarge, HandshakeError, MalformedFrame, ProtocolError, Status
from protocols.frames import (
    EMPTY_BODY,
    PROTOCOL_VERSION,
    AnyFrame,
    Call,
    Cancel,
    End,
    Error,
    GoAway,
    Hello,
    Item,
    Ping,
    Pong,
    Reply,
    Welcome,
)
from protocols.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, FrameDecoder, FrameEncoder

SERVER_NAME = "pigeon/test"
_decode_frame = msgspec.msgpack.Decoder(AnyFrame).decode


def wire(*frames: AnyFrame) -> bytes:
    encoder = FrameEncoder()
    return b"".join(encoder.frame(f) for f in frames)


def raw(obj: object) -> bytes:
    """A well-framed payload of arbitrary MessagePack (not necessarily a valid frame)."""
    return prefixed(msgspec.msgpack.encode(obj))


def prefixed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def parse(data: bytes) -> list[AnyFrame]:
    decoder = FrameDecoder(max_frame=2**32)
    frames = [_decode_frame(p) for p in decoder.feed(data)]
    assert decoder.buffered == 0, "data_to_send ended in a partial frame"
    return frames


def body(obj: object) -> msgspec.Raw:
    return msgspec.Raw(msgspec.msgpack.encode(obj))


HELLO = Hello(version=PROTOCOL_VERSION, client="test")


def open_server(**kwargs) -> ServerConnection:
    server = ServerConnection(server=SERVER_NAME, **kwargs)
    assert server.receive_data(wire(HELLO)) == [HelloReceived(HELLO)]
    server.data_to_send()
    return server


def call(call_id: int, method: str = "server.health", payload: object = None, **kw) -> Call:
    return Call(id=call_id, method=method, body=EMPTY_BODY if payload is None else body(payload), **kw)


# =============================================================================================
# server: handshake


def test_server_answers_hello_with_welcome() -> None:
    server = ServerConnection(server=SERVER_NAME, max_frame=1000, max_calls=8)
    assert server.state is State.HANDSHAKE
    assert server.data_to_send() == b""
    events = server.receive_data(wire(HELLO))
    assert events == [HelloReceived(HELLO)]
    assert server.state is State.OPEN
    assert server.hello == HELLO
    assert parse(server.data_to_send()) == [
        Welcome(version=PROTOCOL_VERSION, server=SERVER_NAME, max_frame=1000, max_calls=8)
    ]


def test_server_welcome_announces_defaults() -> None:
    server = ServerConnection(server=SERVER_NAME)
    server.receive_data(wire(HELLO))
    (welcome,) = parse(server.data_to_send())
    assert welcome == Welcome(version=1, server=SERVER_NAME, max_frame=DEFAULT_MAX_FRAME, max_calls=256)


def test_server_accepts_hello_with_api_key_and_unknown_fields() -> None:
    server = ServerConnection(server=SERVER_NAME)
    events = server.receive_data(raw({"t": "hello", "version": 1, "api_key": "k", "future": [1, 2]}))
    assert events == [HelloReceived(Hello(version=1, api_key="k"))]
    assert server.state is State.OPEN


def test_server_hello_split_byte_by_byte() -> None:
    server = ServerConnection(server=SERVER_NAME)
    data = wire(HELLO)
    events = []
    for i in range(len(data)):
        events += server.receive_data(data[i : i + 1])
    assert events == [HelloReceived(HELLO)]


def test_server_hello_and_pipelined_calls_in_one_chunk() -> None:
    server = ServerConnection(server=SERVER_NAME)
    events = server.receive_data(wire(HELLO, call(1), call(2)))
    assert events == [HelloReceived(HELLO), CallReceived(call(1)), CallReceived(call(2))]
    assert [type(f) for f in parse(server.data_to_send())] == [Welcome]


def assert_terminated(server: ServerConnection, events: list, code: Status) -> Terminated:
    (event,) = events
    assert isinstance(event, Terminated)
    assert event.code is code
    assert server.state is State.CLOSED
    assert parse(server.data_to_send()) == [GoAway(code=code, message=event.message, last_id=server.last_id)]
    return event


@pytest.mark.parametrize("first", [call(1), Ping(nonce=1), Cancel(id=1)], ids=["call", "ping", "cancel"])
def test_server_non_hello_first_is_terminated(first: AnyFrame) -> None:
    server = ServerConnection(server=SERVER_NAME)
    event = assert_terminated(server, server.receive_data(wire(first)), Status.FAILED_PRECONDITION)
    assert "hello" in event.message
    assert repr(first.__struct_config__.tag) in event.message


def test_server_wrong_version_is_terminated_naming_both_versions() -> None:
    server = ServerConnection(server=SERVER_NAME)
    event = assert_terminated(server, server.receive_data(wire(Hello(version=2))), Status.FAILED_PRECONDITION)
    assert event.message == "unsupported protocol version 2; this server speaks version 1"
    assert server.hello is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used MessagePack byte
        b"",  # empty frame
        msgspec.msgpack.encode({"t": "hello", "version": "1"}),
        msgspec.msgpack.encode({"t": "hello"}),
        msgspec.msgpack.encode([1, 2, 3]),
    ],
    ids=["garbage", "empty", "version-as-str", "no-version", "array"],
)
def test_server_malformed_hello_is_terminated(payload: bytes) -> None:
    server = ServerConnection(server=SERVER_NAME)
    event = assert_terminated(server, server.receive_data(prefixed(payload)), Status.INVALID_ARGUMENT)
    assert event.message.startswith("malformed hello frame: ")


def test_server_ignores_everything_after_termination() -> None:
    server = ServerConnection(server=SERVER_NAME)
    events = server.receive_data(wire(call(1), HELLO, call(2)))
    assert len(events) == 1 and isinstance(events[0], Terminated)
    server.data_to_send()
    assert server.receive_data(wire(HELLO, call(3))) == []
    assert server.receive_data(b"") == []
    assert server.data_to_send() == b""
    assert server.state is State.CLOSED


# =============================================================================================
# server: calls


def test_server_call_received() -> None:
    server = open_server()
    c = call(1, "profiles.get", {"identity": "crm:42"}, timeout_ms=500)
    assert server.receive_data(wire(c)) == [CallReceived(c)]
    assert server.open_calls == {1}
    assert server.last_id == 1
    assert server.data_to_send() == b""


def test_server_last_id_is_the_highest_id_seen() -> None:
    server = open_server()
    server.receive_data(wire(call(5), call(3)))
    assert server.last_id == 5
    assert server.open_calls == {3, 5}


def test_server_reused_id_in_flight_is_rejected_and_first_call_stays_open() -> None:
    server = open_server()
    assert server.receive_data(wire(call(7))) == [CallReceived(call(7))]
    assert server.receive_data(wire(call(7, "profiles.get"))) == []
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    # answered on id 0: an error on id 7 would look like the first call's answer
    assert (error.id, error.code, error.field) == (0, Status.INVALID_ARGUMENT, "$.id")
    assert "call id 7 is already in flight" in error.message
    assert server.open_calls == {7}
    assert server.send_reply(7, {"ok": True})
    assert parse(server.data_to_send()) == [Reply(id=7, body=body({"ok": True}))]


def test_server_id_may_be_reused_after_the_call_finished() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    server.send_end(1)
    server.data_to_send()
    assert server.receive_data(wire(call(1))) == [CallReceived(call(1))]


def test_server_garbage_in_a_well_framed_frame_keeps_the_connection_open() -> None:
    server = open_server()
    assert server.receive_data(prefixed(b"\xc1\xc1\xc1")) == []
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    assert (error.id, error.code, error.field) == (0, Status.INVALID_ARGUMENT, None)
    assert error.message.startswith("malformed frame: ")
    assert server.state is State.OPEN
    # The stream is still in sync: the next frame is read normally.
    assert server.receive_data(wire(call(1))) == [CallReceived(call(1))]


@pytest.mark.parametrize(
    "obj, call_id, field",
    [
        ({"t": "call", "id": 9, "method": 5}, 9, "$.method"),
        ({"t": "call", "id": 9, "method": "x", "timeout_ms": 0}, 9, "$.timeout_ms"),
        ({"t": "call", "id": 9}, 9, None),  # missing method: msgspec names no path
        ({"t": "bogus", "id": 9}, 9, "$.t"),
        ({"t": "call", "id": 0, "method": "x"}, 0, "$.id"),
        ({"t": "call", "id": -3, "method": "x"}, 0, "$.id"),
        ({"t": "call", "id": "nine", "method": "x"}, 0, "$.id"),
        ({"id": 4}, 4, None),  # no tag at all
        (17, 0, None),
    ],
)
def test_server_malformed_frame_is_answered_for_its_call(obj: object, call_id: int, field: str | None) -> None:
    server = open_server()
    assert server.receive_data(raw(obj)) == []
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    assert (error.id, error.code, error.field) == (call_id, Status.INVALID_ARGUMENT, field)
    assert error.message.startswith("malformed frame: ")
    if field is not None:
        assert error.message.endswith(f" - at `{field}`")
    assert server.state is State.OPEN
    assert server.open_calls == set()


def test_server_malformed_frame_with_the_id_of_an_open_call_goes_to_call_zero() -> None:
    """The open call must not look finished to the client, so the error is for the connection."""
    server = open_server()
    server.receive_data(wire(call(3)))
    server.receive_data(raw({"t": "call", "id": 3, "method": 5}))
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    assert (error.id, error.field) == (0, "$.method")
    assert server.open_calls == {3}


@pytest.mark.parametrize(
    "frame",
    [
        Reply(id=1, body=EMPTY_BODY),
        Item(id=1, body=EMPTY_BODY),
        End(id=1),
        Error(id=1, code=Status.INTERNAL, message="x"),
        Welcome(version=1, server="s", max_frame=1, max_calls=1),
        GoAway(code=Status.UNAVAILABLE, message="bye"),
        HELLO,
    ],
    ids=lambda f: f.__struct_config__.tag,
)
def test_server_rejects_frames_a_client_may_not_send(frame: AnyFrame) -> None:
    server = open_server()
    assert server.receive_data(wire(frame)) == []
    (error,) = parse(server.data_to_send())
    tag = frame.__struct_config__.tag
    assert error == Error(
        id=0, code=Status.INVALID_ARGUMENT, message=f"a client may not send a {tag!r} frame", field="$.t"
    )
    assert server.state is State.OPEN


def test_server_answers_ping_with_pong_carrying_the_nonce() -> None:
    server = open_server()
    assert server.receive_data(wire(Ping(nonce=12345), Ping())) == []
    assert parse(server.data_to_send()) == [Pong(nonce=12345), Pong(nonce=0)]


def test_server_ignores_pong() -> None:
    server = open_server()
    assert server.receive_data(wire(Pong(nonce=3))) == []
    assert server.data_to_send() == b""


def test_server_cancel_of_an_open_call() -> None:
    server = open_server()
    server.receive_data(wire(call(4)))
    assert server.receive_data(wire(Cancel(id=4))) == [CallCancelled(4)]
    # The call stays open until the handler answers it (with CANCELLED).
    assert server.open_calls == {4}
    assert server.send_error(4, Status.CANCELLED, "cancelled by the client")
    assert parse(server.data_to_send()) == [Error(id=4, code=Status.CANCELLED, message="cancelled by the client")]


def test_server_cancel_of_an_unknown_or_finished_call_is_ignored() -> None:
    server = open_server()
    assert server.receive_data(wire(Cancel(id=99))) == []
    server.receive_data(wire(call(1)))
    server.send_reply(1, None)
    assert server.receive_data(wire(Cancel(id=1))) == []
    assert parse(server.data_to_send()) == [Reply(id=1, body=body(None))]


# =============================================================================================
# server: answers


def test_server_send_reply_only_once() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    assert server.send_reply(1, {"status": "serving"}) is True
    assert server.send_reply(1, {"status": "again"}) is False
    assert server.send_error(1, Status.INTERNAL, "late") is False
    assert server.send_end(1) is False
    assert server.send_item(1, 1) is False
    assert server.open_calls == set()
    assert parse(server.data_to_send()) == [Reply(id=1, body=body({"status": "serving"}))]


def test_server_send_reply_exact_bytes() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    server.send_reply(1, {"a": 1})
    payload = b"\x83\xa1t\xa5reply\xa2id\x01\xa4body\x81\xa1a\x01"
    assert server.data_to_send() == len(payload).to_bytes(4, "big") + payload


def test_server_send_end_only_once() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    assert server.send_end(1) is True
    assert server.send_end(1) is False
    assert server.send_reply(1, None) is False
    assert parse(server.data_to_send()) == [End(id=1)]


def test_server_send_error_only_once() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    assert server.send_error(1, Status.NOT_FOUND, "no profile", field="$.identity") is True
    assert server.send_error(1, Status.INTERNAL, "again") is False
    assert server.send_reply(1, None) is False
    assert parse(server.data_to_send()) == [
        Error(id=1, code=Status.NOT_FOUND, message="no profile", field="$.identity")
    ]


def test_server_send_to_a_call_never_received() -> None:
    server = open_server()
    assert server.send_reply(5, None) is False
    assert server.send_item(5, None) is False
    assert server.send_end(5) is False
    assert server.send_error(5, Status.INTERNAL, "x") is False
    assert server.data_to_send() == b""


def test_server_streams_items_then_end() -> None:
    server = open_server()
    server.receive_data(wire(call(2, "events.list", {"identity": "crm:1"})))
    for i in range(3):
        assert server.send_item(2, {"seq": i}) is True
    assert server.open_calls == {2}
    assert server.send_end(2) is True
    assert server.send_item(2, {"seq": 3}) is False
    assert parse(server.data_to_send()) == [
        Item(id=2, body=body({"seq": 0})),
        Item(id=2, body=body({"seq": 1})),
        Item(id=2, body=body({"seq": 2})),
        End(id=2),
    ]


def test_server_send_reply_accepts_a_raw_body() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    server.send_reply(1, msgspec.Raw(b"\x92\x01\x02"))
    assert parse(server.data_to_send()) == [Reply(id=1, body=msgspec.Raw(b"\x92\x01\x02"))]


def test_server_counters_and_pending_bytes() -> None:
    server = ServerConnection(server=SERVER_NAME)
    server.receive_data(wire(HELLO, call(1), Ping()))
    assert server.frames_in == 3
    assert server.frames_out == 2  # welcome, pong
    pending = server.pending_bytes
    data = server.data_to_send()
    assert pending == len(data) > 0
    assert server.pending_bytes == 0
    assert server.data_to_send() == b""


def test_server_encode_body() -> None:
    server = open_server()
    assert server.encode_body({"x": [1]}) == body({"x": [1]})


# =============================================================================================
# server: goaway


def test_server_goaway_drains() -> None:
    server = open_server()
    server.receive_data(wire(call(1), call(2)))
    server.send_goaway(Status.UNAVAILABLE, "shutting down")
    assert server.state is State.DRAINING
    assert parse(server.data_to_send()) == [GoAway(code=Status.UNAVAILABLE, message="shutting down", last_id=2)]

    # New calls are refused with UNAVAILABLE and do not open.
    assert server.receive_data(wire(call(3))) == []
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    assert (error.id, error.code, error.field) == (3, Status.UNAVAILABLE, None)
    assert server.open_calls == {1, 2}
    assert server.last_id == 2

    # Open calls are still answered, and pings and cancels still work.
    assert server.receive_data(wire(Cancel(id=1), Ping(nonce=8))) == [CallCancelled(1)]
    assert server.send_reply(2, "done")
    assert server.send_error(1, Status.CANCELLED, "cancelled")
    assert parse(server.data_to_send()) == [
        Pong(nonce=8),
        Reply(id=2, body=body("done")),
        Error(id=1, code=Status.CANCELLED, message="cancelled"),
    ]


def test_server_goaway_reused_id_still_reported_as_reused() -> None:
    server = open_server()
    server.receive_data(wire(call(1)))
    server.send_goaway(Status.UNAVAILABLE, "bye")
    server.data_to_send()
    server.receive_data(wire(call(1)))
    (error,) = parse(server.data_to_send())
    assert isinstance(error, Error)
    assert (error.id, error.code, error.field) == (0, Status.INVALID_ARGUMENT, "$.id")
    assert server.open_calls == {1}


def test_server_goaway_is_sent_once() -> None:
    server = open_server()
    server.send_goaway(Status.UNAVAILABLE, "first")
    server.send_goaway(Status.INTERNAL, "second")
    assert parse(server.data_to_send()) == [GoAway(code=Status.UNAVAILABLE, message="first")]
    assert server.state is State.DRAINING


def test_server_goaway_after_termination_sends_nothing() -> None:
    server = ServerConnection(server=SERVER_NAME)
    server.receive_data(wire(call(1)))
    server.data_to_send()
    server.send_goaway(Status.UNAVAILABLE, "bye")
    assert server.data_to_send() == b""
    assert server.state is State.CLOSED


# =============================================================================================
# server: frame size and end of stream


def test_server_oversized_frame_terminates_before_buffering() -> None:
    server = open_server(max_frame=64)
    server.receive_data(wire(call(1)))
    header = (65).to_bytes(4, "big")
    events = server.receive_data(header + b"x" * 65 + wire(call(2)))
    event = assert_terminated(server, events, Status.RESOURCE_EXHAUSTED)
    assert event.message == "frame of 65 bytes exceeds the maximum frame size of 64 bytes"
    # Nothing more is processed, not even well-formed calls.
    assert server.receive_data(wire(call(3), Ping())) == []
    assert server.data_to_send() == b""
    assert server.open_calls == {1}
    assert server.last_id == 1


def test_server_oversized_header_alone_terminates() -> None:
    server = open_server(max_frame=64)
    assert server.receive_data((2**31).to_bytes(4, "big")[:3]) == []
    events = server.receive_data((2**31).to_bytes(4, "big")[3:])
    assert_terminated(server, events, Status.RESOURCE_EXHAUSTED)


def test_server_oversized_hello_terminates() -> None:
    server = ServerConnection(server=SERVER_NAME, max_frame=16)
    events = server.receive_data(wire(Hello(version=1, client="a rather long client name")))
    assert_terminated(server, events, Status.RESOURCE_EXHAUSTED)


def test_server_frame_at_the_limit_is_accepted() -> None:
    c = call(1, "m", "p" * 40)
    size = len(wire(c)) - HEADER_SIZE
    server = open_server(max_frame=size)
    assert server.receive_data(wire(c)) == [CallReceived(c)]


def test_server_frames_before_an_oversized_one_in_the_same_chunk_are_processed() -> None:
    """Events must not depend on how the byte stream was split into chunks.

    BUG: `FrameDecoder.feed` raises FrameTooLarge and drops the complete frames it already
    split off in the same chunk, so call 2 is silently lost when it shares a chunk with the
    oversized header, and received when it arrives alone.
    """
    oversized = (65).to_bytes(4, "big")

    split_server = open_server(max_frame=64)
    split_events = split_server.receive_data(wire(call(2))) + split_server.receive_data(oversized)

    joined_server = open_server(max_frame=64)
    joined_events = joined_server.receive_data(wire(call(2)) + oversized)

    assert split_events[0] == CallReceived(call(2))
    assert joined_events == split_events
    assert joined_server.data_to_send() == split_server.data_to_send()


def test_server_eof_mid_frame_reports_truncation() -> None:
    server = open_server()
    data = wire(call(1))
    assert server.receive_data(data[:-3]) == []
    assert server.receive_data(b"") == [Closed(truncated=len(data) - 3)]
    assert server.state is State.CLOSED
    assert server.receive_data(data[-3:]) == []
    assert server.receive_data(b"") == []


def test_server_eof_mid_header_reports_truncation() -> None:
    server = open_server()
    server.receive_data(b"\x00\x00")
    assert server.receive_data(b"") == [Closed(truncated=2)]


def test_server_clean_eof() -> None:
    server = open_server()
    assert server.receive_data(b"") == [Closed()]
    assert Closed() == Closed(truncated=0)


def test_server_eof_before_hello() -> None:
    server = ServerConnection(server=SERVER_NAME)
    assert server.receive_data(b"") == [Closed(0)]
    assert server.data_to_send() == b""


# ---------------------------------------------------------------------------------------------
# server: the events and output do not depend on how the stream is split

client_frames = st.lists(
    st.one_of(
        st.builds(
            call,
            st.integers(1, 6),
            st.sampled_from(["server.health", "profiles.get"]),
            st.integers(-(2**63), 2**63),
        ),
        st.builds(Cancel, id=st.integers(1, 6)),
        st.builds(Ping, nonce=st.integers(0, 2**63 - 1)),
        st.builds(Pong, nonce=st.integers(0, 10)),
        st.just(Reply(id=1, body=EMPTY_BODY)),
    ),
    max_size=12,
)
garbage = st.sampled_from([prefixed(b"\xc1"), raw({"t": "call", "id": 3, "method": 1}), raw(5)])
stream_parts = st.lists(client_frames.map(lambda fs: wire(*fs)) | garbage, max_size=5).map(b"".join)


@given(stream=stream_parts, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_server_is_independent_of_chunking(stream: bytes, cuts: list[int]) -> None:
    data = wire(HELLO) + stream

    whole = ServerConnection(server=SERVER_NAME)
    whole_events = whole.receive_data(data)

    chunked = ServerConnection(server=SERVER_NAME)
    chunked_events = []
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in zip(points, points[1:]):
        chunked_events += chunked.receive_data(data[a:b])

    assert chunked_events == whole_events
    assert chunked.data_to_send() == whole.data_to_send()
    assert chunked.open_calls == whole.open_calls
    assert chunked.state is whole.state is State.OPEN


# =============================================================================================
# client


def test_client_hello_exact_bytes() -> None:
    client = ClientConnection()
    assert client.state is State.HANDSHAKE
    client.hello()
    payload = b"\x83\xa1t\xa5hello\xa7version\x01\xa6client\xadpigeon-client"
    assert client.data_to_send() == len(payload).to_bytes(4, "big") + payload
    assert len(payload) == 0x27


def test_client_hello_with_api_key() -> None:
    client = ClientConnection(client="cli/1.0", api_key="secret")
    client.hello()
    assert parse(client.data_to_send()) == [Hello(version=PROTOCOL_VERSION, client="cli/1.0", api_key="secret")]


def test_client_start_call_ids_increase_from_one() -> None:
    client = ClientConnection()
    client.hello()
    client.data_to_send()
    ids = [client.start_call("server.health", {}) for _ in range(3)]
    assert ids == [1, 2, 3]
    assert parse(client.data_to_send()) == [Call(id=i, method="server.health", body=body({})) for i in ids]
    assert client.frames_out == 4


def test_client_start_call_body_and_timeout() -> None:
    client = ClientConnection()
    call_id = client.start_call("profiles.get", {"identity": "crm:42"}, timeout_ms=250)
    raw_id = client.start_call("profiles.get", msgspec.Raw(b"\x80"))
    assert parse(client.data_to_send()) == [
        Call(id=call_id, method="profiles.get", body=body({"identity": "crm:42"}), timeout_ms=250),
        Call(id=raw_id, method="profiles.get", body=EMPTY_BODY),
    ]


def test_client_pending_bytes_counts_calls() -> None:
    client = ClientConnection()
    client.hello()
    client.start_call("m", None)
    assert client.pending_bytes == len(client.data_to_send())
    assert client.pending_bytes == 0


def welcomed_client(max_frame: int = DEFAULT_MAX_FRAME) -> ClientConnection:
    client = ClientConnection()
    client.hello()
    client.data_to_send()
    welcome = Welcome(version=PROTOCOL_VERSION, server=SERVER_NAME, max_frame=max_frame, max_calls=4)
    assert client.receive_data(wire(welcome)) == [Welcomed(welcome)]
    return client


def test_client_welcome() -> None:
    client = welcomed_client(max_frame=1000)
    assert client.state is State.OPEN
    assert client.welcome is not None and client.welcome.max_calls == 4
    assert client.server_max_frame == 1000


def test_client_start_call_over_the_servers_max_frame() -> None:
    client = welcomed_client(max_frame=64)
    frames_out = client.frames_out
    with pytest.raises(FrameTooLarge) as info:
        client.start_call("profiles.upsert", {"attributes": "x" * 100})
    assert info.value.limit == 64
    assert info.value.size > 64
    assert client.pending_bytes == 0
    assert client.data_to_send() == b""
    assert client.frames_out == frames_out


def test_client_start_call_exactly_at_the_servers_max_frame() -> None:
    probe = len(wire(Call(id=1, method="m", body=body("x" * 30)))) - HEADER_SIZE
    client = welcomed_client(max_frame=probe)
    assert client.start_call("m", "x" * 30) == 1
    assert len(client.data_to_send()) == probe + HEADER_SIZE


def test_client_calls_may_be_queued_before_the_welcome() -> None:
    client = ClientConnection()
    client.hello()
    assert client.start_call("server.health", {}) == 1
    frames = parse(client.data_to_send())
    assert [type(f) for f in frames] == [Hello, Call]


def test_client_answer_events() -> None:
    client = welcomed_client()
    data = wire(
        Reply(id=1, body=body({"ok": 1})),
        Item(id=2, body=body(1)),
        End(id=2),
        Error(id=3, code=Status.NOT_FOUND, message="nope", field="$.identity"),
        Error(id=0, code=Status.INVALID_ARGUMENT, message="bad frame"),
        Pong(nonce=77),
    )
    assert client.receive_data(data) == [
        ReplyReceived(1, body({"ok": 1})),
        ItemReceived(2, body(1)),
        EndReceived(2),
        ErrorReceived(3, Status.NOT_FOUND, "nope", "$.identity"),
        ErrorReceived(0, Status.INVALID_ARGUMENT, "bad frame", None),
        PongReceived(77),
    ]
    assert client.frames_in == 7
    assert client.data_to_send() == b""


def test_client_answers_server_ping() -> None:
    client = welcomed_client()
    assert client.receive_data(wire(Ping(nonce=5))) == []
    assert parse(client.data_to_send()) == [Pong(nonce=5)]


def test_client_ping_and_cancel() -> None:
    client = welcomed_client()
    client.ping(9)
    client.ping()
    client.cancel(4)
    assert parse(client.data_to_send()) == [Ping(nonce=9), Ping(), Cancel(id=4)]


def test_client_goaway() -> None:
    client = welcomed_client()
    client.start_call("m", None)
    goaway = GoAway(code=Status.UNAVAILABLE, message="server shutting down", last_id=1)
    assert client.receive_data(wire(goaway)) == [GoAwayReceived(goaway)]
    assert client.state is State.DRAINING
    assert client.goaway == goaway
    client.data_to_send()
    with pytest.raises(HandshakeError, match="cannot start m: server shutting down"):
        client.start_call("m", None)
    assert client.data_to_send() == b""
    # Answers to calls already made still arrive.
    assert client.receive_data(wire(Reply(id=1, body=EMPTY_BODY))) == [ReplyReceived(1, EMPTY_BODY)]


def test_client_start_call_after_close() -> None:
    client = welcomed_client()
    assert client.receive_data(b"") == [Closed(0)]
    assert client.state is State.CLOSED
    with pytest.raises(HandshakeError, match="connection closed"):
        client.start_call("m", None)
    client.cancel(1)
    assert client.data_to_send() == b""


def test_client_eof_mid_frame() -> None:
    client = welcomed_client()
    data = wire(Reply(id=1, body=EMPTY_BODY))
    assert client.receive_data(data[:5]) == []
    assert client.receive_data(b"") == [Closed(truncated=5)]


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", msgspec.msgpack.encode({"t": "reply", "id": "x", "body": 1}), msgspec.msgpack.encode({"t": "nope"})],
    ids=["garbage", "bad-id", "unknown-tag"],
)
def test_client_malformed_server_frame_raises(payload: bytes) -> None:
    client = welcomed_client()
    with pytest.raises(MalformedFrame, match="malformed frame from server") as info:
        client.receive_data(prefixed(payload))
    assert isinstance(info.value, ProtocolError)
    assert isinstance(info.value.__cause__, msgspec.DecodeError)


@pytest.mark.parametrize("frame", [call(1), Cancel(id=1), HELLO], ids=lambda f: f.__struct_config__.tag)
def test_client_rejects_frames_a_server_may_not_send(frame: AnyFrame) -> None:
    client = welcomed_client()
    tag = frame.__struct_config__.tag
    with pytest.raises(MalformedFrame, match=f"a server may not send a '{tag}' frame"):
        client.receive_data(wire(frame))


def test_client_second_welcome_raises() -> None:
    client = welcomed_client()
    with pytest.raises(HandshakeError, match="second welcome"):
        client.receive_data(wire(Welcome(version=1, server="s", max_frame=10, max_calls=1)))
    assert client.server_max_frame == DEFAULT_MAX_FRAME


def test_client_welcome_with_another_version_raises() -> None:
    client = ClientConnection()
    client.hello()
    with pytest.raises(HandshakeError, match="server speaks protocol version 2, not 1"):
        client.receive_data(wire(Welcome(version=2, server="s", max_frame=10, max_calls=1)))
    assert client.welcome is None
    assert client.state is State.HANDSHAKE


def test_client_oversized_server_frame_raises() -> None:
    client = ClientConnection(max_frame=16)
    with pytest.raises(FrameTooLarge):
        client.receive_data((17).to_bytes(4, "big"))


@pytest.mark.parametrize(
    "violation, error",
    [((65).to_bytes(4, "big"), FrameTooLarge), (prefixed(b"\xc1"), MalformedFrame), (wire(HELLO), MalformedFrame)],
    ids=["oversized", "garbage", "client-frame"],
)
def test_client_frames_before_a_violation_in_the_same_chunk_are_delivered(violation: bytes, error: type) -> None:
    """Events must not depend on how the server's bytes were split into reads.

    BUG (found by tests/fuzz/fuzz_frames.py): a reply and an oversized header in one read
    raised FrameTooLarge and dropped the reply, which arrived when read alone; and a malformed
    frame before an oversized header was reported as the oversized one.
    """
    answers = wire(Reply(id=1, body=EMPTY_BODY), Error(id=2, code="NOT_FOUND", message="no"))
    delivered = [ReplyReceived(1, EMPTY_BODY), ErrorReceived(2, Status.NOT_FOUND, "no", None)]

    split = ClientConnection(max_frame=64)
    assert split.receive_data(answers) == delivered
    with pytest.raises(error) as split_error:
        split.receive_data(violation)
    assert split_error.value.events == []

    joined = ClientConnection(max_frame=64)
    with pytest.raises(error) as joined_error:
        joined.receive_data(answers + violation)
    assert joined_error.value.events == delivered
    assert str(joined_error.value) == str(split_error.value)


def test_client_a_malformed_frame_before_an_oversized_header_is_what_is_reported() -> None:
    client = ClientConnection(max_frame=64)
    with pytest.raises(MalformedFrame):
        client.receive_data(prefixed(b"\xc1") + (65).to_bytes(4, "big"))


def test_client_goaway_before_welcome() -> None:
    client = ClientConnection()
    client.hello()
    goaway = GoAway(code=Status.FAILED_PRECONDITION, message="unsupported protocol version 7")
    assert client.receive_data(wire(goaway)) == [GoAwayReceived(goaway)]
    assert client.state is State.DRAINING
    with pytest.raises(HandshakeError, match="unsupported protocol version 7"):
        client.start_call("m", None)


# =============================================================================================
# client against server, in memory


def pump(src, dst) -> list:
    return dst.receive_data(src.data_to_send())


def test_client_and_server_full_exchange() -> None:
    client = ClientConnection(client="test-client")
    server = ServerConnection(server=SERVER_NAME, max_frame=4096, max_calls=16)

    # Hello and three pipelined calls leave before the welcome arrives.
    client.hello()
    health = client.start_call("server.health", {})
    profile = client.start_call("profiles.get", {"identity": "crm:42"}, timeout_ms=1000)
    events = client.start_call("events.list", {"identity": "crm:42"})
    assert (health, profile, events) == (1, 2, 3)

    received = pump(client, server)
    assert received[0] == HelloReceived(Hello(version=1, client="test-client"))
    assert [e.call.id for e in received[1:]] == [1, 2, 3]
    assert received[2].call.body == body({"identity": "crm:42"})
    assert received[2].call.timeout_ms == 1000
    assert server.open_calls == {1, 2, 3}

    # The server answers out of order: stream items first, then 2, then 1, then the end of 3.
    server.send_item(events, {"seq": 1})
    server.send_item(events, {"seq": 2})
    server.send_error(profile, Status.NOT_FOUND, "no profile has identity crm:42", field="$.identity")
    server.send_reply(health, {"status": "serving"})
    server.send_end(events)
    assert server.open_calls == set()

    answered = pump(server, client)
    assert answered == [
        Welcomed(Welcome(version=1, server=SERVER_NAME, max_frame=4096, max_calls=16)),
        ItemReceived(3, body({"seq": 1})),
        ItemReceived(3, body({"seq": 2})),
        ErrorReceived(2, Status.NOT_FOUND, "no profile has identity crm:42", "$.identity"),
        ReplyReceived(1, body({"status": "serving"})),
        EndReceived(3),
    ]
    assert client.state is State.OPEN
    assert client.server_max_frame == 4096

    # Ping round trip, a cancel, then the server drains.
    client.ping(42)
    later = client.start_call("server.stats", {})
    client.cancel(later)
    assert pump(client, server) == [CallReceived(Call(id=4, method="server.stats", body=body({}))), CallCancelled(4)]
    server.send_error(later, Status.CANCELLED, "cancelled")
    server.send_goaway(Status.UNAVAILABLE, "shutting down")
    assert pump(server, client) == [
        PongReceived(42),
        ErrorReceived(4, Status.CANCELLED, "cancelled", None),
        GoAwayReceived(GoAway(code=Status.UNAVAILABLE, message="shutting down", last_id=4)),
    ]
    with pytest.raises(HandshakeError):
        client.start_call("server.health", {})

    # Both sides see the close.
    assert server.receive_data(b"") == [Closed()]
    assert client.receive_data(b"") == [Closed()]


def test_client_and_server_byte_by_byte() -> None:
    client = ClientConnection()
    server = ServerConnection(server=SERVER_NAME)
    client.hello()
    ids = [client.start_call("m", i) for i in range(5)]
    data = client.data_to_send()
    received = []
    for i in range(len(data)):
        received += server.receive_data(data[i : i + 1])
    assert [type(e) for e in received] == [HelloReceived] + [CallReceived] * 5
    for call_id in reversed(ids):
        server.send_reply(call_id, call_id * 10)
    data = server.data_to_send()
    answers = []
    for i in range(len(data)):
        answers += client.receive_data(data[i : i + 1])
    assert answers[1:] == [ReplyReceived(i, body(i * 10)) for i in reversed(ids)]


def test_client_call_too_large_for_the_server_never_reaches_it() -> None:
    client = ClientConnection()
    server = ServerConnection(server=SERVER_NAME, max_frame=128)
    client.hello()
    pump(client, server)
    pump(server, client)
    with pytest.raises(FrameTooLarge):
        client.start_call("profiles.upsert", {"attributes": {"note": "z" * 200}})
    call_id = client.start_call("server.health", {})
    assert pump(client, server) == [CallReceived(Call(id=call_id, method="server.health", body=body({})))]
    assert server.state is State.OPEN


def test_server_answer_over_the_clients_frame_limit_becomes_an_error() -> None:
    server = ServerConnection(server="pigeon/test")
    server.receive_data(wire(Hello(version=PROTOCOL_VERSION, max_frame=1024)))
    server.data_to_send()
    server.receive_data(wire(call(1)) + wire(call(2)))
    assert server.send_reply(1, {"blob": "x" * 2000})
    assert server.send_item(2, {"blob": "x" * 2000})
    first, second = parse(server.data_to_send())
    assert isinstance(first, Error) and first.id == 1 and first.code == Status.RESOURCE_EXHAUSTED
    assert "1024" in first.message and "hello.max_frame" in first.message
    assert isinstance(second, Error) and second.id == 2
    assert server.open_calls == set()  # both calls ended
