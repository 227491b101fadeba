"""The sans-IO HTTP/2 client codec against h2's server side (an independent implementation of
RFC 9113), byte for byte in memory; and its HPACK halves against hpack's."""

from __future__ import annotations

import struct

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.h2client import (
    ErrorCode,
    GoAway,
    H2Client,
    H2ProtocolError,
    HpackDecoder,
    HpackError,
    PingAck,
    ResponseEnded,
    SettingsChanged,
    StatelessEncoder,
    StreamReset,
    decode_huffman,
)


def request(path: bytes = b"/3/device/ab", **extra: bytes) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", path), (b":authority", b"push.test")]
    return fields + [(name.replace("_", "-").encode(), value) for name, value in extra.items()]


class Pair:
    """Our client and h2's server, wired together in memory."""

    def __init__(self, *, client: H2Client | None = None, **server_settings: int) -> None:
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        values = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100}
        values.update({getattr(h2.settings.SettingCodes, k.upper()): v for k, v in server_settings.items()})
        self.server.local_settings = h2.settings.Settings(client=False, initial_values=values)
        self.client = client or H2Client()
        self.requests: dict[int, dict] = {}
        self.client.initiate()
        self.server.initiate_connection()
        self.events = self.exchange()
        assert any(type(e) is SettingsChanged for e in self.events)

    def exchange(self, *, acknowledge: bool = True) -> list:
        """Move bytes both ways until neither side has any; the client's events."""
        events = []
        while True:
            to_server = self.client.data_to_send()
            if to_server:
                for event in self.server.receive_data(to_server):
                    self.on_server_event(event, acknowledge)
            to_client = self.server.data_to_send()
            if to_client:
                events += self.client.receive(to_client)
            if not to_server and not to_client:
                return events

    def on_server_event(self, event, acknowledge: bool) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self.requests[event.stream_id] = {"headers": list(event.headers), "body": b"", "ended": False}
        elif isinstance(event, h2.events.DataReceived):
            self.requests[event.stream_id]["body"] += event.data
            if acknowledge:
                self.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.requests[event.stream_id]["ended"] = True


def test_requests_and_responses_round_trip():
    pair = Pair()
    ids = [pair.client.send_request(request(b"/3/device/%d" % i, apns_topic=b"com.acme.app"), b'{"n":%d}' % i)
           for i in range(50)]
    assert ids == list(range(1, 100, 2))
    pair.exchange()
    for sid in ids:
        got = pair.requests[sid]
        assert got["ended"] and got["body"] == b'{"n":%d}' % (sid // 2)
        assert (b"apns-topic", b"com.acme.app") in got["headers"]
        # Answered with h2's own encoder: Huffman strings and its dynamic table.
        pair.server.send_headers(sid, [(b":status", b"200"), (b"apns-id", b"id-%d" % sid)])
        pair.server.send_data(sid, b"first ")
        pair.server.send_data(sid, b"second", end_stream=True)
    events = pair.exchange()
    assert [e.stream_id for e in events] == ids
    for event in events:
        assert type(event) is ResponseEnded
        assert (event.status, event.headers, event.body) == (200, {b"apns-id": b"id-%d" % event.stream_id}, b"first second")
    assert pair.client.streams == {}


def test_a_request_without_body_ends_with_its_headers():
    pair = Pair()
    sid = pair.client.send_request(request())
    pair.exchange()
    assert pair.requests[sid] == {"headers": request(), "body": b"", "ended": True}


def test_bodies_wait_for_the_servers_windows_and_arrive_whole_in_order():
    pair = Pair(initial_window_size=100)
    bodies = [bytes([65 + i]) * 1000 for i in range(5)]
    ids = [pair.client.send_request(request(), body) for body in bodies]
    pair.exchange(acknowledge=False)  # the server reads but grants no more window
    assert [pair.requests[sid]["body"] for sid in ids] == [body[:100] for body in bodies]
    assert not any(pair.requests[sid]["ended"] for sid in ids)
    for sid in ids:  # now the server acknowledges what it read: the rest follows
        pair.server.acknowledge_received_data(len(pair.requests[sid]["body"]), sid)
    pair.exchange()
    assert [pair.requests[sid]["body"] for sid in ids] == bodies
    assert all(pair.requests[sid]["ended"] for sid in ids)


def test_the_connection_window_is_shared_in_order():
    pair = Pair()  # the connection's window: 65,535 bytes until the server grants more
    bodies = [bytes([65 + i]) * 30000 for i in range(4)]
    ids = [pair.client.send_request(request(), body) for body in bodies]
    pair.exchange(acknowledge=False)
    assert [len(pair.requests[sid]["body"]) for sid in ids] == [30000, 30000, 5535, 0]
    for sid in ids[:3]:
        pair.server.acknowledge_received_data(len(pair.requests[sid]["body"]), sid)
    pair.exchange()
    assert [pair.requests[sid]["body"] for sid in ids] == bodies


def test_streams_that_end_while_their_bodies_wait_leave_the_queue():
    pair = Pair(initial_window_size=10)
    ids = [pair.client.send_request(request(), b"x" * 50) for _ in range(3)]
    pair.exchange(acknowledge=False)
    assert list(pair.client._blocked) == ids
    pair.client.reset(ids[0])
    pair.server.reset_stream(ids[1], h2.errors.ErrorCodes.CANCEL)
    pair.server.send_headers(ids[2], [(b":status", b"413")], end_stream=True)  # answered early
    events = pair.exchange(acknowledge=False)
    assert [(type(e), e.stream_id) for e in events] == [(StreamReset, ids[1]), (ResponseEnded, ids[2])]
    assert not pair.client._blocked and not pair.client.streams


def test_a_server_raising_its_initial_window_releases_waiting_bodies():
    pair = Pair(initial_window_size=10)
    sid = pair.client.send_request(request(), b"x" * 50)
    pair.exchange(acknowledge=False)
    assert pair.requests[sid]["body"] == b"x" * 10
    pair.server.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1000})
    pair.exchange(acknowledge=False)
    assert pair.requests[sid] == {"headers": request(), "body": b"x" * 50, "ended": True}


