"""The journey simulator: one profile through a journey on a virtual clock.

It runs the engine's own state machine (`server.journeys.machine`) with a `World` that renders
each push exactly as the providers would get it (the message's templates, the channel's
payload for each registration) and sends nothing, asks the ``pigeon_exclude`` rules as a live
send does (`server.messages.pipeline.Rules`), applies profile updates to its copy of the
profile, and counts its own pushes for the caps. Time moves from one thing to the next: the
profile's events, given with their times, and the instance's timers; so a 30-day wait takes
no time at all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from protocols import api
from server.channels import AppRecord, Channel
from server.journeys import audiences
from server.journeys.machine import Happened, Instance, Journey, Step, advance, enter
from server.messages.content import Compiled, ConfigRecord, MessageRecord, context_for, exclusion, to_delivery
from server.messages.pipeline import PLATFORMS, Rules, reachable
from server.profiles.records import ProfileRecord
from server.profiles.writes import merge_patch
from server.runtime.errors import InvalidArgument
from server.templates import Scope, TemplateError, compile_condition

__all__ = ["Catalog", "simulate", "trace_step", "MAX_STEPS"]

#: Steps a simulation takes at most (a journey that waits in a loop stops there).
MAX_STEPS = 2_000
_DAY_US = 86_400_000_000
_CAP_US = {"hour": 3_600_000_000, "day": _DAY_US, "week": 7 * _DAY_US, "month": 30 * _DAY_US}


@dataclass
class Catalog:
    """What a simulated push reads: messages, their configurations, apps and channels."""

    message: Callable[[str, int], MessageRecord]
    config: Callable[[str], ConfigRecord]
    app: Callable[[str], AppRecord]
    channel: Callable[[str], Channel | None]
    compiled: Callable[[MessageRecord], Compiled]
    #: The plugins' exclusion rules (None: no plugin has any).
    rules: Rules | None = None


@dataclass
class _World:
    journey: Journey
    profile: ProfileRecord
    catalog: Catalog
    pushed: list[int] = field(default_factory=list)

    def attributes(self) -> dict[str, Any]:
        return {**self.profile.attributes, "identities": self.profile.identities}

    def push(self, instance: Instance, node: api.PushNode, at_us: int) -> tuple[Any, str | None]:
        assert node.version is not None  # pinned by check()
        record = self.catalog.message(node.message, node.version)
        config = self.catalog.config(record.message.channel).config
        platforms = {p for name in config.platforms for p in PLATFORMS[name]}
        active, reason = reachable(self.profile, config, set(config.apps), platforms)
        if reason is not None:
            return f"no push ({reason})", reason
        if self.catalog.rules is not None:
            reason = self.catalog.rules.reason(self.profile, record.message, record.version, config, instance.event)
            if reason is not None:
                return f"excluded by a plugin's rule ({reason})", reason
        context = Scope(context_for(attributes=self.profile.attributes, identities=self.profile.identities,
                                    event=instance.event, message=record.message, version=record.version,
                                    journey={"id": self.journey.id, "version": self.journey.version,
                                             "node": node.id}))
        try:
            content = self.catalog.compiled(record).render(context)
        except InvalidArgument as exc:
            return exc.message, exclusion(exc)
        rendered = to_delivery(record.message, content)
        execution = f"sim-{node.id}"
        instance.pushes[node.id] = execution
        tracking = {"m": record.message.id, "v": record.version, "j": self.journey.id, "jv": self.journey.version,
                    "n": node.id, "x": execution}  # as the live world's
        pushes = []
        for registration in active:
            job = rendered.job(self.catalog.app(registration.app), registration.token, registration.platform, tracking)
            channel = self.catalog.channel("fcm" if registration.platform == "fcm" else "apns")
            out = channel.render(job) if channel is not None else None
            pushes.append(api.SimulatedPush(
                app=registration.app, platform=registration.platform, token=registration.token,
                payload=out.payload if out else {}, headers=out.headers if out else {}, size=out.size if out else 0,
                error=out.error if out else "NoChannel", detail=out.detail if out else None))
        self.pushed.append(at_us)
        return pushes, None

    def capped(self, caps: list[api.FrequencyCap], at_us: int) -> bool:
        return any(sum(1 for t in self.pushed if at_us - _CAP_US[cap.per] < t <= at_us) >= cap.max for cap in caps)

    def update(self, patch: dict[str, Any]) -> None:
        self.profile.attributes = merge_patch(self.profile.attributes, patch)


def simulate(journey: Journey, profile: ProfileRecord, events: list[api.SimulatedEvent], catalog: Catalog, *,
             start_us: int, until_us: int) -> api.Simulation:
    """Run ``journey`` for ``profile`` from ``start_us`` to ``until_us`` (see the module docstring)."""
    world = _World(journey, profile, catalog)
    pending = sorted(((_us(e.at), n, e) for n, e in enumerate(events)), key=lambda item: (item[0], item[1]))
    out = api.Simulation(journey=journey.id, version=journey.version, outcome="not_entered")
    instance, at_us = _entry(journey, world, pending, start_us, out)
    if instance is None:
        return out
    steps: list[Step] = []
    happened = Happened("enter", type=journey.spec.entry.event or "")
    while len(steps) < MAX_STEPS:
        instance, taken = advance(journey, instance, happened, at_us, world.attributes(), world)
        steps.extend(taken)
        if instance.ended:
            break
        next_event = pending[0][0] if pending else None
        wake = instance.wake_us or None
        if next_event is not None and (wake is None or next_event < wake) and next_event <= until_us:
            at_us, _, event = pending.pop(0)
            happened = Happened("event", type=event.type, data=event.data)
        elif wake is not None and wake <= until_us:
            at_us, happened = wake, Happened("timer")
        else:
            break
    out.steps = [trace_step(step) for step in steps]
    out.outcome = "ended" if instance.ended else "waiting"
    out.node, out.reason = instance.node, instance.reason
    out.wake = _when(instance.wake_us) if instance.wake_us else None
    return out


def _entry(journey: Journey, world: _World, pending: list[tuple[int, int, api.SimulatedEvent]], start_us: int,
           out: api.Simulation) -> tuple[Instance | None, int]:
    """The instance, entered when the journey's entry lets the profile in, and when; or None
    (with the reason in ``out``)."""
    entry = journey.spec.entry
    condition = compile_condition("$.journey.entry.condition", entry.condition) if entry.condition else None
    if entry.audience is not None:  # as if the profile, as it is at the start, just qualified
        history = audiences.History()
        while pending and pending[0][0] <= start_us:  # the events before the start: its history
            at_us, _, event = pending.pop(0)
            summary = history[event.type] = dict(history[event.type])
            summary["count"] += 1
            summary["last"] = audiences.iso(at_us)  # in time order
        member = _holds(journey.conditions["audience"], world, {}, audiences.context(world.attributes(), history, start_us))
        if member != (entry.on == "enter"):
            out.reason = f"the profile {'does not match' if entry.on == 'enter' else 'matches'} the audience"
            return None, start_us
        return enter(journey, Happened("enter"), start_us), start_us
    if entry.event is None:  # a read audience: the profile as it is at the start
        if condition is not None and not _holds(condition, world, {}):
            out.reason = "the profile does not match the entry's condition"
            return None, start_us
        return enter(journey, Happened("enter"), start_us), start_us
    while pending:
        at_us, _, event = pending.pop(0)
        if event.type == entry.event and (condition is None or _holds(condition, world, event.data)):
            return enter(journey, Happened("event", type=event.type, data=event.data), at_us), at_us
    out.reason = f"no event {entry.event} (that the entry's condition accepts) among the events"
    return None, start_us


def _holds(condition: Any, world: _World, event: dict[str, Any], context: dict[str, Any] | None = None) -> bool:
    try:
        return bool(condition.test(context or {"profile": world.attributes(), "event": event}))
    except TemplateError:
        return False


def trace_step(step: Step) -> api.TraceStep:
    """A machine's step as a trace shows it (a live one keeps no payloads)."""
    out = api.TraceStep(at=_when(step.at_us), node=step.node, kind=step.kind, detail=step.detail)
    if step.kind == "excluded":
        out.excluded = step.push
    elif step.kind == "push" and isinstance(step.push, list):
        out.pushes = step.push
    return out


def _us(when: datetime) -> int:
    return int(when.timestamp() * 1_000_000)


def _when(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)
