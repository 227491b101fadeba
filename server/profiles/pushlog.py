"""The pushes delivered to each profile, which frequency caps count.

Database ``push_log`` (each sandbox's): profile id (8) + µs (u64 BE) + what sent it (utf-8: a
journey id, or an execution of ``messages.send``) -> b"". A delivery is logged when its result
is settled (`server.messages.outbox.settle_batch`), whoever sent it, so a journey's cap counts
every journey's pushes and ``messages.send`` 's alike; entries older than `KEPT_US` (the
longest cap's period, a month) go as new ones come.
"""

from __future__ import annotations

from server.profiles.sandboxes import Space
from server.profiles.store import Writer

__all__ = ["KEPT_US", "log", "count_since"]

#: The longest a cap looks back (a month), and so what the log keeps.
KEPT_US = 30 * 86_400_000_000


def log(w: Writer, pid: bytes, at_us: int, sender: str) -> None:
    """Store op step: a push delivered to the profile; its entries older than a month go."""
    db = w.dbs["push_log"]
    w.txn.put(pid + at_us.to_bytes(8, "big") + sender.encode(), b"", db=db)
    cursor = w.txn.cursor(db=db)
    if cursor.set_range(pid):
        limit = pid + max(0, at_us - KEPT_US).to_bytes(8, "big")
        while cursor.key()[:8] == pid and cursor.key()[:16] < limit:
            if not cursor.delete():
                break


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