def test_a_large_header_block_goes_out_in_continuations():
    pair = Pair()
    big = b"v" * 40000
    sid = pair.client.send_request(request(x_large=big), b"{}")
    sent = pair.client.data_to_send()
    assert sent.count(b"\x09\x00\x00\x00") or sent.count(b"\x09\x04\x00\x00")  # CONTINUATION frames
    for event in pair.server.receive_data(sent):
        pair.on_server_event(event, True)
    pair.exchange()
    assert (b"x-large", big) in pair.requests[sid]["headers"]


def test_informational_responses_are_skipped_and_trailers_merged():
    pair = Pair()
    sid = pair.client.send_request(request(), b"{}")
    pair.exchange()
    pair.server.send_headers(sid, [(b":status", b"100")])
    pair.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/json")])
    pair.server.send_data(sid, b"{}")
    pair.server.send_headers(sid, [(b"x-trailer", b"yes")], end_stream=True)
    [event] = pair.exchange()
    assert (event.status, event.headers, event.body) == (200, {b"content-type": b"application/json", b"x-trailer": b"yes"}, b"{}")


def test_padded_and_prioritised_frames_are_read_through():
    client = ready_client()  # h2's server neither pads HEADERS nor sends priorities: by hand
    padded_priority = b"\x03" + b"\x00\x00\x00\x00\xc8" + b"\x88" + b"\x00" * 3  # pad 3, priority, :status 200
    body = b'{"reason":"Unregistered"}'
    wire = frame(1, 0x4 | 0x8 | 0x20, 1, padded_priority) + frame(2, 0, 1, b"\x00\x00\x00\x00\x10") \
        + frame(0, 0x1 | 0x8, 1, b"\x1e" + body + b"\x00" * 30)
    [event] = client.receive(wire)
    assert (event.status, event.body) == (200, body)
    assert client.recv_window == client.window - (1 + len(body) + 30)  # padding counts for flow control


def test_our_window_is_topped_up_for_long_responses():
    pair = Pair(client=H2Client(window=65535))
    sid = pair.client.send_request(request())
    pair.exchange()
    body = bytes(range(256)) * 800  # 204,800 bytes: three windows' worth
    pair.server.send_headers(sid, [(b":status", b"200")])
    sent = 0
    events = []
    while sent < len(body):
        room = min(pair.server.local_flow_control_window(sid), pair.server.max_outbound_frame_size, len(body) - sent)
        assert room > 0, "the client did not return window"
        pair.server.send_data(sid, body[sent:sent + room], end_stream=sent + room == len(body))
        sent += room
        events += pair.exchange()
    [event] = events
    assert event.body == body


