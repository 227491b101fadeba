"""The profile writes: attributes, identities, push registrations, consent, token state, events.

Each is a function of a `Writer` (one nested transaction of the store's writer, see
`server.profiles.store`), given to ``store.write``: it runs in the writer's thread, and its
changes commit with its neighbours' or roll back alone.
"""

from __future__ import annotations

from typing import Any

from server.profiles import keys
from server.profiles.records import ConsentRecord, ProfileRecord, RegistrationRecord, encode_event
from server.profiles.store import InEvent, Writer
from server.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StorageError

__all__ = [
    "merge_patch", "upsert_profile", "patch_profile", "delete_profile", "link_identity", "unlink_identity",
    "register_token", "unregister_token", "set_consent", "invalidate_token", "invalidate_tokens",
    "ingest_events",
]


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def upsert_profile(w: Writer, identity: str, attributes: dict[str, Any]) -> ProfileRecord:
    pid, record, _ = w.get_or_create(identity)
    record.attributes = attributes
    w.save(pid, record)
    return record


def patch_profile(w: Writer, identity: str, patch: dict[str, Any], create: bool) -> ProfileRecord:
    pid, record, _ = w.get_or_create(identity) if create else (*w.require(identity), False)
    record.attributes = merge_patch(record.attributes, patch)
    w.save(pid, record)
    return record


def delete_profile(w: Writer, identity: str) -> tuple[list[str], int, int]:
    pid, record = w.require(identity)
    txn, dbs = w.txn, w.dbs
    for other in record.identities:
        txn.delete(keys.identity_key(other), db=dbs["identities"])
    for reg in record.registrations:
        txn.delete(keys.token_key(reg.app, reg.token), db=dbs["tokens"])
    # its events: those indexed, and those logged earlier in this same commit
    seqs = w.store.index.seqs_of(pid) + [seq for p, _, seq in w.index_adds if p == pid]
    for seq in seqs:
        txn.delete(keys.seq_key(seq), db=dbs["events"])
    w.index_drops.append(pid)
    txn.delete(pid, db=dbs["profiles"])
    return record.identities, len(record.registrations), len(seqs)


def link_identity(w: Writer, identity: str, link: str) -> ProfileRecord:
    pid, record = w.require(identity)
    owner = w.pid(link, "$.link")
    if owner == pid:
        return record
    if owner is not None:
        other = w.load(owner)
        raise AlreadyExists(
            f"identity {link!r} already belongs to another profile ({other.identities[0]!r})", field="$.link"
        )
    w.txn.put(keys.identity_key(link), pid, db=w.dbs["identities"])
    record.identities.append(link)
    w.save(pid, record)
    return record


def unlink_identity(w: Writer, identity: str) -> ProfileRecord:
    pid, record = w.require(identity)
    if len(record.identities) == 1:
        raise FailedPrecondition(
            f"{identity!r} is the profile's only identity; delete the profile instead", field="$.identity"
        )
    w.txn.delete(keys.identity_key(identity), db=w.dbs["identities"])
    record.identities.remove(identity)
    w.save(pid, record)
    return record


def register_token(
    w: Writer, identity: str, app: str, platform: str, token: str
) -> tuple[RegistrationRecord, bool, str | None, list[RegistrationRecord]]:
    """Register ``token`` on the profile (created if needed), moving it from another profile.

    Returns the registration, whether the profile was created, an identity of the profile it
    moved from, and the registrations evicted to keep ``max_registrations`` (least recently
    seen first; their tokens are forgotten).
    """
    tkey = keys.token_key(app, token)
    pid, record, created = w.get_or_create(identity)
    txn, dbs = w.txn, w.dbs
    owner = txn.get(tkey, db=dbs["tokens"])
    moved_from = None
    first_seen = w.now
    if owner is not None and owner != pid:
        previous = w.load(owner)
        for reg in previous.registrations:
            if reg.app == app and reg.token == token:
                first_seen = reg.first_seen
        previous.registrations = [r for r in previous.registrations if not (r.app == app and r.token == token)]
        w.save(owner, previous)
        moved_from = previous.identities[0]
    kept = []
    for reg in record.registrations:
        if reg.app == app and reg.token == token:
            first_seen = reg.first_seen
        else:
            kept.append(reg)
    registration = RegistrationRecord(app, platform, token, first_seen, w.now)
    kept.append(registration)
    evicted: list[RegistrationRecord] = []
    cap = w.store.max_registrations
    if len(kept) > cap:
        kept.sort(key=lambda r: r.last_seen)
        evicted, kept = kept[: len(kept) - cap], kept[len(kept) - cap :]
        for gone in evicted:
            txn.delete(keys.token_key(gone.app, gone.token), db=dbs["tokens"])
    record.registrations = kept
    w.save(pid, record)
    txn.put(tkey, pid, db=dbs["tokens"])
    return registration, created, moved_from, evicted


