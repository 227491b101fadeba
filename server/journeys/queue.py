"""Entries held while a journey is paused (``paused_entries: queue``), entered when it resumes.

Database ``journey_queue`` (each sandbox's):

    utf-8 journey id + NUL                    -> versioned `Tally` (count, bytes, next sequence)
    utf-8 journey id + NUL + seq (u64 BE)     -> `Held` (profile id, event type, event data)

An entry that would enter a profile while the journey is paused is added here, in the cycle's
commit, after the journey's own; when it is live again the engine enters them in order, at
the journey's pace, and deletes them in the commit that enters them (so a crash neither loses
nor enters one twice). Bounded per journey in count (`MAX_HELD`) and bytes (`MAX_HELD_BYTES`):
an entry over the bound is refused (counted, reason ``paused_queue_full``).
"""

from __future__ import annotations

import msgspec

from server.profiles.records import unversioned
from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["Held", "Tally", "MAX_HELD", "MAX_HELD_BYTES", "tally", "encode", "add", "take", "remove"]

#: Entries held per journey at most.
MAX_HELD = 10_000
#: Bytes of held entries per journey at most.
MAX_HELD_BYTES = 4 * 1024 * 1024

_V1 = b"\x01"


class Held(msgspec.Struct, array_like=True):
    pid: bytes
    type: str
    #: The event's data, as stored in the event log (msgpack).
    data: bytes


class Tally(msgspec.Struct, kw_only=True):
    count: int = 0
    bytes: int = 0
    next_seq: int = 0


_encoder = msgspec.msgpack.Encoder()
_held_decoder = msgspec.msgpack.Decoder(Held)
_tally_decoder = msgspec.msgpack.Decoder(Tally)


def _prefix(journey: str) -> bytes:
    return journey.encode() + b"\x00"


def _tally(value: bytes | None) -> Tally:
    if value is None:
        return Tally()
    if value[:1] != _V1:
        raise unversioned(value, "journey queue tally")
    return _tally_decoder.decode(memoryview(value)[1:])


def tally(space: Space, journey: str) -> Tally:
    """What the journey holds now."""
    with space.env.begin() as txn:
        return _tally(txn.get(_prefix(journey), db=space.db("journey_queue")))


def encode(pid: bytes, type: str, data: bytes) -> bytes:
    return _encoder.encode(Held(pid, type, data))


def add(w: Writer, journey: str, items: list[bytes]) -> None:
    """Store op step: hold ``items`` (`encode` d) after the journey's others (the engine kept
    them within the bounds)."""
    db = w.dbs["journey_queue"]
    prefix = _prefix(journey)
    held = _tally(w.txn.get(prefix, db=db))
    for item in items:
        w.txn.put(prefix + held.next_seq.to_bytes(8, "big"), item, db=db)
        held.next_seq += 1
        held.count += 1
        held.bytes += len(item)
    w.txn.put(prefix, _V1 + _encoder.encode(held), db=db)


def take(space: Space, journey: str, limit: int) -> list[tuple[bytes, int, Held]]:
    """The journey's first ``limit`` held entries: (key, size, entry)."""
    prefix = _prefix(journey)
    out: list[tuple[bytes, int, Held]] = []
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("journey_queue"))
        found = cursor.set_range(prefix + bytes(8))
        while found and len(out) < limit:
            key = bytes(cursor.key())
            if not key.startswith(prefix) or len(key) != len(prefix) + 8:
                break
            value = bytes(cursor.value())
            out.append((key, len(value), _held_decoder.decode(value)))
            found = cursor.next()
    return out


def remove(w: Writer, journey: str, taken: list[tuple[bytes, int]]) -> None:
    """Store op step: delete the entries taken (key, size)."""
    db = w.dbs["journey_queue"]
    prefix = _prefix(journey)
    held = _tally(w.txn.get(prefix, db=db))
    for key, size in taken:
        if w.txn.delete(key, db=db):
            held.count -= 1
            held.bytes -= size
    w.txn.put(prefix, _V1 + _encoder.encode(held), db=db)
