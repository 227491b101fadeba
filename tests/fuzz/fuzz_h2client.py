"""Coverage-guided fuzzing of the senders' HTTP/2 client codec, `protocols.h2client.H2Client` (atheris).

    .venv/bin/python tests/fuzz/fuzz_h2client.py -max_total_time=60

A push provider's answers are untrusted bytes too. The input's first byte says how the rest
is cut into reads; the rest is what the server sends to a client with three requests in
flight (one of them with a body waiting for flow-control window). Whatever it is: `receive`
returns events or raises `H2ProtocolError` (`HpackError` is one), nothing else, and the
connection is closed after it; the events (those the error carries included), the error and
what the client queues for the server do not depend on how the bytes were cut; events name
only the streams the client opened; a response's body is at most ``max_body`` bytes.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["protocols"]):
    from protocols.h2client import GoAway, H2Client, H2ProtocolError, PingAck, ResponseEnded, SettingsChanged, StreamReset

from _fuzz import bounded, main

MAX_BODY = 4096
HEADERS = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/3/device/ab"), (b":authority", b"127.0.0.1")]
BODIES = [b"{}", b"", b"x" * 70_000]  # the last one waits for the server's WINDOW_UPDATEs


def _client() -> tuple[H2Client, list[int]]:
    client = H2Client(window=1 << 20, max_header_list_size=8192, max_body=MAX_BODY)
    client.initiate()
    ids = [client.send_request(HEADERS, body) for body in BODIES]
    client.data_to_send()
    return client, ids


def _shown(event: Any) -> tuple[Any, ...]:
    values = tuple(getattr(event, name) for name in type(event).__slots__)
    return (type(event).__name__, *(sorted(v.items()) if isinstance(v, dict) else v for v in values))


def _run(reads: list[bytes]) -> tuple[Any, ...]:
    client, ids = _client()
    events: list[Any] = []
    error: tuple[Any, ...] = ()
    try:
        for data in reads:
            events.extend(client.receive(data))
    except H2ProtocolError as exc:
        events.extend(exc.events)
        error = (type(exc).__name__, str(exc), exc.error_code)
        assert client.closed, "a violation leaves the connection closed"
    for event in events:
        assert isinstance(event, (ResponseEnded, StreamReset, SettingsChanged, GoAway, PingAck)), event
        if isinstance(event, (ResponseEnded, StreamReset)):
            assert event.stream_id in ids, event
        if isinstance(event, ResponseEnded):
            assert len(event.body) <= MAX_BODY, len(event.body)
    return tuple(map(_shown, events)), error, client.data_to_send()


@bounded(2.0)
def test_one_input(data: bytes) -> None:
    if not data:
        return
    size, stream = data[0] + 1, data[1:]
    whole = _run([stream])
    cut = _run([stream[i : i + size] for i in range(0, len(stream), size)] or [b""])
    assert cut == whole, "the reads changed the outcome"


def seeds() -> list[bytes]:
    import h2.config
    import h2.connection
    import h2.errors

    client, ids = _client()
    server = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    preface = H2Client(window=1 << 20, max_header_list_size=8192, max_body=MAX_BODY)
    preface.initiate()
    for body in BODIES:
        preface.send_request(HEADERS, body)
    server.receive_data(preface.data_to_send())
    out = [server.data_to_send()]
    server.send_headers(ids[0], [(":status", "200"), ("apns-id", "0a0b"), ("x-long", "v" * 300)], end_stream=True)
    server.send_headers(ids[1], [(":status", "400"), ("content-type", "application/json")])
    server.send_data(ids[1], b'{"reason":"BadDeviceToken"}', end_stream=True)
    server.increment_flow_control_window(1 << 20)
    server.increment_flow_control_window(1 << 20, stream_id=ids[2])
    out.append(server.data_to_send())
    server.reset_stream(ids[2], h2.errors.ErrorCodes.REFUSED_STREAM)
    server.ping(b"12345678")
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 1})
    out.append(server.data_to_send())
    server.close_connection(last_stream_id=ids[1], additional_data=b"max_age")
    out.append(server.data_to_send())
    whole = b"".join(out)
    return [bytes([n]) + s for s in (whole, out[0] + out[1], out[0] + out[3]) for n in (255, 0, 8)]


TOKENS = [b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", b"\x00\x00\x00\x04\x01\x00\x00\x00\x00", b"\x01\x05\x00\x00\x00\x01",
          b"\x00\x01\x00\x00\x00\x01", b"\x03\x00\x00\x00\x00\x05", b"\x07\x00\x00\x00\x00\x00", b"\x08\x00\x00\x00\x00",
          b"\x06\x00\x00\x00\x00\x00", b"\x09\x04\x00\x00\x00\x01", b"\x88", b"\x3f\xe1\x1f", b"\x40\x85", b"\xff\xff\xff"]

if __name__ == "__main__":
    main(test_one_input, seeds(), TOKENS)
    sys.exit(0)
