"""The published channel configurations and messages, as the methods and sends read them."""

from __future__ import annotations

from server.messages.content import Compiled, ConfigRecord, MessageRecord, decode_config, decode_message
from server.profiles.store import ProfileStore
from server.runtime.errors import NotFound

__all__ = ["Catalog"]

#: Messages whose compiled templates are kept (the cache is emptied when it is full).
_COMPILED = 1024


class Catalog:
    """Reads published versions from the store, and keeps each message version's compiled
    templates (versions never change, so neither do they)."""

    def __init__(self, store: ProfileStore) -> None:
        self.store = store
        self._compiled: dict[tuple[str, int], Compiled] = {}

    def config(self, name: str, version: int | None = None, field: str = "$.name") -> ConfigRecord:
        value = self.store.get_version("configs", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}channel configuration {name!r} is published (pigeon configs publish FILE)", field=field)
        return decode_config(value)

    def message(self, name: str, version: int | None = None) -> MessageRecord:
        value = self.store.get_version("messages", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}message {name!r} is published (pigeon messages publish FILE)", field="$.id")
        return decode_message(value)

    def compiled(self, record: MessageRecord) -> Compiled:
        key = (record.message.id, record.version)
        found = self._compiled.get(key)
        if found is None:
            if len(self._compiled) >= _COMPILED:
                self._compiled.clear()
            found = self._compiled[key] = Compiled(record)
        return found
