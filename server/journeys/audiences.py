"""Audience-qualification entries: a profile enters a journey when it starts matching the
journey's audience (``entry.audience``, with ``on: enter``), or when it stops (``on: exit``),
as its attributes and events change; never by a periodic scan of all profiles.

What changes a profile reaches the engine two ways: its events through the event log, which the
engine follows anyway, and every other write (attributes, identities, registrations, consent,
a delete, a journey's own update node) through the change feed, which the store appends to in
the commit of the write, for the sandboxes that have a live audience journey only
(`ProfileStore.watched`; a sandbox without one pays nothing):

    changes           (shared)  u64 BE number -> profile id (8): profiles written, in commit
                                order; the engine deletes what it has read, in the commit that
                                records how far it read
    audience_members  (each sandbox's) profile id (8) + utf-8 journey id -> b"": the profiles
                                that match the audience of a live audience journey

So "starts matching" is a difference between two evaluations: the membership stored and the
condition now, committed with the instance it enters. When an audience journey goes live (or a
new version changes its audience) the engine reads every profile once, in id order and in
pages, to record who already matches, entering nobody (they did not just qualify: a read
audience enters those); progress is kept in ``journey_runs`` (`server.journeys.reads.Run`,
``source`` the audience it is for), so a restart goes on from where it was. While that read
runs, a change to a profile it has not reached yet only records the profile's membership.

The audience condition sees ``profile`` (attributes, ``identities``), ``now`` (``date`` and
``iso``, UTC) and, when it names them, ``events``: the profile's event history, for each event
type its ``count`` and ``last`` (ISO 8601 UTC, comparable as text, or with ``days_since``),
over its latest `MAX_HISTORY` events still in the log; ``events['app.opened'].count`` for a
type with dots, and a type never seen counts 0. A profile's membership is re-evaluated only
when it changes: "no purchase for 7 days" becomes true without a change, and is seen at the
profile's next change (a read audience on a schedule covers time alone). An event is a change
only for the audiences that count its type (`counts_any`): reading the history costs about
1.4 µs per event of the profile (measured with 1,000), so other events do not read it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from server.journeys import reads
from server.journeys.machine import Journey
from server.profiles import keys
from server.profiles.records import decode_event
from server.profiles.sandboxes import Space
from server.profiles.store import ProfileStore, Writer
from server.templates import TemplateError

__all__ = ["MAX_HISTORY", "History", "read_changes", "drop_changes", "members_of", "set_member", "history",
           "uses_history", "counts_any", "context", "matches", "backfilled", "iso"]

#: Latest events of a profile its ``events`` history counts.
MAX_HISTORY = 1_000
_EVENTS = re.compile(r"\bevents\b")
_NAMED = re.compile(r"""\bevents(?:\.([A-Za-z_][A-Za-z0-9_]*)|\[\s*['"]([^'"]+)['"]\s*\])""")


def read_changes(store: ProfileStore, after: int, limit: int) -> tuple[list[bytes], int]:
    """Up to ``limit`` profile ids of the change feed after ``after``; the number of the last."""
    out: list[bytes] = []
    position = after
    with store.env.begin() as txn:
        cursor = txn.cursor(db=store.db("changes"))
        found = cursor.set_range(keys.seq_key(after + 1))
        while found and len(out) < limit:
            position = keys.seq_of(cursor.key())
            out.append(bytes(cursor.value()))
            found = cursor.next()
    return out, position


def drop_changes(w: Writer, upto: int) -> None:
    """Store op step: forget the change feed's entries up to ``upto`` (read)."""
    cursor = w.txn.cursor(db=w.store.db("changes"))
    while cursor.first() and keys.seq_of(cursor.key()) <= upto:
        cursor.delete()


def members_of(space: Space, pid: bytes) -> set[str]:
    """The audience journeys whose audience ``pid`` matched when last evaluated."""
    out = set()
    with space.env.begin() as txn:
        cursor = txn.cursor(db=space.db("audience_members"))
        if cursor.set_range(pid):
            for key in cursor.iternext(keys=True, values=False):
                if key[:8] != pid:
                    break
                out.add(bytes(key[8:]).decode())
    return out


