"""API keys: their records in LMDB, their keyed hashes, the first admin key's file.

Database ``keys``:

    b"\x00pepper"       -> the pepper (32 random bytes), sealed with the master key
                          (`server.runtime.masterkey`, associated data: this LMDB key)
    b"k:" + key id      -> versioned `KeyRecord`

A key is ``pgn_`` and 43 base64url characters (32 random bytes); its id is its first 12
characters (lists show it, revocation takes it). The server keeps only HMAC-SHA256(pepper, key):
a copy of the data folder without the master key holds nothing that opens a connection, and
with it a key still cannot be read back (256 random bits need no slow hash, a keyed one is
enough). Keys are shown once, in the answer of ``keys.create`` (or in the admin key file).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from protocols import api
from server.profiles.records import unversioned
from server.profiles.store import ProfileStore, Writer
from server.runtime.errors import AlreadyExists, ConfigError, FailedPrecondition, NotFound, StorageError
from server.runtime.masterkey import write_private

__all__ = [
    "PEPPER_KEY", "KeyRecord", "new_key", "key_id", "hash_key", "is_key", "ensure_pepper", "list_keys", "put_key", "delete_key",
    "touch_keys", "admin_key_path", "write_admin_key", "read_key_file", "DEFAULT_SANDBOX", "MAX_KEYS",
]

PEPPER_KEY = b"\x00pepper"
_RECORD_PREFIX = b"k:"
_V1 = b"\x01"
#: The sandbox of keys stored before sandboxes, and of the first admin key.
DEFAULT_SANDBOX = "default"
#: Most keys a server keeps (a list of them fits in one frame).
MAX_KEYS = 1000
_KEY = re.compile(api.KEY_PATTERN)


class KeyRecord(msgspec.Struct, kw_only=True):
    id: str
    digest: bytes
    scopes: list[str]
    sandbox: str = DEFAULT_SANDBOX
    name: str = ""
    created_us: int
    last_used_us: int = 0

    def info(self) -> api.KeyInfo:
        return api.KeyInfo(
            id=self.id, scopes=list(self.scopes), sandbox=self.sandbox, name=self.name,
            created=_when(self.created_us), last_used=_when(self.last_used_us) if self.last_used_us else None,
        )


def _when(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KeyRecord)


def new_key() -> str:
    return "pgn_" + secrets.token_urlsafe(32)


def is_key(text: str) -> bool:
    return _KEY.match(text) is not None


def key_id(key: str) -> str:
    return key[:12]


def hash_key(pepper: bytes, key: str) -> bytes:
    return hmac.new(pepper, key.encode(), hashlib.sha256).digest()


def _record_key(id: str) -> bytes:
    return _RECORD_PREFIX + id.encode()


def _encode(record: KeyRecord) -> bytes:
    return _V1 + _encoder.encode(record)


def _decode(value: bytes) -> KeyRecord:
    if value[:1] != _V1:
        raise unversioned(value, "API key")
    return _decoder.decode(memoryview(value)[1:])


# -- in the writer --------------------------------------------------------------------------


def ensure_pepper(w: Writer) -> bytes:
    """The pepper of the key hashes, made (and sealed) at the first start."""
    keyring = w.store.keyring
    if keyring is None:
        raise StorageError("the store has no master key")
    db = w.dbs["keys"]
    sealed = w.txn.get(PEPPER_KEY, db=db)
    if sealed is not None:
        return keyring.open(bytes(sealed), PEPPER_KEY)
    pepper = os.urandom(32)
    w.txn.put(PEPPER_KEY, keyring.seal(pepper, PEPPER_KEY), db=db)
    return pepper


def put_key(w: Writer, record: KeyRecord) -> KeyRecord:
    """Store a new key; `AlreadyExists` if its id is taken (the caller draws another key)."""
    record.created_us = record.created_us or w.now
    if w.txn.stat(w.dbs["keys"])["entries"] > MAX_KEYS:  # the pepper, and the keys
        raise FailedPrecondition(f"this server already has {MAX_KEYS} API keys, the most it keeps: revoke unused ones")
    if not w.txn.put(_record_key(record.id), _encode(record), db=w.dbs["keys"], overwrite=False):
        raise AlreadyExists(f"key id {record.id} is taken")
    return record


def delete_key(w: Writer, id: str, sandbox: str | None) -> KeyRecord:
    """Delete a key of ``sandbox`` (None: of any); the last admin key of sandbox ``default``
    cannot go (nobody could make keys any more)."""
    db = w.dbs["keys"]
    value = w.txn.get(_record_key(id), db=db)
    record = None if value is None else _decode(bytes(value))
    if record is None or sandbox is not None and record.sandbox != sandbox:
        raise NotFound(f"no API key has the id {id!r}", field="$.id")
    if "admin" in record.scopes and record.sandbox == DEFAULT_SANDBOX:
        admins = sum(1 for other in _records(w.txn, db) if "admin" in other.scopes and other.sandbox == DEFAULT_SANDBOX)
        if admins <= 1:
            raise FailedPrecondition("this is the last key with the admin scope in sandbox default: create "
                                     "another admin key before revoking it", field="$.id")
    w.txn.delete(_record_key(id), db=db)
    return record


def touch_keys(w: Writer, used: dict[str, int]) -> None:
    """Record when keys were last used (ids of revoked keys are skipped)."""
    db = w.dbs["keys"]
    for id, when in used.items():
        value = w.txn.get(_record_key(id), db=db)
        if value is not None:
            record = _decode(bytes(value))
            record.last_used_us = max(record.last_used_us, when)
            w.txn.put(_record_key(id), _encode(record), db=db)


def _records(txn: object, db: object) -> list[KeyRecord]:
    cursor = txn.cursor(db=db)  # type: ignore[attr-defined]
    if not cursor.set_range(_RECORD_PREFIX):
        return []
    out = []
    for key, value in cursor:
        if not bytes(key).startswith(_RECORD_PREFIX):
            break
        out.append(_decode(bytes(value)))
    return out


# -- reads ------------------------------------------------------------------------------------


def list_keys(store: ProfileStore) -> list[KeyRecord]:
    with store.env.begin() as txn:
        return _records(txn, store.db("keys"))


# -- the admin key file -----------------------------------------------------------------------


def admin_key_path(data: str | Path) -> Path:
    """The admin key file of a data folder: beside it, like the master key
    (``pigeon-data.admin-key`` for ``pigeon-data``)."""
    folder = Path(data).resolve()
    return folder.with_name(folder.name + ".admin-key")


def write_admin_key(path: Path, key: str) -> None:
    """Write ``key`` to ``path``, readable by its owner only, replacing a stale file whole."""
    try:
        write_private(path, key + "\n")
    except OSError as exc:
        raise ConfigError(f"cannot write the admin key file {str(path)!r}: {exc}") from None


def read_key_file(path: Path) -> str | None:
    """The key in a key file, or None when there is no such file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the admin key file {str(path)!r}: {exc}") from None
    key = text.strip()
    if not is_key(key):  # never send a file's contents that are not a key (a configuration may name any file)
        raise ConfigError(f"the admin key file {str(path)!r} does not hold a Pigeon API key (pgn_...)")
    return key
