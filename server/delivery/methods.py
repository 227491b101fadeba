"""The delivery methods: ``apps.*`` (apps and their credentials) and ``push.send``."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocols import api
from server.api.registry import CallContext, Methods
from server.channels import AppRecord, DeliveryJob, DeliveryResult
from server.delivery import apps
from server.profiles import keys
from server.runtime.errors import InvalidArgument

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

log = logging.getLogger("pigeon")

methods = Methods()


@methods(api.RegisterIosApp, scope="admin")
async def register_ios(server: Server, ctx: CallContext, req: api.RegisterIosApp) -> api.AppInfo:
    ios = apps.channel_for_apps(server, "ios").check_app(req)
    stored = await apps.store_credentials(server, server.space(ctx), req.app, ios=ios)
    log.info("app %s: iOS credentials registered (%s auth, %s)", stored.handle, ios.auth, ios.environment)
    return stored.info()


@methods(api.RegisterAndroidApp, scope="admin")
async def register_android(server: Server, ctx: CallContext, req: api.RegisterAndroidApp) -> api.AppInfo:
    android = apps.channel_for_apps(server, "android").check_app(req)
    stored = await apps.store_credentials(server, server.space(ctx), req.app, android=android)
    log.info("app %s: Android credentials registered (project %s)", stored.handle, android.project_id)
    return stored.info()


@methods(api.GetApp, scope="admin")
async def get_app(server: Server, ctx: CallContext, req: api.GetApp) -> api.AppInfo:
    return apps.require_app(server.space(ctx), req.app).info()


@methods(api.ListApps, scope="admin")
async def list_apps(server: Server, ctx: CallContext, req: api.ListApps) -> api.AppList:
    return api.AppList(apps=[record.info() for record in apps.list_apps(server.space(ctx))])


@methods(api.DeleteApp, scope="admin")
async def delete_app(server: Server, ctx: CallContext, req: api.DeleteApp) -> api.AppDeleted:
    space = server.space(ctx)
    await space.write(apps.delete_app, req.app)
    for channel in server.channels:
        channel.forget_app(AppRecord(app=req.app, sandbox=space.name).handle, None)
    return api.AppDeleted(app=req.app)


@methods(api.SendPush, scope="operator")
async def push_send(server: Server, ctx: CallContext, req: api.SendPush) -> api.PushSent:
    _check_push(req)
    space = server.space(ctx)
    app = apps.require_app(space, req.app)
    if req.token is not None:
        if req.platform is None:
            raise InvalidArgument("a token needs its platform (apns, apns-sandbox or fcm)", field="$.platform")
        token = keys.normalize_token(req.platform, req.token)
        keys.token_key(req.app, token)  # the same length limit as registered tokens
        targets: list[tuple[str, str]] = [(token, req.platform)]
        owner = space.find_token(req.app, token)
        pid = b"" if owner is None else owner[0]  # its deliveries count for frequency caps
    else:
        assert req.identity is not None
        pid, profile = space.find_profile(req.identity)
        registrations = [
            r for r in profile.registrations
            if r.app == req.app and (req.platform is None or r.platform == req.platform)
        ]
        targets = [(r.token, r.platform) for r in registrations if r.state == "active"]
        if not targets:
            excluded = "OnlyInvalidTokens" if registrations else "NoTokenForApp"
            where = (space.name, "", 0, "", "", req.app, req.platform or "")
            await server.reporting.record_counts({(*where, "targeted", ""): 1, (*where, "excluded", excluded): 1})
            return api.PushSent(outcomes=[], excluded=excluded)
    jobs = [
        DeliveryJob(
            app=app, token=token, platform=platform, content=req.content, raw=req.raw, fcm_raw=req.fcm_raw,
            apns=req.apns, fcm=req.fcm, profile=pid,
        )
        for token, platform in targets
    ]
    # Counted as messages.send counts (targeted, then sent and the outcome), under no
    # message, and logged in the profile's push log, even if this call is cancelled meanwhile.
    results = await server.delivery.deliver(jobs, count=True)
    return api.PushSent(outcomes=[_outcome(token, platform, r) for (token, platform), r in zip(targets, results)])


def _check_push(req: api.SendPush) -> None:
    if (req.token is None) == (req.identity is None):
        raise InvalidArgument("give either a token (with its platform) or an identity", field="$.token")
    if req.content is not None and (req.raw is not None or req.fcm_raw is not None):
        raise InvalidArgument("give content, or raw payloads (raw for APNs, fcm_raw for FCM), not both", field="$.content")
    if req.content is None and req.raw is None and req.fcm_raw is None:
        raise InvalidArgument("give content, or a raw payload (raw for APNs, fcm_raw for FCM)", field="$.content")


def _outcome(token: str, platform: str, result: DeliveryResult) -> api.PushOutcome:
    return api.PushOutcome(
        token=token,
        platform=platform,  # type: ignore[arg-type]
        status=result.status,
        reason=result.reason,
        detail=result.detail,
        status_code=result.status_code,
        provider_id=result.provider_id,
        unique_id=result.unique_id,
        attempts=result.attempts,
    )
