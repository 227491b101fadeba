"""The sending pipeline: a published message to profiles, one notification per valid token.

Per profile: qualification (the audience condition; test sends only reach test profiles) →
exclusions, each with a reason → personalization → the delivery service → the outcome. Every
step is reported (`server.reports.reporting`), in the commits below: ``targeted`` and ``excluded``
when a batch is staged, ``sent``, ``delivered``, ``failed`` and ``bounced`` when it is
settled. The notifications carry the message, its version and the execution in their
tracking envelope (``m``, ``v``, ``x``).

Exclusion reasons (AJO's names where it has one):

- ``NoTokenForApp``: no registration for the configuration's apps and platforms;
- ``OnlyInvalidTokens``: only registrations providers said are dead;
- ``NoConsent``: the profile opted out of the app's push (or did not opt in, with consent
  ``opt_in``);
- ``MissingValue``, ``TemplateLimit``, ``TemplateError``: personalization failed for it;
- ``AudienceError``: the audience condition fails on its data (a text compared with a number);
- a rule's reason: plugins implementing ``pigeon_exclude`` (`server.hookspecs`: frequency
  caps, holdouts, suppression lists) exclude profiles after consent, before personalization.

Test sends (``test``) reach only test profiles and are not counted in reports (their envelope
carries ``t``); their counts are in the `SendResult` only.

Durability: each batch is staged in the outbox and settled in its own commits, and the
sends a crash interrupted resume when the server starts (`server.messages.outbox`).

What is staged and not settled is bounded, in notifications rather than batches, so that a
batch whose members are being retried (a provider answering 503 to half the requests) does
not hold back the batches after it: the next batch is prepared once fewer than `ACTIVE`
notifications are staged, unsettled and not waiting for a retry, fewer than `UNSETTLED` are
staged and unsettled in all, and fewer than `MAX_BATCHES` batches are in delivery. With a
healthy provider that is what the bound of four batches was (three delivered while the next
is personalized); after a crash, at most ``ACTIVE`` + a batch of notifications had been in
flight at the provider (they may arrive twice), and at most ``UNSETTLED`` + a batch are
delivered again (the others were waiting for a retry: the provider had refused them).
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import time
from collections import Counter
from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from protocols import api

from server.delivery.apps import get_app
from server.messages.catalog import get_version
from server.messages.content import (
    Compiled, MessageRecord, context_for, decode_config, decode_message, exclusion, to_delivery,
)
from server.messages import outbox
from server.messages.outbox import ExecutionRecord, OutboxEntry, Outcomes, Watcher, deliver_batch, end_execution, stage_batch
from server.profiles.records import ProfileRecord, RegistrationRecord
from server.profiles.sandboxes import Space
from server.runtime.errors import InvalidArgument, NotFound
from server.reports.reporting import ReportKey, envelope_key
from server.channels import AppRecord, DeliveryJob
from server.templates import Condition, Scope, TemplateError, compile_condition

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["Pipeline", "PLATFORMS", "Rules", "reachable", "resume", "recover"]

log = logging.getLogger("pigeon.pipeline")

#: Registration platforms of each configuration platform.
PLATFORMS = {"ios": ("apns", "apns-sandbox"), "android": ("fcm",)}
#: Profiles per batch (staged in one commit), and batches being delivered at once with a
#: healthy provider (see the module docstring for the bounds).
BATCH = 500
IN_FLIGHT = 4
#: The next batch is prepared once fewer notifications than this are staged, unsettled and not
#: waiting for a retry ...
ACTIVE = (IN_FLIGHT - 1) * BATCH
#: ... fewer than this are staged and unsettled ...
UNSETTLED = 10_000
#: ... and fewer batches than this are in delivery.
MAX_BATCHES = 20
#: Seconds a batch is prepared before it lets the event loop run other tasks.
_SLICE_S = 0.005
#: The first batch is smaller (the sizes double up to BATCH), so that the first notifications
#: leave sooner.
FIRST_BATCH = 50


class _Room(Watcher):
    """What the pipeline has staged and not settled (see the module docstring)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.unsettled = 0
        self.waiting_retry = 0
        self.batches = 0
        self._changed = trio.Event()

    def full(self) -> bool:
        return (self.batches >= MAX_BATCHES or self.unsettled >= UNSETTLED
                or self.unsettled - self.waiting_retry >= ACTIVE)

    async def wait(self) -> None:
        while self.full():
            self._changed = trio.Event()
            await self._changed.wait()

    def staged(self, count: int) -> None:
        self.unsettled += count
        self.batches += 1

    def delivered(self) -> None:
        self.batches -= 1
        self._changed.set()

    def settled(self, outcomes: Outcomes, count: int) -> None:
        outcomes.add_to(self.pipeline.result)
        self.unsettled -= count
        self._changed.set()

    def waiting(self, delta: int) -> None:
        self.waiting_retry += delta
        self._changed.set()


