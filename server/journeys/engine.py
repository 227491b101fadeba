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
Audience entries: the profiles that an event or the store's change feed says changed are
evaluated against the sandbox's audience journeys (`server.journeys.audiences`); read
audiences: pages of profiles at their rate (`server.journeys.reads`).
A paused journey's instances do not move (its timers are held, an event applies only its
exits and goal) and its entries are refused or held (`server.journeys.queue`) and entered
when it resumes.
Each trigger runs under a guard (`Journeys._guard`): a bug met by one is quarantined, not
met again after a restart. ``entry_rate`` is a token bucket per journey (`server.journeys.pace`);
the instances running per version and node are gauges kept by the commit
(`server.journeys.gauges`), and a closed journey with none left becomes finished.

Why one module of over 600 lines: a cycle's parts (events, timers, stops, moves, reads,
audience changes, held entries, the guard each trigger runs under) all fill the same `Plan`
that one commit stores (`server.journeys.plan`), and each reads and changes the engine's view
of the live journeys (their index by event type, pace, holds, memberships) that this actor
keeps; the pieces that stand alone (the machine, the world, the plan and its commit,
instances, audiences, reads, the queue, gauges, catalog) are modules of their own.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocols import api
from server.channels import DeliveryJob
from server.journeys import audiences, catalog, gauges, instances, pace, queue, reads
from server.journeys.definition import duration_us
from server.journeys.machine import Happened, Instance, Journey, Step, advance, enter, hold
from server.journeys.plan import CHANGES, POSITION, Plan, attributes, commit
from server.journeys.world import LiveWorld
from server.messages import outbox
from server.messages.pipeline import Rules
from server.profiles import keys
from server.profiles.records import ProfileRecord, decode_event
from server.profiles.sandboxes import Space, sandbox_of
from server.reports.reporting import count_targeted, journey_dimension
from server.runtime.actor import Actor
from server.runtime.errors import ActorError, ResourceExhausted, ServerError
from server.templates import TemplateError

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["Journeys", "EventsCommitted"]

log = logging.getLogger("pigeon.journeys")

#: Events and timers a cycle takes at most.
BATCH = 500
#: Profiles an audience journey's first read of who matches reads a cycle at most.
BACKFILL = 2_000
#: Cycles whose pushes may be in delivery at once.
IN_DELIVERY = 8
#: How long the position may move in memory before it is stored, when nothing else is.
_SAVE_POSITION_US = 1_000_000
_data_decoder = msgspec.msgpack.Decoder(dict[str, Any])
#: Exclusions the machine decides itself (the world counts those of its pushes).
_MACHINE_EXCLUSIONS = ("FrequencyCapped", "QuietHours")


