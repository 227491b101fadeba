"""The access actor: which key a hello carries, what it may call, and slowing down guessers.

It loads the keys when the server starts (the pepper of their hashes first, made at the first
start), makes the first admin key when there is none (or takes ``PIGEON_ADMIN_KEY``), and keeps
the keys in memory by their hash, so the handshake checks a key without touching LMDB. When a
key was last used is kept in memory and written every `TOUCH_INTERVAL_S`, and at the stop.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgspec
import msgspec.structs
import trio

from server.access import keys
from server.access.keys import DEFAULT_SANDBOX, KeyRecord
from server.api.registry import granted
from server.profiles.store import ProfileStore
from server.runtime.actor import Actor
from server.runtime.errors import AlreadyExists, ConfigError, FailedPrecondition, NotFound, Unauthenticated

__all__ = ["Access", "Grant", "Throttle", "ADMIN_KEY_ENV", "TOUCH_INTERVAL_S"]

log = logging.getLogger("pigeon.access")

ADMIN_KEY_ENV = "PIGEON_ADMIN_KEY"
#: Seconds between writes of the keys' last use.
TOUCH_INTERVAL_S = 60.0
_EVERY_SCOPE = granted(("admin",))


class Grant(msgspec.Struct, frozen=True):
    """What a connection may call: its key's id (None: no key), every scope it has, and the
    sandbox it works in."""

    key_id: str | None
    scopes: frozenset[str]
    sandbox: str = DEFAULT_SANDBOX


#: A connection without a key: public methods only (``server.health``).
NO_KEY = Grant(None, granted(()))
#: Every connection when keys are off (``auth = "none"``), in sandbox ``default``.
ANYONE = Grant(None, _EVERY_SCOPE)


def _network(host: str) -> str:
    """What the throttle counts for ``host``: itself, or its /64 for an IPv6 address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # unix, or a name
    if address.version == 6 and address.ipv4_mapped is None:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return host


class Throttle:
    """Delays the refusals of hosts that failed before, with a bounded memory.

    Each failure adds 1 to its host's score, which halves every ``half_life`` seconds; a
    refusal waits ``base * 2 ** (score - 1)`` seconds (no wait before the first failure), at
    most ``max_delay``. At most ``max_hosts`` hosts are remembered (the least recently failed
    is forgotten first). Only the failing host's connections wait. An IPv6 host counts as its
    /64 (one machine, or one customer of a provider, holds a whole /64 and could walk through
    it).
    """

    def __init__(
        self, *, base: float = 0.05, max_delay: float = 4.0, half_life: float = 30.0, max_hosts: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base, self.max_delay, self.half_life, self.max_hosts = base, max_delay, half_life, max_hosts
        self.clock = clock
        self._hosts: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._hosts)

    def score(self, host: str) -> float:
        seen = self._hosts.get(_network(host))
        if seen is None:
            return 0.0
        score, when = seen
        return score * 0.5 ** ((self.clock() - when) / self.half_life)

    def failed(self, host: str) -> float:
        """Record a failure of ``host``; the seconds its refusal should wait (0: the host was
        not being slowed down, which is when a refusal is worth a line in the log)."""
        score = self.score(host)
        delay = 0.0 if score < 1 else min(self.max_delay, self.base * 2 ** min(64.0, score - 1))
        host = _network(host)
        self._hosts[host] = (score + 1, self.clock())
        self._hosts.move_to_end(host)
        while len(self._hosts) > self.max_hosts:
            self._hosts.popitem(last=False)
        return delay