class Pipeline:
    """One execution of a message (see the module docstring).

    Args:
        server: the running server (store, delivery, reporting).
        space: the sandbox it runs in (its profiles, apps and outbox).
        record: the message version.
        compiled: its compiled templates.
        config: its channel configuration.
        event: data for templates that use ``event``.
        test: only test profiles.
    """

    def __init__(self, server: Server, space: Space, record: MessageRecord, compiled: Compiled,
                 config: api.ChannelConfig, *, event: dict[str, Any], test: bool,
                 identities: list[str] | None = None, audience: str | None = None,
                 resume: ExecutionRecord | None = None) -> None:
        self.server = server
        self.space = space
        self.record = record
        self.spec = record.message
        self.compiled = compiled
        self.config = config
        self.event = event
        self.test = test
        self.execution = resume.execution if resume is not None else secrets.token_hex(8)
        self.tracking: dict[str, Any] = {"m": self.spec.id, "v": record.version, "x": self.execution}
        if test:
            self.tracking["t"] = 1  # not counted in reports
        self.apps: dict[str, AppRecord | None] = {app: get_app(space, app) for app in config.apps}
        self.platforms = {p for name in config.platforms for p in PLATFORMS[name]}
        self._rules = Rules.of(server)  # the frequency-cap step
        self.state = resume or ExecutionRecord(
            execution=self.execution, message=self.spec.id, version=record.version, identities=identities or [],
            audience=audience, test=test, event=event,
            result=api.SendResult(execution=self.execution, message=self.spec.id, version=record.version),
        )
        self.result = self.state.result
        self._excluded: Counter[str] = Counter(self.result.excluded)
        #: The report key of this execution's notifications, but for app, platform, outcome
        #: and reason (None: a test send, not counted).
        head = envelope_key(self.tracking)
        self._head = None if head is None else (space.name, *head)

    async def run(self, audience: Condition | None = None) -> api.SendResult:
        """Send to the execution's profiles from its cursor on; return the counts.

        Batches are prepared and staged one after the other, while earlier ones are delivered
        (within the bounds of the module docstring). A batch that cannot be staged ends the run once the batches in
        delivery are settled (its error is raised; the execution resumes at the next start).
        """
        store = self.space
        room = _Room(self)
        failure: BaseException | None = None
        running = self.server.running_executions
        if self.execution in running:
            raise InvalidArgument(f"execution {self.execution} is already running")
        running.add(self.execution)  # recovery leaves it alone
        try:
            async with trio.open_nursery() as nursery:
                while failure is None:
                    # Room first, then the profiles: what they hold is read just before use.
                    await room.wait()
                    try:
                        staged = await self._next_batch(audience)
                    except Exception as exc:  # deliver what is in flight before failing
                        failure = exc
                        staged = None
                    if staged is None:
                        break
                    room.staged(len(staged[0]))
                    nursery.start_soon(self._deliver, *staged, room)
        except BaseExceptionGroup as group:  # a delivery failed: its error, not trio's group
            _, rest = group.split(trio.Cancelled)
            if rest is None:
                raise  # cancelled: trio's business
            raise _first(rest) from None
        finally:
            running.discard(self.execution)
        if failure is not None:
            raise failure
        await store.write(end_execution, self.execution)
        self.result.excluded = dict(self._excluded)
        return self.result

    async def _next_batch(self, audience: Condition | None) -> tuple[list[DeliveryJob], list[bytes]] | None:
        """Read, personalize and stage the next batch; None when there is none."""
        store = self.space
        state = self.state
        if state.audience is None:
            size = min(BATCH, FIRST_BATCH << state.batches)
            identities = state.identities[state.cursor : state.cursor + size]
            if not identities:
                return None
            profiles, unknown = _profiles_of(store, identities)
            state.cursor += len(identities)
            if unknown:
                self.result.unknown += len(unknown)
                listed = self.result.unknown_identities
                listed += unknown[: api.MAX_UNKNOWN_LISTED - len(listed)]
        else:
            page = store.scan_profiles(state.after, min(BATCH, FIRST_BATCH << state.batches))
            if not page:
                return None
            profiles = page
            state.after = page[-1][0]
        return await self._stage(profiles, audience)

    def _snapshot(self) -> ExecutionRecord:
        """A copy of the execution to stage (`stage_batch` changes its outcome counts)."""
        result = msgspec.structs.replace(self.result, excluded=dict(self._excluded), details=dict(self.result.details),
                                         unknown_identities=list(self.result.unknown_identities))
        return msgspec.structs.replace(self.state, result=result)

    def _explain(self, reason: str, profile: ProfileRecord, problem: str) -> None:
        """Keep why the first profile excluded for ``reason`` was (`api.SendResult.details`)."""
        if reason not in self.result.details:
            identity = profile.identities[0] if profile.identities else "?"
            if reason == "MissingValue" and self.spec.on_missing == "default":
                problem += (" (with on_missing: default a missing value prints as nothing, but this template"
                            " computes with it: give it a default(...))")
            self.result.details[reason] = f"{identity}: {problem}"[:_MAX_DETAIL]

    async def _stage(self, profiles: list[tuple[bytes, ProfileRecord]], audience: Condition | None
                     ) -> tuple[list[DeliveryJob], list[bytes]]:
        """Qualify, exclude and personalize a batch; stage its notifications in the outbox
        with the execution's cursor past it and its counts (one commit)."""
        counts: Counter[ReportKey] = Counter()
        head = self._head
        jobs: list[DeliveryJob] = []
        yielded = time.perf_counter()
        for pid, profile in profiles:
            if time.perf_counter() - yielded > _SLICE_S:
                # Let the batches in delivery and other clients move meanwhile (a profile's
                # templates may take up to 50 ms).
                await trio.lowlevel.checkpoint()
                yielded = time.perf_counter()
            context = Scope(context_for(attributes=profile.attributes, identities=profile.identities,
                                                 event=self.event, message=self.spec, version=self.record.version))
            if self.test and profile.attributes.get("testProfile") is not True:
                continue
            reason = None
            if audience is not None:
                try:
                    if not audience.test(context):
                        continue
                except TemplateError as exc:
                    reason = "AudienceError"  # this profile's data breaks the condition; the others go on
                    self._explain(reason, profile, exc.message)
            self.result.profiles += 1
            jobs_before = len(jobs)
            if reason is None:
                reason = self._profile(pid, profile, context, jobs)
            if reason is not None:
                self.result.targeted += 1
                self._excluded[reason] += 1
                if head is not None:
                    counts[(*head, "", "", "targeted", "")] += 1
                    counts[(*head, "", "", "excluded", reason)] += 1
            else:
                self.result.targeted += len(jobs) - jobs_before
                if head is not None:
                    for job in jobs[jobs_before:]:
                        counts[(*head, job.app.app, job.platform, "targeted", "")] += 1
        batch = self.state.batches
        self.state.batches += 1
        keys = [outbox.outbox_key(self.execution, batch, i) for i in range(len(jobs))]
        entries = [
            (key, outbox.encode_entry(OutboxEntry(job.app.app, job.token, job.platform, job.content, job.apns, job.fcm,
                                              job.tracking or {}, job.profile)))
            for key, job in zip(keys, jobs)
        ]
        reporting = self.server.reporting
        minute = reporting.minute()
        await self.space.write(stage_batch, self._snapshot(), entries, counts, minute)
        reporting.counted(counts, minute)
        return jobs, keys

    async def _deliver(self, jobs: list[DeliveryJob], keys: list[bytes], room: _Room) -> None:
        """Deliver a staged batch and settle it as results come; each part's outcomes counted
        in the result once stored (`_Room.settled`)."""
        try:
            await deliver_batch(self.server, self.space, self.execution, jobs, keys, room)
        finally:
            room.delivered()

    def _profile(self, pid: bytes, profile: ProfileRecord, context: Scope, jobs: list[DeliveryJob]) -> str | None:
        """Add the profile's jobs; or return why it is excluded."""
        active, reason = reachable(profile, self.config, self.apps, self.platforms)
        if reason is not None:
            return reason
        if self._rules is not None:
            reason = self._rules.reason(profile, self.spec, self.record.version, self.config, self.event)
            if reason is not None:
                return reason
        try:
            content = self.compiled.render(context)
        except InvalidArgument as exc:
            reason = exclusion(exc)
            self._explain(reason, profile, exc.message)
            return reason
        rendered = to_delivery(self.spec, content)
        for r in active:
            job = rendered.job(self.apps[r.app] or AppRecord(app=r.app, sandbox=self.space.name), r.token, r.platform,
                               self.tracking)
            job.profile = pid
            jobs.append(job)
        return None


