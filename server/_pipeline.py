"""The sending pipeline: a published message to profiles, one notification per valid token.

Per profile: qualification (the audience condition; test sends only reach test profiles) →
exclusions, each with a reason → personalization → the delivery service → the outcome. Every
step is reported (`server._reporting`): ``targeted`` and ``excluded`` here, ``sent``,
``delivered``, ``failed`` and ``bounced`` by the delivery service, all carrying the message,
its version and the execution in the tracking envelope (``m``, ``v``, ``x``).

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

Durability: an execution is stored when it starts (``executions``). Each batch of profiles
(50 at first, doubling up to 500) is staged in one commit: its notifications go into the
outbox (``outbox``) and the execution's cursor moves past the batch. They are then
delivered, and removed from the outbox, with their outcomes' counts, in a second commit. Four
batches at most are being prepared or delivered at once (three delivered while the next is
personalized). After a crash (or a stop) the server, when it starts, delivers what the outbox still holds again (these may reach the
provider twice: they are counted as ``replayed``) and resumes the executions from their
cursors. So every targeted profile is staged exactly once, and sent at least once.
"""

from __future__ import annotations

import logging
import re
import secrets
from collections import Counter
from typing import Any

import msgspec
import trio

from protocols import api

from . import _messages as messages
from ._errors import InvalidArgument
from ._reporting import ReportEvent, counted
from .channels import AppRecord, DeliveryJob
from .templates import Condition, Scope, TemplateError, compile_condition

__all__ = ["Pipeline", "PLATFORMS", "ExecutionRecord", "OutboxEntry", "recover"]

log = logging.getLogger("pigeon.pipeline")

#: Registration platforms of each configuration platform.
PLATFORMS = {"ios": ("apns", "apns-sandbox"), "android": ("fcm",)}
#: Profiles per batch (staged in one commit), and batches being delivered at once: after a
#: crash, at most BATCH * IN_FLIGHT profiles' notifications are delivered again.
BATCH = 500
IN_FLIGHT = 4
#: The first batch is smaller (the sizes double up to BATCH), so that the first notifications
#: leave sooner.
FIRST_BATCH = 50


class ExecutionRecord(msgspec.Struct, kw_only=True):
    """A send in progress, as stored: enough to resume it."""

    execution: str
    message: str
    version: int
    identities: list[str] = []
    audience: str | None = None
    test: bool = False
    event: dict[str, Any] = {}
    #: Identities staged so far, or the last profile id staged (audiences).
    cursor: int = 0
    after: bytes | None = None
    batches: int = 0
    result: api.SendResult


class OutboxEntry(msgspec.Struct, array_like=True):
    """A notification staged for delivery."""

    app: str
    token: str
    platform: str
    content: api.PushContent
    apns: api.ApnsOptions
    fcm: api.FcmOptions
    tracking: dict[str, Any]


_encoder = msgspec.msgpack.Encoder()
_execution_decoder = msgspec.msgpack.Decoder(ExecutionRecord)
_entry_decoder = msgspec.msgpack.Decoder(OutboxEntry)


def _outbox_key(execution: str, batch: int, index: int) -> bytes:
    return bytes.fromhex(execution) + batch.to_bytes(4, "big") + index.to_bytes(4, "big")


def stage_batch(w: Any, record: bytes, execution: str, entries: list[tuple[bytes, bytes]]) -> None:
    """Store op: the batch's notifications into the outbox, and the execution past the batch."""
    w.txn.put(bytes.fromhex(execution), record, db=w.dbs["executions"])
    for key, value in entries:
        w.txn.put(key, value, db=w.dbs["outbox"])


def settle_batch(w: Any, outcomes: Outcomes | None, execution: str, keys: list[bytes]) -> None:
    """Store op: the batch delivered: out of the outbox, its outcomes added to the execution's
    counts (None: the execution ended).

    Only the batch's own outcomes are added: the cursor, and the counts of the profiles
    staged, are the staging's alone (a batch settled while the next one is being prepared
    must store neither a cursor past profiles not in the outbox yet, nor their counts)."""
    for key in keys:
        w.txn.delete(key, db=w.dbs["outbox"])
    key = bytes.fromhex(execution)
    if outcomes is None:
        w.txn.delete(key, db=w.dbs["executions"])
        return
    stored = w.txn.get(key, db=w.dbs["executions"])
    if stored is not None:
        record = _execution_decoder.decode(stored)
        outcomes.add_to(record.result)
        w.txn.put(key, _encoder.encode(record), db=w.dbs["executions"])


