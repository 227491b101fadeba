"""What one cycle of the journey engine commits, per sandbox (`Plan`), and the store op that
commits it (`commit`).

A cycle's triggers (events, timers, stops, moves, reads, audience changes, held entries) fill
one `Plan` per sandbox: the instances it saves, profile patches, pushes and their jobs, report
counts, read progress, audience memberships, held entries, traces. Each trigger sees what the
earlier ones left (`Plan.instances_of`, `Plan.profile`, `Plan.members_of`), and a trigger that
raised is taken out whole (`Plan.mark`, `Plan.rollback`). `commit` then stores every sandbox's
plan and the engine's positions in the event log and the change feed in one transaction, so a
crash never keeps a step without its push nor a push without its step.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import msgspec

from server.channels import DeliveryJob
from server.journeys import audiences, instances, queue, reads
from server.journeys.machine import Instance, Step
from server.messages import outbox
from server.profiles.records import ProfileRecord, decode_profile
from server.profiles.sandboxes import Space
from server.profiles.store import Writer
from server.profiles.writes import merge_patch
from server.reports.reporting import ReportKey, store_counts

__all__ = ["Plan", "commit", "commit_held", "read_profile", "attributes", "POSITION", "CHANGES"]

#: Meta keys: how far the engine has read the event log, and the change feed.
POSITION = b"journeys_position"
CHANGES = b"journeys_changes"


@dataclass
class Plan:
    """What a cycle commits in one sandbox."""

    space: Space
    saves: list[tuple[bytes, Instance, int]] = field(default_factory=list)
    patches: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    pushes: list[tuple[bytes, int, str]] = field(default_factory=list)
    jobs: list[DeliveryJob] = field(default_factory=list)
    #: The report counts the cycle's triggers made, one key each (`count`): a list, so that a
    #: quarantined trigger's are dropped with its other changes; summed into ``counts`` when
    #: the cycle is staged.
    tally: list[ReportKey] = field(default_factory=list)
    counts: Counter[ReportKey] = field(default_factory=Counter)
    runs: list[tuple[str, reads.Run]] = field(default_factory=list)
    #: Audience memberships that changed: (profile id, journey, member now).
    members: list[tuple[bytes, str, bool]] = field(default_factory=list)
    #: Entries held while their journey is paused (journey, `queue.encode` d entry), and the
    #: held entries taken (journey, key, size).
    queued: list[tuple[str, bytes]] = field(default_factory=list)
    unqueued: list[tuple[str, bytes, int]] = field(default_factory=list)
    traces: list[tuple[bytes, str, list[Step]]] = field(default_factory=list)
    #: The instances ``saves`` holds so far, by profile and journey (`instances_of`).
    latest: dict[bytes, dict[str, Instance]] = field(default_factory=dict)
    indexed: int = 0
    #: Timers whose trigger was quarantined with no instance to end: (wake µs, profile id, journey).
    dropped_timers: list[tuple[int, bytes, str]] = field(default_factory=list)
    #: The profiles read this cycle, with its ``patches`` (`profile`).
    profiles: dict[bytes, ProfileRecord | None] = field(default_factory=dict)
    #: What the cycle's pushes read once (`server.journeys.world`): messages, apps.
    memo: dict[Any, Any] = field(default_factory=dict)

    def profile(self, pid: bytes, read: ProfileRecord | None = None) -> ProfileRecord | None:
        """The profile as this cycle leaves it so far: stored (or ``read`` from a scan), with
        the cycle's patches (an update node's patch made by a first event of the profile must
        be seen by its second, in the same cycle). The update nodes patch the record returned."""
        if pid not in self.profiles:
            record = read if read is not None else read_profile(self.space, pid)
            if record is not None:
                for patched, patch in self.patches:
                    if patched == pid:
                        record.attributes = merge_patch(record.attributes, patch)
            self.profiles[pid] = record
        return self.profiles[pid]

    @property
    def busy(self) -> bool:
        """Whether the plan changes anything (more than the position)."""
        return bool(self.saves or self.patches or self.jobs or self.tally or self.counts or self.runs or self.members
                    or self.queued or self.unqueued)

    def count(self, key: ReportKey) -> None:
        """One more of ``key`` in the reports (see ``tally``)."""
        self.tally.append(key)

    def members_of(self, pid: bytes) -> set[str]:
        """The profile's audience memberships as this cycle leaves them so far."""
        out = audiences.members_of(self.space, pid)
        for saved, id, member in self.members:
            if saved == pid:
                (out.add if member else out.discard)(id)
        return out

    def mark(self) -> tuple[int, ...]:
        """Where the plan's lists are: a trigger's partial changes are what comes after."""
        return (len(self.saves), len(self.patches), len(self.pushes), len(self.jobs), len(self.traces),
                len(self.runs), len(self.members), len(self.queued), len(self.tally))

    def rollback(self, mark: tuple[int, ...]) -> None:
        """Drop what was added since ``mark`` (a quarantined trigger's partial changes)."""
        lists: tuple[list[Any], ...] = (self.saves, self.patches, self.pushes, self.jobs, self.traces, self.runs,
                                        self.members, self.queued, self.tally)
        for pid, _ in self.patches[mark[1]:]:  # its record holds a patch dropped: read again
            self.profiles.pop(pid, None)
        for items, length in zip(lists, mark):
            del items[length:]
        if self.indexed > len(self.saves):  # `latest` holds instances just dropped: built again
            self.latest, self.indexed = {}, 0

    def instances_of(self, pid: bytes) -> dict[str, Instance]:
        """The profile's instances as this cycle leaves them so far: the stored ones, then the
        cycle's own saves (a second event of the profile, or a timer, in the same cycle must
        see what the first did: not enter it again, not move it from where it was)."""
        for saved, instance, _ in self.saves[self.indexed:]:
            self.latest.setdefault(saved, {})[instance.journey] = instance
        self.indexed = len(self.saves)
        return {**instances.instances_of(self.space, pid), **self.latest.get(pid, {})}


