"""The event index: each profile's events in time order, in an LMDB environment of its own.

The store's log (``events``, by sequence number) is the record; this index is derived from it,
so it is written without fsync: after each group commit of the store, the writer thread adds
that commit's index entries here and commits with no flush (``writemap`` + no sync), and the
page cache absorbs the random page writes of many commits. What can go wrong, and what fixes it:

- the process dies between the store's commit and the index's: on open, the index replays the
  log after its recorded position (it always records the last sequence number it holds);
- the machine stops (power loss, kernel crash) before unsynced pages reached the disk: the index
  may then be torn. It records the boot it was opened in and whether it was closed cleanly; an
  index left open in an earlier boot is rebuilt from the log.

Keys are ``profile id + ts µs + seq`` (`_keys.index_key`); values are empty.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

import lmdb
import msgspec

from . import _keys as keys
from ._errors import StorageError
from ._records import event_head

__all__ = ["EventIndex", "current_boot"]

log = logging.getLogger("pigeon.store")

_encoder = msgspec.msgpack.Encoder()
#: Initial map of the index. With writemap the file is sparse, so this costs no disk; growing
#: a writemap environment flushes its dirty pages, a stall worth avoiding for a long while.
_INITIAL_MAP = 1024 * 1024 * 1024


def current_boot() -> str:
    """An id of the running kernel's boot (changes at every reboot); empty if unknown."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class EventIndex:
    """The index environment in ``path``; used by the store's writer thread and by readers.

    Writes happen only in the store's writer thread. Readers on other threads take ``lock``
    around their (short) read transactions, so that growing the map never meets one.
    """

    def __init__(self, path: Path, *, boot: str) -> None:
        self.path = path
        self.boot = boot
        self.lock = threading.Lock()
        self.position = 0
        self.rebuilt = False
        self.resizes = 0
        self._env: lmdb.Environment | None = None
        self._entries = None
        self._meta = None

    # -- lifecycle ----------------------------------------------------------------------------

    def open(self) -> None:
        """Open the index; wipe it first if an earlier boot left it open (possibly torn)."""
        meta = self._read_meta()
        if meta is not None and not meta.get("clean") and meta.get("boot") != self.boot:
            log.warning("the event index was not closed cleanly before a restart of the machine; rebuilding it")
            shutil.rmtree(self.path, ignore_errors=True)
            meta = None
            self.rebuilt = True
        self.path.mkdir(parents=True, exist_ok=True)
        env = lmdb.open(
            str(self.path), map_size=_INITIAL_MAP, max_dbs=4, sync=False, metasync=False,
            writemap=True, map_async=True, readahead=False,
        )
        with env.begin(write=True) as txn:
            self._entries = env.open_db(b"entries", txn=txn)
            self._meta = env.open_db(b"meta", txn=txn)
            raw = txn.get(b"position", db=self._meta)
            self.position = 0 if raw is None else msgspec.msgpack.decode(raw)
            txn.put(b"state", _encoder.encode({"boot": self.boot, "clean": False}), db=self._meta)
        env.sync(True)  # "open, not clean" must be on disk before any unsynced write
        self._env = env

    def _read_meta(self) -> dict | None:
        if not (self.path / "data.mdb").exists():
            return None
        try:
            env = lmdb.open(str(self.path), max_dbs=4, readonly=True, lock=False)
        except lmdb.Error:
            return {"clean": False, "boot": None}
        try:
            with env.begin() as txn:
                db = env.open_db(b"meta", txn=txn, create=False)
                raw = txn.get(b"state", db=db)
        except lmdb.Error:
            return {"clean": False, "boot": None}
        finally:
            env.close()
        return None if raw is None else msgspec.msgpack.decode(raw)

    def close(self) -> None:
        env = self._env
        if env is None:
            return
        with env.begin(write=True) as txn:
            txn.put(b"state", _encoder.encode({"boot": self.boot, "clean": True}), db=self._meta)
        env.sync(True)
        env.close()
        self._env = None

    # -- writing (the store's writer thread) --------------------------------------------------

    def catch_up(self, log_env: lmdb.Environment, log_db: object, *, chunk: int = 100_000) -> int:
        """Index every logged event after ``position``; return how many."""
        total = 0
        while True:
            entries = []
            with log_env.begin() as txn:
                cursor = txn.cursor(db=log_db)
                found = cursor.set_range(keys.seq_key(self.position + 1))
                last = self.position
                while found and len(entries) < chunk:
                    key, value = cursor.item()
                    last = keys.seq_of(key)
                    pid, ts = event_head(value)
                    entries.append(keys.index_key(pid, ts, last))
                    found = cursor.next()
            if not entries:
                return total
            self.apply(entries, (), (), last)
            total += len(entries)

    def apply(self, puts: list[bytes], drop_pids: Iterable[int], deletes: Iterable[bytes], position: int) -> None:
        """One index commit: add ``puts``, remove every entry of ``drop_pids`` and the keys in
        ``deletes``, record ``position``. Not flushed to disk (see the module docstring)."""
        while True:
            try:
                self._apply(puts, drop_pids, deletes, position)
                return
            except lmdb.MapFullError:
                self._grow()

    def _apply(self, puts: list[bytes], drop_pids: Iterable[int], deletes: Iterable[bytes], position: int) -> None:
        env = self._require()
        with env.begin(write=True) as txn:
            if puts:
                puts.sort()
                txn.cursor(db=self._entries).putmulti([(key, b"") for key in puts])
            for pid in drop_pids:
                cursor = txn.cursor(db=self._entries)
                prefix = keys.pid_key(pid)
                found = cursor.set_range(prefix)
                while found and cursor.key()[:8] == prefix:
                    found = cursor.delete()
            for key in deletes:
                txn.delete(key, db=self._entries)
            if position != self.position:
                txn.put(b"position", _encoder.encode(position), db=self._meta)
        self.position = position

    def _grow(self) -> None:
        env = self._require()
        with self.lock:
            env.set_mapsize(env.info()["map_size"] * 2)
        self.resizes += 1
        log.info("event index map grown to %d MiB", env.info()["map_size"] >> 20)

    # -- reading ------------------------------------------------------------------------------

    def _require(self) -> lmdb.Environment:
        if self._env is None:
            raise StorageError("the event index is not open")
        return self._env

    def seqs_of(self, pid: int) -> list[tuple[int, bytes]]:
        """Every ``(seq, index key)`` of ``pid``'s events."""
        env = self._require()
        prefix = keys.pid_key(pid)
        with self.lock, env.begin() as txn:
            cursor = txn.cursor(db=self._entries)
            out = []
            found = cursor.set_range(prefix)
            while found and cursor.key()[:8] == prefix:
                key = cursor.key()
                out.append((keys.split_index_key(key)[2], key))
                found = cursor.next()
        return out

    def page(self, pid: int, *, start: bytes | None, since_us: int, until_us: int, reverse: bool, limit: int
             ) -> tuple[list[tuple[int, int]], bytes | None]:
        """Up to ``limit`` ``(seq, ts)`` of ``pid`` in time order and the key to resume from."""
        env = self._require()
        low = keys.index_prefix(pid, since_us)
        high = keys.index_prefix(pid, until_us + 1)
        out: list[tuple[int, int]] = []
        with self.lock, env.begin() as txn:
            cursor = txn.cursor(db=self._entries)
            if not reverse:
                found = cursor.set_range(start or low)
                while found and len(out) < limit:
                    key = cursor.key()
                    if key >= high:
                        return out, None
                    _, ts, seq = keys.split_index_key(key)
                    out.append((seq, ts))
                    found = cursor.next()
                return out, (cursor.key() if found and cursor.key() < high else None)
            # newest first: position on the last key below ``start`` (or ``high``)
            found = cursor.set_range(start or high)
            found = cursor.prev() if found else cursor.last()
            while found and len(out) < limit:
                key = cursor.key()
                if key < low:
                    return out, None
                _, ts, seq = keys.split_index_key(key)
                out.append((seq, ts))
                found = cursor.prev()
            if found and cursor.key() >= low:
                return out, cursor.key() + b"\x00"  # resume strictly below this key
            return out, None

    def expired(self, cutoff_us: int, start: bytes, budget: int) -> tuple[list[bytes], bytes | None]:
        """Index keys of events older than ``cutoff_us``, from ``start``; at most ``budget``
        keys visited, and where to resume (None at the end)."""
        env = self._require()
        out = []
        visited = 0
        with self.lock, env.begin() as txn:
            cursor = txn.cursor(db=self._entries)
            found = cursor.set_range(start)
            while found:
                if visited >= budget:
                    return out, cursor.key()
                visited += 1
                key = cursor.key()
                pid, ts, _ = keys.split_index_key(key)
                if ts < cutoff_us:
                    out.append(key)
                    found = cursor.next()
                else:
                    # the rest of this profile's events are newer: jump to the next profile
                    found = cursor.set_range(keys.pid_key(pid + 1))
        return out, None

    def count(self) -> int:
        env = self._require()
        with self.lock, env.begin() as txn:
            return txn.stat(self._entries)["entries"]
