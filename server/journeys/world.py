"""The journey machine's world, live: what a push, a cap and an update do for the engine.

A push is rendered for the profile (the message version the journey pinned, its channel
configuration's registrations and consent, the plugins' ``pigeon_exclude`` rules) and its
jobs added to the cycle's plan, which the engine stages in the outbox in the cycle's commit;
an exclusion is counted at its node. A cap counts the pushes delivered to the profile
(`server.profiles.pushlog`) and those of this cycle; an update patches the profile the
machine sees and is applied in the commit. A cycle reads a message version, its channel
configuration and an app once (the plan's ``memo``), not once a push.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from protocols import api
from server.channels import AppRecord
from server.delivery.apps import get_app
from server.journeys.machine import Instance, Journey
from server.messages.content import context_for, exclusion, to_delivery
from server.messages.pipeline import PLATFORMS, reachable
from server.profiles import pushlog
from server.profiles.records import ProfileRecord
from server.profiles.writes import merge_patch
from server.reports.reporting import envelope_key
from server.runtime.errors import InvalidArgument, ServerError
from server.templates import Scope

if TYPE_CHECKING:
    from server.journeys.plan import Plan
    from server.runtime.app import Server

__all__ = ["LiveWorld"]

_CAP_US = {"hour": 3_600_000_000, "day": 86_400_000_000, "week": 7 * 86_400_000_000, "month": 30 * 86_400_000_000}


class LiveWorld:
    """The machine's world, live: pushes rendered and staged in the cycle's plan."""

    def __init__(self, server: Server, plan: Plan, pid: bytes, profile: ProfileRecord, journey: Journey) -> None:
        self.server, self.plan, self.pid, self.profile, self.journey = server, plan, pid, profile, journey

    def push(self, instance: Instance, node: api.PushNode, at_us: int) -> tuple[Any, str | None]:
        server = self.server
        assert node.version is not None
        space = self.plan.space
        memo = self.plan.memo  # what the cycle's pushes read once: the message, its channel, the apps
        found = memo.get((node.message, node.version))
        if found is None:
            try:
                record = server.catalog.message(space, node.message, node.version)
                config = server.catalog.config(space, record.message.channel).config
            except ServerError as exc:  # deleted since: this push is excluded, the journey goes on
                return exc.message, "MessageGone"
            platforms = {p for name in config.platforms for p in PLATFORMS[name]}
            found = memo[(node.message, node.version)] = (record, config, set(config.apps), platforms)
        record, config, apps, platforms = found
        active, reason = reachable(self.profile, config, apps, platforms)
        detail = f"no push ({reason})"
        rules = server.journeys.rules
        if reason is None and rules is not None:  # the plugins' rules, asked as a send asks them
            reason = rules.reason(self.profile, record.message, record.version, config, instance.event)
            detail = f"excluded by a plugin's rule ({reason})"
        tracking = {"m": record.message.id, "v": record.version, "j": self.journey.id, "jv": self.journey.version,
                    "n": node.id}
        head = envelope_key(tracking)
        if reason is None:
            context = Scope(context_for(attributes=self.profile.attributes, identities=self.profile.identities,
                                        event=instance.event, message=record.message, version=record.version,
                                        journey={"id": self.journey.id, "version": self.journey.version, "node": node.id}))
            try:
                rendered = to_delivery(record.message, server.catalog.compiled(space, record).render(context))
            except InvalidArgument as exc:
                reason, detail = exclusion(exc), exc.message
        if reason is not None:
            if head is not None:
                self.plan.count((space.name, *head, "", "", "targeted", ""))
                self.plan.count((space.name, *head, "", "", "excluded", reason))
            return detail, reason  # the simulator's words for it too
        instance.pushes[node.id] = "pending"  # the cycle's execution id, set when staged
        for registration in active:
            app = memo.get(registration.app)
            if app is None:
                app = memo[registration.app] = (get_app(space, registration.app)
                                                 or AppRecord(app=registration.app, sandbox=space.name))
            job = rendered.job(app, registration.token, registration.platform, dict(tracking))
            job.profile = self.pid
            self.plan.jobs.append(job)
        self.plan.pushes.append((self.pid, at_us, self.journey.id))
        return len(active), None

    def capped(self, caps: list[api.FrequencyCap], at_us: int) -> bool:
        space = self.plan.space
        # the deliveries logged so far, and this cycle's pushes to the profile (not delivered yet)
        mine = [t for pid, t, _ in self.plan.pushes if pid == self.pid]
        return any(pushlog.count_since(space, self.pid, at_us - _CAP_US[cap.per])
                   + sum(1 for t in mine if t > at_us - _CAP_US[cap.per]) >= cap.max for cap in caps)

    def update(self, patch: dict[str, Any]) -> None:
        self.profile.attributes = merge_patch(self.profile.attributes, patch)
        self.plan.patches.append((self.pid, patch))