def reachable(profile: ProfileRecord, config: api.ChannelConfig, apps: Collection[str],
              platforms: Collection[str]) -> tuple[list[RegistrationRecord], str | None]:
    """The registrations a message of ``config`` goes to (of ``apps`` on ``platforms``, active,
    with the consent the configuration asks for); or why the profile is excluded."""
    registrations = [r for r in profile.registrations if r.app in apps and r.platform in platforms]
    if not registrations:
        return [], "NoTokenForApp"
    active = [r for r in registrations if r.state == "active"]
    if not active:
        return [], "OnlyInvalidTokens"
    rule = config.consent
    if rule != "none":
        allowed = []
        for r in active:
            entry = profile.consent.get(r.app)
            choice = entry.push if entry is not None else None
            if (rule == "opt_in" and choice == "in") or (rule == "not_opted_out" and choice != "out"):
                allowed.append(r)
        if not allowed:
            return [], "NoConsent"
        active = allowed
    return active, None


def _first(exc: BaseException) -> BaseException:
    """The first error of a group (a delivery task's)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


_REASON = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Rules:
    """The ``pigeon_exclude`` rules (`server.hookspecs`) as one send asks them; the journey
    simulator asks them the same way (the same arguments, the same outcome). A plugin that raises
    excludes the profile as ``RuleError``, one that returns something that is not a reason code
    as ``ExcludedByRule``; either is logged once per `Rules`. `Rules.of` is None when no plugin
    implements the hook (nothing to ask)."""

    def __init__(self, hook: Any) -> None:
        self._hook = hook
        self._failed = False

    @classmethod
    def of(cls, server: Server) -> Rules | None:
        hook = server.plugins.pm.hook.pigeon_exclude
        return cls(hook) if hook.get_hookimpls() else None

    def reason(self, profile: ProfileRecord, message: api.MessageSpec, version: int, config: api.ChannelConfig,
               event: dict[str, Any]) -> str | None:
        """Why a rule excludes the profile from ``message`` (its ``version``, sent through
        ``config`` with ``event``), or None."""
        try:
            reason = self._hook(identity=profile.identities[0] if profile.identities else "",
                                attributes=profile.attributes, message=message, version=version, config=config,
                                event=event)
        except Exception:  # a plugin's bug excludes the profile, and is told once
            if not self._failed:
                log.exception("a pigeon_exclude plugin failed: the profiles it fails on are excluded as RuleError")
            self._failed = True
            return "RuleError"
        if not reason:
            return None
        if isinstance(reason, str) and _REASON.fullmatch(reason):
            return reason
        if not self._failed:  # a bad reason is named once, not trusted
            log.error("a pigeon_exclude plugin returned %r, not a reason code: reported as ExcludedByRule", reason)
        self._failed = True
        return "ExcludedByRule"


#: Characters of an exclusion's detail kept in a `api.SendResult` (a template's error can be long).
_MAX_DETAIL = 500


def _profiles_of(store: Space, identities: list[str]) -> tuple[list[tuple[bytes, ProfileRecord]], list[str]]:
    """The profiles of ``identities`` with their ids (a profile named twice in one batch
    once), and the identities no profile has."""

    seen: set[bytes] = set()
    out = []
    unknown = []
    for identity in identities:
        try:
            pid, profile = store.find_profile(identity)
        except NotFound:
            unknown.append(identity)
            continue
        if pid not in seen:
            seen.add(pid)
            out.append((pid, profile))
    return out, unknown


async def resume(server: Server, space: Space, record: ExecutionRecord) -> api.SendResult:
    """Run a stored execution of ``space`` on from its cursor."""
    value = get_version(space, "messages", record.message, record.version)
    config_value = None
    if value is not None:
        message = decode_message(value)
        config_value = get_version(space, "configs", message.message.channel)
    if value is None or config_value is None:
        log.error("cannot resume execution %s: message %s v%d or its configuration is gone", record.execution,
                  record.message, record.version)
        await space.write(end_execution, record.execution)
        return record.result
    audience = compile_condition("$.audience", record.audience) if record.audience is not None else None
    run = Pipeline(server, space, message, Compiled(message), decode_config(config_value).config,
                   event=record.event, test=record.test, resume=record)
    return await run.run(audience)


async def recover(server: Server) -> None:
    """At start: deliver again what the outbox holds (a crash or a stop left it between
    staging and settling), batch by batch, then resume the executions that did not end."""
    store = server.store
    # What a pipeline of this process runs is not a leftover: clients may have started sends
    # before this runs (the listener is up).
    running = {bytes.fromhex(execution) for execution in server.running_executions}
    # Every sandbox's leftovers at once, before anything awaits: what is staged later (a send
    # started meanwhile, the journey engine, which waits for this) is not a leftover.
    found = [(space, *outbox.leftovers(space, running)) for space in store.spaces()]
    server.outbox_read.set()
    for space, staged, pending in found:
        if staged:  # the crash benches and tests read this line (bench._crash.REPLAYING)
            log.warning("delivering %d notifications again that were staged when the server stopped "
                        "(some may reach the provider twice)%s", len(staged), _in(space))
            # Keys are the execution, the batch and the index: a batch's entries are together.
            for _, batch in itertools.groupby(staged, key=lambda item: item[0][:12]):
                await outbox.replay(server, space, list(batch))
        for record in outbox.executions(space, pending):  # as the replays left them, with their outcomes
            log.info("resuming execution %s of message %s v%d%s", record.execution, record.message, record.version,
                     _in(space))
            try:
                await resume(server, space, record)
            except Exception:  # the others still resume; this one again at the next start
                log.exception("execution %s failed again; it stays stored", record.execution)


def _in(space: Space) -> str:
    """Where a log line happens, beyond sandbox ``default``."""
    return "" if space.number == 0 else f" in sandbox {space.name}"