def test_resets_goaway_and_pings():
    pair = Pair()
    a, b, c = (pair.client.send_request(request()) for _ in range(3))
    pair.exchange()
    pair.server.reset_stream(a, h2.errors.ErrorCodes.REFUSED_STREAM)
    pair.server.ping(b"12345678")
    pair.client.ping(b"pigeon!!")
    events = pair.exchange()
    assert [(type(e), getattr(e, "stream_id", None)) for e in events] == [(StreamReset, a), (PingAck, None)]
    assert events[0].error_code == ErrorCode.REFUSED_STREAM and events[1].data == b"pigeon!!"
    pair.server.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, additional_data=b"bye", last_stream_id=b)
    [goaway] = pair.exchange()
    assert type(goaway) is GoAway and (goaway.last_stream_id, goaway.error_code, goaway.debug_data) == (b, 0, b"bye")
    with pytest.raises(H2ProtocolError, match="closing"):
        pair.client.send_request(request())
    assert set(pair.client.streams) == {b, c}  # the caller decides what c's fate is


def test_a_response_without_status_resets_only_its_stream():
    client = H2Client()
    client.initiate()
    client.receive(frame(4, 0, 0, b""))  # the server's SETTINGS
    bad, good = client.send_request(request()), client.send_request(request())
    client.data_to_send()
    events = client.receive(frame(1, 0x5, bad, b"\x00\x01x\x01y") + frame(1, 0x5, good, b"\x88"))  # x: y, then :status 200
    assert [(type(e), e.stream_id) for e in events] == [(StreamReset, bad), (ResponseEnded, good)]
    assert events[0].error_code == ErrorCode.PROTOCOL_ERROR
    assert frame(3, 0, bad, struct.pack(">L", ErrorCode.PROTOCOL_ERROR)) in client.data_to_send()


def test_frames_split_anywhere_decode_the_same():
    pair = Pair()
    sid = pair.client.send_request(request())
    pair.exchange()
    pair.server.send_headers(sid, [(b":status", b"200"), (b"apns-id", b"abc")])
    pair.server.send_data(sid, b"hello", end_stream=True)
    wire = pair.server.data_to_send()
    events = []
    for i in range(len(wire)):
        events += pair.client.receive(wire[i:i + 1])
    [event] = events
    assert (event.status, event.headers, event.body) == (200, {b"apns-id": b"abc"}, b"hello")


