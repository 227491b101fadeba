"""Tests for protocols/errors.py: gRPC status numbers and the exception tree."""

from __future__ import annotations

import pytest

from protocols.errors import (
    CallError,
    ConnectionClosed,
    FrameTooLarge,
    HandshakeError,
    MalformedFrame,
    PigeonProtocolError,
    ProtocolError,
    Status,
)

#: https://grpc.github.io/grpc/core/md_doc_statuscodes.html
GRPC_CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def test_status_numbers_match_grpc() -> None:
    assert {status.name: status.number for status in Status} == GRPC_CODES


@pytest.mark.parametrize("status", list(Status))
def test_status_is_sent_by_name(status: Status) -> None:
    assert status.value == status.name
    assert str(status) == status.name
    assert Status(status.name) is status


def test_exception_tree() -> None:
    for cls in (FrameTooLarge, MalformedFrame, HandshakeError):
        assert issubclass(cls, ProtocolError)
    for cls in (ProtocolError, CallError, ConnectionClosed):
        assert issubclass(cls, PigeonProtocolError)
    assert issubclass(PigeonProtocolError, Exception)
    assert not issubclass(CallError, ProtocolError)
    assert not issubclass(ConnectionClosed, ProtocolError)


def test_call_error_keeps_status_message_and_field() -> None:
    exc = CallError(Status.NOT_FOUND, "no profile has identity crm:42", field="$.identity")
    assert exc.status is Status.NOT_FOUND
    assert exc.message == "no profile has identity crm:42"
    assert exc.field == "$.identity"
    assert str(exc) == "NOT_FOUND: no profile has identity crm:42"


def test_call_error_accepts_a_status_name_and_defaults_field_to_none() -> None:
    exc = CallError("INVALID_ARGUMENT", "bad")  # type: ignore[arg-type]
    assert exc.status is Status.INVALID_ARGUMENT
    assert exc.field is None
    assert str(exc) == "INVALID_ARGUMENT: bad"


def test_call_error_rejects_an_unknown_status() -> None:
    with pytest.raises(ValueError):
        CallError("NOPE", "bad")  # type: ignore[arg-type]


def test_frame_too_large_names_both_sizes() -> None:
    exc = FrameTooLarge(5_000_000, 4_194_304)
    assert exc.size == 5_000_000
    assert exc.limit == 4_194_304
    assert str(exc) == "frame of 5000000 bytes exceeds the maximum frame size of 4194304 bytes"


def test_connection_closed_defaults_to_unavailable() -> None:
    exc = ConnectionClosed("server went away")
    assert exc.status is Status.UNAVAILABLE
    assert exc.message == "server went away"
    assert str(exc) == "UNAVAILABLE: server went away"


def test_connection_closed_carries_the_goaway_status() -> None:
    exc = ConnectionClosed("frame too large", Status.RESOURCE_EXHAUSTED)
    assert exc.status is Status.RESOURCE_EXHAUSTED
    assert str(exc) == "RESOURCE_EXHAUSTED: frame too large"