class EventsCommitted(msgspec.Struct, frozen=True):
    """The event log now reaches ``last_seq``; ``count`` events were added by the commit."""

    last_seq: int
    count: int


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
        #: Triggers whose handling raised (a bug): dropped, their instance ended (`_guard`).
        self.quarantined = 0
        self._saved_us = 0
        #: Whether a closed journey may have no instance left (`_finish`): its state changed,
        #: or a commit ended one of its instances.
        self._finish_due = True
        self._wake = trio.Event()
        self._live: dict[str, dict[str, Journey]] = {}  # sandbox -> id -> live version
        self._states: dict[str, dict[str, str]] = {}  # sandbox -> id -> lifecycle state
        self._to_stop: set[tuple[str, str]] = set()  # stopped journeys whose instances must end
        #: Where each stop's scan of the instances is (the last profile id ended; None: from the start).
        self._stop_after: dict[tuple[str, str], bytes | None] = {}
        #: Journeys whose waiting instances move to a new version, and where the scan is.
        self._to_move: dict[tuple[str, str], tuple[Journey, bytes | None]] = {}
        self._by_event: dict[str, dict[str, list[str]]] = {}  # sandbox -> event type -> ids
        self._reads: dict[str, list[str]] = {}  # sandbox -> ids of live read-audience journeys
        self._audiences: dict[str, list[str]] = {}  # sandbox -> ids of live audience journeys
        self._exit_watch: dict[str, bool] = {}  # sandbox -> a live journey exits on a condition
        #: Audience journeys gone live again: their first read of who matches starts over.
        self._fresh: set[tuple[str, str]] = set()
        #: Number of the last change feed entry evaluated (`server.journeys.audiences`).
        self.changes_position = 0
        self._compiled: dict[tuple[str, str, int], Journey] = {}
        self._stale: set[str] = set()  # sandboxes whose journeys changed
        self._held: set[tuple[str, str]] = set()  # journeys holding entries (`server.journeys.queue`)
        self._buckets: dict[tuple[str, str], pace.Bucket] = {}  # journeys with an entry_rate
        self._rules: tuple[tuple[Any, ...], Rules | None] = ((), None)

    @property
    def rules(self) -> Rules | None:
        """The plugins' ``pigeon_exclude`` rules its pushes are checked against (`LiveWorld`),
        as registered now (one `Rules` while they stay the same: it tells a plugin's bug once)."""
        assert self.server is not None
        hook = self.server.plugins.pm.hook.pigeon_exclude
        impls = tuple(hook.get_hookimpls())
        if impls != self._rules[0]:
            self._rules = (impls, Rules(hook) if impls else None)
        return self._rules[1]

    @property
    def live_journeys(self) -> int:
        return sum(1 for states in self._states.values() for state in states.values() if state == "live")

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
            stored = txn.get(POSITION, db=store.db("meta"))
            changes = txn.get(CHANGES, db=store.db("meta"))
            last = txn.cursor(db=store.db("events"))
            end = keys.seq_of(last.key()) if last.last() else 0
            last = txn.cursor(db=store.db("changes"))
            self.changes_position = (msgspec.msgpack.decode(changes) if changes is not None
                                     else keys.seq_of(last.key()) if last.last() else 0)
        store.on_change = self._wake_up
        # The first start follows the log from its end: earlier events were never for journeys.
        self.position = msgspec.msgpack.decode(stored) if stored is not None else end
        self.log_end = max(self.log_end, end)
        if stored is None:  # durable now: a crash before the first cycle must not skip what comes after
            await store.write(commit, [], {}, (self.position, self.changes_position), 0)
        for space in store.spaces():
            if not gauges.built(space):  # a store from before the gauges: counted once
                await space.write(gauges.build, instances.decode)
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
                self._stop_after[(space.name, info.journey.id)] = None
            if queue.tally(space, info.journey.id).count:
                self._held.add((space.name, info.journey.id))
            if info.state not in ("live", "paused") or info.live_version is None:
                continue  # a paused journey's entries are refused or held: `_on_entry`
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
        self._finish_due = True
        self._reads[space.name] = [id for id, journey in live.items() if journey.spec.entry.read]
        audience = [id for id, journey in live.items() if journey.spec.entry.audience]
        if space.name in self._audiences:  # went live again since the last index: memberships are stale
            before_live = set(self._audiences[space.name])
            self._fresh.update((space.name, id) for id in audience if id not in before_live)
        self._audiences[space.name] = audience
        # the journeys whose exit criteria are conditions over the profile: a write may take it out
        self._exit_watch[space.name] = any(c.event is None for j in live.values() for c in j.spec.exit)
        store = space.store
        watched = {store.space(name).number for name in self._audiences
                   if self._audiences[name] or self._exit_watch.get(name)}
        store.watched = frozenset(watched)

    def _wake_up(self) -> None:
        """The store committed profile writes of a watched sandbox (its change feed grew)."""
        self._wake.set()

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
        if self._finish_due:
            self._finish_due = False
            await self._finish()
        plans: dict[str, Plan] = {}
        events, position = self._read_events()
        for pid, type_, data in events:
            space = store.space_of(sandbox_of(pid))
            if space is not None:
                plan = self._plan(plans, space)
                self._guard(plan, f"event {type_}", pid, None, now,
                            lambda: self._on_event(plan, pid, type_, data, now))
        changed, changes = audiences.read_changes(store, self.changes_position, BATCH)
        fired = 0
        if store.watched:  # a sandbox has an audience journey or an exit condition: its changes count
            fired = self._qualify(plans, [(pid, type_) for pid, type_, _ in events] + [(pid, None) for pid in changed],
                                  now)
        fired += self._stop_instances(plans, now) + self._move_instances(plans)
        for space in store.spaces():
            due, self._next_timers[space.name] = instances.due(space, now, BATCH)
            for wake, pid, journey in due:
                plan = self._plan(plans, space)
                self._guard(plan, "timer", pid, journey, now, lambda: self._on_timer(plan, pid, journey, wake, now),
                            wake)
                fired += 1
        fired += self._read_audiences(plans, now) + self._backfill(plans, now) + self._drain_held(plans, now)
        if not events and not fired and position == self.position and changes == self.changes_position:
            return None
        if not any(plan.busy for plan in plans.values()) and now - self._saved_us < _SAVE_POSITION_US:
            # Only the position moved (events no journey wanted): kept in memory, stored at most
            # once a second, so that ingestion's commits carry no engine write each.
            self.position, self.changes_position = position, changes
            return position
        execution = secrets.token_hex(8)
        staged = self._stage(plans, execution)
        minute = self.server.reporting.minute()
        await store.write(commit, list(plans.values()), staged, (position, changes), minute)
        self.position, self.changes_position, self._saved_us = position, changes, now
        self._finish_due = self._finish_due or any(
            instance.ended and self._states.get(plan.space.name, {}).get(instance.journey) == "closed"
            for plan in plans.values() for _, instance, _ in plan.saves)
        self.timers_fired += fired
        for plan in plans.values():
            self.server.reporting.counted(plan.counts, minute)
            jobs, keys_ = staged[plan.space.name]
            if jobs:
                await self._deliveries.acquire()
                self._nursery.start_soon(self._deliver, plan.space, execution, jobs, keys_)
        return position

    async def _finish(self) -> None:
        """A closed journey with no instance running left (`server.journeys.gauges`) is
        finished: the end of its lifecycle (`catalog`)."""
        assert self.server is not None
        for name, states in list(self._states.items()):
            for id, state in list(states.items()):
                space = self.server.store.space(name)
                if state != "closed" or gauges.running(space, id):
                    continue
                try:
                    await space.write(catalog.change_state, id, "finish")
                except ServerError as exc:  # published or stopped meanwhile: not finished
                    log.info("journey %s: not finished: %s", id, exc)
                else:
                    log.info("journey %s: finished (closed, and its last instance ended)", id)
                self.changed(space)

    def _stop_instances(self, plans: dict[str, Plan], now: int) -> int:
        """End the instances of the journeys stopped since the last cycle (`BATCH` at most;
        the rest next cycle, the scan going on where it was: from the start each cycle, a stop
        of many instances rescanned those it had ended)."""
        assert self.server is not None
        ended = 0
        for name, id in list(self._to_stop):
            space = self.server.store.space(name)
            found, rest = instances.of_journey(space, id, BATCH - ended, after=self._stop_after.get((name, id)))
            plan = self._plan(plans, space)
            for pid, instance in found:
                self._guard(plan, "stop", pid, id, now, lambda: self._stop_one(plan, pid, instance, now))
            ended += len(found)
            self._stop_after[(name, id)] = rest
            if rest is None:
                self._to_stop.discard((name, id))
                del self._stop_after[(name, id)]
            if ended >= BATCH:
                break
        return ended

    def _stop_one(self, plan: Plan, pid: bytes, instance: Instance, now: int) -> None:
        instance = plan.instances_of(pid).get(instance.journey, instance)
        if not instance.ended:  # else an event of this cycle ended it already
            self._stopped(plan, pid, instance, instance.wake_us, now)

    def _move_instances(self, plans: dict[str, Plan]) -> int:
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
                self._guard(plan, "move", pid, id, space.clock(), lambda: self._move_one(plan, pid, instance, journey))
            moved += len(found)
            if after is None:
                del self._to_move[(name, id)]
            else:
                self._to_move[(name, id)] = (journey, after)
                break  # the rest next cycle
        return moved

    def _move_one(self, plan: Plan, pid: bytes, instance: Instance, journey: Journey) -> None:
        instance = plan.instances_of(pid).get(journey.id, instance)  # as this cycle left it
        old = self._journey(plan.space, journey.id, instance.version)
        node = journey.nodes.get(instance.node)
        same = old is not None and type(node) is type(old.nodes.get(instance.node))
        if instance.waiting and not instance.ended and same:
            plan.saves.append((pid, msgspec.structs.replace(instance, version=journey.version), instance.wake_us))

    def _read_audiences(self, plans: dict[str, Plan], now: int) -> int:
        """Enter the next profiles of each read under way, within its rate (`server.journeys.reads`);
        the profiles read."""
        assert self.server is not None
        read = 0
        for name, ids in self._reads.items():
            space = self.server.store.space(name)
            for id in ids:
                journey = self._live[name][id]
                if self._states[name].get(id) == "paused":
                    continue  # the read goes on when the journey resumes
                entry = journey.spec.entry
                run = reads.get_run(space, id) or reads.Run(next_us=int(entry.at.timestamp() * 1e6) if entry.at else now)
                if run.next_us == 0 or now < run.next_us:
                    continue
                run = msgspec.structs.replace(run, running=True)
                limit = reads.allowance(run, min(entry.rate, journey.spec.entry_rate or entry.rate), now, BATCH - read)
                page = reads.page(space, run, limit)
                read += len(page)
                plan = self._plan(plans, space)
                for pid, profile in page:
                    self._guard(plan, "read", pid, id, now, lambda: self._read_one(plan, pid, profile, journey, now))
                if page:
                    run.after, run.last_us = page[-1][0], now
                    run.entered += len(page)
                if len(page) < limit:  # the read reached the last profile
                    every = duration_us(entry.every) if entry.every else 0
                    run = reads.Run(next_us=run.next_us + every if every else 0, last_us=now)
                plan.runs.append((id, run))
        return read

    def _qualify(self, plans: dict[str, Plan], changes: list[tuple[bytes, str | None]], now: int) -> int:
        """Evaluate the audiences of the profiles that changed, in sandboxes with audience
        journeys: (profile id, the type of an event of it, or None for a write in the change
        feed); the profiles evaluated."""
        assert self.server is not None
        by_profile: dict[bytes, set[str] | None] = {}
        for pid, type_ in changes:
            types = by_profile.setdefault(pid, set())
            if types is not None:
                if type_ is None:
                    by_profile[pid] = None  # written: every audience
                else:
                    types.add(type_)
        evaluated = 0
        for pid, types in by_profile.items():
            space = self.server.store.space_of(sandbox_of(pid))
            if space is not None and (self._audiences.get(space.name) or self._exit_watch.get(space.name)):
                plan = self._plan(plans, space)
                self._guard(plan, "change", pid, None, now, lambda: self._on_change(plan, pid, types, now))
                evaluated += 1
        return evaluated

    def _on_change(self, plan: Plan, pid: bytes, types: set[str] | None, now: int) -> None:
        """Enter the profile where it starts (or stops, ``on: exit``) matching an audience.
        ``types``: the types of the events that are all that changed it, so that only the
        audiences counting those can change (None: it was written). A write may also meet an
        exit condition of the profile's instances (`_exit_on_write`)."""
        space = plan.space
        if types is None and self._exit_watch.get(space.name):
            self._exit_on_write(plan, pid, now)
        ids = [id for id in self._audiences.get(space.name, [])
               if types is None or audiences.counts_any(self._live[space.name][id], types)]
        if not ids:
            return
        profile = plan.profile(pid)
        members = plan.members_of(pid)
        if profile is None:  # deleted: it matches nothing now, and enters nothing
            plan.members.extend((pid, id, False) for id in members)
            return
        histories: list[audiences.History] = []
        for id in ids:
            journey = self._live[space.name][id]
            member = audiences.matches(journey, space, pid, attributes(profile), histories, now)
            if member == (id in members):
                continue
            plan.members.append((pid, id, member))
            if member != (journey.spec.entry.on == "enter") or not audiences.backfilled(space, journey, pid):
                continue  # not a qualification (or the first read of who matched has not reached it)
            self._on_entry(plan, pid, profile, journey, plan.instances_of(pid).get(id),
                           Happened("audience", type="audience"), now)

    def _exit_on_write(self, plan: Plan, pid: bytes, now: int) -> None:
        """The profile was written: its instances in journeys with an exit criterion that is a
        condition alone check it now, not at the profile's next event."""
        profile = plan.profile(pid)
        if profile is None:
            return
        for id, instance in plan.instances_of(pid).items():
            journey = self._journey(plan.space, id, instance.version)
            if journey is not None and not instance.ended and any(c.event is None for c in journey.spec.exit):
                self._on_instance(plan, pid, profile, journey, instance, Happened("change"), now)

    def _backfill(self, plans: dict[str, Plan], now: int) -> int:
        """Record who already matches the audience of an audience journey that went live (or
        changed its audience), `BACKFILL` profiles a cycle at most, entering nobody; the
        profiles read."""
        assert self.server is not None
        read = 0
        for name, ids in self._audiences.items():
            space = self.server.store.space(name)
            for id in ids:
                journey = self._live[name][id]
                source = journey.spec.entry.audience or ""
                run = reads.get_run(space, id)
                if run is not None and run.source == source and run.next_us == 0 and (name, id) not in self._fresh:
                    continue
                if run is None or run.source != source or (name, id) in self._fresh:
                    self._fresh.discard((name, id))
                    run = reads.Run(next_us=now, running=True, source=source)
                limit = BACKFILL - read
                page = reads.page(space, run, limit)
                plan = self._plan(plans, space)
                for pid, profile in page:
                    self._guard(plan, "audience read", pid, None, now,
                                lambda: self._record_member(plan, pid, profile, journey, now))
                read += len(page)
                run.after = page[-1][0] if page else run.after
                plan.runs.append((id, run if len(page) == limit else reads.Run(next_us=0, source=source)))
                if read >= BACKFILL:
                    return read
        return read

    @staticmethod
    def _record_member(plan: Plan, pid: bytes, profile: ProfileRecord, journey: Journey, now: int) -> None:
        """Whether the profile matches the journey's audience, recorded (a first read's part)."""
        member = audiences.matches(journey, plan.space, pid, attributes(profile), [], now)
        if member != (journey.id in plan.members_of(pid)):
            plan.members.append((pid, journey.id, member))

    def _read_one(self, plan: Plan, pid: bytes, read: ProfileRecord, journey: Journey, now: int) -> None:
        profile = plan.profile(pid, read)
        assert profile is not None
        if self._enters(journey, plan.instances_of(pid).get(journey.id), profile, {}, now):
            self.entered += 1
            self._advance(plan, pid, profile, journey, enter(journey, Happened("enter"), now),
                          Happened("enter", type="read"), now)

    def _bucket(self, space: Space, journey: Journey, now: int) -> pace.Bucket | None:
        """The journey's entry_rate bucket (None: no cap), made again when the rate changed."""
        rate = journey.spec.entry_rate
        if rate is None:
            return None
        bucket = self._buckets.get((space.name, journey.id))
        if bucket is None or bucket.rate != rate:
            bucket = self._buckets[(space.name, journey.id)] = pace.Bucket(rate, now)
        return bucket

    def _paced(self, space: Space, journey: Journey, now: int) -> bool:
        """Whether the journey's entry_rate lets one more profile enter now (counted if so)."""
        bucket = self._bucket(space, journey, now)
        return bucket is None or bucket.take(now)

    def _hold_entry(self, plan: Plan, pid: bytes, journey: Journey, happened: Happened) -> None:
        """An entry while its journey is paused: refused (counted, reason paused), or held
        (``paused_entries: queue``) within the queue's bounds (`server.journeys.queue`)."""
        where = (plan.space.name, "", 0, journey_dimension(journey.id, journey.version), journey.first, "", "",
                 "refused")
        if journey.spec.paused_entries != "queue":
            plan.count((*where, "paused"))
            return
        item = queue.encode(pid, happened.type, msgspec.msgpack.encode(happened.data))
        held = queue.tally(plan.space, journey.id)
        mine = [len(queued) for id, queued in plan.queued if id == journey.id]
        if held.count + len(mine) >= queue.MAX_HELD or held.bytes + sum(mine) + len(item) > queue.MAX_HELD_BYTES:
            plan.count((*where, "paused_queue_full"))
            return
        plan.queued.append((journey.id, item))
        self._held.add((plan.space.name, journey.id))

    def _drain_held(self, plans: dict[str, Plan], now: int) -> int:
        """Enter the entries held while a journey was paused, now that it is live, in order, at
        its pace (`BATCH` a cycle at most); those of a journey closed or stopped meanwhile are
        refused (the reason: its state). Returns the entries taken."""
        assert self.server is not None
        taken = 0
        for name, id in list(self._held):
            state = self._states.get(name, {}).get(id, "gone")
            if state == "paused":
                continue
            space = self.server.store.space(name)
            journey = self._live.get(name, {}).get(id)
            bucket = self._bucket(space, journey, now) if journey is not None and state == "live" else None
            limit = min(BATCH - taken, bucket.available(now) if bucket is not None else BATCH)
            if limit <= 0:
                continue  # its pace: the rest in a later cycle
            found = queue.take(space, id, limit)
            if len(found) < limit:
                self._held.discard((name, id))
            plan = self._plan(plans, space)
            for key, size, held in found:
                plan.unqueued.append((id, key, size))
                if state != "live" or journey is None:
                    where = (journey_dimension(id, journey.version), journey.first) if journey else (id, "")
                    plan.count((name, "", 0, *where, "", "", "refused", state))
                else:
                    self._guard(plan, "held entry", held.pid, id, now,
                                lambda: self._enter_held(plan, journey, held, now))
            taken += len(found)
            if taken >= BATCH:
                break
        return taken

    def _enter_held(self, plan: Plan, journey: Journey, held: queue.Held, now: int) -> None:
        """A held entry: its profile enters now if it still may."""
        profile = plan.profile(held.pid)
        if profile is None:
            return
        try:
            data = _data_decoder.decode(held.data)
        except msgspec.DecodeError:
            data = {}
        self._on_entry(plan, held.pid, profile, journey, plan.instances_of(held.pid).get(journey.id),
                       Happened("event", type=held.type, data=data), now)

    def _guard(self, plan: Plan, what: str, pid: bytes, journey: str | None, now: int, run: Callable[[], None],
               wake: int = 0) -> None:
        """Carry out one trigger (an event, or its part for one journey; a timer; a profile
        read; a stop or move of one instance) so that a bug costs that trigger only: on an
        unexpected exception its partial changes leave the plan (a push is never staged
        without its step), it is logged and counted (``quarantined``), its instance ends with
        reason ``error``, and the cycle goes on. Raising instead would crash the actor, whose
        restart meets the same trigger again, forever."""
        mark = plan.mark()
        try:
            run()
        except Exception:
            plan.rollback(mark)
            self.quarantined += 1
            log.exception("journeys: the %s of profile %s%s raised: quarantined", what, pid.hex(),
                          f" in journey {journey}" if journey else "")
            self._end_in_error(plan, pid, journey, wake, now)

    def _end_in_error(self, plan: Plan, pid: bytes, journey: str | None, wake: int, now: int) -> None:
        """A quarantined trigger's instance ends (reason error, counted as exited); its timer goes."""
        if wake and journey is not None:
            plan.dropped_timers.append((wake, pid, journey))
        try:
            instance = plan.instances_of(pid).get(journey) if journey is not None else None
        except Exception:  # its instances cannot be read: the trigger is dropped, nothing more
            log.exception("journeys: the instances of profile %s cannot be read", pid.hex())
            return
        if instance is not None and not instance.ended:
            ended = msgspec.structs.replace(instance, ended_us=now, reason="error", waiting="", wake_us=0)
            plan.saves.append((pid, ended, instance.wake_us))
            plan.count((plan.space.name, "", 0, journey_dimension(instance.journey, instance.version), instance.node,
                         "", "", "exited", "error"))

    def _plan(self, plans: dict[str, Plan], space: Space) -> Plan:
        plan = plans.get(space.name)
        if plan is None:
            plan = plans[space.name] = Plan(space)
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

    def _on_event(self, plan: Plan, pid: bytes, type_: str, raw: msgspec.Raw, now: int) -> None:
        space = plan.space
        entries = self._by_event.get(space.name, {}).get(type_, [])
        running = plan.instances_of(pid)
        if not entries and all(instance.ended for instance in running.values()):
            return  # nothing this event could enter or move: the profile is not read
        profile = plan.profile(pid)
        if profile is None:
            return
        try:
            data = _data_decoder.decode(raw)
        except msgspec.DecodeError:
            data = {}
        happened = Happened("event", type=type_, data=data)
        for id, instance in running.items():
            journey = self._journey(space, id, instance.version)
            if journey is None or instance.ended:
                continue
            self._guard(plan, f"event {type_}", pid, id, now,
                        lambda: self._on_instance(plan, pid, plan.profile(pid) or profile, journey, instance, happened,
                                                  now))
        for id in entries:
            self._guard(plan, f"event {type_}", pid, id, now,
                        lambda: self._on_entry(plan, pid, plan.profile(pid) or profile, self._live[space.name][id],
                                               running.get(id), happened, now))

    def _on_instance(self, plan: Plan, pid: bytes, profile: ProfileRecord, journey: Journey, instance: Instance,
                     happened: Happened, now: int) -> None:
        """What an event does to one running instance of its profile."""
        state = self._states.get(plan.space.name, {}).get(journey.id)
        if state == "stopped":  # a stop not carried out to it yet (a crash came first)
            self._stopped(plan, pid, instance, instance.wake_us, now)
        elif state == "paused":  # goals and exits only: it does not move
            self._advance(plan, pid, profile, journey, instance, happened, now, how=hold)
        else:
            self._advance(plan, pid, profile, journey, instance, happened, now)

    def _on_entry(self, plan: Plan, pid: bytes, profile: ProfileRecord, journey: Journey, previous: Instance | None,
                  happened: Happened, now: int) -> None:
        """An event of an entry's type, or an audience's change: its profile enters if it may
        (``previous``: its instance before), at the journey's pace."""
        if self._enters(journey, previous, profile, happened.data, now):
            if self._states.get(plan.space.name, {}).get(journey.id) == "paused":
                self._hold_entry(plan, pid, journey, happened)
                return
            if not self._paced(plan.space, journey, now):
                plan.count((plan.space.name, "", 0, journey_dimension(journey.id, journey.version), journey.first, "",
                             "", "refused", "entry_rate"))
                return
            self.entered += 1
            self._advance(plan, pid, profile, journey, enter(journey, happened, now),
                          Happened("enter", type=happened.type), now)

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
            return condition.test({"profile": attributes(profile), "event": data})
        except TemplateError:
            return False

    def _on_timer(self, plan: Plan, pid: bytes, id: str, wake: int, now: int) -> None:
        space = plan.space
        instance = plan.instances_of(pid).get(id)
        profile = plan.profile(pid)
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

    def _stopped(self, plan: Plan, pid: bytes, instance: Instance, old_wake: int, now: int) -> None:
        """End an instance of a stopped journey that `_stop_instances` did not reach (reason
        stopped, counted as exited, as there)."""
        ended = msgspec.structs.replace(instance, ended_us=now, reason="stopped", waiting="", wake_us=0)
        plan.saves.append((pid, ended, old_wake))
        plan.count((plan.space.name, "", 0, journey_dimension(instance.journey, instance.version), instance.node, "",
                     "", "exited", "stopped"))

    def _advance(self, plan: Plan, pid: bytes, profile: ProfileRecord, journey: Journey, instance: Instance,
                 happened: Happened, now: int, how: Callable[..., tuple[Instance, list[Step]]] | None = None) -> None:
        assert self.server is not None
        world = LiveWorld(self.server, plan, pid, profile, journey)
        old_wake = instance.wake_us
        seen = attributes(profile)
        if self._audiences.get(plan.space.name):  # ``'vip' in profile.audiences``: those it matches
            seen["audiences"] = sorted(plan.members_of(pid))
        moved, steps = (how or advance)(journey, instance, happened, now, seen, world)
        self.steps += len(steps)
        plan.saves.append((pid, moved, old_wake))
        if journey.test and steps:
            plan.traces.append((pid, journey.id, steps))
        where = (plan.space.name, "", 0, journey_dimension(journey.id, journey.version))
        for step in steps:
            if step.kind == "enter":
                plan.count((*where, step.node, "", "", "entered", ""))
            elif step.kind == "goal":
                plan.count((*where, step.node, "", "", "goal", ""))
            elif step.kind == "excluded" and step.push in _MACHINE_EXCLUSIONS:  # the world counted its own
                node = journey.nodes[step.node]
                assert isinstance(node, api.PushNode)
                head = (plan.space.name, node.message, node.version or 0, journey_dimension(journey.id, journey.version),
                        node.id)
                plan.count((*head, "", "", "targeted", ""))
                plan.count((*head, "", "", "excluded", step.push))
        if moved.ended:
            plan.count((*where, moved.node, "", "", "exited", moved.reason))

    def _stage(self, plans: dict[str, Plan], execution: str) -> dict[str, tuple[list[DeliveryJob], list[bytes]]]:
        """Each sandbox's jobs with their outbox keys (all under ``execution``, batch per sandbox)."""
        out = {}
        for batch, plan in enumerate(plans.values()):
            keys_ = [outbox.outbox_key(execution, batch, i) for i in range(len(plan.jobs))]
            for job in plan.jobs:
                assert job.tracking is not None
                job.tracking["x"] = execution
            plan.counts.update(plan.tally)  # the cycle's counts, as the triggers that stayed made them
            count_targeted(plan.counts, plan.jobs)
            out[plan.space.name] = (plan.jobs, keys_)
        return out

    def details(self) -> dict[str, Any]:
        return {
            "live_journeys": self.live_journeys, "log_end": self.log_end, "position": self.position,
            "events_seen": self.events_seen, "hints_dropped": self.hints_dropped, "entered": self.entered,
            "steps": self.steps, "timers_fired": self.timers_fired, "quarantined": self.quarantined,
        }