def set_member(w: Writer, pid: bytes, journey: str, member: bool) -> None:
    """Store op step: ``pid`` matches ``journey`` 's audience, or no longer does."""
    key = pid + journey.encode()
    if member:
        w.txn.put(key, b"", db=w.dbs["audience_members"])
    else:
        w.txn.delete(key, db=w.dbs["audience_members"])


class History(dict[str, dict[str, Any]]):
    """A profile's events by type: ``count`` and ``last``; a type never seen counts 0."""

    def __missing__(self, type_: str) -> dict[str, Any]:
        return {"count": 0, "last": None}


def history(store: ProfileStore, pid: bytes) -> History:
    """The profile's latest `MAX_HISTORY` events, summed up by type (see the module docstring)."""
    out = History()
    seqs = store.index.seqs_of(pid)[-MAX_HISTORY:]
    if not seqs:
        return out
    latest: dict[str, int] = {}
    with store.env.begin() as txn:
        events = store.db("events")
        for seq in seqs:
            value = txn.get(keys.seq_key(seq), db=events)
            if value is None:
                continue  # deleted by retention since it was indexed
            _, ts, record = decode_event(value)
            type_ = record.type
            summary = out.get(type_)
            if summary is None:
                summary = out[type_] = {"count": 0, "last": None}
            summary["count"] += 1
            latest[type_] = max(latest.get(type_, ts), ts)
    for type_, ts in latest.items():
        out[type_]["last"] = iso(ts)
    return out


def matches(journey: Journey, space: Space, pid: bytes, profile: dict[str, Any], histories: list[History],
            now_us: int) -> bool:
    """Whether the profile (``profile``: its attributes and identities) matches the journey's
    audience; ``histories`` holds its event history once read, so that it is read at most
    once per profile however many audiences name it."""
    source = journey.spec.entry.audience or ""
    if not histories and uses_history(source):
        histories.append(history(space.store, pid))
    try:
        return journey.conditions["audience"].test(context(profile, histories[0] if histories else None, now_us))
    except TemplateError:  # this profile's data breaks the condition: it does not match
        return False


def backfilled(space: Space, journey: Journey, pid: bytes) -> bool:
    """Whether the journey's first read of who matches its audience has been past ``pid``
    (until then a change to the profile records its membership and enters nothing)."""
    run = reads.get_run(space, journey.id)
    if run is None or run.source != journey.spec.entry.audience:
        return False
    return run.next_us == 0 or (run.after is not None and pid <= run.after)


def uses_history(source: str) -> bool:
    """Whether an audience condition names ``events`` (only then is the history read)."""
    return _EVENTS.search(source) is not None


def counts_any(journey: Journey, types: set[str]) -> bool:
    """Whether events of ``types`` can change whether a profile matches the journey's audience:
    it names one of them (``events.purchase``, ``events['a.b']``), or ``events`` otherwise
    than by a type's name. An audience that does not count events changes only with writes."""
    named = _named_types(journey.spec.entry.audience or "")
    return named is None or not named.isdisjoint(types)


def _named_types(source: str) -> frozenset[str] | None:
    """The event types an audience names (empty: it does not use ``events``; None: it uses
    ``events`` in a way that names no type, so any type counts)."""
    uses = len(_EVENTS.findall(source))
    named = [a or b for a, b in _NAMED.findall(source)]
    return frozenset(named) if len(named) == uses else None


def context(profile: dict[str, Any], events: History | None, now_us: int) -> dict[str, Any]:
    """What an audience condition sees (see the module docstring)."""
    return {"profile": profile, "events": History() if events is None else events,
            "now": {"date": iso(now_us)[:10], "iso": iso(now_us)}}


def iso(us: int) -> str:
    """A time as ISO 8601 UTC text of a fixed width, so that texts compare as times do."""
    return datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
