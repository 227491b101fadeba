"""Journey instances and their timers in LMDB (each sandbox's own databases).

    instances  profile id (8) + utf-8 journey id  -> versioned `machine.Instance`
    timers     wake µs (u64 BE) + profile id (8) + utf-8 journey id -> b""
    journey_traces  profile id (8) + journey id + NUL + step µs (u64 BE) + n (u16 BE)
                    -> a step (test mode only; `MAX_TRACE` an instance, the oldest go)

An instance's key starts with its profile's id, so a profile's instances are together (one
cursor range per event of that profile) and move with it if profiles are ever partitioned.
``timers`` is ordered by time: the due ones are the first keys. An instance that ended keeps
its record (re-entrance is decided on it) and has no timer.
"""

from __future__ import annotations

import msgspec
import msgspec.structs

from server.journeys import gauges
from server.journeys.machine import Instance, Step
from server.profiles.records import unversioned
from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["instance_key", "timer_key", "save", "instances_of", "of_journey", "due", "trace", "read_trace",
           "MAX_TRACE", "decode"]

_V1 = b"\x01"
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Instance)


def instance_key(pid: bytes, journey: str) -> bytes:
    return pid + journey.encode()


def timer_key(wake_us: int, pid: bytes, journey: str) -> bytes:
    return wake_us.to_bytes(8, "big") + pid + journey.encode()


def _decode(value: bytes) -> Instance:
    if value[:1] != _V1:
        raise unversioned(value, "journey instance")
    return _decoder.decode(memoryview(value)[1:])


decode = _decode


def save(w: Writer, pid: bytes, instance: Instance, old_wake_us: int) -> None:
    """Store op step: the instance as it is now, its timer moved from ``old_wake_us``, and
    the gauges of where it was and is (`server.journeys.gauges`: its stored record read here)."""
    key = instance_key(pid, instance.journey)
    old = w.txn.get(key, db=w.dbs["instances"])
    gauges.moved(w, None if old is None else _decode(old), instance)
    if old_wake_us and old_wake_us != instance.wake_us:
        w.txn.delete(timer_key(old_wake_us, pid, instance.journey), db=w.dbs["timers"])
    if instance.wake_us and instance.wake_us != old_wake_us:
        w.txn.put(timer_key(instance.wake_us, pid, instance.journey), b"", db=w.dbs["timers"])
    w.txn.put(key, _V1 + _encoder.encode(instance), db=w.dbs["instances"])


#: Steps kept per test-mode instance.
MAX_TRACE = 500
_step_encoder = msgspec.msgpack.Encoder()
_step_decoder = msgspec.msgpack.Decoder(Step)


def trace(w: Writer, pid: bytes, journey: str, steps: list[Step]) -> None:
    """Store op step: a test-mode instance's steps, after its earlier ones."""
    db = w.dbs["journey_traces"]
    prefix = pid + journey.encode() + b"\x00"
    cursor = w.txn.cursor(db=db)
    count = 0
    if cursor.set_range(prefix):
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            count += 1
    for n, step in enumerate(steps, count):  # n orders steps of the same µs
        kept = msgspec.structs.replace(step, push=step.push if isinstance(step.push, str) else None)
        w.txn.put(prefix + step.at_us.to_bytes(8, "big") + (n & 0xFFFF).to_bytes(2, "big"), _step_encoder.encode(kept),
                  db=db)
    count += len(steps)
    if count > MAX_TRACE and cursor.set_range(prefix):
        for _ in range(count - MAX_TRACE):
            cursor.delete()


def read_trace(space: Space, pid: bytes, journey: str) -> list[Step]:
    prefix = pid + journey.encode() + b"\x00"
    out = []
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("journey_traces"))
        if cursor.set_range(prefix):
            for key, value in cursor:
                if not bytes(key).startswith(prefix):
                    break
                out.append(_step_decoder.decode(value))
    return out


def instances_of(space: Space, pid: bytes) -> dict[str, Instance]:
    """The profile's instances (running or ended), by journey."""
    out: dict[str, Instance] = {}
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("instances"))
        if cursor.set_range(pid):
            for key, value in cursor:
                if key[:8] != pid:
                    break
                out[bytes(key[8:]).decode()] = _decode(value)
    return out


def of_journey(space: Space, journey: str, limit: int, *, before: int | None = None,
               after: bytes | None = None) -> tuple[list[tuple[bytes, Instance]], bytes | None]:
    """Up to ``limit`` running instances of ``journey`` (of versions before ``before`` if
    given), from the profile id after ``after``: a scan of the sandbox's instances, for a stop
    or a move, which are rare. Returns them and where to go on from (None: the scan is done)."""
    out: list[tuple[bytes, Instance]] = []
    tail = journey.encode()
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("instances"))
        found = cursor.set_range(after + b"\xff") if after is not None else cursor.first()
        while found:
            key = bytes(cursor.key())
            if key[8:] == tail:
                instance = _decode(cursor.value())
                if not instance.ended and (before is None or instance.version < before):
                    out.append((key[:8], instance))
                    if len(out) >= limit:
                        return out, key[:8]
            found = cursor.next()
    return out, None


def due(space: Space, now_us: int, limit: int) -> tuple[list[tuple[int, bytes, str]], int | None]:
    """Up to ``limit`` timers due by ``now_us``: (wake µs, profile id, journey); and the time of
    the first timer not due yet (None: none)."""
    out: list[tuple[int, bytes, str]] = []
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("timers"))
        found = cursor.first()
        while found:
            key = cursor.key()
            wake = int.from_bytes(key[:8], "big")
            if wake > now_us or len(out) >= limit:
                return out, wake
            out.append((wake, bytes(key[8:16]), bytes(key[16:]).decode()))
            found = cursor.next()
    return out, None


