"""The event index: each profile's events in time order, in memory, derived from the log.

The store's log (``events``, by sequence number) is the record. This index answers "the events
of profile P between two times" and is rebuilt from the log whenever the store opens. Kept in
LMDB, every commit would have copied and written about one 4 KB page per profile it touched
(a B-tree keyed by profile takes random writes); in memory it costs a dictionary lookup and
an append per event, and about 17 bytes per event plus ~200 bytes per profile (measured; the
allocator adds about 2 bytes per event around the arrays, see ``bench/ingest.py``'s memory phase).

Each profile's entries are an ``array('Q')`` of interleaved ``ts, seq`` pairs sorted by
``(ts, seq)``. Only the Trio thread changes the index (after the commit that logged the
events); the writer thread may read it while a transaction is being applied.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable

import lmdb

from server.profiles import keys as keys

__all__ = ["EventIndex", "Entry"]

#: A profile id (8 bytes, as in keys), an event timestamp (µs) and its sequence number.
Entry = tuple[bytes, int, int]


def _bisect(pairs: array, ts: int, seq: int) -> int:
    """The number of pairs in ``pairs`` that sort before ``(ts, seq)``."""
    lo, hi = 0, len(pairs) // 2
    while lo < hi:
        mid = (lo + hi) // 2
        t = pairs[2 * mid]
        if t < ts or (t == ts and pairs[2 * mid + 1] < seq):
            lo = mid + 1
        else:
            hi = mid
    return lo


class EventIndex:
    def __init__(self) -> None:
        self._by_pid: dict[bytes, array] = {}

    # -- building -----------------------------------------------------------------------------

    def rebuild(self, txn: lmdb.Transaction[bytes], log_db: lmdb._Database) -> int:
        """Index the whole log (read in ``txn``); return the number of events."""
        self._by_pid.clear()
        by_pid = self._by_pid
        cursor = txn.cursor(db=log_db)
        seq_of = keys.seq_of
        for key, value in cursor:
            pid = value[1:9]  # the log's value layout: version, profile id, ts, ... (`server.profiles.records`)
            pairs = by_pid.get(pid)
            if pairs is None:
                pairs = by_pid[pid] = array("Q")
            pairs.append(int.from_bytes(value[9:17], "big"))
            pairs.append(seq_of(key))
        for pid, pairs in by_pid.items():
            if not _is_sorted(pairs):
                by_pid[pid] = _sorted(pairs)
        return self.count()

    def add(self, entries: Iterable[Entry]) -> None:
        """Index newly logged events (in log order)."""
        by_pid = self._by_pid
        for pid, ts, seq in entries:
            pairs = by_pid.get(pid)
            if pairs is None:
                pairs = by_pid[pid] = array("Q")
            if not pairs or ts > pairs[-2] or (ts == pairs[-2] and seq > pairs[-1]):
                pairs.append(ts)
                pairs.append(seq)
            else:  # an event older than the profile's latest: keep time order
                at = 2 * _bisect(pairs, ts, seq)
                pairs[at:at] = array("Q", (ts, seq))

    def drop(self, pid: bytes) -> None:
        """Forget a deleted profile."""
        self._by_pid.pop(pid, None)

    def remove(self, entries: Iterable[Entry]) -> None:
        """Forget events deleted from the log."""
        gone: dict[bytes, set[int]] = {}
        for pid, _, seq in entries:
            gone.setdefault(pid, set()).add(seq)
        for pid, seqs in gone.items():
            pairs = self._by_pid.get(pid)
            if pairs is None:
                continue
            n = len(seqs)
            if set(pairs[1 : 2 * n : 2]) == seqs:
                del pairs[: 2 * n]  # the oldest ones, as the retention sweep removes
            else:
                kept = array("Q")
                for i in range(0, len(pairs), 2):
                    if pairs[i + 1] not in seqs:
                        kept.append(pairs[i])
                        kept.append(pairs[i + 1])
                pairs = self._by_pid[pid] = kept
            if not pairs:
                del self._by_pid[pid]

    # -- reading ------------------------------------------------------------------------------

    def seqs_of(self, pid: bytes) -> list[int]:
        pairs = self._by_pid.get(pid)
        return [] if pairs is None else list(pairs[1::2])

    def page(
        self, pid: bytes, *, after: tuple[int, int] | None, since_us: int, until_us: int, reverse: bool, limit: int
    ) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
        """Up to ``limit`` ``(seq, ts)`` of ``pid`` within ``[since_us, until_us]`` in time order
        (newest first with ``reverse``), strictly after the ``(ts, seq)`` cursor ``after``;
        and the cursor to resume from, or None at the end."""
        pairs = self._by_pid.get(pid)
        if pairs is None:
            return [], None
        low = _bisect(pairs, since_us, 0)
        high = _bisect(pairs, until_us + 1, 0)
        out = []
        if not reverse:
            start = low if after is None else max(low, _bisect(pairs, after[0], after[1] + 1))
            stop = min(high, start + limit)
            for i in range(start, stop):
                out.append((pairs[2 * i + 1], pairs[2 * i]))
            more = stop < high
        else:
            start = high if after is None else min(high, _bisect(pairs, after[0], after[1]))
            stop = max(low, start - limit)
            for i in range(start - 1, stop - 1, -1):
                out.append((pairs[2 * i + 1], pairs[2 * i]))
            more = stop > low
        if not more or not out:
            return out, None
        seq, ts = out[-1]
        return out, (ts, seq)

    def expired(self, cutoff_us: int) -> list[Entry]:
        """Every event older than ``cutoff_us``."""
        out: list[Entry] = []
        for pid, pairs in self._by_pid.items():
            n = _bisect(pairs, cutoff_us, 0)
            out.extend((pid, pairs[2 * i], pairs[2 * i + 1]) for i in range(n))
        return out

    def count(self) -> int:
        return sum(len(p) for p in self._by_pid.values()) // 2

    def events_of(self, sandbox: int) -> int:
        """The events of the profiles of sandbox number ``sandbox`` (the top 16 bits of their ids)."""
        prefix = sandbox.to_bytes(2, "big")
        return sum(len(p) for pid, p in self._by_pid.items() if pid[:2] == prefix) // 2

    def statistics(self) -> dict[str, int]:
        memory = sys.getsizeof(self._by_pid) + sum(sys.getsizeof(p) + 41 for p in self._by_pid.values())
        return {"profiles": len(self._by_pid), "events": self.count(), "memory_bytes": memory}


def _is_sorted(pairs: array) -> bool:
    return all(
        pairs[i] < pairs[i + 2] or (pairs[i] == pairs[i + 2] and pairs[i + 1] < pairs[i + 3])
        for i in range(0, len(pairs) - 2, 2)
    )


def _sorted(pairs: array) -> array:
    ordered = sorted(zip(pairs[0::2], pairs[1::2]))
    out = array("Q")
    for ts, seq in ordered:
        out.append(ts)
        out.append(seq)
    return out

