"""The profile store: one LMDB environment, one writer actor with group commit.

Writes are `WriteOp` messages. The writer takes every op waiting in its mailbox, applies them
in one write transaction inside one ``trio.to_thread.run_sync`` call (an LMDB write transaction
belongs to its thread), commits, and only then resolves each op's future: an acknowledged write
is on disk. Each op runs in a nested transaction, so an op that fails (a missing profile, a
value too large) is rolled back alone and its neighbours still commit. While one batch
commits the next one gathers, so the batch size follows the load.

Experience events are appended to a log in commit order (``events``, keyed by sequence
number): an acknowledged ingest costs a few sequential pages whatever profiles it touches.
Profiles written in a sandbox the journey engine watches go to a change feed (``changes``).
Each profile's time-ordered view of its events is an in-memory index derived from the log
(`server.profiles.index`), updated after each commit and rebuilt from the log when the store opens.

The data folder holds every profile, token and credential (`server.profiles.folder`: private
to its owner, and locked for one process).

Reads are synchronous, short read transactions on the Trio thread: LMDB readers never block
the writer and a point read costs microseconds, far less than a hop to a worker thread. No read
transaction is held across an ``await``, which is what makes growing the map between two write
batches safe.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any, Generic, TypeVar, TypeVarTuple

import lmdb
import msgspec
import trio

from server.profiles import folder, keys, sandboxes, sealing
from server.profiles.sandboxes import Space
from server.runtime.actor import Actor, Future
from server.runtime.masterkey import Keyring, default_path
from server.runtime.errors import (
    InvalidArgument,
    NotFound,
    SchemaError,
    ServerError,
    StorageError,
    ActorError,
    MailboxClosed,
)
from server.profiles.records import (
    SCHEMA_VERSION,
    ProfileRecord,
    decode_profile,
    encode_profile,
)
from server.profiles.index import Entry, EventIndex

__all__ = ["ProfileStore", "Writer", "WriteOp", "InEvent", "MAX_PROFILE_BYTES", "MAX_REGISTRATIONS"]

log = logging.getLogger("pigeon.store")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: An encoded profile record may not exceed this.
MAX_PROFILE_BYTES = 256 * 1024
#: Registrations kept per profile by default (``store.max_registrations``); registering one
#: more evicts the least recently seen.
MAX_REGISTRATIONS = 50

#: Named databases the environment may hold: the shared ones and each sandbox's
#: (`server.profiles.sandboxes`; each domain reads and writes its own: see
#: `server.profiles.keys` for where they are described).
_MAX_DBS = len(sandboxes.SHARED_DATABASES) + sandboxes.MAX_SANDBOXES * len(sandboxes.SANDBOX_DATABASES) + 4
_meta_encoder = msgspec.msgpack.Encoder()


class WriteOp(Generic[T]):
    """A write for the store actor: ``fn(writer, *args)`` runs inside the write transaction.

    ``weight`` is its size in events (1 for a profile write): a group commit holds at most
    ``max_commit_events`` of them, so a backlog is cleared in commits of bounded duration.
    ``space`` is the sandbox whose databases the op sees as ``writer.dbs`` (None: ``default``).
    """

    __slots__ = ("fn", "args", "future", "weight", "space")

    def __init__(self, fn: Callable[[Writer, *Ts], T], *args: *Ts, weight: int = 1, space: Space | None = None) -> None:
        self.fn: Callable[..., T] = fn
        self.args: tuple[Any, ...] = args
        self.weight = weight
        self.space = space
        self.future: Future[T] = Future()


#: A validated event ready for storage: identity, type, timestamp (µs), encoded data map.
InEvent = tuple[str, str, int, msgspec.Raw]


class ProfileStore(Actor):
    """Owns the LMDB environment in ``path``.

    Args:
        path: the data folder (created if missing).
        map_size: initial map size in bytes; doubled whenever a write finds it full.
        max_batch: most ops committed in one transaction.
        max_commit_events: most events (op weights) committed in one transaction, unless a
            single op is heavier.
        max_registrations: push registrations kept per profile.
        retention_us: events older than this are deleted by the sweeper.
        sweep_interval: seconds between retention sweeps.
        clock: returns the current time in µs since the epoch.
        sync: fsync on commit (turn off only for throwaway data).
        master_key_file: the master key (`server.runtime.masterkey`); default beside ``path``.
            It is read, or made, when the store opens.
        sealed: the databases holding values sealed with the master key, and how to re-seal
            one (`server.profiles.sealing`): the server gives every domain's; a store without
            them does not migrate a folder of schema version 1.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        map_size: int = 1024 * 1024 * 1024,
        max_batch: int = 1024,
        max_commit_events: int = 20_000,
        max_registrations: int = MAX_REGISTRATIONS,
        retention_us: int = 90 * 86_400 * 1_000_000,
        sweep_interval: float = 3600.0,
        clock: Callable[[], int],
        sync: bool = True,
        mailbox_size: int = 1024,
        master_key_file: Path | None = None,
        sealed: Mapping[str, sealing.Reseal] | None = None,
    ) -> None:
        super().__init__("store", mailbox_size)
        self.path = Path(path)
        self.master_key_file = master_key_file if master_key_file is not None else default_path(self.path)
        #: Seals the secrets kept here (set when the store opens).
        self.keyring: Keyring | None = None
        self.sealed: Mapping[str, sealing.Reseal] = sealed or {}
        #: A master key rotation is under way (`sealing.rotate`).
        self.rotating = False
        self.map_size = map_size
        self.max_batch = max_batch
        self.max_commit_events = max_commit_events
        self.max_registrations = max_registrations
        self.retention_us = retention_us
        self.sweep_interval = sweep_interval
        self.clock = clock
        self.sync = sync
        self._env: lmdb.Environment | None = None
        self._dbs: dict[str, lmdb._Database] = {}
        self._spaces: dict[str, Space] = {}
        self._lock: IO[str] | None = None
        self._next_pid = 1
        self._next_seq = 1
        self._next_change = 1
        #: Sandboxes (numbers) whose profile writes go to the change feed (read back at open, as the
        #: journey engine stored it), and what is called after a commit that fed it (its wake-up).
        self.watched: frozenset[int] = frozenset()
        self.on_change: Callable[[], None] | None = None
        self.index = EventIndex()
        self.commits = 0
        self.writes = 0
        self.map_resizes = 0
        self.swept = 0
        #: Time spent applying ops (Python, holds the GIL) and committing (fsync) so far.
        self.apply_seconds = 0.0
        self.commit_seconds = 0.0
        #: The slowest group commit so far: (total, apply, commit) seconds.
        self.slowest = (0.0, 0.0, 0.0)

    # -- lifecycle ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # In a thread: rebuilding the event index takes about a second per million events,
        # and after a restart the rest of the server keeps serving meanwhile.
        await trio.to_thread.run_sync(self._open)
        try:
            async with trio.open_nursery() as nursery:
                if self.sweep_interval > 0:
                    nursery.start_soon(self._sweeper)
                task_status.started()
                while batch := await self.receive_batch(self.max_batch):
                    for chunk in _by_weight(batch, self.max_commit_events):
                        await self._write(chunk)
                nursery.cancel_scope.cancel()
        finally:
            self._close()

    def _open(self) -> None:
        self._lock = folder.open_folder(self.path)
        try:
            self.keyring = Keyring.load(self.master_key_file)
            self._open_environment()
        except BaseException:
            self._unlock_folder()
            raise

    def _unlock_folder(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _open_environment(self) -> None:
        env = self._open_lmdb()
        try:
            compact = self._check_schema(env)
            if compact:
                env = sealing.compact(env, self.path, self._open_lmdb)
                self._open_databases(env)
            started = time.perf_counter()
            with env.begin() as txn:
                indexed = self.index.rebuild(txn, self._dbs["events"])
        except BaseException:
            env.close()
            raise
        if indexed:
            log.info("event index: %d events indexed in %.1fs", indexed, time.perf_counter() - started)
        self._env = env
        log.info("store open at %s (map %d MiB)", self.path, env.info()["map_size"] >> 20)

    def _open_lmdb(self) -> lmdb.Environment:
        try:
            return lmdb.open(
                str(self.path),
                map_size=self.map_size,
                max_dbs=_MAX_DBS,
                sync=self.sync,
                readahead=False,
                writemap=False,  # nested transactions need it off
                mode=folder.FILE_MODE,
            )
        except (OSError, lmdb.Error) as exc:
            raise StorageError(f"cannot open the data folder {str(self.path)!r}: {exc}") from exc

    def _open_databases(self, env: lmdb.Environment) -> None:
        """Open the shared databases and every sandbox's (`sandboxes.Space`)."""
        with env.begin(write=True) as txn:
            shared = {name: env.open_db(name.encode(), txn=txn) for name in sandboxes.SHARED_DATABASES}
            sandboxes.ensure_default(txn, shared["sandboxes"], self.clock())
            spaces = {
                record.name: (record, sandboxes.open_databases(env, txn, record.number))
                for record in sandboxes.read_sandboxes(txn, shared["sandboxes"])
            }
        self._dbs = shared
        self._spaces = {}
        for record, dbs in spaces.values():
            self._add_space(record, dbs)

    def _add_space(self, record: sandboxes.SandboxRecord, dbs: dict[str, lmdb._Database]) -> None:
        self._spaces[record.name] = Space(self, record, {**self._dbs, **dbs})

    def _check_schema(self, env: lmdb.Environment) -> bool:
        """Open the databases, record or check (and migrate) the schema, bring the sealed
        values under the newest master key (`server.profiles.sealing`); whether a migration
        left the environment to compact."""
        keyring = self.keyring
        assert keyring is not None
        self._open_databases(env)
        with env.begin(write=True) as txn:
            meta = self._dbs["meta"]
            version = txn.get(b"schema", db=meta)
            if version is None:
                txn.put(b"schema", _meta_encoder.encode(SCHEMA_VERSION), db=meta)
                txn.put(b"created_us", _meta_encoder.encode(self.clock()), db=meta)
            elif (found := msgspec.msgpack.decode(version)) not in (1, SCHEMA_VERSION):
                raise SchemaError(
                    f"the data folder {str(self.path)!r} has schema version {found}; "
                    f"this Pigeon reads version {SCHEMA_VERSION} and has no migration from it"
                )
            else:
                sealing.open_sealed(txn, [(sp.number, sp.dbs) for sp in self.spaces()], found, keyring, self.sealed,
                                    str(self.path))
            self._next_pid = msgspec.msgpack.decode(txn.get(b"next_pid", db=meta) or b"\x01")
            self._next_seq = msgspec.msgpack.decode(txn.get(b"next_seq", db=meta) or b"\x01")
            self._next_change = msgspec.msgpack.decode(txn.get(b"next_change", db=meta) or b"\x01")
            self.watched = frozenset(msgspec.msgpack.decode(txn.get(b"watched", db=meta) or b"\x90"))
            compact = sealing.compact_pending(txn, meta)
        if len(keyring.keys) > 1 and self.sealed:
            self.keyring = sealing.drop_old_keys(keyring)
        return compact

    def _close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
            self._dbs = {}
            self._spaces = {}
        self._unlock_folder()

    def db(self, name: str) -> lmdb._Database:
        """One of the shared databases (its domain reads it in ``env.begin()``)."""
        return self._dbs[name]

    def space(self, name: str) -> Space:
        """Sandbox ``name`` 's view of the store; raises `NotFound`."""
        try:
            return self._spaces[name]
        except KeyError:
            if self._env is None:
                raise ActorError("the profile store is not open (starting or restarting); retry shortly") from None
            raise NotFound(f"no sandbox is named {name!r}", field="$.sandbox") from None

    @property
    def default(self) -> Space:
        """Sandbox ``default`` 's view of the store."""
        return self.space(sandboxes.DEFAULT)

    def spaces(self) -> list[Space]:
        """Every sandbox's view, ``default`` first, then by number."""
        return sorted(self._spaces.values(), key=lambda space: space.number)

    def space_of(self, number: int) -> Space | None:
        """The sandbox numbered ``number`` (a profile id's top bits), if it exists."""
        return next((space for space in self._spaces.values() if space.number == number), None)

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise ActorError("the profile store is not open (starting or restarting); retry shortly")
        return self._env

    # -- writing -----------------------------------------------------------------------------

    async def write(self, fn: Callable[[Writer, *Ts], T], *args: *Ts, space: Space | None = None) -> T:
        """Apply ``fn(writer, *args)`` in the next group commit, ``writer.dbs`` those of
        ``space`` (default: sandbox ``default``); return its result once durable."""
        return await self.write_op(WriteOp(fn, *args, space=space))

    async def write_op(self, op: WriteOp[T]) -> T:
        await self.send(op)
        return await op.future.wait()

    async def _write(self, ops: list[WriteOp]) -> None:
        while True:
            try:
                outcome = await trio.to_thread.run_sync(self._apply, ops)
                break
            except lmdb.MapFullError:
                self._grow()
            except ServerError:
                raise  # the store itself is unusable (not open): crash, restart
            except lmdb.Error as exc:
                raise StorageError(f"LMDB write failed: {exc}") from exc
            except Exception as exc:
                # A bug triggered by some op: find it and fail it alone.
                if len(ops) > 1:
                    log.exception("a write batch failed; retrying its %d ops one by one", len(ops))
                    for op in ops:
                        await self._write([op])
                    return
                log.exception("write op %s failed", getattr(ops[0].fn, "__name__", ops[0].fn))
                ops[0].future.fail(ServerError(f"internal error while writing: {exc!r}"))
                return
        results, writer = outcome
        if writer.changed and self.on_change is not None:
            self.on_change()
        for record, dbs in writer.opened:  # sandboxes created: their handles are valid now
            self._add_space(record, dbs)
        # The commit is durable: index what it logged (only this thread changes the index).
        self.index.add(writer.index_adds)
        self.index.remove(writer.index_removes)
        for pid in writer.index_drops:
            self.index.drop(pid)
        self.commits += 1
        self.writes += len(ops)
        for op, (ok, value) in zip(ops, results):
            if ok:
                op.future.set(value)
            else:
                op.future.fail(value)
        # The worker thread may still hold the list it returned: what it holds goes now, not
        # when that thread takes its next job (a refusal would keep its op's data alive).
        results.clear()

    def _log_changes(self, txn: lmdb.Transaction[bytes], changed: list[bytes]) -> None:
        """Append the profiles written by a commit's ops to the change feed, each once."""
        pids, first = list(dict.fromkeys(changed)), self._next_change
        self._next_change += len(pids)
        txn.cursor(db=self._dbs["changes"]).putmulti([(keys.seq_key(first + n), p) for n, p in enumerate(pids)], append=True)
        txn.put(b"next_change", _meta_encoder.encode(self._next_change), db=self._dbs["meta"])

    def _grow(self) -> None:
        env = self.env
        size = env.info()["map_size"] * 2
        env.set_mapsize(size)
        self.map_resizes += 1
        log.info("store map grown to %d MiB", size >> 20)

    def _apply(self, ops: list[WriteOp]) -> tuple[list[tuple[bool, Any]], Writer]:
        """Runs in a worker thread: one write transaction, one nested transaction per op."""
        env = self.env
        results: list[tuple[bool, Any]] = []
        pid, seq, change = self._next_pid, self._next_seq, self._next_change
        started = time.perf_counter()
        txn = env.begin(write=True)
        try:
            writer = Writer(self, txn)
            default = self._spaces[sandboxes.DEFAULT]
            for op in ops:
                child = env.begin(write=True, parent=txn)
                writer.txn = child
                writer.space = space = op.space or default
                writer.dbs = space.dbs
                mark = writer.mark()
                try:
                    value = op.fn(writer, *op.args)
                except ServerError as exc:
                    child.abort()
                    writer.rollback(mark)
                    # A refusal is the op's answer: without its traceback, which would hold this
                    # frame, which holds ``results`` and so the error (a cycle keeping the ops'
                    # data alive until a full garbage collection).
                    results.append((False, exc.with_traceback(None)))
                    continue
                except BaseException:
                    child.abort()
                    raise
                child.commit()
                results.append((True, value))
            meta = self._dbs["meta"]
            if self._next_pid != pid:
                txn.put(b"next_pid", _meta_encoder.encode(self._next_pid), db=meta)
            if self._next_seq != seq:
                txn.put(b"next_seq", _meta_encoder.encode(self._next_seq), db=meta)
            if writer.changed:
                self._log_changes(txn, writer.changed)
        except BaseException:
            txn.abort()
            # Nothing was committed: hand the numbers out again.
            self._next_pid, self._next_seq, self._next_change = pid, seq, change
            raise
        applied = time.perf_counter()
        try:
            txn.commit()
        except BaseException:
            self._next_pid, self._next_seq, self._next_change = pid, seq, change
            raise
        committed = time.perf_counter()
        self.apply_seconds += applied - started
        self.commit_seconds += committed - applied
        self.slowest = max(self.slowest, (committed - started, applied - started, committed - applied))
        return results, writer

    # -- retention --------------------------------------------------------------------------

    async def _sweeper(self) -> None:
        # Once shortly after opening (a server restarted often would otherwise never sweep),
        # then every sweep_interval.
        delay = min(self.sweep_interval, 60.0)
        while not self.stopping:
            await trio.sleep(delay)
            delay = self.sweep_interval
            try:
                await self.sweep()
            except MailboxClosed:
                return

    async def sweep(self, budget: int = 10_000) -> int:
        """Delete events older than the retention window, ``budget`` events per transaction."""
        expired = self.index.expired(self.clock() - self.retention_us)
        for start in range(0, len(expired), budget):
            await self.write(_sweep_events, expired[start : start + budget])
        self.swept += len(expired)
        if expired:
            log.info("retention sweep deleted %d events", len(expired))
        return len(expired)

    # -- reading -----------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """The map's size and how much of it is used."""
        env = self.env
        counts = {}
        info, stat = env.info(), env.stat()
        counts["map_size"] = info["map_size"]
        counts["used_bytes"] = (info["last_pgno"] + 1) * stat["psize"]
        return counts

    def details(self) -> dict[str, Any]:
        return {
            "commits": self.commits,
            "writes": self.writes,
            "map_resizes": self.map_resizes,
            "events_swept": self.swept,
            "event_index": self.index.statistics(),
            "slowest_commit_ms": {
                name: round(value * 1000, 1) for name, value in zip(("total", "apply", "fsync"), self.slowest)
            },
            "apply_seconds": round(self.apply_seconds, 3),
            "commit_seconds": round(self.commit_seconds, 3),
        }


def _by_weight(ops: list[WriteOp], limit: int) -> list[list[WriteOp]]:
    """Split ``ops``, in order, into runs whose weights add up to at most ``limit``."""
    chunks: list[list[WriteOp]] = [[]]
    weight = 0
    for op in ops:
        if chunks[-1] and weight + op.weight > limit:
            chunks.append([])
            weight = 0
        chunks[-1].append(op)
        weight += op.weight
    return chunks


class Writer:
    """What a write op sees: the transaction, the databases and helpers. Runs in the writer thread."""

    def __init__(self, store: ProfileStore, txn: lmdb.Transaction[bytes]) -> None:
        self.store = store
        self.txn = txn
        #: The sandbox of the op being applied, and its databases (and the shared ones).
        self.space = store._spaces.get(sandboxes.DEFAULT)
        self.dbs = store._dbs if self.space is None else self.space.dbs
        self.now = store.clock()
        #: Sandboxes created in this commit, with their databases.
        self.opened: list[tuple[sandboxes.SandboxRecord, dict[str, lmdb._Database]]] = []
        #: Index work for after the commit: events logged, events deleted, profiles deleted.
        self.index_adds: list[Entry] = []
        self.index_removes: list[Entry] = []
        self.index_drops: list[bytes] = []
        #: Profiles written (saved or deleted) in a watched sandbox: the change feed's entries.
        self.changed: list[bytes] = []

    def mark(self) -> tuple[int, int, int, int, int]:
        return len(self.index_adds), len(self.index_removes), len(self.index_drops), len(self.opened), len(self.changed)

    def rollback(self, mark: tuple[int, int, int, int, int]) -> None:
        """Forget the index work of an op whose nested transaction was aborted."""
        adds, removes, drops, opened, changed = mark
        del self.changed[changed:]
        del self.opened[opened:]
        del self.index_adds[adds:]
        del self.index_removes[removes:]
        del self.index_drops[drops:]

    def pid(self, identity: str, field: str = "$.identity") -> bytes | None:
        return self.txn.get(keys.identity_key(identity, field), db=self.dbs["identities"])

    def load(self, pid: bytes) -> ProfileRecord:
        return decode_profile(self.txn.get(pid, db=self.dbs["profiles"]))

    def require(self, identity: str) -> tuple[bytes, ProfileRecord]:
        pid = self.pid(identity)
        if pid is None:
            raise NotFound(f"no profile has the identity {identity!r}", field="$.identity")
        return pid, self.load(pid)

    def get_or_create(self, identity: str) -> tuple[bytes, ProfileRecord, bool]:
        pid = self.pid(identity)
        if pid is not None:
            return pid, self.load(pid), False
        pid, record = self.create(identity)
        return pid, record, True

    def create(self, identity: str) -> tuple[bytes, ProfileRecord]:
        """A new, empty profile known by ``identity`` (which must be free)."""
        store = self.store
        pid = sandboxes.pid_of(self.space.number if self.space is not None else 0, store._next_pid)
        store._next_pid += 1
        record = ProfileRecord([identity], {}, [], {}, self.now, self.now)
        self.txn.put(keys.identity_key(identity), pid, db=self.dbs["identities"])
        self.save(pid, record, touch=False)
        return pid, record

    def save(self, pid: bytes, record: ProfileRecord, *, touch: bool = True) -> None:
        if touch:
            record.updated = self.now
        value = encode_profile(record)
        if len(value) > MAX_PROFILE_BYTES:
            raise InvalidArgument(
                f"the profile would take {len(value)} bytes; the limit is {MAX_PROFILE_BYTES}",
                field="$.attributes",
            )
        self.txn.put(pid, value, db=self.dbs["profiles"])
        self.touched(pid)

    def touched(self, pid: bytes) -> None:
        """``pid`` 's profile changed: logged in the change feed if its sandbox is watched."""
        if self.space is not None and self.space.number in self.store.watched:
            self.changed.append(pid)


# ---------------------------------------------------------------------------------------------
# write ops: each checks before it writes; a ServerError rolls back its nested transaction.


def _sweep_events(w: Writer, expired: list[Entry]) -> int:
    """Delete these expired events from the log."""
    events = w.dbs["events"]
    for _, _, seq in expired:
        w.txn.delete(keys.seq_key(seq), db=events)
    w.index_removes.extend(expired)
    return len(expired)
