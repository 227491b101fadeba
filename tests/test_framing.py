"""Tests for protocols/framing.py: 4-byte big-endian length prefix, sans-IO decoding."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import FrameTooLarge, ProtocolError, Status
from protocols.frames import (
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

decode_frame = msgspec.msgpack.Decoder(AnyFrame).decode


def prefixed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


# ---------------------------------------------------------------------------------------------
# strategies

u63 = st.integers(min_value=0, max_value=2**63 - 1)
call_ids = st.integers(min_value=1, max_value=2**63 - 1)
texts = st.text(max_size=40)
bodies = st.builds(
    lambda obj: msgspec.Raw(msgspec.msgpack.encode(obj)),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    ),
)
statuses = st.sampled_from(list(Status))

frames = st.one_of(
    st.builds(Hello, version=u63, client=texts, api_key=st.none() | texts),
    st.builds(Welcome, version=u63, server=texts, max_frame=u63, max_calls=u63),
    st.builds(Call, id=call_ids, method=texts, body=bodies, timeout_ms=st.none() | st.integers(1, 2**63 - 1)),
    st.builds(Reply, id=u63, body=bodies),
    st.builds(Item, id=u63, body=bodies),
    st.builds(End, id=u63),
    st.builds(Error, id=u63, code=statuses, message=texts, field=st.none() | texts,
              retry_after_ms=st.none() | st.integers(0, 2**63 - 1)),
    st.builds(Cancel, id=call_ids),
    st.builds(Ping, nonce=u63),
    st.builds(Pong, nonce=u63),
    st.builds(GoAway, code=statuses, message=texts, last_id=u63),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# ---------------------------------------------------------------------------------------------
# encoder


def test_encoded_frame_exact_bytes() -> None:
    data = FrameEncoder().frame(Ping(nonce=5))
    # fixmap(2) "t" "ping" "nonce" 5 -- 15 bytes of payload.
    assert data == b"\x00\x00\x00\x0f" + b"\x82\xa1t\xa4ping\xa5nonce\x05"


def test_encoded_call_exact_bytes_omits_the_empty_body() -> None:
    data = FrameEncoder().frame(Call(id=1, method="server.health"))
    payload = b"\x83\xa1t\xa4call\xa2id\x01\xa6method\xadserver.health"
    assert len(payload) == 33
    assert data == b"\x00\x00\x00\x21" + payload


def test_length_prefix_is_big_endian_payload_length() -> None:
    # A payload longer than 255 bytes shows the byte order.
    frame = Error(id=7, code=Status.INTERNAL, message="x" * 1000)
    data = FrameEncoder().frame(frame)
    payload = msgspec.msgpack.encode(frame)
    assert len(payload) > 0xFF
    assert data[:HEADER_SIZE] == len(payload).to_bytes(4, "big")
    assert data[HEADER_SIZE:] == payload


def test_encoder_reuses_its_buffer_without_leaking_bytes() -> None:
    encoder = FrameEncoder()
    big = encoder.frame(Error(id=1, code=Status.INTERNAL, message="y" * 500))
    small = encoder.frame(Ping())
    assert small == prefixed(msgspec.msgpack.encode(Ping()))
    assert small == b"\x00\x00\x00\x08\x81\xa1t\xa4ping"
    assert big[:HEADER_SIZE] == (len(big) - HEADER_SIZE).to_bytes(4, "big")
    # Bytes handed out earlier are not changed by later encodes.
    again = encoder.frame(Error(id=1, code=Status.INTERNAL, message="y" * 500))
    assert again == big


def test_encoder_body_is_raw_msgpack() -> None:
    body = FrameEncoder().body({"identity": "crm:42"})
    assert isinstance(body, msgspec.Raw)
    assert bytes(body) == b"\x81\xa8identity\xa6crm:42"


@given(frame=frames)
def test_encode_then_decode_round_trips(frame) -> None:
    data = FrameEncoder().frame(frame)
    assert data[:HEADER_SIZE] == (len(data) - HEADER_SIZE).to_bytes(4, "big")
    (payload,) = FrameDecoder().feed(data)
    assert decode_frame(payload) == frame


# ---------------------------------------------------------------------------------------------
# decoder


def test_decoder_returns_nothing_until_a_frame_is_complete() -> None:
    decoder = FrameDecoder()
    data = prefixed(b"hello")
    assert decoder.feed(data[:2]) == []
    assert decoder.buffered == 2
    assert decoder.feed(data[2:4]) == []
    assert decoder.buffered == 4
    assert decoder.feed(data[4:8]) == []
    assert decoder.buffered == 8
    assert decoder.feed(data[8:]) == [b"hello"]
    assert decoder.buffered == 0


def test_decoder_split_at_every_byte_boundary() -> None:
    stream = prefixed(b"first") + prefixed(b"") + prefixed(b"third frame")
    expected = [b"first", b"", b"third frame"]
    for cut in range(len(stream) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:])
        assert got == expected, cut
        assert decoder.buffered == 0


def test_decoder_one_byte_at_a_time() -> None:
    stream = prefixed(b"abc") + prefixed(b"de")
    decoder = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == [b"abc", b"de"]


def test_decoder_many_frames_in_one_chunk() -> None:
    payloads = [bytes([i]) * i for i in range(50)]
    decoder = FrameDecoder()
    assert decoder.feed(b"".join(map(prefixed, payloads))) == payloads
    assert decoder.buffered == 0


def test_decoder_keeps_a_trailing_partial_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(prefixed(b"one") + prefixed(b"two")[:5]) == [b"one"]
    assert decoder.buffered == 5
    assert decoder.feed(b"wo") == [b"two"]
    assert decoder.buffered == 0


def test_decoder_empty_feed_is_a_no_op() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(b"") == []
    assert decoder.buffered == 0


@given(payloads=st.lists(st.binary(max_size=300), max_size=20), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_decoder_payloads_round_trip_at_arbitrary_splits(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(map(prefixed, payloads))
    decoder = FrameDecoder()
    got: list[bytes] = []
    for chunk in split(stream, cuts):
        got += decoder.feed(chunk)
    assert got == payloads
    assert decoder.buffered == 0


@given(stream_frames=st.lists(frames, max_size=15), cuts=st.lists(st.integers(min_value=0), max_size=30))
def test_stream_of_random_frames_round_trips_at_arbitrary_splits(stream_frames, cuts: list[int]) -> None:
    encoder = FrameEncoder()
    stream = b"".join(encoder.frame(f) for f in stream_frames)
    decoder = FrameDecoder()
    got = []
    for chunk in split(stream, cuts):
        got += [decode_frame(p) for p in decoder.feed(chunk)]
    assert got == stream_frames
    assert decoder.buffered == 0


def test_default_max_frame_is_4_mib() -> None:
    assert DEFAULT_MAX_FRAME == 4 * 1024 * 1024
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME


def test_frame_exactly_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_frame=10)
    assert decoder.feed(prefixed(b"0123456789")) == [b"0123456789"]
    assert decoder.buffered == 0


def test_oversized_header_raises_as_soon_as_it_is_complete() -> None:
    decoder = FrameDecoder(max_frame=10)
    header = (11).to_bytes(4, "big")
    assert decoder.feed(header[:3]) == []
    assert decoder.buffered == 3
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(header[3:])
    assert info.value.size == 11
    assert info.value.limit == 10
    assert isinstance(info.value, ProtocolError)
    # Nothing of the announced body was waited for or kept.
    assert decoder.buffered == 0


def test_oversized_header_does_not_buffer_the_body_that_came_with_it() -> None:
    decoder = FrameDecoder(max_frame=1024)
    huge = 0xFFFFFFFF
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(huge.to_bytes(4, "big") + b"\x00" * 4096)
    assert info.value.size == huge
    assert decoder.buffered == 0


def test_oversized_header_after_good_frames_in_the_same_chunk() -> None:
    decoder = FrameDecoder(max_frame=10)
    with pytest.raises(FrameTooLarge):
        decoder.feed(prefixed(b"ok") + (11).to_bytes(4, "big") + b"x" * 11)
    assert decoder.buffered == 0


# ---------------------------------------------------------------------------------------------
# error.retry_after_ms (the load-shedding hint), as a client decodes it


def _client_after_welcome():
    from protocols.connection import ClientConnection

    conn = ClientConnection()
    conn.hello()
    conn.data_to_send()
    welcome = {"t": "welcome", "version": 1, "server": "pigeon/test", "max_frame": DEFAULT_MAX_FRAME, "max_calls": 8}
    conn.receive_data(prefixed(msgspec.msgpack.encode(welcome)))
    return conn


hints = st.one_of(
    st.none(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=8), st.booleans(),
    st.binary(max_size=8), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(-(2**63), 2**63 - 1), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(hint=hints, present=st.booleans())
def test_a_client_takes_a_retry_hint_that_is_a_whole_number_of_ms_and_no_other(hint, present) -> None:
    from protocols.connection import ErrorReceived
    from protocols.errors import MalformedFrame

    conn = _client_after_welcome()
    frame = {"t": "error", "id": 3, "code": "RESOURCE_EXHAUSTED", "message": "shed"}
    if present:
        frame["retry_after_ms"] = hint
    valid = not present or hint is None or (type(hint) is int and 0 <= hint <= 2**64 - 1)
    try:
        events = conn.receive_data(prefixed(msgspec.msgpack.encode(frame)))
    except MalformedFrame:
        assert not valid
        return
    assert valid
    assert events == [ErrorReceived(3, Status.RESOURCE_EXHAUSTED, "shed", None, hint if present else None)]


@settings(max_examples=200, deadline=None)
@given(hint=st.none() | st.integers(0, 2**63 - 1), code=statuses, message=texts)
def test_a_retry_hint_travels_from_the_server_to_the_call_error(hint, code, message) -> None:
    from protocols._client_core import CallSink, route_events
    from protocols.connection import ClientConnection, ServerConnection

    server = ServerConnection(server="pigeon/test", max_frame=DEFAULT_MAX_FRAME, max_calls=8)
    client = ClientConnection()
    client.hello()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    call_id = client.start_call("events.ingest", {"events": []})
    server.receive_data(client.data_to_send())
    server.send_error(call_id, code, message, retry_after_ms=hint)
    outcomes = []

    class Sink(CallSink):
        def resolve(self, outcome):
            outcomes.append(outcome)

    route_events(client.receive_data(server.data_to_send()), {call_id: Sink()},
                 on_welcome=lambda: None, on_pong=lambda n: None, on_connection_error=lambda e: None)
    [error] = outcomes
    assert (error.status, error.message, error.retry_after_ms) == (code, message, hint)
