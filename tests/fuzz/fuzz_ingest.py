"""Coverage-guided fuzzing of the ingest batch decoder, `server.profiles.ingest.decode_batch` (atheris).

    .venv/bin/python tests/fuzz/fuzz_ingest.py -max_total_time=60

The input is an ``events.ingest`` body. Whatever it holds: `decode_batch` returns or raises
`InvalidArgument` (nothing else), in bounded time. When it returns, every event of the batch
is either accepted or rejected once (by index, in order, with a field and a message naming
that event); an accepted event has an identity of at most 511 bytes, a timestamp inside the
retention window (or the clock's), and data that is a map with string keys, nested at most
`MAX_VALUE_DEPTH` levels, that reads back (the rule of what is stored: it can be read back).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from typing import Any

import atheris

with atheris.instrument_imports(include=["protocols", "server"]):
    import msgspec

    from server.profiles.ingest import MAX_FUTURE_SKEW_US, decode_batch
    from server.profiles.keys import MAX_KEY_BYTES
    from server.runtime.errors import InvalidArgument
    from server.runtime.values import MAX_VALUE_DEPTH, check_depth

from _fuzz import bounded, main

NOW_US = 1_780_000_000 * 10**6
RETENTION_US = 90 * 86_400 * 10**6


class _Batch(msgspec.Struct):
    events: list[msgspec.Raw]


_batch = msgspec.msgpack.Decoder(_Batch)
_data = msgspec.msgpack.Decoder(dict[str, Any])


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _check_accepted(event: tuple[str, str, int, Any]) -> None:
    identity, _type, ts, data = event
    assert len(identity.encode()) <= MAX_KEY_BYTES, identity
    assert NOW_US - RETENTION_US <= ts <= NOW_US + MAX_FUTURE_SKEW_US, ts
    stored = _data.decode(data)  # what is stored reads back as a map with string keys
    check_depth(stored, "$", "data")
    assert _depth(stored) <= MAX_VALUE_DEPTH + 1
    again = msgspec.msgpack.encode(stored)
    assert msgspec.msgpack.encode(_data.decode(again)) == again  # bytes, not values: NaN is not NaN


@bounded(2.0)
def test_one_input(data: bytes) -> None:
    try:
        accepted, rejected = decode_batch(data, now_us=NOW_US, retention_us=RETENTION_US)
    except InvalidArgument as exc:
        assert exc.message, exc
        return
    count = len(_batch.decode(data).events)  # it returned: the body is a map with an events list
    indexes = [r.index for r in rejected]
    assert indexes == sorted(set(indexes)) and all(0 <= i < count for i in indexes), indexes
    assert len(accepted) + len(rejected) == count, (len(accepted), indexes, count)
    for rejection in rejected:
        prefix = f"$.events[{rejection.index}]"
        assert rejection.field is not None and rejection.field.startswith(prefix), rejection
        assert rejection.message.startswith(rejection.field), rejection
        assert rejection.code in ("INVALID_ARGUMENT", "OUT_OF_RANGE"), rejection
    for event in accepted:
        _check_accepted(event)


def seeds() -> list[bytes]:
    now = datetime.fromtimestamp(NOW_US / 1e6, UTC)
    events = [
        {"identity": "crm:1", "type": "app.launch"},
        {"identity": "crm:2", "type": "pushTracking.applicationOpened", "ts": now,
         "data": {"_p": "m1", "n": 1, "f": 1.5, "l": [1, [2, {"a": None}]], "t": now, "b": b"x"}},
        {"identity": "crm:3", "type": "a", "data": {"deep": [[[[[[[[[[1]]]]]]]]]]}},
        {"identity": "x" * 600 + ":1", "type": "a"},
        {"identity": "crm:4", "type": "a", "data": {1: 2}},
        {"identity": "crm:5", "type": "a", "data": [1]},
        {"identity": "crm:6", "type": "a", "unknown": 1},
        {"identity": "crm:7", "type": "a", "ts": datetime(1971, 1, 1, tzinfo=UTC)},
    ]
    out = [msgspec.msgpack.encode({"events": events}), msgspec.msgpack.encode({"events": events[:2]})]
    out += [msgspec.msgpack.encode({"events": [e]}) for e in events]
    out += [b"\x81\xa6events\x91" + b"\x91" * 40 + b"\x01", b"\x81\xa6events\xc0", b"\x90", b""]
    return out


TOKENS = [msgspec.msgpack.encode(word) for word in (
    "events", "identity", "type", "ts", "data", "crm:1", "app.launch", "pushTracking.applicationOpened", "_p")] + [
    b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff", b"\x91", b"\x81", b"\xdc\xff\xff", b"\xde\x00\x01", b"\xcb", b"\xc4\x01"]

if __name__ == "__main__":
    main(test_one_input, seeds(), TOKENS)
    sys.exit(0)