class Outcomes:
    """What became of one batch's notifications."""

    __slots__ = ("sent", "delivered", "bounced", "failed")

    def __init__(self) -> None:
        self.sent = self.delivered = self.bounced = 0
        self.failed: Counter[str] = Counter()

    def count(self, result: Any) -> None:
        self.sent += 1
        if result.status == "sent":
            self.delivered += 1
        else:
            self.failed[result.reason or "Unknown"] += 1
            if result.status == "invalid":
                self.bounced += 1

    def add_to(self, result: api.SendResult) -> None:
        result.sent += self.sent
        result.delivered += self.delivered
        result.bounced += self.bounced
        result.failed = dict(Counter(result.failed) + self.failed)


class Pipeline:
    """One execution of a message (see the module docstring).

    Args:
        server: the running server (store, delivery, reporting).
        record: the message version.
        compiled: its compiled templates.
        config: its channel configuration.
        event: data for templates that use ``event``.
        test: only test profiles.
    """

    def __init__(self, server: Any, record: messages.MessageRecord, compiled: messages.Compiled,
                 config: api.ChannelConfig, *, event: dict[str, Any], test: bool,
                 identities: list[str] | None = None, audience: str | None = None,
                 resume: ExecutionRecord | None = None) -> None:
        self.server = server
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
        self.apps: dict[str, AppRecord | None] = {app: server.store.get_app(app) for app in config.apps}
        self.platforms = {p for name in config.platforms for p in PLATFORMS[name]}
        hook = server.plugins.pm.hook.pigeon_exclude
        self._rules = hook if hook.get_hookimpls() else None  # the frequency-cap step
        self._rule_failed = False
        self.state = resume or ExecutionRecord(
            execution=self.execution, message=self.spec.id, version=record.version, identities=identities or [],
            audience=audience, test=test, event=event,
            result=api.SendResult(execution=self.execution, message=self.spec.id, version=record.version),
        )
        self.result = self.state.result
        self._excluded: Counter[str] = Counter(self.result.excluded)

    def _report(self, outcome: str, app: str = "", platform: str = "", reason: str = "") -> ReportEvent:
        return ReportEvent(outcome=outcome, app=app, platform=platform, reason=reason, message=self.spec.id,
                           version=self.record.version)

    async def run(self, audience: Condition | None = None) -> api.SendResult:
        """Send to the execution's profiles from its cursor on; return the counts.

        Batches are prepared and staged one after the other; `IN_FLIGHT` of them at most are
        being prepared or delivered at once (personalizing the next overlaps with delivering
        the last ones). A batch that cannot be staged ends the run once the batches in
        delivery are settled (its error is raised; the execution resumes at the next start).
        """
        store = self.server.store
        limiter = trio.Semaphore(IN_FLIGHT)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                while failure is None:
                    # A slot first, then the profiles: what they hold is read just before use.
                    await limiter.acquire()
                    try:
                        staged = await self._next_batch(audience)
                    except Exception as exc:  # deliver what is in flight before failing
                        failure = exc
                        staged = None
                    if staged is None:
                        limiter.release()
                        break
                    nursery.start_soon(self._deliver, *staged, limiter)
        except BaseExceptionGroup as group:  # a delivery failed: its error, not trio's group
            _, rest = group.split(trio.Cancelled)
            if rest is None:
                raise  # cancelled: trio's business
            raise _first(rest) from None
        if failure is not None:
            raise failure
        await store.write(settle_batch, None, self.execution, [])
        self.result.excluded = dict(self._excluded)
        return self.result

    async def _next_batch(self, audience: Condition | None) -> tuple[list[DeliveryJob], list[bytes]] | None:
        """Read, personalize and stage the next batch; None when there is none."""
        store = self.server.store
        state = self.state
        if state.audience is None:
            size = min(BATCH, FIRST_BATCH << state.batches)
            identities = state.identities[state.cursor : state.cursor + size]
            if not identities:
                return None
            profiles = _profiles_of(store, identities)
            state.cursor += len(identities)
        else:
            page = store.scan_profiles(state.after, min(BATCH, FIRST_BATCH << state.batches))
            if not page:
                return None
            profiles = [profile for _, profile in page]
            state.after = page[-1][0]
        return await self._stage(profiles, audience)

    def _rule_reason(self, reason: Any) -> str:
        """A plugin's exclusion reason, as reported (a bad one is named once, not trusted)."""
        if isinstance(reason, str) and _REASON.fullmatch(reason):
            return reason
        if not self._rule_failed:
            log.error("a pigeon_exclude plugin returned %r, not a reason code: reported as ExcludedByRule", reason)
        self._rule_failed = True
        return "ExcludedByRule"

    def _encoded_state(self) -> bytes:
        """The execution, encoded with its counts."""
        self.result.excluded = dict(self._excluded)
        return _encoder.encode(self.state)

    async def _stage(self, profiles: list[Any], audience: Condition | None) -> tuple[list[DeliveryJob], list[bytes]]:
        """Qualify, exclude and personalize a batch; stage its notifications in the outbox
        with the execution's cursor past it (one commit)."""
        reports: list[ReportEvent] = []
        jobs: list[DeliveryJob] = []
        for n, profile in enumerate(profiles):
            if n % 100 == 99:
                await trio.lowlevel.checkpoint()  # let the batches in delivery move meanwhile
            context = Scope(messages.context_for(attributes=profile.attributes, identities=profile.identities,
                                                 event=self.event, message=self.spec, version=self.record.version))
            if self.test and profile.attributes.get("testProfile") is not True:
                continue
            reason = None
            if audience is not None:
                try:
                    if not audience.test(context):
                        continue
                except TemplateError:
                    reason = "AudienceError"  # this profile's data breaks the condition; the others go on
            self.result.profiles += 1
            jobs_before = len(jobs)
            if reason is None:
                reason = self._profile(profile, context, jobs)
            if reason is not None:
                reports += [self._report("targeted"), self._report("excluded", reason=reason)]
                self.result.targeted += 1
                self._excluded[reason] += 1
            else:
                for job in jobs[jobs_before:]:
                    reports.append(self._report("targeted", app=job.app.app, platform=job.platform))
                    self.result.targeted += 1
        batch = self.state.batches
        self.state.batches += 1
        keys = [_outbox_key(self.execution, batch, i) for i in range(len(jobs))]
        entries = [
            (key, _encoder.encode(OutboxEntry(job.app.app, job.token, job.platform, job.content, job.apns, job.fcm,
                                              job.tracking or {})))
            for key, job in zip(keys, jobs)
        ]
        await self.server.store.write(stage_batch, self._encoded_state(), self.execution, entries)
        if not self.test:
            await self.server.reporting.record_many(reports)
        return jobs, keys

    async def _deliver(self, jobs: list[DeliveryJob], keys: list[bytes], limiter: trio.Semaphore) -> None:
        """Deliver a staged batch, count its outcomes, and take it out of the outbox."""
        try:
            outcomes = Outcomes()
            if jobs:
                for result in await self.server.delivery.deliver(jobs):
                    outcomes.count(result)
            outcomes.add_to(self.result)
            await self.server.store.write(settle_batch, outcomes, self.execution, keys)
        finally:
            limiter.release()

    def _profile(self, profile: Any, context: Scope, jobs: list[DeliveryJob]) -> str | None:
        """Add the profile's jobs; or return why it is excluded."""
        registrations = [r for r in profile.registrations if r.app in self.apps and r.platform in self.platforms]
        if not registrations:
            return "NoTokenForApp"
        active = [r for r in registrations if r.state == "active"]
        if not active:
            return "OnlyInvalidTokens"
        consent_rule = self.config.consent
        if consent_rule != "none":
            allowed = []
            for r in active:
                entry = profile.consent.get(r.app)
                choice = entry.push if entry is not None else None
                if (consent_rule == "opt_in" and choice == "in") or (consent_rule == "not_opted_out" and choice != "out"):
                    allowed.append(r)
            if not allowed:
                return "NoConsent"
            active = allowed
        if self._rules is not None:
            try:
                reason = self._rules(identity=profile.identities[0] if profile.identities else "",
                                     attributes=profile.attributes, message=self.spec, version=self.record.version,
                                     config=self.config, event=self.event)
            except Exception:  # a plugin's bug excludes the profile, and is told once
                if not self._rule_failed:
                    log.exception("a pigeon_exclude plugin failed: the profiles it fails on are excluded as RuleError")
                self._rule_failed = True
                return "RuleError"
            if reason:
                return self._rule_reason(reason)
        try:
            content = self.compiled.render(context)
        except InvalidArgument as exc:
            return messages.exclusion(exc)
        rendered = messages.to_delivery(self.spec, content)
        for r in active:
            jobs.append(rendered.job(self.apps[r.app] or AppRecord(app=r.app), r.token, r.platform, self.tracking))
        return None


