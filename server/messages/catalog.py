"""The published channel configurations and messages: their versions in LMDB, and the
`Catalog` the methods and sends read them through.

Databases ``configs`` and ``messages``: utf-8 name + NUL + version (u32 BE) -> the encoded
record of that version (`server.messages.content`). Versions start at 1 and are never
replaced, so a send (or a journey) that uses one keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from server.messages.content import Compiled, ConfigRecord, MessageRecord, decode_config, decode_message
from server.profiles.sandboxes import Space
from server.profiles.store import Writer
from server.runtime.errors import NotFound

__all__ = ["Catalog", "get_version", "list_latest", "publish_version"]

#: Messages whose compiled templates are kept (the cache is emptied when it is full).
_COMPILED = 1024


class Catalog:
    """Reads published versions from the store, and keeps each message version's compiled
    templates (versions never change, so neither do they)."""

    def __init__(self) -> None:
        self._compiled: dict[tuple[str, str, int], Compiled] = {}

    def config(self, space: Space, name: str, version: int | None = None, field: str = "$.name") -> ConfigRecord:
        value = get_version(space, "configs", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}channel configuration {name!r} is published (pigeon configs publish FILE)", field=field)
        return decode_config(value)

    def message(self, space: Space, name: str, version: int | None = None) -> MessageRecord:
        value = get_version(space, "messages", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}message {name!r} is published (pigeon messages publish FILE)", field="$.id")
        return decode_message(value)

    def compiled(self, space: Space, record: MessageRecord) -> Compiled:
        """``record`` (a version of ``space`` 's) compiled."""
        key = (space.name, record.message.id, record.version)
        found = self._compiled.get(key)
        if found is None:
            if len(self._compiled) >= _COMPILED:
                self._compiled.clear()
            found = self._compiled[key] = Compiled(record)
        return found


def get_version(store: Space, db: str, name: str, version: int | None = None) -> bytes | None:
    """A published version (``configs``, ``messages``): the given one, or the latest."""
    prefix = name.encode() + b"\x00"
    with store.env.begin() as txn:
        if version is not None:
            return txn.get(prefix + version.to_bytes(4, "big"), db=store.db(db))
        cursor = txn.cursor(db=store.db(db))
        key = _latest_key(cursor, prefix)
        return None if key is None else cursor.get(key)


def list_latest(store: Space, db: str) -> list[bytes]:
    """The latest version of everything published in ``db``, by name."""
    latest: dict[bytes, bytes] = {}
    with store.env.begin() as txn:
        for key, value in txn.cursor(db=store.db(db)):
            latest[key[:-5]] = value  # keys sort by name, then version
    return list(latest.values())


def _latest_key(cursor: Any, prefix: bytes) -> bytes | None:
    """The last key starting with ``prefix`` (a name and its NUL; names hold no NUL)."""
    last = None
    if cursor.set_range(prefix):
        for key in cursor.iternext(keys=True, values=False):
            if not key.startswith(prefix):
                break
            last = key
    return last


def publish_version(w: Writer, db: str, name: str, encode: Callable[[int], bytes]) -> int:
    """Store the next version of ``name`` in ``db`` (``encode(version)`` gives its value);
    versions start at 1 and are never replaced."""
    prefix = name.encode() + b"\x00"
    last = _latest_key(w.txn.cursor(db=w.dbs[db]), prefix)
    version = 1 if last is None else int.from_bytes(last[-4:], "big") + 1
    w.txn.put(prefix + version.to_bytes(4, "big"), encode(version), db=w.dbs[db])
    return version
