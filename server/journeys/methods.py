"""The journey methods: ``journeys.publish``, ``get``, ``list``, the lifecycle changes
(``close``, ``stop``, ``pause``, ``resume``) and ``simulate``; admin scope, in the caller's
sandbox."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import msgspec.structs

from protocols import api
from server.api.registry import CallContext, Methods
from server.channels import AppRecord
from server.delivery.apps import get_app
from server.journeys import catalog, definition, gauges, instances, simulator
from server.journeys.machine import Journey
from server.messages.catalog import get_version
from server.messages.content import decode_message
from server.messages.pipeline import Rules
from server.profiles.keys import identity_key as normalize_identity, normalize_token
from server.profiles.records import ConsentRecord, ProfileRecord, RegistrationRecord
from server.runtime.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from server.profiles.sandboxes import Space
    from server.runtime.app import Server

__all__ = ["methods"]

log = logging.getLogger("pigeon.journeys")

methods = Methods()


def _messages(space: Space) -> definition.Messages:
    def version_of(name: str, version: int | None) -> int | None:
        value = get_version(space, "messages", name, version)
        return None if value is None else decode_message(value).version

    return version_of


@methods(api.PublishJourney, scope="admin")
async def publish_journey(server: Server, ctx: CallContext, req: api.PublishJourney) -> api.JourneyInfo:
    space = server.space(ctx)
    if req.draft and req.move_waiting:
        raise InvalidArgument("a draft takes no one: move_waiting goes with the version that is published live",
                              field="$.move_waiting")
    spec = definition.check(req.journey, _messages(space), now_us=space.clock())
    info = await space.write(catalog.publish, spec, req.draft, req.move_waiting)
    server.journeys.changed(space)
    log.info("journey %s: version %d published (%s)", spec.id, info.version, "draft" if req.draft else info.state)
    return info


@methods(api.GetJourney, scope="admin")
async def get_journey(server: Server, ctx: CallContext, req: api.GetJourney) -> api.JourneyInfo:
    space = server.space(ctx)
    return _gauged(space, catalog.get_journey(space, req.id, req.version))


@methods(api.ListJourneys, scope="admin")
async def list_journeys(server: Server, ctx: CallContext, req: api.ListJourneys) -> api.JourneyList:
    space = server.space(ctx)
    return api.JourneyList(journeys=[_gauged(space, info) for info in catalog.list_journeys(space)])


def _gauged(space: Space, info: api.JourneyInfo) -> api.JourneyInfo:
    """``info`` with the instances running now (`server.journeys.gauges`)."""
    waiting = gauges.waiting(space, info.journey.id)
    return msgspec.structs.replace(info, waiting=waiting.get(info.version, {}),
                                   running=sum(sum(nodes.values()) for nodes in waiting.values()))


async def _change(server: Server, ctx: CallContext, id: str, verb: str) -> api.JourneyInfo:
    space = server.space(ctx)
    state = await space.write(catalog.change_state, id, verb)
    server.journeys.changed(space)
    log.info("journey %s: %s", id, state.state)
    return catalog.get_journey(space, id)


@methods(api.CloseJourney, scope="admin")
async def close_journey(server: Server, ctx: CallContext, req: api.CloseJourney) -> api.JourneyInfo:
    return await _change(server, ctx, req.id, "close")


@methods(api.StopJourney, scope="admin")
async def stop_journey(server: Server, ctx: CallContext, req: api.StopJourney) -> api.JourneyInfo:
    return await _change(server, ctx, req.id, "stop")


@methods(api.PauseJourney, scope="admin")
async def pause_journey(server: Server, ctx: CallContext, req: api.PauseJourney) -> api.JourneyInfo:
    return await _change(server, ctx, req.id, "pause")


@methods(api.ResumeJourney, scope="admin")
async def resume_journey(server: Server, ctx: CallContext, req: api.ResumeJourney) -> api.JourneyInfo:
    return await _change(server, ctx, req.id, "resume")


@methods(api.SimulateJourney, scope="admin")
async def simulate_journey(server: Server, ctx: CallContext, req: api.SimulateJourney) -> api.Simulation:
    space = server.space(ctx)
    journey = _simulated(space, req)
    profile = _profile(space, req)
    start = req.start or (req.events[0].at if req.events else None)
    start_us = int(start.timestamp() * 1_000_000) if start is not None else space.clock()
    until_us = int(req.until.timestamp() * 1_000_000) if req.until is not None else start_us + _SIMULATED_US
    if until_us <= start_us:
        raise InvalidArgument("until must come after the start", field="$.until")
    catalog = server.catalog
    world = simulator.Catalog(
        message=lambda name, version: catalog.message(space, name, version),
        config=lambda name: catalog.config(space, name, field="$.journey"),
        app=lambda app: get_app(space, app) or AppRecord(app=app, sandbox=space.name),
        channel=server.delivery.by_platform.get,
        compiled=lambda record: catalog.compiled(space, record),
        rules=Rules.of(server),
    )
    return simulator.simulate(journey, profile, req.events, world, start_us=start_us, until_us=until_us)


#: How long a simulation runs by default.
_SIMULATED_US = 120 * 86_400_000_000


def _simulated(space: Space, req: api.SimulateJourney) -> Journey:
    if (req.journey is None) == (req.id is None):
        raise InvalidArgument("give either a journey to try or the id of a published one", field="$.journey")
    if req.journey is not None:
        return Journey(definition.check(req.journey, _messages(space), now_us=space.clock()), 0)
    assert req.id is not None
    info = catalog.get_journey(space, req.id, req.version)
    return Journey(info.journey, info.version)


def _profile(space: Space, req: api.SimulateJourney) -> ProfileRecord:
    """The stored profile, or the sample (its attributes, ``identities``, ``registrations``
    and ``consent``), as a record the simulation may change."""
    if (req.identity is None) == (req.profile is None):
        raise InvalidArgument("give either an identity or a sample profile", field="$.identity")
    if req.identity is not None:
        return msgspec.structs.replace(space.get_profile(req.identity))
    try:
        return _sample(dict(req.profile or {}))
    except (msgspec.ValidationError, InvalidArgument) as exc:
        raise InvalidArgument(f"$.profile: {exc}", field="$.profile") from None


class _SampleRegistration(msgspec.Struct, forbid_unknown_fields=True):
    app: api.AppId
    platform: api.Platform
    token: api.PushToken


def _sample(sample: dict[str, Any]) -> ProfileRecord:
    identities = msgspec.convert(sample.pop("identities", ["sample:1"]), list[str])
    registrations = msgspec.convert(sample.pop("registrations", []), list[_SampleRegistration])
    consent = msgspec.convert(sample.pop("consent", {}), dict[str, Literal["in", "out"]])
    return ProfileRecord(
        identities=identities, attributes=sample,
        registrations=[RegistrationRecord(r.app, r.platform, normalize_token(r.platform, r.token), 0, 0)
                       for r in registrations],
        consent={app: ConsentRecord(push, 0) for app, push in consent.items()}, created=0, updated=0,
    )


@methods(api.TraceJourney, scope="admin")
async def trace_journey(server: Server, ctx: CallContext, req: api.TraceJourney) -> api.Simulation:
    space = server.space(ctx)
    catalog.get_journey(space, req.id)  # NOT_FOUND for a journey that is not published
    with space.env.begin() as txn:
        pid = txn.get(normalize_identity(req.identity), db=space.db("identities"))
    if pid is None:
        raise NotFound(f"no profile has the identity {req.identity!r}", field="$.identity")
    instance = instances.instances_of(space, bytes(pid)).get(req.id)
    if instance is None:
        raise NotFound(f"{req.identity!r} has not entered journey {req.id!r}", field="$.identity")
    steps = instances.read_trace(space, bytes(pid), req.id)
    return api.Simulation(
        journey=req.id, version=instance.version, outcome="ended" if instance.ended else "waiting",
        node=instance.node, reason=instance.reason, wake=_when(instance.wake_us) if instance.wake_us else None,
        steps=[simulator.trace_step(step) for step in steps],
    )


def _when(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, UTC)