def frame(kind: int, flags: int, stream_id: int, payload: bytes) -> bytes:
    return struct.pack(">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream_id) + payload


def ready_client(open_streams: int = 1) -> H2Client:
    client = H2Client()
    client.initiate()
    client.receive(frame(4, 0, 0, b""))
    for _ in range(open_streams):
        client.send_request(request())
    client.data_to_send()
    return client


@pytest.mark.parametrize("wire, code, message", [
    (frame(0, 0, 1, b"x" * 16385), ErrorCode.FRAME_SIZE_ERROR, "16385 bytes"),
    (frame(0, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR, "DATA on stream 0"),
    (frame(1, 0x4, 9, b"\x88"), ErrorCode.PROTOCOL_ERROR, "stream 9, which we did not open"),
    (frame(1, 0x4, 2, b"\x88"), ErrorCode.PROTOCOL_ERROR, "stream 2, which we did not open"),
    (frame(9, 0x4, 1, b"\x88"), ErrorCode.PROTOCOL_ERROR, "CONTINUATION without"),
    (frame(1, 0, 1, b"\x88") + frame(0, 0, 1, b"x"), ErrorCode.PROTOCOL_ERROR, "interrupted"),
    (frame(1, 0xC, 1, b"\x05\x88"), ErrorCode.PROTOCOL_ERROR, "padding longer"),
    (frame(4, 0, 0, b"\x00\x03\x00\x00"), ErrorCode.FRAME_SIZE_ERROR, "multiple of 6"),
    (frame(4, 0, 0, b"\x00\x04\x80\x00\x00\x00"), ErrorCode.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE"),
    (frame(4, 0, 0, b"\x00\x05\x00\x00\x10\x00"), ErrorCode.PROTOCOL_ERROR, "MAX_FRAME_SIZE 4096"),
    (frame(8, 0, 0, b"\x00\x00\x00\x00"), ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0"),
    (frame(8, 0, 0, b"\x7f\xff\xff\xff"), ErrorCode.FLOW_CONTROL_ERROR, "above 2\\*\\*31-1"),
    (frame(5, 0x4, 1, b"\x00\x00\x00\x02\x88"), ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE"),
    (frame(6, 0, 0, b"1234"), ErrorCode.FRAME_SIZE_ERROR, "PING"),
    (frame(3, 0, 0, b"\x00\x00\x00\x00"), ErrorCode.PROTOCOL_ERROR, "RST_STREAM"),
    (frame(7, 0, 0, b"\x00"), ErrorCode.PROTOCOL_ERROR, "GOAWAY"),
    (frame(1, 0x5, 1, b"\xff\x40"), ErrorCode.COMPRESSION_ERROR, "no table entry 191"),
    (frame(1, 0x5, 1, b"\x3f\xe2\x1f"), ErrorCode.COMPRESSION_ERROR, "table size update to 4097"),
    (frame(1, 0x5, 1, b"\x08\x83\xff\xff\xff"), ErrorCode.COMPRESSION_ERROR, "Huffman"),
    (frame(1, 0x5, 1, b"\x08\x05ab"), ErrorCode.COMPRESSION_ERROR, "longer than its header block"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_protocol_violations_close_the_connection_with_the_right_code(wire, code, message):
    client = ready_client()
    with pytest.raises(H2ProtocolError, match=message) as raised:
        client.receive(wire)
    assert raised.value.error_code == code
    assert client.closed
    out = client.data_to_send()
    assert out[3] == 7 and struct.unpack(">L", out[13:17])[0] == code  # our GOAWAY says why
    with pytest.raises(H2ProtocolError):
        client.send_request(request())


def test_data_beyond_our_window_is_a_flow_control_error():
    client = H2Client(window=65535)
    client.initiate()
    client.receive(frame(4, 0, 0, b""))
    sid = client.send_request(request())
    client.receive(frame(1, 0x4, sid, b"\x88"))
    chunk = frame(0, 0, sid, b"x" * 16384)
    with pytest.raises(H2ProtocolError) as raised:
        client.receive(chunk * 5)  # never acknowledged: 81,920 bytes into a 65,535-byte window
    assert raised.value.error_code in (ErrorCode.FLOW_CONTROL_ERROR,)


def test_window_for_a_reset_stream_still_counts_for_the_connection():
    client = ready_client()
    client.reset(1)
    assert client.data_to_send() == frame(3, 0, 1, struct.pack(">L", ErrorCode.CANCEL))
    assert client.receive(frame(1, 0x4, 1, b"\x88") + frame(0, 0x1, 1, b"late")) == []
    assert client.recv_window == client.window - 4


def test_the_last_stream_id_is_the_last():
    client = ready_client(0)
    client.next_stream_id = 2**31 - 1
    assert client.send_request(request()) == 2**31 - 1
    with pytest.raises(H2ProtocolError, match="out of stream ids"):
        client.send_request(request())


# -- HPACK --------------------------------------------------------------------------------------

names = st.sampled_from([b":method", b":path", b":authority", b"authorization", b"apns-topic", b"x-custom", b"accept"])
values = st.binary(min_size=0, max_size=300).filter(lambda v: b"\n" not in v)


@given(st.lists(st.lists(st.tuples(names, values, st.booleans()), max_size=12), min_size=1, max_size=5))
def test_stateless_encoding_decodes_to_the_same_fields(blocks):
    encoder, decoder = StatelessEncoder(), hpack.Decoder()
    for block in blocks:
        fields = [hpack.NeverIndexedHeaderTuple(n, v) if secret else (n, v) for n, v, secret in block]
        decoded = decoder.decode(encoder.encode(fields), raw=True)
        assert [tuple(f) for f in decoded] == [(n, v) for n, v, _ in block]
        assert [isinstance(f, hpack.NeverIndexedHeaderTuple) for f in decoded] == [secret for _, _, secret in block]
        assert len(decoder.header_table.dynamic_entries) == 0  # nothing was ever indexed
    assert decoder.header_table.maxsize == 0  # the first block set the table size to 0


def test_stateless_encoding_uses_the_static_table_and_caches_repeated_fields():
    encoder = StatelessEncoder()
    first = encoder.encode([(b":method", b"POST"), (b":scheme", b"https")])
    assert first == b"\x20\x83\x87"  # size update 0, then static entries 3 and 7
    assert encoder.encode([(b":method", b"POST")]) == b"\x83"
    encoder.encode([(b"apns-topic", b"com.acme.app"), (b":path", b"/3/device/" + b"a" * 64)])
    assert (b"apns-topic", b"com.acme.app", False) in encoder._cache
    assert not any(name == b":path" for name, _, _ in encoder._cache)  # device paths do not repeat


header_lists = st.lists(
    st.lists(st.tuples(st.sampled_from([b":status", b"apns-id", b"content-type", b"x-a", b"x-b", b"date"]),
                       st.binary(max_size=120)), max_size=8),
    min_size=1, max_size=12,
)


@settings(max_examples=300)
@given(header_lists, st.lists(st.sampled_from([None, 0, 64, 256, 4096]), min_size=12, max_size=12), st.booleans())
def test_our_decoder_agrees_with_hpack_whatever_the_server_encodes(blocks, sizes, huffman):
    """hpack's encoder indexes, evicts, Huffman-codes and changes its table size at will."""
    encoder = hpack.Encoder()
    ours = HpackDecoder()
    for block, size in zip(blocks, sizes):
        if size is not None:
            encoder.header_table_size = size
        assert ours.decode(encoder.encode(block, huffman=huffman)) == block


def test_decoding_never_indexed_literals_and_table_eviction():
    decoder = HpackDecoder(max_table_size=100)
    decoder.table_size = 100
    # literal with incremental indexing, new name: x-a: 40 bytes (entry 75 bytes)
    decoder.decode(b"\x40\x03x-a\x28" + b"a" * 40)
    assert list(decoder.entries) == [(b"x-a", b"a" * 40)]
    decoder.decode(b"\x40\x03x-b\x28" + b"b" * 40)  # evicts x-a
    assert list(decoder.entries) == [(b"x-b", b"b" * 40)] and decoder.size == 75
    assert decoder.decode(b"\xbe\x10\x03x-c\x01c") == [(b"x-b", b"b" * 40), (b"x-c", b"c")]
    with pytest.raises(HpackError, match="header list over"):
        HpackDecoder(max_header_list_size=50).decode(b"\x00\x03x-a\x28" + b"a" * 40)
    with pytest.raises(HpackError, match="size update after a field"):
        decoder.decode(b"\x88\x20")


@given(st.binary(max_size=200))
def test_huffman_decoding_matches_hpack(data):
    assert decode_huffman(hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH).encode(data)) == data


# -- servers that misbehave ----------------------------------------------------------------

def test_an_endless_header_block_of_empty_continuations_is_refused():
    client = ready_client()
    client.receive(frame(1, 0, 1, b"\x88"))  # HEADERS without END_HEADERS
    with pytest.raises(H2ProtocolError):
        for _ in range(20):
            client.receive(frame(9, 0, 1, b"") * 10_000)
    assert len(client._block) < 10_000


def test_a_response_body_beyond_max_body_resets_its_stream():
    client = H2Client(window=65535, max_body=100_000)
    client.initiate()
    client.receive(frame(4, 0, 0, b""))
    sid = client.send_request(request())
    client.data_to_send()
    client.receive(frame(1, 0x4, sid, b"\x88"))
    events = []
    for _ in range(7):  # a server that sends exactly what our WINDOW_UPDATEs allow, forever
        events += client.receive(frame(0, 0, sid, b"x" * 16384))
        client.data_to_send()
    assert [(type(e), e.stream_id, e.error_code) for e in events] == [(StreamReset, sid, ErrorCode.CANCEL)]
    assert sid not in client.streams


def test_responses_before_a_violation_in_the_same_read_are_not_lost():
    client = ready_client(2)
    with pytest.raises(H2ProtocolError) as raised:
        client.receive(frame(1, 0x5, 1, b"\x88") + frame(7, 0, 0, b"\x00"))  # 200 for stream 1, then a bad GOAWAY
    delivered = getattr(raised.value, "events", [])
    assert [(type(e), e.stream_id) for e in delivered] == [(ResponseEnded, 1)]


def test_data_after_an_informational_head_is_not_a_response():
    client = ready_client()
    events = client.receive(frame(1, 0x4, 1, b"\x08\x03103") + frame(0, 0x1, 1, b"body"))
    assert not any(type(e) is ResponseEnded and e.status < 200 for e in events)
