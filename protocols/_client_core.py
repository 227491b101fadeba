"""Parts shared by the Trio and asyncio clients: targets, body decoding, event routing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from .api import METHODS, Request
from .connection import (
    ClientConnection,
    EndReceived,
    ErrorReceived,
    ItemReceived,
    PongReceived,
    ReplyReceived,
    Welcomed,
)
from .errors import CallError, ConnectionClosed, Status

__all__ = ["parse_target", "decoder_for", "response_type", "route_events", "CallSink", "closed_error"]

_decoders: dict[Any, msgspec.msgpack.Decoder] = {}


def decoder_for(kind: Any) -> msgspec.msgpack.Decoder:
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind)
    return decoder


def response_type(request: Request[Any]) -> Any:
    spec = METHODS.get(request.method)
    if spec is None:  # a request type defined outside this package (a plugin's method)
        return Any
    return spec.response


def parse_target(target: str) -> tuple[str, str | int]:
    """``HOST:PORT`` or ``unix:PATH`` → (host, port) or ("unix", path)."""
    if target.startswith("unix:"):
        return "unix", target[5:]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{target!r} is not HOST:PORT or unix:PATH")
    return host.strip("[]") or "127.0.0.1", int(port)


class CallSink:
    """Where the reader puts a call's outcome; each client implements it with its primitives.

    A unary call's sink is resolved at once (`resolve`). A stream's frames are returned by
    `route_events` in order, for the client to hand over with whatever waiting its consumer
    needs: ``(sink, body)`` for an item, ``(sink, None)`` for the end, ``(sink, error)``.
    """

    streaming = False

    def resolve(self, outcome: msgspec.Raw | BaseException) -> None:
        raise NotImplementedError


StreamDelivery = tuple[CallSink, "msgspec.Raw | BaseException | None"]


def route_events(
    events: list[Any],
    pending: dict[int, CallSink],
    *,
    on_welcome: Callable[[], None],
    on_pong: Callable[[int], None],
) -> list[StreamDelivery]:
    """Resolve unary calls from ``events``; return the streams' frames, in order."""
    deliveries: list[StreamDelivery] = []
    for event in events:
        if isinstance(event, (ReplyReceived, ItemReceived)):
            sink = pending.get(event.id)
            if sink is None:
                continue
            if sink.streaming:
                deliveries.append((sink, event.body))
            else:
                del pending[event.id]
                sink.resolve(event.body)
        elif isinstance(event, (EndReceived, ErrorReceived)):
            sink = pending.pop(event.id, None)
            if sink is None:
                continue
            outcome = None if isinstance(event, EndReceived) else CallError(event.code, event.message, event.field)
            if sink.streaming:
                deliveries.append((sink, outcome))
            else:
                sink.resolve(outcome or CallError(Status.INTERNAL, "the server ended a unary call like a stream"))
        elif isinstance(event, Welcomed):
            on_welcome()
        elif isinstance(event, PongReceived):
            on_pong(event.nonce)
        # GoAwayReceived and Closed: the connection's state says draining/closed
    return deliveries


def closed_error(conn: ClientConnection, reason: str = "the connection was closed") -> ConnectionClosed:
    if conn.goaway is not None:
        return ConnectionClosed(conn.goaway.message, conn.goaway.code)
    return ConnectionClosed(reason, Status.UNAVAILABLE)
