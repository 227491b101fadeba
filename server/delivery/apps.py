"""Apps and their credentials: their records in LMDB, and what the methods share.

Database ``apps``: utf-8 app id -> versioned `AppRecord` (with the provider credentials).

An app record holds the credentials of each platform (``ios``, ``android``), checked by the
channel that handles the platform (`server.channels.Channel.check_app`) before they are stored.
Each store of credentials gets a new version, so channels retire what they built from the old
ones (`Channel.forget_app`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.structs

from server.channels import AppRecord, Channel
from server.profiles.records import unversioned
from server.profiles.store import ProfileStore, Writer
from server.runtime.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = [
    "encode_app", "decode_app", "get_app", "list_apps", "put_app", "delete_app", "require_app", "channel_for_apps",
    "store_credentials",
]

_V1 = b"\x01"
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AppRecord)


def _key(app: str) -> bytes:
    return app.encode()


def encode_app(record: AppRecord) -> bytes:
    return _V1 + _encoder.encode(record)


def decode_app(value: bytes) -> AppRecord:
    if value[:1] != _V1:
        raise unversioned(value, "app")
    return _decoder.decode(memoryview(value)[1:])


def get_app(store: ProfileStore, app: str) -> AppRecord | None:
    with store.env.begin() as txn:
        value = txn.get(_key(app), db=store.db("apps"))
    return None if value is None else decode_app(value)


def list_apps(store: ProfileStore) -> list[AppRecord]:
    with store.env.begin() as txn:
        return [decode_app(value) for _, value in txn.cursor(db=store.db("apps"))]


def put_app(w: Writer, record: AppRecord) -> AppRecord:
    """Store an app with a new credentials version: one number for the whole store, never
    reused (not even after the app is deleted), so channels can tell credentials apart."""
    meta = w.dbs["meta"]
    last = w.txn.get(b"last_app_version", db=meta)
    record.version = (msgspec.msgpack.decode(last) if last is not None else 0) + 1
    w.txn.put(b"last_app_version", _encoder.encode(record.version), db=meta)
    w.txn.put(_key(record.app), encode_app(record), db=w.dbs["apps"])
    return record


def delete_app(w: Writer, app: str) -> None:
    if not w.txn.delete(_key(app), db=w.dbs["apps"]):
        raise NotFound(f"no app {app!r} is registered", field="$.app")



def require_app(server: Server, app: str) -> AppRecord:
    record = get_app(server.store, app)
    if record is None:
        raise NotFound(f"no app {app!r} is registered (pigeon apps register-ios or register-android ...)", field="$.app")
    return record


def channel_for_apps(server: Server, platform: str) -> Channel:
    """The channel that checks and uses the credentials of ``platform`` (ios or android) apps."""
    for channel in server.channels:
        if getattr(channel, "app_platform", None) == platform:  # a plugin's channel may not subclass Channel
            return channel
    raise FailedPrecondition(f"no channel plugin handles {platform} apps (is it disabled?)")


async def store_credentials(server: Server, app: str, **credentials: Any) -> AppRecord:
    """Store an app's credentials for one platform (``ios=`` or ``android=``), keeping the
    other's, and let the channels retire what they built from the old ones."""
    existing = get_app(server.store, app)
    record = AppRecord(app=app, **credentials) if existing is None else msgspec.structs.replace(existing, **credentials)
    stored: AppRecord = await server.store.write(put_app, record)
    for channel in server.channels:
        channel.forget_app(app, stored.version)
    return stored
