"""The journey engine: live journeys, run on the state machine (`server.journeys.machine`).

It follows the committed event log from its position and the timers of every sandbox. Each
cycle takes the events after its position (ingestion's hint wakes it at once) and the timers
due (it sleeps until the next one, a second at most), works out on the Trio thread what each
does to the instances of its profile (and which journeys it enters), and commits it all in
one store op: the instances, their timers, the pushes' outbox entries and report counts,
profile updates, and the position past those events. So a crash never sends a push whose
step was not recorded nor records a step whose push was lost (the outbox is replayed at the
next start, `server.messages.pipeline.recover`), and each event and each timer moves its
instance once. Then the pushes are delivered, in the background, as ``messages.send`` 's are.

Entries: an event entry indexed by event type per sandbox (no scan of all journeys per
event); reactions, exits and goals: the event's profile's own instances (one key range).
What is not here yet: audience and read-audience entries, ``move_waiting``, per-node journey
metrics beyond the pushes' counts, caps counted on delivery (they count pushes staged).
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocols import api
from server.channels import DeliveryJob
from server.journeys import catalog, instances, reads
from server.journeys.definition import duration_us
from server.journeys.machine import Happened, Instance, Journey, Step, advance, enter
from server.journeys.world import LiveWorld
from server.messages import outbox
from server.profiles import keys
from server.profiles.records import ProfileRecord, decode_event, decode_profile
from server.profiles.sandboxes import Space, sandbox_of
from server.profiles.store import Writer
from server.profiles.writes import merge_patch
from server.reports.reporting import ReportKey, count_targeted, store_counts
from server.runtime.actor import Actor
from server.runtime.errors import ActorError, ResourceExhausted, ServerError
from server.templates import TemplateError

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["Journeys", "EventsCommitted"]

log = logging.getLogger("pigeon.journeys")

#: Events and timers a cycle takes at most.
BATCH = 500
#: Cycles whose pushes may be in delivery at once.
IN_DELIVERY = 8
_POSITION = b"journeys_position"
#: How long the position may move in memory before it is stored, when nothing else is.
_SAVE_POSITION_US = 1_000_000
_data_decoder = msgspec.msgpack.Decoder(dict[str, Any])
#: Exclusions the machine decides itself (the world counts those of its pushes).
_MACHINE_EXCLUSIONS = ("FrequencyCapped", "QuietHours")


class EventsCommitted(msgspec.Struct, frozen=True):
    """The event log now reaches ``last_seq``; ``count`` events were added by the commit."""

    last_seq: int
    count: int


@dataclass
class _Plan:
    """What a cycle commits in one sandbox."""

    space: Space
    saves: list[tuple[bytes, Instance, int]] = field(default_factory=list)
    patches: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    pushes: list[tuple[bytes, int, str]] = field(default_factory=list)
    jobs: list[DeliveryJob] = field(default_factory=list)
    counts: Counter[ReportKey] = field(default_factory=Counter)
    runs: list[tuple[str, reads.Run]] = field(default_factory=list)
    #: What the cycle's pushes read once (`server.journeys.world`): messages, apps.
    memo: dict[Any, Any] = field(default_factory=dict)

    @property
    def busy(self) -> bool:
        """Whether the plan changes anything (more than the position)."""
        return bool(self.saves or self.patches or self.jobs or self.counts or self.runs)
    traces: list[tuple[bytes, str, list[Step]]] = field(default_factory=list)
    #: The instances ``saves`` holds so far, by profile and journey (`instances_of`).
    latest: dict[bytes, dict[str, Instance]] = field(default_factory=dict)
    indexed: int = 0

    def instances_of(self, pid: bytes) -> dict[str, Instance]:
        """The profile's instances as this cycle leaves them so far: the stored ones, then the
        cycle's own saves (a second event of the profile, or a timer, in the same cycle must
        see what the first did: not enter it again, not move it from where it was)."""
        for saved, instance, _ in self.saves[self.indexed:]:
            self.latest.setdefault(saved, {})[instance.journey] = instance
        self.indexed = len(self.saves)
        return {**instances.instances_of(self.space, pid), **self.latest.get(pid, {})}


class Journeys(Actor):
    def __init__(self, server: Server | None = None, *, mailbox_size: int = 1024) -> None:
        super().__init__("journeys", mailbox_size)
        self.server = server
        #: Highest event sequence number known to be committed.
        self.log_end = 0
        #: Highest sequence number the engine has evaluated.
        self.position = 0
        self.events_seen = 0
        self.hints_dropped = 0
        self.steps = 0
        self.entered = 0
        self.timers_fired = 0
        self._saved_us = 0
        self._wake = trio.Event()
        self._live: dict[str, dict[str, Journey]] = {}  # sandbox -> id -> live version
        self._states: dict[str, dict[str, str]] = {}  # sandbox -> id -> lifecycle state
        self._to_stop: set[tuple[str, str]] = set()  # stopped journeys whose instances must end
        #: Journeys whose waiting instances move to a new version, and where the scan is.
        self._to_move: dict[tuple[str, str], tuple[Journey, bytes | None]] = {}
        self._by_event: dict[str, dict[str, list[str]]] = {}  # sandbox -> event type -> ids
        self._reads: dict[str, list[str]] = {}  # sandbox -> ids of live read-audience journeys
        self._compiled: dict[tuple[str, str, int], Journey] = {}
        self._stale: set[str] = set()  # sandboxes whose journeys changed

    @property
    def live_journeys(self) -> int:
        return sum(len(j) for j in self._live.values())

    def events_committed(self, last_seq: int, count: int) -> None:
        """Called by ingestion after a commit; never blocks the caller."""
        try:
            self.send_nowait(EventsCommitted(last_seq, count))
        except (ResourceExhausted, ActorError):
            self.hints_dropped += 1  # only a hint: the log is in LMDB
        self.log_end = max(self.log_end, last_seq)
        self._wake.set()

    def changed(self, space: Space) -> None:
        """A journey of ``space`` was published or changed state: read them again."""
        self._stale.add(space.name)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.server is None:  # a bare engine (tests of other actors): follow the hints only
            task_status.started()
            while hints := await self.receive_batch(1024):
                for hint in hints:
                    self.events_seen += hint.count
                    self.position = max(self.position, hint.last_seq)
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._hints)
            self._deliveries = trio.Semaphore(IN_DELIVERY)
            self._nursery = nursery
            task_status.started()
            # The start's recovery takes the outbox's leftovers first (the server starts it once
            # its actors are up): what this engine stages must not look like one.
            await self.server.outbox_read.wait()
            await self._start()
            while not self.stopping:
                next_due = await self._cycle()
                if next_due is None:
                    with trio.move_on_after(self._sleep()):
                        await self._wake.wait()
                    self._wake = trio.Event()
            nursery.cancel_scope.cancel()

    async def _hints(self) -> None:
        while hints := await self.receive_batch(1024):
            for hint in hints:
                self.events_seen += hint.count
            self._wake.set()
        self._wake.set()  # the mailbox is closed: the engine stops now, not at its next second

    def _sleep(self) -> float:
        """Seconds until the next timer is due, a second at most."""
        assert self.server is not None
        now = self.server.store.clock()
        soonest = min((wake for wake in self._next_timers.values() if wake is not None), default=None)
        return 1.0 if soonest is None else max(0.0, min(1.0, (soonest - now) / 1e6))

    async def _start(self) -> None:
        assert self.server is not None
        store = self.server.store
        self._next_timers: dict[str, int | None] = {}
        with store.env.begin() as txn:
            stored = txn.get(_POSITION, db=store.db("meta"))
            last = txn.cursor(db=store.db("events"))
            end = keys.seq_of(last.key()) if last.last() else 0
        # The first start follows the log from its end: earlier events were never for journeys.
        self.position = msgspec.msgpack.decode(stored) if stored is not None else end
        self.log_end = max(self.log_end, end)
        if stored is None:  # durable now: a crash before the first cycle must not skip what comes after
            await store.write(_commit, [], {}, self.position, 0)
        for space in store.spaces():
            self._index(space)

    def _index(self, space: Space) -> None:
        live: dict[str, Journey] = {}
        states: dict[str, str] = {}
        by_event: dict[str, list[str]] = {}
        before = self._states.get(space.name, {})
        for info in catalog.list_journeys(space):
            states[info.journey.id] = info.state
            if info.state == "stopped" and before.get(info.journey.id, "stopped") != "stopped":
                self._to_stop.add((space.name, info.journey.id))
            if info.state != "live" or info.live_version is None:
                continue
            old = self._live.get(space.name, {}).get(info.journey.id)
            journey = self._journey(space, info.journey.id, info.live_version)
            if (journey is not None and old is not None and old.version < journey.version
                    and catalog.moves_waiting(space, journey.id, journey.version)):
                self._to_move[(space.name, journey.id)] = (journey, None)
            if journey is not None:
                live[journey.id] = journey
                if journey.spec.entry.event is not None:
                    by_event.setdefault(journey.spec.entry.event, []).append(journey.id)
        self._live[space.name], self._states[space.name], self._by_event[space.name] = live, states, by_event
        self._reads[space.name] = [id for id, journey in live.items() if journey.spec.entry.read]

    def _journey(self, space: Space, id: str, version: int) -> Journey | None:
        key = (space.name, id, version)
        found = self._compiled.get(key)
        if found is None:
            try:
                info = catalog.get_journey(space, id, version)
            except ServerError:
                return None
            found = self._compiled[key] = Journey(info.journey, version)
        return found

    # -- a cycle ----------------------------------------------------------------------------

    async def _cycle(self) -> int | None:
        """Take the events after the position and the timers due; commit what they do.
        Returns the position when there was work (call again), None when idle."""
        assert self.server is not None
        store = self.server.store
        for name in list(self._stale):
            self._stale.discard(name)
            self._index(store.space(name))
        now = store.clock()
        plans: dict[str, _Plan] = {}
        events, position = self._read_events()
        for pid, type_, data in events:
            space = store.space_of(sandbox_of(pid))
            if space is not None:
                self._on_event(self._plan(plans, space), pid, type_, data, now)
        fired = self._stop_instances(plans, now) + self._move_instances(plans)
        for space in store.spaces():
            due, self._next_timers[space.name] = instances.due(space, now, BATCH)
            for wake, pid, journey in due:
                self._on_timer(self._plan(plans, space), pid, journey, wake, now)
                fired += 1
        fired += self._read_audiences(plans, now)
        if not events and not fired and position == self.position:
            return None
        if not any(plan.busy for plan in plans.values()) and now - self._saved_us < _SAVE_POSITION_US:
            # Only the position moved (events no journey wanted): kept in memory, stored at most
            # once a second, so that ingestion's commits carry no engine write each.
            self.position = position
            return position
        execution = secrets.token_hex(8)
        staged = self._stage(plans, execution)
        minute = self.server.reporting.minute()
        await store.write(_commit, list(plans.values()), staged, position, minute)
        self.position, self._saved_us = position, now
        self.timers_fired += fired
        for plan in plans.values():
            self.server.reporting.counted(plan.counts, minute)
            jobs, keys_ = staged[plan.space.name]
            if jobs:
                await self._deliveries.acquire()
                self._nursery.start_soon(self._deliver, plan.space, execution, jobs, keys_)
        return position

    def _stop_instances(self, plans: dict[str, _Plan], now: int) -> int:
        """End the instances of the journeys stopped since the last cycle (`BATCH` at most;
        the rest next cycle)."""
        assert self.server is not None
        ended = 0
        for name, id in list(self._to_stop):
            space = self.server.store.space(name)
            found, rest = instances.of_journey(space, id, BATCH - ended)
            for pid, instance in found:
                plan = self._plan(plans, space)
                instance = plan.instances_of(pid).get(id, instance)
                if instance.ended:  # an event of this cycle ended it already
                    continue
                stopped = msgspec.structs.replace(instance, ended_us=now, reason="stopped", waiting="", wake_us=0)
                plan.saves.append((pid, stopped, instance.wake_us))
                plan.counts[(name, "", 0, id, instance.node, "", "", "exited", "stopped")] += 1
            ended += len(found)
            if rest is None:
                self._to_stop.discard((name, id))
            if ended >= BATCH:
                break
        return ended

    def _move_instances(self, plans: dict[str, _Plan]) -> int:
        """Move the instances waiting in an older version of a journey published with
        ``move_waiting`` to its new version, where a node of the same id and type waits
        (`BATCH` at most a cycle); the others stay on their version."""
        assert self.server is not None
        moved = 0
        for (name, id), (journey, after) in list(self._to_move.items()):
            space = self.server.store.space(name)
            found, after = instances.of_journey(space, id, BATCH - moved, before=journey.version, after=after)
            plan = self._plan(plans, space)
            for pid, instance in found:
                instance = plan.instances_of(pid).get(id, instance)  # as this cycle left it
                old = self._journey(space, id, instance.version)
                node = journey.nodes.get(instance.node)
                same = old is not None and type(node) is type(old.nodes.get(instance.node))
                if instance.waiting and not instance.ended and same:
                    plan.saves.append(
                        (pid, msgspec.structs.replace(instance, version=journey.version), instance.wake_us))
                    moved += 1
            if after is None:
                del self._to_move[(name, id)]
            else:
                self._to_move[(name, id)] = (journey, after)
                break  # the rest next cycle
        return moved

    def _read_audiences(self, plans: dict[str, _Plan], now: int) -> int:
        """Enter the next profiles of each read under way, within its rate (`server.journeys.reads`);
        the profiles read."""
        assert self.server is not None
        entered = read = 0
        for name, ids in self._reads.items():
            space = self.server.store.space(name)
            for id in ids:
                journey = self._live[name][id]
                entry = journey.spec.entry
                run = reads.get_run(space, id) or reads.Run(next_us=int(entry.at.timestamp() * 1e6) if entry.at else now)
                if run.next_us == 0 or now < run.next_us:
                    continue
                run = msgspec.structs.replace(run, running=True)
                limit = reads.allowance(run, entry.rate, now, BATCH - read)
                page = reads.page(space, run, limit)
                read += len(page)
                plan = self._plan(plans, space)
                for pid, profile in page:
                    previous = plan.instances_of(pid).get(id)
                    if self._enters(journey, previous, profile, {}, now):
                        self.entered += 1
                        entered += 1
                        self._advance(plan, pid, profile, journey, enter(journey, Happened("enter"), now),
                                      Happened("enter", type="read"), now)
                if page:
                    run.after, run.last_us = page[-1][0], now
                    run.entered += len(page)
                if len(page) < limit:  # the read reached the last profile
                    every = duration_us(entry.every) if entry.every else 0
                    run = reads.Run(next_us=run.next_us + every if every else 0, last_us=now)
                plan.runs.append((id, run))
        return read

    def _plan(self, plans: dict[str, _Plan], space: Space) -> _Plan:
        plan = plans.get(space.name)
        if plan is None:
            plan = plans[space.name] = _Plan(space)
        return plan

    async def _deliver(self, space: Space, execution: str, jobs: list[DeliveryJob], keys_: list[bytes]) -> None:
        assert self.server is not None
        try:
            await outbox.deliver_batch(self.server, space, execution, jobs, keys_)
        except ServerError as exc:  # left in the outbox: delivered again at the next start
            log.error("journey pushes of %s not settled: %s", execution, exc)
        finally:
            self._deliveries.release()

    def _read_events(self) -> tuple[list[tuple[bytes, str, msgspec.Raw]], int]:
        """Up to `BATCH` events after the position: (profile id, type, encoded data); the new
        position. Only a sandbox with journeys has its events decoded."""
        assert self.server is not None
        store = self.server.store
        out: list[tuple[bytes, str, msgspec.Raw]] = []
        position = self.position
        with store.env.begin() as txn:
            cursor = txn.cursor(db=store.db("events"))
            found = cursor.set_range(keys.seq_key(position + 1))
            while found and len(out) < BATCH:
                value = cursor.value()
                position = keys.seq_of(cursor.key())
                found = cursor.next()
                space = store.space_of(sandbox_of(value[1:9]))
                if space is None or not self._states.get(space.name):
                    continue  # no journey in that sandbox: nothing to evaluate
                _, _, record = decode_event(value)
                out.append((bytes(value[1:9]), record.type, record.data))
        return out, position

    # -- what an event and a timer do -------------------------------------------------------

    def _on_event(self, plan: _Plan, pid: bytes, type_: str, raw: msgspec.Raw, now: int) -> None:
        space = plan.space
        entries = self._by_event.get(space.name, {}).get(type_, [])
        running = plan.instances_of(pid)
        if not entries and all(instance.ended for instance in running.values()):
            return  # nothing this event could enter or move: the profile is not read
        profile = _profile(space, pid)
        if profile is None:
            return
        try:
            data = _data_decoder.decode(raw)
        except msgspec.DecodeError:
            data = {}
        happened = Happened("event", type=type_, data=data)
        states = self._states.get(space.name, {})
        for id, instance in running.items():
            journey = self._journey(space, id, instance.version)
            if journey is None or instance.ended:
                continue
            if states.get(id) == "stopped":  # a stop not carried out to it yet (a crash came first)
                self._stopped(plan, pid, instance, instance.wake_us, now)
            else:
                self._advance(plan, pid, profile, journey, instance, happened, now)
        for id in entries:
            journey = self._live[space.name][id]
            if self._enters(journey, running.get(id), profile, data, now):
                self.entered += 1
                self._advance(plan, pid, profile, journey, enter(journey, happened, now),
                              Happened("enter", type=type_), now)

    def _enters(self, journey: Journey, previous: Instance | None, profile: ProfileRecord, data: dict[str, Any],
                now: int) -> bool:
        spec = journey.spec
        if previous is not None:
            again = spec.reentrance
            if not previous.ended or again is None or not again.allowed:
                return False
            if again.after is not None and now - previous.entered_us < duration_us(again.after):
                return False
        if journey.test and profile.attributes.get("testProfile") is not True:
            return False
        if spec.start is not None and now < int(spec.start.timestamp() * 1e6):
            return False
        if spec.end is not None and now >= int(spec.end.timestamp() * 1e6):
            return False
        condition = journey.conditions.get("entry")
        if condition is None:
            return True
        try:
            return condition.test({"profile": _attributes(profile), "event": data})
        except TemplateError:
            return False

    def _on_timer(self, plan: _Plan, pid: bytes, id: str, wake: int, now: int) -> None:
        space = plan.space
        instance = plan.instances_of(pid).get(id)
        profile = _profile(space, pid)
        if instance is None or instance.ended or instance.wake_us != wake or profile is None:
            if instance is not None and instance.wake_us != wake:
                plan.saves.append((pid, instance, wake))  # a stale timer: its key goes
            return
        state = self._states.get(space.name, {}).get(id, "live")
        if state == "paused":
            held = msgspec.structs.replace(instance, wake_us=now + 60_000_000)
            plan.saves.append((pid, held, wake))
            return
        journey = self._journey(space, id, instance.version)
        if journey is None:
            return
        if state == "stopped":
            self._stopped(plan, pid, instance, wake, now)
            return
        self._advance(plan, pid, profile, journey, instance, Happened("timer"), now)

    def _stopped(self, plan: _Plan, pid: bytes, instance: Instance, old_wake: int, now: int) -> None:
        """End an instance of a stopped journey that `_stop_instances` did not reach (reason
        stopped, counted as exited, as there)."""
        ended = msgspec.structs.replace(instance, ended_us=now, reason="stopped", waiting="", wake_us=0)
        plan.saves.append((pid, ended, old_wake))
        plan.counts[(plan.space.name, "", 0, instance.journey, instance.node, "", "", "exited", "stopped")] += 1

    def _advance(self, plan: _Plan, pid: bytes, profile: ProfileRecord, journey: Journey, instance: Instance,
                 happened: Happened, now: int) -> None:
        assert self.server is not None
        world = LiveWorld(self.server, plan, pid, profile, journey)
        old_wake = instance.wake_us
        moved, steps = advance(journey, instance, happened, now, _attributes(profile), world)
        self.steps += len(steps)
        plan.saves.append((pid, moved, old_wake))
        if journey.test and steps:
            plan.traces.append((pid, journey.id, steps))
        where = (plan.space.name, "", 0, journey.id)
        for step in steps:
            if step.kind == "enter":
                plan.counts[(*where, step.node, "", "", "entered", "")] += 1
            elif step.kind == "goal":
                plan.counts[(*where, step.node, "", "", "goal", "")] += 1
            elif step.kind == "excluded" and step.push in _MACHINE_EXCLUSIONS:  # the world counted its own
                node = journey.nodes[step.node]
                assert isinstance(node, api.PushNode)
                head = (plan.space.name, node.message, node.version or 0, journey.id, node.id)
                plan.counts[(*head, "", "", "targeted", "")] += 1
                plan.counts[(*head, "", "", "excluded", step.push)] += 1
        if moved.ended:
            plan.counts[(*where, moved.node, "", "", "exited", moved.reason)] += 1

    def _stage(self, plans: dict[str, _Plan], execution: str) -> dict[str, tuple[list[DeliveryJob], list[bytes]]]:
        """Each sandbox's jobs with their outbox keys (all under ``execution``, batch per sandbox)."""
        out = {}
        for batch, plan in enumerate(plans.values()):
            keys_ = [outbox.outbox_key(execution, batch, i) for i in range(len(plan.jobs))]
            for job in plan.jobs:
                assert job.tracking is not None
                job.tracking["x"] = execution
            count_targeted(plan.counts, plan.jobs)
            out[plan.space.name] = (plan.jobs, keys_)
        return out

    def details(self) -> dict[str, Any]:
        return {
            "live_journeys": self.live_journeys, "log_end": self.log_end, "position": self.position,
            "events_seen": self.events_seen, "hints_dropped": self.hints_dropped, "entered": self.entered,
            "steps": self.steps, "timers_fired": self.timers_fired,
        }


