"""The store's sealed values: re-sealing them under a new master key, and migrating a data
folder that held them in plain text.

What the master key seals (`server.runtime.masterkey`) lives in the databases of the domains
that own it (the apps' credentials, the pepper of the API keys' hashes). Each such database
has a `Reseal` function, given to the store (`ProfileStore(sealed=...)`): it returns a value
sealed under the ring's newest key, or None when the value is already. The store uses them:

- when it opens (`open_sealed`): a folder of schema version 1 holds the credentials in plain
  text; every one is sealed, the schema becomes 2 and the environment is compacted (`compact`:
  a copy without free pages replaces ``data.mdb``, and the old file is overwritten with zeros
  before it goes), so that no plain-text copy survives in freed pages. A compaction that a
  crash interrupted is done at the next start (``meta`` holds ``compact_pending`` until then).
  A value sealed under an older key of the ring (a rotation interrupted, or a key file or
  ``PIGEON_MASTER_KEY`` with a new key put in front by hand) is re-sealed, and then the key file
  keeps the newest key alone. A value sealed under a key the ring does not have stops the
  store from opening, which says so: the server does not start with the wrong master key.
- for ``pigeon secrets rotate`` (`rotate`), without stopping: a new key is written in front of
  the old one in the key file, every sealed value is re-sealed in write batches of the store's
  writer, then the key file keeps the new key alone. Reads and writes go on meanwhile (a
  value is opened with whichever key sealed it). Old ciphertexts stay in freed pages until
  LMDB reuses them: sealed, under a key that is gone.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import lmdb
import msgspec
import trio

from server.profiles import sandboxes
from server.runtime.errors import ActorError, FailedPrecondition, SchemaError, StorageError
from server.runtime.masterkey import ENV, Keyring

if TYPE_CHECKING:
    from server.profiles.store import ProfileStore, Writer

__all__ = ["Reseal", "Rotation", "bare", "open_sealed", "compact_pending", "compact", "drop_old_keys", "rotate",
           "RESEAL_BATCH"]

log = logging.getLogger("pigeon.secrets")

S = TypeVar("S")

#: ``reseal(keyring, key, value)``: ``value`` (stored at ``key``) sealed under the ring's
#: newest key, or None when it is already; `StorageError` when it does not open. In a
#: sandbox's database ``key`` is qualified by its sandbox (`sandboxes.sealed_key`), so that a
#: value moved to another sandbox does not open.
Reseal = Callable[[Keyring, bytes, bytes], "bytes | None"]
#: Values re-sealed per write transaction by a rotation.
RESEAL_BATCH = 200
COMPACT_PENDING = b"compact_pending"
_meta = msgspec.msgpack.Encoder()


def bare(*keys: bytes) -> Reseal:
    """The `Reseal` of a database where the values at ``keys`` are sealed values themselves
    (their LMDB key as associated data), and the others hold nothing sealed."""
    wanted = frozenset(keys)

    def reseal(keyring: Keyring, key: bytes, value: bytes) -> bytes | None:
        if key not in wanted or keyring.is_current(value):
            return None
        return keyring.seal(keyring.open(value, key), key)

    return reseal


class Rotation(msgspec.Struct, frozen=True):
    """What a rotation did: values re-sealed, the new key's fingerprint, the key file."""

    resealed: int
    fingerprint: str
    key_file: str


# -- when the store opens -------------------------------------------------------------------


#: A sandbox's number and its databases (with the shared ones).
Databases = tuple[int, Mapping[str, lmdb._Database]]


