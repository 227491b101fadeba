"""Stored values: compact msgspec records behind a one-byte format version.

Every value in LMDB is ``version byte + MessagePack``. Readers dispatch on the byte, so a
later format can be introduced next to this one and migrated lazily or in bulk. Timestamps
are integer microseconds since the epoch (UTC). These records are the server's own; the
protocol's types (`protocols.api`) are built from them at the edge.
"""

from __future__ import annotations

import struct
from typing import Any

import msgspec

from protocols import api

from server.runtime.errors import SchemaError
from server.runtime.values import from_us

__all__ = [
    "SCHEMA_VERSION",
    "RegistrationRecord",
    "ConsentRecord",
    "ProfileRecord",
    "EventRecord",
    "encode_profile",
    "decode_profile",
    "encode_event",
    "decode_event",
    "unversioned",
    "profile_to_api",
    "registration_to_api",
]

#: Layout of keys and databases (see `server.profiles.keys`); recorded in ``meta`` when the store is created.
#: 2: the apps' credentials are sealed with the master key (1 held them in plain text; the
#: store migrates a folder of version 1 when it opens it: `server.profiles.sealing`).
SCHEMA_VERSION = 2
_V1 = b"\x01"


class RegistrationRecord(msgspec.Struct, array_like=True):
    app: str
    platform: str
    token: str
    first_seen: int
    last_seen: int
    state: str = "active"
    invalid_reason: str | None = None
    invalid_at: int | None = None


class ConsentRecord(msgspec.Struct, array_like=True):
    push: str
    updated: int


class ProfileRecord(msgspec.Struct, array_like=True):
    identities: list[str]
    attributes: dict[str, Any]
    registrations: list[RegistrationRecord]
    consent: dict[str, ConsentRecord]
    created: int
    updated: int


class EventRecord(msgspec.Struct, array_like=True):
    type: str
    #: The event's data map, kept encoded as it arrived.
    data: msgspec.Raw


_encoder = msgspec.msgpack.Encoder()
_profile_decoder = msgspec.msgpack.Decoder(ProfileRecord)
_event_decoder = msgspec.msgpack.Decoder(EventRecord)


def unversioned(value: bytes, what: str) -> SchemaError:
    """The error for a stored value whose format byte this Pigeon does not know."""
    return SchemaError(f"{what} value has unknown format version {value[:1]!r}; written by a newer Pigeon?")


def encode_profile(record: ProfileRecord) -> bytes:
    return _V1 + _encoder.encode(record)


def decode_profile(value: bytes | None) -> ProfileRecord:
    """A stored profile (``None``: an index names a profile the store does not hold, which is
    a bug or a damaged store: not a refusal, an internal error the server logs)."""
    if value is None:
        raise LookupError("a profile named by an index is missing from the store")
    if value[:1] != _V1:
        raise unversioned(value, "profile")
    return _profile_decoder.decode(memoryview(value)[1:])


#: An event in the log: version byte, profile id and timestamp (fixed width, so the indexer
#: reads them without decoding), then the MessagePack of ``[type, data]``.
_EVENT_HEAD = struct.Struct(">QQ")


def encode_event(pid: bytes, ts: int, type_: str, data: msgspec.Raw) -> bytes:
    return b"".join((_V1, pid, ts.to_bytes(8, "big"), _encoder.encode((type_, data))))


def event_head(value: bytes) -> tuple[int, int]:
    """The profile id and timestamp of a logged event."""
    if value[:1] != _V1:
        raise unversioned(value, "event")
    return _EVENT_HEAD.unpack_from(value, 1)  # type: ignore[return-value]


def decode_event(value: bytes) -> tuple[int, int, EventRecord]:
    """Profile id, timestamp and record of a logged event."""
    pid, ts = event_head(value)
    return pid, ts, _event_decoder.decode(memoryview(value)[17:])


def registration_to_api(r: RegistrationRecord) -> api.Registration:
    return api.Registration(
        app=r.app,
        platform=r.platform,  # type: ignore[arg-type]
        token=r.token,
        first_seen=from_us(r.first_seen),
        last_seen=from_us(r.last_seen),
        state=r.state,  # type: ignore[arg-type]
        invalid_reason=r.invalid_reason,
        invalid_at=None if r.invalid_at is None else from_us(r.invalid_at),
    )


def profile_to_api(record: ProfileRecord) -> api.Profile:
    return api.Profile(
        identities=record.identities,
        attributes=record.attributes,
        registrations=[registration_to_api(r) for r in record.registrations],
        consent={
            app: api.ConsentEntry(push=c.push, updated=from_us(c.updated))  # type: ignore[arg-type]
            for app, c in record.consent.items()
        },
        created=from_us(record.created),
        updated=from_us(record.updated),
    )