def _commit(w: Writer, plans: list[_Plan], staged: dict[str, tuple[list[DeliveryJob], list[bytes]]], position: int,
            minute: int) -> None:
    """Store op: every sandbox's plan of the cycle, and the position past its events."""
    for plan in plans:
        w.space, w.dbs = plan.space, plan.space.dbs  # this op spans the cycle's sandboxes
        jobs, keys_ = staged[plan.space.name]
        execution = keys_[0][:8].hex() if keys_ else ""
        for pid, instance, old_wake in plan.saves:
            if "pending" in instance.pushes.values():
                instance.pushes = {n: (execution if x == "pending" else x) for n, x in instance.pushes.items()}
            instances.save(w, pid, instance, old_wake)
        for pid, patch in plan.patches:
            value = w.txn.get(pid, db=w.dbs["profiles"])
            if value is not None:
                record = decode_profile(value)
                record.attributes = merge_patch(record.attributes, patch)
                w.save(pid, record)
        for id, run in plan.runs:
            reads.put_run(w, id, run)
        for pid, journey, steps in plan.traces:
            instances.trace(w, pid, journey, steps)
        for key, job in zip(keys_, jobs):
            entry = outbox.OutboxEntry(job.app.app, job.token, job.platform, job.content, job.apns, job.fcm,
                                       job.tracking or {}, job.profile)
            w.txn.put(key, outbox.encode_entry(entry), db=w.dbs["outbox"])
        store_counts(w, plan.counts, minute)
    w.txn.put(_POSITION, msgspec.msgpack.encode(position), db=w.dbs["meta"])


def _profile(space: Space, pid: bytes) -> ProfileRecord | None:
    with space.env.begin() as txn:
        value = txn.get(pid, db=space.db("profiles"))
    return None if value is None else decode_profile(value)


def _attributes(profile: ProfileRecord) -> dict[str, Any]:
    return {**profile.attributes, "identities": profile.identities}

