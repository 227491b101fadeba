"""How many instances of a journey run now, per version and node where they are ("waiting
now"), kept in the same store op as the instances.

Database ``journey_gauges`` (each sandbox's):

    utf-8 journey id + NUL + version (u32 BE) + utf-8 node id -> count (u64 BE)
    NUL                                                        -> b"" (the gauges were built)

`moved` is called by `instances.save` before it stores an instance: it reads the instance's
previous record in the same transaction, so a gauge moves by exactly what the commit did (an
entry adds one; a step from a node to another moves one; an end takes one away), and a crash
loses neither. A store written before the gauges existed has them counted once, at the
engine's start (`build`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from server.journeys.machine import Instance
from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["moved", "build", "built", "waiting", "running"]

_BUILT = b"\x00"


def _key(journey: str, version: int, node: str) -> bytes:
    return journey.encode() + b"\x00" + version.to_bytes(4, "big") + node.encode()


def _add(w: Writer, key: bytes, n: int) -> None:
    db = w.dbs["journey_gauges"]
    old = w.txn.get(key, db=db)
    count = max(0, (int.from_bytes(old, "big") if old is not None else 0) + n)
    if count:
        w.txn.put(key, count.to_bytes(8, "big"), db=db)
    elif old is not None:
        w.txn.delete(key, db=db)


def moved(w: Writer, old: Instance | None, new: Instance) -> None:
    """Store op step: ``new`` replaces ``old`` (None: it enters): the gauges follow."""
    before = None if old is None or old.ended else (old.version, old.node)
    after = None if new.ended else (new.version, new.node)
    if before == after:
        return
    if before is not None:
        _add(w, _key(new.journey, *before), -1)
    if after is not None:
        _add(w, _key(new.journey, *after), 1)


def built(space: Space) -> bool:
    with space.env.begin() as txn:
        return txn.get(_BUILT, db=space.db("journey_gauges")) is not None


def build(w: Writer, decode: Callable[[bytes], Instance]) -> None:
    """Store op: the gauges, counted from scratch from every stored instance (``decode`` d)."""
    running: Counter[tuple[str, int, str]] = Counter()
    for value in w.txn.cursor(db=w.dbs["instances"]).iternext(keys=False, values=True):
        instance = decode(value)
        if not instance.ended:
            running[(instance.journey, instance.version, instance.node)] += 1
    db = w.dbs["journey_gauges"]
    w.txn.drop(db, delete=False)
    for (journey, version, node), n in running.items():
        w.txn.put(_key(journey, version, node), n.to_bytes(8, "big"), db=db)
    w.txn.put(_BUILT, b"", db=db)


def waiting(space: Space, journey: str) -> dict[int, dict[str, int]]:
    """The journey's running instances now: by version, by node."""
    prefix = journey.encode() + b"\x00"
    out: dict[int, dict[str, int]] = {}
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("journey_gauges"))
        found = cursor.set_range(prefix)
        while found:
            key = bytes(cursor.key())
            if not key.startswith(prefix):
                break
            version = int.from_bytes(key[len(prefix):len(prefix) + 4], "big")
            out.setdefault(version, {})[key[len(prefix) + 4:].decode()] = int.from_bytes(cursor.value(), "big")
            found = cursor.next()
    return out


def running(space: Space, journey: str) -> int:
    """The journey's running instances now, all versions."""
    return sum(sum(nodes.values()) for nodes in waiting(space, journey).values())