def _first(exc: BaseException) -> BaseException:
    """The first error of a group (a delivery task's)."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


_REASON = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _profiles_of(store: Any, identities: list[str]) -> list[Any]:
    """The profiles of ``identities``, unknown identities skipped (a profile named twice in
    one batch once)."""
    from ._errors import NotFound

    seen: set[str] = set()
    out = []
    for identity in identities:
        try:
            profile = store.get_profile(identity)
        except NotFound:
            continue
        key = profile.identities[0] if profile.identities else identity
        if key not in seen:
            seen.add(key)
            out.append(profile)
    return out


async def resume(server: Any, record: ExecutionRecord) -> api.SendResult:
    """Run a stored execution on from its cursor."""
    value = server.store.get_version("messages", record.message, record.version)
    config_value = None
    if value is not None:
        message = messages.decode_message(value)
        config_value = server.store.get_version("configs", message.message.channel)
    if value is None or config_value is None:
        log.error("cannot resume execution %s: message %s v%d or its configuration is gone", record.execution,
                  record.message, record.version)
        await server.store.write(settle_batch, None, record.execution, [])
        return record.result
    audience = compile_condition("$.audience", record.audience) if record.audience is not None else None
    run = Pipeline(server, message, messages.Compiled(message), messages.decode_config(config_value).config,
                   event=record.event, test=record.test, resume=record)
    return await run.run(audience)


async def recover(server: Any) -> None:
    """At start: deliver again what the outbox holds (a crash or a stop left it between
    staging and settling), then resume the executions that did not end."""
    store = server.store
    with store.env.begin() as txn:
        staged = list(txn.cursor(db=store._dbs["outbox"]))
        executions = [_execution_decoder.decode(v) for _, v in txn.cursor(db=store._dbs["executions"])]
    if staged:
        jobs = []
        for _, value in staged:
            entry = _entry_decoder.decode(value)
            app = store.get_app(entry.app) or AppRecord(app=entry.app)
            jobs.append(DeliveryJob(app=app, token=entry.token, platform=entry.platform, content=entry.content,
                                    apns=entry.apns, fcm=entry.fcm, tracking=entry.tracking))
        log.warning("delivering %d notifications again that were staged when the server stopped "
                    "(some may reach the provider twice)", len(jobs))
        await server.reporting.record_many([
            ReportEvent(outcome="replayed", app=job.app.app, platform=job.platform, message=str(job.tracking.get("m", "")),
                        version=job.tracking.get("v", 0) if isinstance(job.tracking.get("v"), int) else 0)
            for job in jobs if counted(job.tracking)
        ])
        for offset in range(0, len(jobs), BATCH):
            await server.delivery.deliver(jobs[offset : offset + BATCH])
        await store.write(_drop_outbox, [key for key, _ in staged])
    for record in executions:
        log.info("resuming execution %s of message %s v%d", record.execution, record.message, record.version)
        try:
            await resume(server, record)
        except Exception:  # the others still resume; this one again at the next start
            log.exception("execution %s failed again; it stays stored", record.execution)


def _drop_outbox(w: Any, keys: list[bytes]) -> None:
    for key in keys:
        w.txn.delete(key, db=w.dbs["outbox"])
