"""The pushes delivered to each profile, which frequency caps count.

Database ``push_log`` (each sandbox's): profile id (8) + µs (u64 BE) + the push (utf-8: a
journey cycle's execution with the journey and node, an execution of ``messages.send``, or
``push.send:`` and an id of the call: `push_of`) -> b"". A push counts once per profile,
however many of its devices it reached and in however many commits they were settled.
A delivery is logged when its result is settled (`server.messages.outbox.settle_batch`; for
``push.send``, by the delivery actor: `log_each`), whoever sent it, so a journey's cap counts
every journey's pushes, ``messages.send`` 's and ``push.send`` 's alike (a push.send to a token
counts for the profile the token is registered to). Entries older than `KEPT_US` (the longest
cap's period, a month) go as new ones come.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["KEPT_US", "RECENT", "push_of", "log", "log_each", "count_since"]

#: The longest a cap looks back (a month), and so what the log keeps.
KEPT_US = 30 * 86_400_000_000
#: A profile's latest entries a delivery is compared with (the devices of one push settle
#: within moments of each other; a scan of all its entries cost a month of them per delivery).
RECENT = 16


def push_of(execution: str, tracking: dict[str, Any] | None) -> str:
    """What a delivery is a push of: the execution, and for a journey's push its journey and
    node (one cycle's execution carries the pushes of several nodes and journeys)."""
    if tracking and tracking.get("n"):
        return f"{execution}/{tracking.get('j', '')}/{tracking['n']}"
    return execution


def log(w: Writer, pid: bytes, at_us: int, sender: str) -> None:
    """Store op step: a push (``sender``) delivered to the profile, logged once however many
    of its devices it reached (their results settle close together: the profile's latest
    `RECENT` entries are looked at); its entries older than a month go."""
    db = w.dbs["push_log"]
    tail = sender.encode()
    cursor = w.txn.cursor(db=db)
    # its latest entries, newest first: back from the first key after the profile's range
    found = cursor.prev() if cursor.set_range(pid + b"\xff" * 9) else cursor.last()
    for _ in range(RECENT):
        if not found or cursor.key()[:8] != pid:
            break
        if cursor.key()[16:] == tail:
            return  # another device of the same push
        found = cursor.prev()
    w.txn.put(pid + at_us.to_bytes(8, "big") + tail, b"", db=db)
    if cursor.set_range(pid):
        limit = pid + max(0, at_us - KEPT_US).to_bytes(8, "big")
        while cursor.key()[:8] == pid and cursor.key()[:16] < limit:
            if not cursor.delete():
                break


def log_each(w: Writer, pids: Iterable[bytes], sender: str) -> None:
    """Store op: pushes delivered now to the profiles ``pids`` by ``sender``."""
    for pid in pids:
        log(w, pid, w.now, sender)


def count_since(space: Space, pid: bytes, since_us: int) -> int:
    """Pushes delivered to the profile since ``since_us``."""
    count = 0
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("push_log"))
        if cursor.set_range(pid + max(0, since_us).to_bytes(8, "big")):
            for key in cursor.iternext(keys=True, values=False):
                if key[:8] != pid:
                    break
                count += 1
    return count