def commit(w: Writer, plans: list[Plan], staged: dict[str, tuple[list[DeliveryJob], list[bytes]]],
            positions: tuple[int, int], minute: int) -> None:
    """Store op: every sandbox's plan of the cycle, and the positions past its events and its
    change feed entries (which go)."""
    for plan in plans:
        w.space, w.dbs = plan.space, plan.space.dbs  # this op spans the cycle's sandboxes
        jobs, keys_ = staged[plan.space.name]
        execution = keys_[0][:8].hex() if keys_ else ""
        for pid, instance, old_wake in plan.saves:
            if "pending" in instance.pushes.values():
                instance.pushes = {n: (execution if x == "pending" else x) for n, x in instance.pushes.items()}
            instances.save(w, pid, instance, old_wake)
        for wake, pid, journey in plan.dropped_timers:
            w.txn.delete(instances.timer_key(wake, pid, journey), db=w.dbs["timers"])
        for pid, patch in plan.patches:
            value = w.txn.get(pid, db=w.dbs["profiles"])
            if value is not None:
                record = decode_profile(value)
                record.attributes = merge_patch(record.attributes, patch)
                w.save(pid, record)
        for id, run in plan.runs:
            reads.put_run(w, id, run)
        for pid, id, member in plan.members:
            audiences.set_member(w, pid, id, member)
        commit_held(w, plan)
        for pid, journey, steps in plan.traces:
            instances.trace(w, pid, journey, steps)
        for key, job in zip(keys_, jobs):
            entry = outbox.OutboxEntry(job.app.app, job.token, job.platform, job.content, job.apns, job.fcm,
                                       job.tracking or {}, job.profile)
            w.txn.put(key, outbox.encode_entry(entry), db=w.dbs["outbox"])
        store_counts(w, plan.counts, minute)
    position, changes = positions
    w.txn.put(POSITION, msgspec.msgpack.encode(position), db=w.dbs["meta"])
    w.txn.put(CHANGES, msgspec.msgpack.encode(changes), db=w.dbs["meta"])
    w.txn.put(b"watched", msgspec.msgpack.encode(sorted(w.store.watched)), db=w.dbs["meta"])  # read at open
    audiences.drop_changes(w, changes)


def commit_held(w: Writer, plan: Plan) -> None:
    """Store op step: the entries a paused journey holds now, and those entered or refused."""
    added: dict[str, list[bytes]] = {}
    for id, item in plan.queued:
        added.setdefault(id, []).append(item)
    for id, items in added.items():
        queue.add(w, id, items)
    taken: dict[str, list[tuple[bytes, int]]] = {}
    for id, key, size in plan.unqueued:
        taken.setdefault(id, []).append((key, size))
    for id, keys_ in taken.items():
        queue.remove(w, id, keys_)


def read_profile(space: Space, pid: bytes) -> ProfileRecord | None:
    with space.env.begin() as txn:
        value = txn.get(pid, db=space.db("profiles"))
    return None if value is None else decode_profile(value)


def attributes(profile: ProfileRecord) -> dict[str, Any]:
    return {**profile.attributes, "identities": profile.identities}

