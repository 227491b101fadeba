"""Sandboxes: separate worlds of apps, profiles, messages, sends and reports in one store.

A sandbox (``prod``, ``dev``, ...) has databases of its own for everything a key of it may see
(`SANDBOX_DATABASES`); the server's own records (``meta``, the event log, the API keys, the
sandboxes themselves) are shared. A `Space` is one sandbox's view of the store: what a handler,
an execution or a delivery reads and writes through. Since a space holds no handle on another
sandbox's databases, code given one cannot reach into another by a wrong key; the same identity
or app id in two sandboxes are two records in two databases.

Database ``sandboxes``:  utf-8 name -> versioned `SandboxRecord`

Sandbox ``default`` (number 0) always exists and keeps the databases' plain names, so a data
folder from before sandboxes is its ``default`` sandbox unchanged; sandbox number *n* names
its databases ``<n>.<name>``. Numbers are never reused. A profile id carries its sandbox's
number in its top 16 bits (`pid_of`), so that the shared event log, which names profiles by
id, tells whose an event is without a lookup.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, TypeVar, TypeVarTuple

import lmdb
import msgspec

from server.profiles import keys
from server.profiles.records import (
    EventRecord,
    ProfileRecord,
    decode_event,
    decode_profile,
    unversioned,
)
from server.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from server.profiles.store import ProfileStore, Writer
    from server.runtime.masterkey import Keyring

__all__ = [
    "DEFAULT", "MAX_SANDBOXES", "SHARED_DATABASES", "SANDBOX_DATABASES", "NAME_PATTERN", "SandboxRecord",
    "Space", "db_name", "check_name", "pid_of", "sealed_key", "sandbox_of", "create_sandbox", "read_sandboxes",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The sandbox every server has; a folder from before sandboxes is this one.
DEFAULT = "default"
#: Most sandboxes a store holds (LMDB opens its named databases up front: this bounds them).
MAX_SANDBOXES = 32
#: The server's own databases, shared by every sandbox.
SHARED_DATABASES = ("meta", "events", "keys", "sandboxes", "changes")
#: The databases each sandbox has its own of.
SANDBOX_DATABASES = ("identities", "profiles", "tokens", "apps", "configs", "messages", "reports", "executions",
                     "outbox", "live", "uniques", "journeys", "journey_states", "instances", "timers", "push_log",
                     "journey_runs", "journey_traces", "event_ids", "event_id_log", "audience_members",
                     "journey_queue", "journey_gauges")
#: A sandbox name: lower case letters, digits and dashes, starting with a letter.
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,31}\Z"
_NAME = re.compile(NAME_PATTERN)
_PID_BITS = 48
_V1 = b"\x01"


class SandboxRecord(msgspec.Struct, kw_only=True):
    name: str
    number: int
    created_us: int


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(SandboxRecord)


def check_name(name: str, field: str = "$.sandbox") -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"{field}: a sandbox name is 1 to 32 lower case letters, digits and dashes, starting with a letter "
            f"(got {name!r})", field=field,
        )
    return name


def db_name(number: int, name: str) -> bytes:
    """The LMDB name of sandbox ``number`` 's database ``name``."""
    return name.encode() if number == 0 else f"{number}.{name}".encode()


def pid_of(number: int, serial: int) -> bytes:
    """The profile id of the ``serial`` -th profile made, in sandbox ``number``."""
    return keys.pid_key(number << _PID_BITS | serial)


def sealed_key(number: int, key: bytes) -> bytes:
    """The associated data of a value sealed at ``key`` in sandbox ``number`` 's database:
    the key, after ``<number>/`` beyond ``default`` (sealed values do not open elsewhere)."""
    return key if number == 0 else b"%d/%s" % (number, key)


def sandbox_of(pid: bytes) -> int:
    """The number of the sandbox a profile id belongs to."""
    return int.from_bytes(pid[:2], "big")


def _decode(value: bytes) -> SandboxRecord:
    if value[:1] != _V1:
        raise unversioned(value, "sandbox")
    return _decoder.decode(memoryview(value)[1:])


def read_sandboxes(txn: lmdb.Transaction[bytes], db: lmdb._Database) -> list[SandboxRecord]:
    return [_decode(value) for _, value in txn.cursor(db=db)]


def open_databases(env: lmdb.Environment, txn: lmdb.Transaction[bytes], number: int) -> dict[str, lmdb._Database]:
    """Open (creating them if need be) sandbox ``number`` 's databases in the write ``txn``."""
    return {name: env.open_db(db_name(number, name), txn=txn) for name in SANDBOX_DATABASES}


def create_sandbox(w: Writer, name: str) -> SandboxRecord:
    """Store op: a new sandbox, its databases opened (the store knows it once committed)."""
    check_name(name, "$.name")
    db = w.dbs["sandboxes"]
    if w.txn.get(name.encode(), db=db) is not None:
        raise AlreadyExists(f"sandbox {name!r} already exists", field="$.name")
    taken = w.txn.stat(db)["entries"]
    if taken >= MAX_SANDBOXES:
        raise FailedPrecondition(f"this server already has {taken} sandboxes, the most it holds ({MAX_SANDBOXES})")
    meta = w.dbs["meta"]
    number = msgspec.msgpack.decode(w.txn.get(b"next_sandbox", db=meta) or b"\x01")
    w.txn.put(b"next_sandbox", _encoder.encode(number + 1), db=meta)
    record = SandboxRecord(name=name, number=number, created_us=w.now)
    w.txn.put(name.encode(), _V1 + _encoder.encode(record), db=db)
    w.opened.append((record, open_databases(w.store.env, w.txn, number)))
    return record