def unregister_token(w: Writer, app: str, token: str) -> str:
    """Remove ``token``'s registration for ``app``. An APNs token is stored in lower case, so a
    token given in another case also finds an APNs registration (never an FCM one: FCM tokens
    are case-sensitive)."""
    tokens = w.dbs["tokens"]
    owner = w.txn.get(keys.token_key(app, token), db=tokens)
    if owner is None and token != token.lower():
        lowered = token.lower()
        candidate = w.txn.get(keys.token_key(app, lowered), db=tokens)
        if candidate is not None and any(
            r.app == app and r.token == lowered and r.platform.startswith("apns") for r in w.load(candidate).registrations
        ):
            owner, token = candidate, lowered
    if owner is None:
        raise NotFound(f"token is not registered for app {app!r}", field="$.token")
    record = w.load(owner)
    record.registrations = [r for r in record.registrations if not (r.app == app and r.token == token)]
    w.save(owner, record)
    w.txn.delete(keys.token_key(app, token), db=tokens)
    return record.identities[0]


def set_consent(w: Writer, identity: str, app: str, push: str) -> ConsentRecord:
    pid, record, _ = w.get_or_create(identity)
    entry = ConsentRecord(push, w.now)
    record.consent[app] = entry
    w.save(pid, record)
    return entry


def invalidate_token(w: Writer, app: str, token: str, reason: str, since_us: int | None) -> str:
    """Mark a registration invalid after the provider said its token is dead.

    With ``since_us`` (APNs 410: since when the token is dead), a registration seen again
    after that moment stays valid. Returns ``marked``, ``already`` (it was invalid),
    ``kept`` (registered again since ``since_us``) or ``unknown`` (no profile has it).
    """
    try:
        key = keys.token_key(app, token)
    except InvalidArgument:  # too long to have been registered
        return "unknown"
    owner = w.txn.get(key, db=w.dbs["tokens"])
    if owner is None:
        return "unknown"
    record = w.load(owner)
    for registration in record.registrations:
        if registration.app == app and registration.token == token:
            if since_us is not None and registration.last_seen > since_us:
                return "kept"
            if registration.state == "invalid":
                return "already"
            registration.state = "invalid"
            registration.invalid_reason = reason
            registration.invalid_at = w.now
            w.save(owner, record)
            return "marked"
    return "unknown"


def invalidate_tokens(w: Writer, items: list[tuple[str, str, str, int | None]]) -> list[str]:
    """`invalidate_token` for each ``(app, token, reason, since_us)``."""
    return [invalidate_token(w, *item) for item in items]


def ingest_events(w: Writer, segments: list[list[InEvent]]) -> list[int]:
    """Append each segment's events to the log; return the last sequence number of each.

    This is the hot path of ingestion: profile ids are looked up once per identity and
    batch (a profile is only created, never loaded), and the log is appended to in key order.
    """
    txn, dbs = w.txn, w.dbs
    identities = dbs["identities"]
    cache: dict[str, bytes] = {}
    puts = []
    lasts = []
    store = w.store
    seq = store._next_seq - 1
    seq_key = keys.seq_key
    index = w.index_adds
    for events in segments:
        for identity, type_, ts, data in events:
            pid = cache.get(identity)
            if pid is None:
                pid = txn.get(keys.identity_key(identity), db=identities) or w.create(identity)[0]
                cache[identity] = pid
            seq += 1
            puts.append((seq_key(seq), encode_event(pid, ts, type_, data)))
            index.append((pid, ts, seq))
        lasts.append(seq)
    store._next_seq = seq + 1
    if puts:
        added = txn.cursor(db=dbs["events"]).putmulti(puts, append=True)[1]
        if added != len(puts):
            raise StorageError(f"stored {added} of {len(puts)} events")
    return lasts
