"""Apps and their credentials: their records in LMDB, and what the methods share.

Database ``apps``: utf-8 app id -> versioned app record (with the provider credentials,
sealed).

An app record holds the credentials of each platform (``ios``, ``android``), checked by the
channel that handles the platform (`server.channels.Channel.check_app`) before they are stored.
Each store of credentials gets a new version, so channels retire what they built from the old
ones (`Channel.forget_app`).

Stored, the credentials are sealed (`server.runtime.masterkey`): the value is ``0x02`` and the
MessagePack of ``[app, version, ios, android]``, where ``ios`` and ``android`` are each the
sealed MessagePack of the platform's whole record (`IosRecord`, `AndroidRecord`: the .p8 key,
the certificate and its private key, the service account's private key, and what goes with
them), with ``apps\0<app id>\0ios`` (or ``android``) as associated data: a sealed part moved
to another app, or to the other platform, does not open. Format ``0x01`` (schema version 1)
held them in plain text: the store's migration (`reseal_app`) seals them when it opens such a
folder, and nothing else reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.structs

from server.channels import AndroidRecord, AppRecord, Channel, IosRecord
from server.profiles.records import unversioned
from server.profiles.sandboxes import Space, sealed_key
from server.profiles.store import ProfileStore, Writer
from server.runtime.errors import ActorError, FailedPrecondition, NotFound, SchemaError, StorageError
from server.runtime.masterkey import Keyring

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = [
    "encode_app", "decode_app", "get_app", "list_apps", "put_app", "delete_app", "require_app", "channel_for_apps",
    "store_credentials", "reseal_app",
]

_V1 = b"\x01"  # plain text (schema version 1): read by the migration alone
_V2 = b"\x02"
_PARTS = ("ios", "android")


class _StoredApp(msgspec.Struct, array_like=True):
    """An app as stored: its platforms' records sealed."""

    app: str
    version: int
    ios: bytes | None = None
    android: bytes | None = None


_encoder = msgspec.msgpack.Encoder()
_v1_decoder = msgspec.msgpack.Decoder(AppRecord)
_stored_decoder = msgspec.msgpack.Decoder(_StoredApp)
_part_decoders: dict[str, msgspec.msgpack.Decoder[Any]] = {
    "ios": msgspec.msgpack.Decoder(IosRecord), "android": msgspec.msgpack.Decoder(AndroidRecord),
}


def _key(app: str) -> bytes:
    return app.encode()


def _bare(key: bytes) -> bytes:
    """The app id in a sealed key (`sandboxes.sealed_key`: app ids hold no ``/``)."""
    return key.rpartition(b"/")[2]


def _aad(key: bytes, part: str) -> bytes:
    return b"apps\x00" + key + b"\x00" + part.encode()


def _keyring(store: ProfileStore | Space) -> Keyring:
    if store.keyring is None:
        raise ActorError("the profile store is not open (starting or restarting); retry shortly")
    return store.keyring


def encode_app(record: AppRecord, keyring: Keyring, key: bytes) -> bytes:
    """The stored value of ``record``, its credentials sealed with ``keyring``'s newest key
    (``key``: its sealed key, `sandboxes.sealed_key`)."""
    parts = {
        part: None if value is None else keyring.seal(_encoder.encode(value), _aad(key, part))
        for part in _PARTS
        for value in [getattr(record, part)]
    }
    return _V2 + _encoder.encode(_StoredApp(app=record.app, version=record.version, **parts))


def _decode_stored(value: bytes, key: bytes) -> _StoredApp:
    if value[:1] == _V1:
        raise SchemaError(f"app {_name(key)} is stored in plain text (schema version 1): the data folder "
                          "was not migrated (only the server's store migrates it when it opens)")
    if value[:1] != _V2:
        raise unversioned(value, "app")
    try:
        stored = _stored_decoder.decode(memoryview(value)[1:])
    except msgspec.DecodeError as exc:
        raise StorageError(f"the stored record of app {_name(key)} is damaged ({exc})") from None
    if _key(stored.app) != _bare(key):
        raise StorageError(f"the stored record of app {_name(key)} names another app: it was moved or damaged")
    return stored


def _name(key: bytes) -> str:
    return repr(key.decode(errors="replace")[:200])


