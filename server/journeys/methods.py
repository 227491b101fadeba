"""The journey methods: ``journeys.publish``, ``get``, ``list`` and the lifecycle changes
(``close``, ``stop``, ``pause``, ``resume``); admin scope, in the caller's sandbox."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocols import api
from server.api.registry import CallContext, Methods
from server.journeys import catalog, definition
from server.messages.catalog import get_version
from server.messages.content import decode_message

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
    spec = definition.check(req.journey, _messages(space), now_us=space.clock())
    info = await space.write(catalog.publish, spec, req.draft, req.move_waiting)
    log.info("journey %s: version %d published (%s)", spec.id, info.version, "draft" if req.draft else info.state)
    return info


@methods(api.GetJourney, scope="admin")
async def get_journey(server: Server, ctx: CallContext, req: api.GetJourney) -> api.JourneyInfo:
    return catalog.get_journey(server.space(ctx), req.id, req.version)


@methods(api.ListJourneys, scope="admin")
async def list_journeys(server: Server, ctx: CallContext, req: api.ListJourneys) -> api.JourneyList:
    return api.JourneyList(journeys=catalog.list_journeys(server.space(ctx)))


async def _change(server: Server, ctx: CallContext, id: str, verb: str) -> api.JourneyInfo:
    space = server.space(ctx)
    state = await space.write(catalog.change_state, id, verb)
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