def ensure_default(txn: lmdb.Transaction[bytes], db: lmdb._Database, now_us: int) -> None:
    """Record sandbox ``default`` in a new folder, or in one from before sandboxes."""
    if txn.get(DEFAULT.encode(), db=db) is None:
        txn.put(DEFAULT.encode(), _V1 + _encoder.encode(SandboxRecord(name=DEFAULT, number=0, created_us=now_us)), db=db)


class Space:
    """One sandbox's view of the store: its databases (and the shared ones), its reads, and
    writes whose ops see its databases as ``w.dbs``."""

    def __init__(self, store: ProfileStore, record: SandboxRecord, dbs: dict[str, lmdb._Database]) -> None:
        self.store = store
        self.name = record.name
        self.number = record.number
        self.record = record
        self.dbs = dbs

    def __repr__(self) -> str:
        return f"<Space {self.name}>"

    @property
    def env(self) -> lmdb.Environment:
        return self.store.env

    @property
    def keyring(self) -> Keyring | None:
        return self.store.keyring

    def db(self, name: str) -> lmdb._Database:
        """One of the sandbox's databases, or a shared one (read in ``env.begin()``)."""
        return self.dbs[name]

    def clock(self) -> int:
        return self.store.clock()

    async def write(self, fn: Callable[[Writer, *Ts], T], *args: *Ts) -> T:
        """``fn(writer, *args)`` in the next group commit, ``writer.dbs`` this sandbox's;
        its result once durable."""
        return await self.store.write(fn, *args, space=self)

    # -- reading -----------------------------------------------------------------------------

    def get_profile(self, identity: str) -> ProfileRecord:
        """The profile with ``identity``; raises `NotFound`."""
        return self.find_profile(identity)[1]

    def find_profile(self, identity: str) -> tuple[bytes, ProfileRecord]:
        """The profile with ``identity`` and its id; raises `NotFound`."""
        key = keys.identity_key(identity)
        dbs = self.dbs
        with self.env.begin() as txn:
            pid = txn.get(key, db=dbs["identities"])
            if pid is None:
                raise NotFound(f"no profile has the identity {identity!r}", field="$.identity")
            return bytes(pid), decode_profile(txn.get(pid, db=dbs["profiles"]))

    def scan_profiles(self, after: bytes | None = None, limit: int = 500) -> list[tuple[bytes, ProfileRecord]]:
        """Up to ``limit`` profiles in profile-id order, after the id ``after`` (audiences)."""
        out: list[tuple[bytes, ProfileRecord]] = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self.dbs["profiles"])
            found = cursor.set_range(after + b"\x00") if after is not None else cursor.first()
            while found and len(out) < limit:
                out.append((bytes(cursor.key()), decode_profile(cursor.value())))
                found = cursor.next()
        return out

    def find_token(self, app: str, token: str) -> tuple[bytes, ProfileRecord] | None:
        """The profile the token is registered to for ``app``, and its id; None if none is."""
        with self.env.begin() as txn:
            pid = txn.get(keys.token_key(app, token), db=self.dbs["tokens"])
            return None if pid is None else (bytes(pid), decode_profile(txn.get(pid, db=self.dbs["profiles"])))

    def read_events(
        self,
        identity: str,
        *,
        after: tuple[int, int] | None,
        since_us: int,
        until_us: int,
        reverse: bool,
        limit: int,
        max_bytes: int | None = None,
    ) -> tuple[list[tuple[int, int, EventRecord]], tuple[int, int] | None]:
        """One page of a profile's events in time order, after the cursor ``after`` (None: from
        the range's edge): ``limit`` events at most, and no more once ``max_bytes`` of them
        are read (a streamed call holds its page while its client is slow).

        Returns ``[(seq, ts, record)]`` and the cursor to resume from, or None at the end.
        """
        dbs = self.dbs
        with self.env.begin() as txn:
            pid = txn.get(keys.identity_key(identity), db=dbs["identities"])
            if pid is None:
                raise NotFound(f"no profile has the identity {identity!r}", field="$.identity")
            page, resume = self.store.index.page(
                pid, after=after, since_us=since_us, until_us=until_us, reverse=reverse, limit=limit
            )
            out = []
            size = 0
            for n, (seq, ts) in enumerate(page):
                value = txn.get(keys.seq_key(seq), db=dbs["events"])
                if value is not None:
                    out.append((seq, ts, decode_event(value)[2]))
                    size += len(value)
                if max_bytes is not None and size >= max_bytes and n + 1 < len(page):
                    return out, (ts, seq)
        return out, resume

    def counts(self) -> dict[str, int]:
        """Entries in each of the sandbox's databases, and its events."""
        with self.env.begin() as txn:
            counts = {name: txn.stat(self.dbs[name])["entries"] for name in SANDBOX_DATABASES}
        counts["events"] = self.store.index.events_of(self.number)
        return counts

    def details(self) -> dict[str, Any]:
        return {"name": self.name, "number": self.number}
