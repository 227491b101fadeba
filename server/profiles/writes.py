"""The profile writes: attributes, identities, push registrations, consent, token state, events.

Each is a function of a `Writer` (one nested transaction of the store's writer, see
`server.profiles.store`), given to ``store.write``: it runs in the writer's thread, and its
changes commit with its neighbours' or roll back alone.
"""

from __future__ import annotations

import struct
from typing import Any

from server.profiles import keys
from server.profiles.records import ConsentRecord, ProfileRecord, RegistrationRecord, encode_event
from server.profiles.store import InEvent, Writer
from server.runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, StorageError

__all__ = [
    "merge_patch", "upsert_profile", "patch_profile", "delete_profile", "link_identity", "unlink_identity",
    "register_token", "unregister_token", "set_consent", "invalidate_token", "invalidate_tokens",
    "ingest_events", "ingest_events_once", "forget_expired_ids", "MIN_ID_SWEEP",
]

#: Expired event ids forgotten per ingest op at least (and twice the ids it stores): the
#: sweep keeps pace with ingestion, in bounded steps.
MIN_ID_SWEEP = 64
_U64 = struct.Struct(">Q")


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
    w.touched(pid)
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


def ingest_events_once(
    w: Writer, segments: list[list[InEvent]], ids: list[list[str | None] | None], window_us: int
) -> list[tuple[int, list[int]]]:
    """`ingest_events`, but an event whose client id (``ids``, beside each segment; None for a
    segment without ids) an event of this sandbox stored less than ``window_us`` ago, or an
    earlier event of this op, is not stored (with ``window_us`` 0, ids are not remembered).

    Returns, for each segment, the sequence number of its last stored event (0 when none
    was) and the positions of its duplicates. The ids are checked and remembered in the op's
    own transaction, so two copies of a batch store once however they interleave; then at
    most ``MIN_ID_SWEEP`` or twice as many expired ids as were stored are forgotten.
    """
    txn, dbs, now = w.txn, w.dbs, w.now
    known, put, get = dbs["event_ids"], txn.put, txn.get
    stamp = _U64.pack(now)
    cutoff = now - window_us
    seq = w.store._next_seq  # `ingest_events` numbers the stored events in order from here
    seq_key = keys.seq_key
    log: list[tuple[bytes, bytes]] = []
    kept_segments: list[list[InEvent]] = []
    duplicates: list[list[int]] = []
    for events, segment_ids in zip(segments, ids):
        if segment_ids is None or window_us <= 0:
            kept_segments.append(events)
            duplicates.append([])
            seq += len(events)
            continue
        kept: list[InEvent] = []
        dups: list[int] = []
        for position, (event, event_id) in enumerate(zip(events, segment_ids)):
            if event_id is not None:
                key = event_id.encode()
                # one lookup for most ids, new ones: remember it unless it is remembered
                if not put(key, stamp, db=known, overwrite=False):
                    if _U64.unpack(get(key, db=known) or b"")[0] >= cutoff:  # this op's own are too
                        dups.append(position)
                        continue
                    put(key, stamp, db=known)  # remembered, but longer ago than the window
                log.append((seq_key(seq), stamp + key))
            kept.append(event)
            seq += 1
        kept_segments.append(kept)
        duplicates.append(dups)
    lasts = ingest_events(w, kept_segments)
    if w.store._next_seq != seq:
        raise StorageError(f"event ids numbered up to {seq}, events up to {w.store._next_seq}")
    if log:  # sequence numbers only grow: appended in key order
        added = txn.cursor(db=dbs["event_id_log"]).putmulti(log, append=True)[1]
        if added != len(log):
            raise StorageError(f"remembered {added} of {len(log)} event ids")
    forget_expired_ids(w, cutoff, max(MIN_ID_SWEEP, 2 * len(log)))
    return [(last if kept else 0, dups) for last, kept, dups in zip(lasts, kept_segments, duplicates)]


def forget_expired_ids(w: Writer, cutoff: int, limit: int) -> int:
    """Forget at most ``limit`` of this sandbox's event ids remembered before ``cutoff`` (µs),
    oldest first; return how many."""
    txn, known = w.txn, w.dbs["event_ids"]
    cursor = txn.cursor(db=w.dbs["event_id_log"])
    forgotten = 0
    found = cursor.first()
    while found and forgotten < limit:
        value = cursor.value()
        stamp = value[:8]
        if _U64.unpack(stamp)[0] >= cutoff:
            break
        key = value[8:]
        # unless the id was stored again since (once expired): that is a later entry's
        if txn.get(key, db=known) == stamp:
            txn.delete(key, db=known)
        forgotten += 1
        found = cursor.delete() and bool(cursor.key())
    return forgotten
