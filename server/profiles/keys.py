"""The keys of the profile databases (schema version 1).

Layout, one named database per record kind (the other domains' databases are described where
their keys are built: ``apps`` in `server.delivery.apps`, ``configs`` and ``messages`` in
`server.messages.catalog`, ``executions`` and ``outbox`` in `server.messages.outbox`,
``reports``, ``live`` and ``uniques`` in `server.reports.reporting`):

    meta         ascii name              -> versioned value
    identities   utf-8 "namespace:value" -> profile id (8 bytes)
    profiles     profile id (u64 BE)     -> versioned ProfileRecord
    tokens       utf-8 app + NUL + token -> profile id (8 bytes)
    events       seq (u64 BE)            -> versioned event: profile id, ts, type, data
    event_ids    utf-8 client event id   -> stored at, µs (u64 BE)
    event_id_log seq (u64 BE)            -> stored at, µs (u64 BE) + utf-8 client event id
    changes      number (u64 BE)         -> profile id: the change feed (`server.journeys.audiences`)

Integers are fixed-width big-endian so byte order is numeric order. ``events`` is the log, in
commit order: appending to it dirties a few sequential pages per commit, whatever profiles
the events belong to; each profile's time-ordered view of it is kept in memory (`server.profiles.index`).
``event_ids`` remembers the client ids of the events stored within the deduplication window
(`server.profiles.writes.ingest_events_once`); ``event_id_log`` is the same ids in the order
they were stored (seq order is commit order, so nearly time order), so that the expired ones
are found from its first key on, without a scan. ``event_ids`` is written in key order: ids led
by the time (the batchers') are added at its end, random ones anywhere (a dirty page each).
With a 22-character id, an id costs about
63 bytes of ``event_ids`` (pages split in half as it grows) and 48 of ``event_id_log``
(appended: pages full), measured over 200,000 batcher ids.
The profile key is derived from the identity here and only here, so that partitioning
profiles by identity (scale-out) has one place to change.
"""

from __future__ import annotations

import struct

from server.runtime.errors import InvalidArgument

__all__ = [
    "MAX_KEY_BYTES",
    "identity_key",
    "pid_key",
    "normalize_token",
    "token_key",
    "seq_key",
    "seq_of",

]

#: LMDB's default key limit is 511 bytes.
MAX_KEY_BYTES = 511

_U64 = struct.Struct(">Q")


def identity_key(identity: str, field: str = "$.identity") -> bytes:
    key = identity.encode()
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"{field}: the identity is {len(key)} bytes long; at most {MAX_KEY_BYTES} bytes are allowed", field=field
        )
    return key


def pid_key(pid: int) -> bytes:
    return _U64.pack(pid)


def normalize_token(platform: str, token: str) -> str:
    """An APNs token in lower case, refused unless it is hexadecimal; other tokens as given."""
    if platform.startswith("apns"):
        if len(token) % 2 or any(c not in "0123456789abcdefABCDEF" for c in token):
            raise InvalidArgument(
                "an APNs device token is the hexadecimal text of the token bytes (an even number of 0-9a-f)",
                field="$.token",
            )
        return token.lower()
    return token


def token_key(app: str, token: str) -> bytes:
    key = f"{app}\x00{token}".encode()
    if len(key) > MAX_KEY_BYTES:
        raise InvalidArgument(
            f"app id and token together are {len(key)} bytes; at most {MAX_KEY_BYTES} are allowed", field="$.token"
        )
    return key




def seq_key(seq: int) -> bytes:
    """The log key of event number ``seq``."""
    return _U64.pack(seq)


def seq_of(key: bytes) -> int:
    return _U64.unpack(key)[0]
