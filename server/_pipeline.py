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
- ``AudienceError``: the audience condition fails on its data (a text compared with a number).
"""

from __future__ import annotations

import secrets
from collections import Counter
from typing import Any

from protocols import api

from . import _messages as messages
from ._errors import InvalidArgument
from ._reporting import ReportEvent
from .channels import AppRecord, DeliveryJob
from .templates import Condition, TemplateError

__all__ = ["Pipeline", "PLATFORMS"]

#: Registration platforms of each configuration platform.
PLATFORMS = {"ios": ("apns", "apns-sandbox"), "android": ("fcm",)}
_BATCH = 500


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
                 config: api.ChannelConfig, *, event: dict[str, Any], test: bool) -> None:
        self.server = server
        self.record = record
        self.spec = record.message
        self.compiled = compiled
        self.config = config
        self.event = event
        self.test = test
        self.execution = secrets.token_hex(8)
        self.tracking = {"m": self.spec.id, "v": record.version, "x": self.execution}
        self.apps: dict[str, AppRecord | None] = {app: server.store.get_app(app) for app in config.apps}
        self.platforms = {p for name in config.platforms for p in PLATFORMS[name]}
        self.result = api.SendResult(execution=self.execution, message=self.spec.id, version=record.version)
        self._excluded: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()

    def _report(self, outcome: str, app: str = "", platform: str = "", reason: str = "") -> ReportEvent:
        return ReportEvent(outcome=outcome, app=app, platform=platform, reason=reason, message=self.spec.id,
                           version=self.record.version)

    async def run(self, profiles: Any, audience: Condition | None = None) -> api.SendResult:
        """Send to the profiles ``profiles`` yields in batches (lists of `ProfileRecord`)."""
        async for batch in profiles:
            await self._batch(batch, audience)
        self.result.excluded = dict(self._excluded)
        self.result.failed = dict(self._failed)
        return self.result

    async def _batch(self, profiles: list[Any], audience: Condition | None) -> None:
        reports: list[ReportEvent] = []
        jobs: list[DeliveryJob] = []
        for profile in profiles:
            context = messages.context_for(attributes=profile.attributes, identities=profile.identities,
                                           event=self.event, message=self.spec, version=self.record.version)
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
        await self.server.reporting.record_many(reports)
        if jobs:
            results = await self.server.delivery.deliver(jobs)
            for result in results:
                self.result.sent += 1
                if result.status == "sent":
                    self.result.delivered += 1
                else:
                    self._failed[result.reason or "Unknown"] += 1
                    if result.status == "invalid":
                        self.result.bounced += 1

    def _profile(self, profile: Any, context: dict[str, Any], jobs: list[DeliveryJob]) -> str | None:
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
        try:
            content = self.compiled.render(context)
        except TemplateError as exc:
            return type(exc).__name__ if type(exc) is not TemplateError else "TemplateError"
        except InvalidArgument:
            return "TemplateError"
        ios_content, apns, android_content, fcm = messages.to_delivery(self.spec, content)
        for r in active:
            app = self.apps[r.app] or AppRecord(app=r.app)
            ios = r.platform != "fcm"
            jobs.append(DeliveryJob(app=app, token=r.token, platform=r.platform,
                                    content=ios_content if ios else android_content, apns=apns, fcm=fcm,
                                    tracking=self.tracking))
        return None


async def profiles_by_identity(store: Any, identities: list[str]) -> Any:
    """The profiles of ``identities`` (each once), in batches; unknown identities are skipped."""
    from ._errors import NotFound

    seen: set[str] = set()
    batch = []
    for identity in identities:
        try:
            profile = store.get_profile(identity)
        except NotFound:
            continue
        key = profile.identities[0] if profile.identities else identity
        if key in seen:
            continue
        seen.add(key)
        batch.append(profile)
        if len(batch) >= _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


async def all_profiles(store: Any) -> Any:
    """Every profile, in batches of 500, read one batch at a time."""
    after = None
    while True:
        page = store.scan_profiles(after, _BATCH)
        if not page:
            return
        yield [profile for _, profile in page]
        after = page[-1][0]
