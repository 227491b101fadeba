"""Read-audience entries: every profile that matches, once or on a schedule, at a capped rate.

Database ``journey_runs`` (each sandbox's): utf-8 journey id -> versioned `Run`, the progress of
the journey's current read: when it (or the next one) starts, the last profile id it read, and
when it last entered profiles. The engine reads profiles in id order from there, at most the
entry's ``rate`` a second, and commits the run's progress with the instances it entered, so a
restart goes on where the read was and enters nobody twice; a read that reached the last
profile waits for its ``every`` (or is done).
"""

from __future__ import annotations

import msgspec

from server.profiles.records import ProfileRecord, unversioned
from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["Run", "get_run", "put_run", "allowance", "page"]

_V1 = b"\x01"
_encoder = msgspec.msgpack.Encoder()


class Run(msgspec.Struct, kw_only=True):
    #: When the current read started or the next one starts (µs); 0: done for good.
    next_us: int
    #: The last profile id read by the current read (None: it has not started).
    after: bytes | None = None
    #: Whether a read is under way (from ``next_us``).
    running: bool = False
    #: When it last entered profiles (for the rate).
    last_us: int = 0
    entered: int = 0
    #: For an audience entry, this is the read of who already matches, and ``source`` the
    #: audience it is for (`server.journeys.audiences`).
    source: str = ""


_run_decoder = msgspec.msgpack.Decoder(Run)


def get_run(space: Space, journey: str) -> Run | None:
    with space.env.begin() as txn:
        value = txn.get(journey.encode(), db=space.db("journey_runs"))
    if value is None:
        return None
    if value[:1] != _V1:
        raise unversioned(value, "journey read")
    return _run_decoder.decode(memoryview(value)[1:])


def put_run(w: Writer, journey: str, run: Run) -> None:
    """Store op step: the read's progress."""
    w.txn.put(journey.encode(), _V1 + _encoder.encode(run), db=w.dbs["journey_runs"])


def allowance(run: Run, rate: int, now_us: int, limit: int) -> int:
    """Profiles the read may enter now: ``rate`` a second since it last did (a second's worth
    at most), ``limit`` at most."""
    elapsed = min(1_000_000, max(0, now_us - run.last_us)) if run.last_us else 1_000_000
    return min(limit, rate * elapsed // 1_000_000)


def page(space: Space, run: Run, limit: int) -> list[tuple[bytes, ProfileRecord]]:
    """The next ``limit`` profiles of the read, in id order."""
    return space.scan_profiles(run.after, limit) if limit > 0 else []