def open_sealed(txn: lmdb.Transaction[bytes], spaces: Sequence[Databases], found: int, keyring: Keyring,
                sealed: Mapping[str, Reseal], where: str) -> int:
    """In the store's first write transaction: bring a folder of schema version ``found``
    (1 or 2) to 2 with every sealed value under the ring's newest key; the values re-sealed.
    ``spaces`` are the sandboxes' databases, ``default`` 's (number 0) first. A migration
    from 1 leaves ``compact_pending`` in ``meta`` (see `compact`)."""
    if found == 1 and not sealed:
        raise SchemaError(f"the data folder {where!r} has schema version 1 (credentials in plain text): "
                          "only the server's store migrates it (it knows which databases to seal)")
    try:
        count = sum(_reseal_database(txn, number, dbs[name], name, fn, keyring)
                    for (number, dbs), name, fn in _sealed(spaces, sealed))
    except StorageError as exc:
        raise StorageError(f"the data folder {where!r}: {exc.message}") from None
    if found == 1:
        meta = spaces[0][1]["meta"]
        txn.put(b"schema", _meta.encode(2), db=meta)
        txn.put(COMPACT_PENDING, _meta.encode(True), db=meta)
        log.warning("data folder %s: schema version 1 migrated to 2: %d values sealed under the master key %s "
                    "(the credentials were stored in plain text)", where, count, keyring.fingerprint)
    elif count:
        log.warning("data folder %s: %d values sealed under an older master key re-sealed under %s",
                    where, count, keyring.fingerprint)
    return count


def _sealed(spaces: Sequence[S], sealed: Mapping[str, Reseal]) -> list[tuple[S, str, Reseal]]:
    """Each database holding sealed values, with the sandbox it is seen through (the first of
    ``spaces`` is ``default``): a shared one once, a sandbox's one in every sandbox."""
    return [(space, name, fn) for name, fn in sealed.items()
            for space in (spaces if name in sandboxes.SANDBOX_DATABASES else spaces[:1])]


def _reseal_database(txn: lmdb.Transaction[bytes], number: int, db: lmdb._Database, name: str, fn: Reseal,
                     keyring: Keyring) -> int:
    changed = []
    qualify = name in sandboxes.SANDBOX_DATABASES
    for key, value in txn.cursor(db=db):
        new = fn(keyring, sandboxes.sealed_key(number, key) if qualify else key, value)
        if new is not None:
            changed.append((key, new))
    for key, new in changed:
        txn.put(key, new, db=db)
    return len(changed)


def compact_pending(txn: lmdb.Transaction[bytes], meta: lmdb._Database) -> bool:
    return txn.get(COMPACT_PENDING, db=meta) is not None


def compact(env: lmdb.Environment, folder: Path, reopen: Callable[[], lmdb.Environment]) -> lmdb.Environment:
    """Replace ``folder``'s ``data.mdb`` with a compacted copy of ``env`` (no free pages: none
    of the plain text that freed pages may hold), overwrite the old file with zeros before it
    goes, and reopen the environment (``reopen``). Nothing else may hold the environment open
    (the store holds the folder's lock and has not served yet)."""
    started = time.perf_counter()
    try:
        old, new = _replace_compacted(env, folder)
    except OSError as exc:
        raise StorageError(f"cannot compact the data folder {str(folder)!r}: {exc}") from exc
    env = reopen()
    try:
        with env.begin(write=True) as txn:
            txn.delete(COMPACT_PENDING, db=env.open_db(b"meta", txn=txn))
    except BaseException:
        env.close()
        raise
    log.warning("data folder %s compacted in %.1fs (%d KiB to %d KiB): the freed pages that held plain-text "
                "credentials are gone, and the old data.mdb was overwritten with zeros",
                folder, time.perf_counter() - started, old >> 10, new >> 10)
    return env


def _replace_compacted(env: lmdb.Environment, folder: Path) -> tuple[int, int]:
    """Copy ``env`` compacted beside ``data.mdb``, close it, put the copy in its place, zero
    the old file; (old size, new size)."""
    data, copy = folder / "data.mdb", folder / "data.mdb.compact"
    copy.unlink(missing_ok=True)  # left by a compaction a crash interrupted
    fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        env.copyfd(fd, compact=True)
        os.fsync(fd)
        new_size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    old = os.open(data, os.O_RDWR)
    try:
        env.close()
        os.replace(copy, data)
        (folder / "lock.mdb").unlink(missing_ok=True)  # LMDB makes it again; it held the old file's state
        _sync_folder(folder)
        old_size = os.fstat(old).st_size
        _zero(old, old_size)
    finally:
        os.close(old)
    return old_size, new_size


