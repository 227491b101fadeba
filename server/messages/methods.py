"""The message methods: ``configs.*`` and ``messages.*`` (publish, read, preview, send)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from protocols import api
from server import templates
from server.api.registry import CallContext, Methods
from server.channels import AppRecord
from server.messages import content
from server.delivery.apps import get_app, require_app
from server.messages.catalog import list_latest, publish_version
from server.messages.pipeline import Pipeline
from server.runtime.errors import InvalidArgument

if TYPE_CHECKING:
    from server.profiles.sandboxes import Space
    from server.runtime.app import Server

__all__ = ["methods"]

log = logging.getLogger("pigeon")

methods = Methods()


@methods(api.PublishConfig, scope="admin")
async def publish_config(server: Server, ctx: CallContext, req: api.PublishConfig) -> api.ConfigInfo:
    store = server.space(ctx)
    config = req.config
    for i, app in enumerate(config.apps):
        require_app(store, app, field=f"$.config.apps[{i}]")
    published = store.clock()

    def encode(version: int) -> bytes:
        return content.encode(content.ConfigRecord(config=config, version=version, published_us=published))

    version = await store.write(publish_version, "configs", config.name, encode)
    log.info("channel configuration %s: version %d published", config.name, version)
    return content.ConfigRecord(config=config, version=version, published_us=published).info()


@methods(api.GetConfig, scope="admin")
async def get_config(server: Server, ctx: CallContext, req: api.GetConfig) -> api.ConfigInfo:
    return server.catalog.config(server.space(ctx), req.name, req.version).info()


@methods(api.ListConfigs, scope="admin")
async def list_configs(server: Server, ctx: CallContext, req: api.ListConfigs) -> api.ConfigList:
    return api.ConfigList(configs=[content.decode_config(v).info() for v in list_latest(server.space(ctx), "configs")])


@methods(api.PublishMessage, scope="admin")
async def publish_message(server: Server, ctx: CallContext, req: api.PublishMessage) -> api.MessageInfo:
    store = server.space(ctx)
    spec = req.message
    server.catalog.config(store, spec.channel, field="$.message.channel")
    draft = content.MessageRecord(message=spec, version=0, published_us=store.clock())
    check = content.Compiled(draft)  # raises TemplateSyntax naming the field, line and column
    draft.templates = check.templates

    def encode(version: int) -> bytes:
        draft.version = version
        return content.encode(draft)

    draft.version = await store.write(publish_version, "messages", spec.id, encode)
    log.info("message %s: version %d published (%d templates)", spec.id, draft.version, len(draft.templates))
    return draft.info()


@methods(api.GetMessage, scope="admin")
async def get_message(server: Server, ctx: CallContext, req: api.GetMessage) -> api.MessageInfo:
    return server.catalog.message(server.space(ctx), req.id, req.version).info()


@methods(api.ListMessages, scope="admin")
async def list_messages(server: Server, ctx: CallContext, req: api.ListMessages) -> api.MessageList:
    return api.MessageList(messages=[content.decode_message(v).info() for v in list_latest(server.space(ctx), "messages")])


@methods(api.PreviewMessage, scope="admin")
async def preview(server: Server, ctx: CallContext, req: api.PreviewMessage) -> api.Preview:
    if (req.identity is None) == (req.profile is None):
        raise InvalidArgument("give either an identity or a sample profile", field="$.identity")
    space = server.space(ctx)
    record = server.catalog.message(space, req.id, req.version)
    spec = record.message
    context = content.context_for(**_who(space, req), event=req.event, message=spec, version=record.version)
    result = api.Preview(id=spec.id, version=record.version)
    try:
        rendered_content = server.catalog.compiled(space, record).render(context)
    except InvalidArgument as exc:
        result.excluded = content.exclusion(exc)
        result.detail = exc.message
        return result
    rendered_message = content.to_delivery(spec, rendered_content)
    config = server.catalog.config(space, spec.channel, field="$.id").config
    tracking = {"m": spec.id, "v": record.version, "x": "preview"}
    for app in config.apps:
        app_record = get_app(space, app) or AppRecord(app=app, sandbox=space.name)
        for platform in config.platforms:
            channel = server.delivery.by_platform.get("apns" if platform == "ios" else "fcm")
            if channel is None:
                result.previews.append(api.PlatformPreview(platform=platform, app=app, error="NoChannel"))
                continue
            rendered = channel.render(
                rendered_message.job(app_record, "", "apns" if platform == "ios" else "fcm", tracking)
            )
            result.previews.append(api.PlatformPreview(
                platform=platform, app=app, payload=rendered.payload, headers=rendered.headers, size=rendered.size,
                error=rendered.error, detail=rendered.detail,
            ))
    return result


def _who(space: Space, req: api.PreviewMessage) -> dict[str, Any]:
    """The profile a preview renders for: a stored one, or the request's sample."""
    if req.identity is not None:
        profile = space.get_profile(req.identity)
        return {"attributes": profile.attributes, "identities": profile.identities, "audiences": []}
    sample = dict(req.profile or {})
    identities = [str(i) for i in sample.pop("identities", [])] if isinstance(sample.get("identities"), list) else []
    audiences = [str(a) for a in sample.pop("audiences", [])] if isinstance(sample.get("audiences"), list) else []
    return {"attributes": sample, "identities": identities, "audiences": audiences}


@methods(api.SendMessage, scope="operator")
async def send_message(server: Server, ctx: CallContext, req: api.SendMessage) -> api.SendResult:
    if bool(req.identities) == (req.audience is not None):
        raise InvalidArgument("give either identities or an audience", field="$.identities")
    space = server.space(ctx)
    record = server.catalog.message(space, req.id, req.version)
    config = server.catalog.config(space, record.message.channel, field="$.id").config
    audience = templates.compile_condition("$.audience", req.audience) if req.audience is not None else None
    run = Pipeline(server, space, record, server.catalog.compiled(space, record), config, event=req.event, test=req.test,
                   identities=req.identities, audience=req.audience)
    # The execution runs in the server, not in this call: a client that goes away does
    # not stop it, and the reply waits for it.
    result: api.SendResult = await server.run_in_background(run.run, audience)
    log.info("message %s v%d execution %s: %d targeted, %d sent, %d delivered", result.message, result.version,
             result.execution, result.targeted, result.sent, result.delivered)
    return result