class Access(Actor):
    """The API keys of the server.

    Args:
        store: where they are kept.
        enabled: False with ``auth = "none"``: every connection may call every method.
        admin_key_file: where the first admin key is written.
        env: where ``PIGEON_ADMIN_KEY`` is read.
        refusal_delay_max_s: the longest a refusal waits (`Throttle`).
    """

    def __init__(
        self, store: ProfileStore, *, enabled: bool, admin_key_file: Path, env: Mapping[str, str] = os.environ,
        refusal_delay_max_s: float = 4.0,
    ) -> None:
        super().__init__("access", 16)
        self.store = store
        self.enabled = enabled
        self.admin_key_file = admin_key_file
        self.env = env
        self.pepper = b""
        self._by_digest: dict[bytes, KeyRecord] = {}
        self._used: dict[str, int] = {}
        self.throttle = Throttle(max_delay=refusal_delay_max_s)
        self.refused = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.pepper = await self.store.write(keys.ensure_pepper)
        self._by_digest = {record.digest: record for record in keys.list_keys(self.store)}
        if self.enabled:
            await self._first_admin_key()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._toucher)
                task_status.started()
                while await self.receive_batch():
                    pass
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._touch()

    async def _first_admin_key(self) -> None:
        given = self.env.get(ADMIN_KEY_ENV)
        if given:
            given = given.strip()
            if not keys.is_key(given):
                raise ConfigError(f"{ADMIN_KEY_ENV} is not an API key: a key is pgn_ and 43 base64url characters "
                                  "(make one with: python3 -c \"import secrets; print('pgn_' + secrets.token_urlsafe(32))\")")
            if keys.hash_key(self.pepper, given) not in self._by_digest:
                await self._store(given, ["admin"], f"from {ADMIN_KEY_ENV}")
                log.info("admin key %s… from %s stored", keys.key_id(given), ADMIN_KEY_ENV)
            return
        if self._by_digest:
            return
        key = keys.new_key()
        keys.write_admin_key(self.admin_key_file, key)
        await self._store(key, ["admin"], "first admin key")
        log.warning("first start: admin API key written to %s (readable by its owner only); the pigeon command "
                    "on this machine uses it", self.admin_key_file)

    async def _store(self, key: str, scopes: list[str], name: str, sandbox: str = DEFAULT_SANDBOX) -> KeyRecord:
        record = KeyRecord(id=keys.key_id(key), digest=keys.hash_key(self.pepper, key), scopes=scopes, name=name,
                           sandbox=sandbox, created_us=0)
        record = await self.store.write(keys.put_key, record)
        self._by_digest[record.digest] = record
        return record

    # -- the methods' side ----------------------------------------------------------------

    async def create(self, scopes: list[str], name: str, sandbox: str = DEFAULT_SANDBOX) -> tuple[str, KeyRecord]:
        """A new key of ``sandbox`` (the whole key is returned here only)."""
        self.store.space(sandbox)  # NOT_FOUND
        for _ in range(8):
            key = keys.new_key()
            try:
                return key, await self._store(key, sorted(set(scopes), key=_SCOPE_ORDER.index), name, sandbox)
            except AlreadyExists:  # two keys with the same first 12 characters: draw again
                continue
        raise AlreadyExists("could not draw a key with an unused id")  # pragma: no cover

    async def revoke(self, id: str, sandbox: str | None) -> KeyRecord:
        """Revoke key ``id`` of ``sandbox`` (None: of any sandbox)."""
        if sandbox is not None and not any(r.id == id and r.sandbox == sandbox for r in self._by_digest.values()):
            raise NotFound(f"no API key has the id {id!r}", field="$.id")  # as the store says it
        given = (self.env.get(ADMIN_KEY_ENV) or "").strip()
        if given and keys.key_id(given) == id:
            # Revoked now, it would be stored again at the next start: it must leave the
            # environment first.
            raise FailedPrecondition(f"this key comes from {ADMIN_KEY_ENV}, which would bring it back at the next "
                                     f"start: remove it from {ADMIN_KEY_ENV}, restart, then revoke it", field="$.id")
        record = await self.store.write(keys.delete_key, id, sandbox)
        self._by_digest.pop(record.digest, None)
        self._used.pop(id, None)
        return record

    def list(self, sandbox: str) -> list[KeyRecord]:
        """The keys of ``sandbox``, oldest first."""
        records = sorted((r for r in self._by_digest.values() if r.sandbox == sandbox), key=lambda r: (r.created_us, r.id))
        return [msgspec.structs.replace(r, last_used_us=max(r.last_used_us, self._used.get(r.id, 0))) for r in records]


    # -- the handshake's side -------------------------------------------------------------

    def authenticate(self, api_key: str | None, sandbox: str | None = None) -> Grant | None:
        """What a hello with ``api_key``, naming ``sandbox``, may call; None when the key is not
        valid. Raises `Unauthenticated` for a key of another sandbox than the one named, and
        `NotFound` for a sandbox that does not exist (without keys: a key names its own)."""
        if not self.enabled:
            if sandbox is None or sandbox == DEFAULT_SANDBOX:
                return ANYONE
            self.store.space(sandbox)
            return Grant(None, _EVERY_SCOPE, sandbox)
        if api_key is None or api_key == "":
            return NO_KEY
        record = self._by_digest.get(keys.hash_key(self.pepper, api_key))
        if record is None:
            self.refused += 1
            return None
        if sandbox is not None and sandbox != record.sandbox:
            # The same answer whether that sandbox exists or not.
            raise Unauthenticated(f"this API key does not belong to sandbox {sandbox!r}: a key works in its own "
                                  "sandbox only (leave the hello's sandbox out to use the key's)")
        self._used[record.id] = time.time_ns() // 1000
        return Grant(record.id, granted(record.scopes), record.sandbox)

    async def _toucher(self) -> None:
        while True:
            await trio.sleep(TOUCH_INTERVAL_S)
            await self._touch()

    async def _touch(self) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self.store.write(keys.touch_keys, used)
        except Exception as exc:  # the store is stopping or restarting: next time
            log.debug("could not record when keys were last used: %r", exc)
            for id, when in used.items():
                self._used[id] = max(when, self._used.get(id, 0))
            return
        for record in self._by_digest.values():
            if record.id in used:
                record.last_used_us = max(record.last_used_us, used[record.id])

    def details(self) -> dict[str, object]:
        return {"keys": len(self._by_digest), "refused": self.refused, "throttled_hosts": len(self.throttle)}


_SCOPE_ORDER = ["admin", "operator", "ingest", "read"]