def _zero(fd: int, size: int) -> None:
    """Overwrite a file with zeros (on file systems that write in place, the plain text is
    gone from the disk too; copy-on-write ones and SSDs may keep old blocks)."""
    chunk = bytes(1 << 20)
    os.lseek(fd, 0, os.SEEK_SET)
    for start in range(0, size, len(chunk)):
        os.write(fd, chunk[: min(len(chunk), size - start)])
    os.fsync(fd)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_old_keys(keyring: Keyring) -> Keyring:
    """Once `open_sealed` has re-sealed everything under the newest key of ``keyring``: the
    ring of that key alone, written to the key file (``PIGEON_MASTER_KEY`` cannot be: the
    log asks for the older keys to be taken out of it)."""
    newest = keyring.newest()
    if keyring.path is not None:
        newest.save()
        log.warning("master key file %s: every value is sealed under %s; the older keys are dropped",
                    keyring.path, keyring.fingerprint)
    else:
        log.warning("every value is sealed under the first key of %s (%s): remove the others from it",
                    ENV, keyring.fingerprint)
    return newest


# -- rotation -------------------------------------------------------------------------------


def _reseal_batch(w: Writer, name: str, fn: Reseal, after: bytes | None, limit: int) -> tuple[int, bytes | None]:
    """Store op: re-seal up to ``limit`` values of ``name`` after the key ``after``; the count
    and the last key seen (None once the database is done)."""
    keyring = w.store.keyring
    assert keyring is not None
    db = w.dbs[name]
    number = w.space.number if w.space is not None and name in sandboxes.SANDBOX_DATABASES else 0
    items: list[tuple[bytes, bytes]] = []
    with w.txn.cursor(db=db) as cursor:
        found = cursor.set_range(after + b"\x00") if after is not None else cursor.first()
        while found and len(items) < limit:
            items.append((cursor.key(), cursor.value()))
            found = cursor.next()
    count = 0
    for key, value in items:
        new = fn(keyring, sandboxes.sealed_key(number, key), value)
        if new is not None:
            w.txn.put(key, new, db=db)
            count += 1
    return count, (items[-1][0] if found and items else None)


async def rotate(store: ProfileStore) -> Rotation:
    """A new master key for ``store``, without stopping (see the module docstring)."""
    keyring = store.keyring
    if keyring is None:
        raise ActorError("the profile store is not open (starting or restarting); retry shortly")
    if keyring.path is None:
        raise FailedPrecondition(
            f"the master key comes from {ENV}, which the server cannot rewrite: to rotate it, put a new key in "
            f"front of the old one in {ENV} (comma-separated: new,old; `openssl rand -hex 32` makes one) and "
            "restart the server, which re-seals everything under the new key as it starts; then remove the "
            f"old key from {ENV}")
    if store.rotating:
        raise FailedPrecondition("a rotation of the master key is already under way; retry once it is done")
    store.rotating = True
    try:
        return await _rotate(store, keyring)
    finally:
        store.rotating = False


async def _rotate(store: ProfileStore, keyring: Keyring) -> Rotation:
    started = time.perf_counter()
    ring = keyring.rotated()
    await trio.to_thread.run_sync(ring.save)
    store.keyring = ring  # seals with the new key from now on; the old one still opens
    log.warning("master key rotation: new key %s written to %s in front of %s; re-sealing",
                ring.fingerprint, ring.path, keyring.fingerprint)
    resealed = 0
    for space, name, fn in _sealed(store.spaces(), store.sealed):
        after: bytes | None = None
        while True:
            count, after = await space.write(_reseal_batch, name, fn, after, RESEAL_BATCH)
            resealed += count
            if after is None:
                break
    final = ring.newest()
    await trio.to_thread.run_sync(final.save)
    store.keyring = final
    log.warning("master key rotation done in %.1fs: %d values re-sealed under %s; the old key %s is gone from %s",
                time.perf_counter() - started, resealed, final.fingerprint, keyring.fingerprint, final.path)
    return Rotation(resealed=resealed, fingerprint=final.fingerprint, key_file=str(final.path))
