"""Coverage-guided fuzzing of the socket protocol's framing and frames (atheris).

    .venv/bin/python tests/fuzz/fuzz_frames.py -max_total_time=60

The input's first byte chooses what is fuzzed, its second how the rest is cut into reads:

- the server's end of a connection (`protocols.connection.ServerConnection`) fed the rest as
  the client's bytes: it never raises (a violation is answered on the wire); it makes the same
  events and the same answer bytes whatever the reads (one, or many small ones); every byte it
  sends decodes as frames a server may send, a goaway last when it terminated; it keeps no
  more calls open than it announced; each call it hands over re-encodes to itself;
- the client's end (`ClientConnection`) fed the rest as the server's bytes: only a
  `ProtocolError` escapes, and the same one (or the same events) whatever the reads;
- one frame payload: it decodes to a frame or raises one of `DECODE_ERRORS`, and a frame
  that decodes re-encodes, frames and decodes to itself.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["protocols", "server"]):
    import msgspec

    from protocols.connection import ClientConnection, ServerConnection, State, Terminated
    from protocols.errors import ProtocolError, Status
    from protocols.frames import (
        PROTOCOL_VERSION, AnyFrame, Call, Cancel, Credit, End, Error, GoAway, Hello, Item, Ping, Pong, Reply, Welcome,
    )
    from protocols.framing import DECODE_ERRORS, FrameDecoder, FrameEncoder

from _fuzz import bounded, main

MAX_FRAME = 4096
MAX_CALLS = 4
_decoder = msgspec.msgpack.Decoder(AnyFrame)
_encoder = FrameEncoder()
_FROM_SERVER = (Welcome, Reply, Item, End, Error, Pong, GoAway)


def _shown(event: Any) -> str:
    """An event as text, bodies included (the repr of a `msgspec.Raw` is its address)."""
    return f"{type(event).__name__}:{msgspec.msgpack.encode(event)!r}"


def _reads(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


def _check_hello(hello: Hello) -> tuple[Status, str] | None:
    return (Status.UNAUTHENTICATED, "refused") if hello.api_key == "refuse" else None


def _serve(reads: list[bytes]) -> tuple[list[str], bytes, ServerConnection]:
    conn = ServerConnection(server="fuzz", max_frame=MAX_FRAME, max_calls=MAX_CALLS, check_hello=_check_hello)
    events: list[Any] = []
    for data in reads:
        if data:
            events.extend(conn.receive_data(data))
        assert len(conn.open_calls) <= MAX_CALLS, conn.open_calls
    return [_shown(e) for e in events], conn.data_to_send(), conn


def _frames(data: bytes) -> list[Any]:
    decoder = FrameDecoder(1 << 30)
    frames = [_decoder.decode(payload) for payload in decoder.feed(data)]
    assert decoder.buffered == 0, "the server sent part of a frame"
    return frames


def fuzz_server(stream: bytes, size: int) -> None:
    whole, whole_out, _ = _serve([stream])
    events, out, conn = _serve(_reads(stream, size))
    assert (events, out) == (whole, whole_out), "the reads changed the outcome"
    sent = _frames(out)
    assert all(isinstance(frame, _FROM_SERVER) for frame in sent), sent
    assert sum(isinstance(frame, Welcome) for frame in sent) <= 1
    if any(e.startswith("Terminated:") for e in events):
        assert events[-1].startswith("Terminated:") and isinstance(sent[-1], GoAway) and conn.state is State.CLOSED
    for event in conn.receive_data(b""):
        assert not isinstance(event, Terminated)


def _client(reads: list[bytes]) -> tuple[str, ...]:
    conn = ClientConnection(client="fuzz", max_frame=MAX_FRAME)
    conn.hello()
    events: list[Any] = []
    try:
        for data in reads:
            events.extend(conn.receive_data(data))
    except ProtocolError as exc:
        return (type(exc).__name__, str(exc))
    return tuple(_shown(e) for e in events)


def fuzz_client(stream: bytes, size: int) -> None:
    assert _client(_reads(stream, size)) == _client([stream]), "the reads changed the outcome"


def fuzz_payload(payload: bytes) -> None:
    try:
        frame = _decoder.decode(payload)
    except DECODE_ERRORS:
        return
    [again] = FrameDecoder(1 << 30).feed(_encoder.frame(frame))
    assert _decoder.decode(again) == frame, (frame, again)


@bounded(2.0)
def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, size, rest = data[0] % 3, data[1] + 1, data[2:]
    if mode == 0:
        fuzz_server(rest, size)
    elif mode == 1:
        fuzz_client(rest, size)
    else:
        fuzz_payload(rest)


def seeds() -> list[bytes]:
    frame = _encoder.frame
    body = msgspec.Raw(msgspec.msgpack.encode({"identity": "crm:1"}))
    hello = frame(Hello(version=PROTOCOL_VERSION, client="seed"))
    calls = b"".join(frame(Call(id=i, method="profiles.get", body=body, timeout_ms=5, window=2)) for i in range(1, 7))
    server = [
        hello + calls + frame(Cancel(id=1)) + frame(Credit(id=2, items=3)) + frame(Ping(nonce=7)) + frame(Pong()),
        frame(Hello(version=PROTOCOL_VERSION, api_key="refuse")) + calls,
        frame(Hello(version=2)), hello + (MAX_FRAME + 1).to_bytes(4, "big"), hello + frame(Welcome(
            version=1, server="x", max_frame=1024, max_calls=1)), hello + frame(Call(id=1, method="m")) * 2,
        hello + b"\x00\x00\x00\x03\x91\x91\x01", calls,
    ]
    welcome = frame(Welcome(version=PROTOCOL_VERSION, server="seed", max_frame=MAX_FRAME, max_calls=MAX_CALLS))
    client = [
        welcome + frame(Reply(id=1, body=body)) + frame(Item(id=2, body=body)) + frame(End(id=2))
        + frame(Error(id=3, code="NOT_FOUND", message="no", field="$.identity")) + frame(Ping(nonce=1))
        + frame(Pong(nonce=2)) + frame(GoAway(code="UNAVAILABLE", message="bye", last_id=3)),
        welcome * 2, frame(Error(id=0, code="NEW_CODE", message="?")), frame(Hello(version=1)),
    ]
    out = [bytes([0, n]) + s for s in server for n in (255, 0, 6)]
    out += [bytes([1, n]) + s for s in client for n in (255, 2)]
    out += [bytes([2, 0]) + p for s in server + client for p in FrameDecoder(1 << 30).feed(s)[:3]]
    return out


TOKENS = [msgspec.msgpack.encode(word) for word in (
    "t", "hello", "welcome", "call", "reply", "item", "end", "error", "cancel", "credit", "ping", "pong", "goaway",
    "id", "method", "body", "timeout_ms", "window", "version", "client", "server", "api_key", "max_frame",
    "max_calls", "code", "message", "field", "last_id", "nonce", "items", "refuse")] + [
    b"\x00\x00\x00", b"\x00\x00\x10\x01", b"\xff\xff\xff\xff", b"\xcf\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x80", b"\xc0"]

if __name__ == "__main__":
    main(test_one_input, seeds(), TOKENS)
    sys.exit(0)