def decode_app(value: bytes, keyring: Keyring, key: bytes) -> AppRecord:
    """The app stored at ``key`` (its id, utf-8, as sealed: `sandboxes.sealed_key`) as
    ``value``, its credentials opened;
    `StorageError` (`SchemaError` for an unknown format) for anything else."""
    stored = _decode_stored(value, key)
    record = AppRecord(app=stored.app, version=stored.version)
    for part in _PARTS:
        sealed = getattr(stored, part)
        if sealed is not None:
            plain = keyring.open(sealed, _aad(key, part))
            try:
                setattr(record, part, _part_decoders[part].decode(plain))
            except msgspec.DecodeError as exc:  # sealed by this server: a bug, not damage
                raise StorageError(f"the {part} credentials of app {_name(key)} do not decode ({exc})") from None
    return record


def reseal_app(keyring: Keyring, key: bytes, value: bytes) -> bytes | None:
    """``value`` with every part sealed under ``keyring``'s newest key (a plain-text value of
    schema version 1 sealed), or None when it is already (a master key rotation, the
    migration: `server.profiles.sealing`)."""
    if value[:1] == _V1:
        try:
            record = _v1_decoder.decode(memoryview(value)[1:])
        except msgspec.DecodeError as exc:
            raise StorageError(f"the stored record of app {_name(key)} (schema version 1) is damaged ({exc})") from None
        if _key(record.app) != _bare(key):
            raise StorageError(f"the stored record of app {_name(key)} names another app: it was moved or damaged")
        return encode_app(record, keyring, key)
    stored = _decode_stored(value, key)
    changed = False
    for part in _PARTS:
        sealed = getattr(stored, part)
        if sealed is not None and not keyring.is_current(sealed):
            setattr(stored, part, keyring.seal(keyring.open(sealed, _aad(key, part)), _aad(key, part)))
            changed = True
    return _V2 + _encoder.encode(stored) if changed else None


def get_app(space: Space, app: str) -> AppRecord | None:
    key = _key(app)
    with space.env.begin() as txn:
        value = txn.get(key, db=space.db("apps"))
    if value is None:
        return None
    record = decode_app(value, _keyring(space), sealed_key(space.number, key))
    record.sandbox = space.name
    return record


def list_apps(space: Space) -> list[AppRecord]:
    keyring = _keyring(space)
    with space.env.begin() as txn:
        records = [decode_app(value, keyring, sealed_key(space.number, key))
                   for key, value in txn.cursor(db=space.db("apps"))]
    for record in records:
        record.sandbox = space.name
    return records


def put_app(w: Writer, record: AppRecord) -> AppRecord:
    """Store an app with a new credentials version: one number for the whole store, never
    reused (not even after the app is deleted), so channels can tell credentials apart."""
    meta = w.dbs["meta"]
    last = w.txn.get(b"last_app_version", db=meta)
    record.version = (msgspec.msgpack.decode(last) if last is not None else 0) + 1
    w.txn.put(b"last_app_version", _encoder.encode(record.version), db=meta)
    key = _key(record.app)
    number = w.space.number if w.space is not None else 0
    w.txn.put(key, encode_app(record, _keyring(w.store), sealed_key(number, key)), db=w.dbs["apps"])
    return record


def delete_app(w: Writer, app: str) -> None:
    if not w.txn.delete(_key(app), db=w.dbs["apps"]):
        raise NotFound(f"no app {app!r} is registered", field="$.app")


def require_app(space: Space, app: str, field: str = "$.app") -> AppRecord:
    record = get_app(space, app)
    if record is None:
        raise NotFound(f"no app {app!r} is registered (pigeon apps register-ios or register-android ...)", field=field)
    return record


def channel_for_apps(server: Server, platform: str) -> Channel:
    """The channel that checks and uses the credentials of ``platform`` (ios or android) apps."""
    for channel in server.channels:
        if getattr(channel, "app_platform", None) == platform:  # a plugin's channel may not subclass Channel
            return channel
    raise FailedPrecondition(f"no channel plugin handles {platform} apps (is it disabled?)")


async def store_credentials(server: Server, space: Space, app: str, **credentials: Any) -> AppRecord:
    """Store an app's credentials for one platform (``ios=`` or ``android=``), keeping the
    other's, and let the channels retire what they built from the old ones."""
    existing = get_app(space, app)
    record = (AppRecord(app=app, sandbox=space.name, **credentials) if existing is None
              else msgspec.structs.replace(existing, **credentials))
    stored: AppRecord = await space.write(put_app, record)
    for channel in server.channels:
        channel.forget_app(stored.handle, stored.version)
    return stored
