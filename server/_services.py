"""The protocol's methods, bound to the actors that serve them."""

from __future__ import annotations

import logging
import os
import resource
import time
from typing import TYPE_CHECKING, Any

import msgspec
import msgspec.structs
import trio

from protocols import api
from protocols.frames import PROTOCOL_VERSION

from . import _keys as keys
from . import _messages as messages
from . import _pipeline as pipeline
from . import _store as store_ops
from . import templates
from ._errors import ActorError, FailedPrecondition, InvalidArgument, NotFound
from .channels import AppRecord, DeliveryJob
from ._records import MAX_VALUE_DEPTH, from_us, profile_to_api, registration_to_api, to_us
from ._rpc import CallContext, Router

if TYPE_CHECKING:
    from ._app import Server

__all__ = ["build_router", "MAX_ATTRIBUTE_DEPTH"]

log = logging.getLogger("pigeon")

MAX_ATTRIBUTE_DEPTH = MAX_VALUE_DEPTH
_END_OF_TIME_US = 2**63 - 1
_PAGE = 256
#: Bytes of events a page of events.list holds at most (and one event more).
_PAGE_BYTES = 16 * 1024


def _check_apns_token(platform: str, token: str) -> str:
    if platform.startswith("apns"):
        if len(token) % 2 or any(c not in "0123456789abcdefABCDEF" for c in token):
            raise InvalidArgument(
                "an APNs device token is the hexadecimal text of the token bytes (an even number of 0-9a-f)",
                field="$.token",
            )
        return token.lower()
    return token


def _process_stats() -> api.ProcessStats:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = usage.ru_maxrss * 1024
    return api.ProcessStats(
        pid=os.getpid(),
        cpu_user_s=usage.ru_utime,
        cpu_system_s=usage.ru_stime,
        rss_bytes=rss,
        max_rss_bytes=usage.ru_maxrss * 1024,
    )


def build_router(server: Server) -> Router:
    store = server.store
    router = Router()

    # -- server -------------------------------------------------------------------------------

    async def health(ctx: CallContext, req: api.GetHealth) -> api.Health:
        return api.Health(
            status="stopping" if server.stopping else "serving",
            version=server.version,
            protocol=PROTOCOL_VERSION,
            uptime_s=time.monotonic() - server.started_at,
        )

    async def stats(ctx: CallContext, req: api.GetStats) -> api.Stats:
        supervised = {c.name: c for c in server.supervisor.statistics()}
        actors = []
        for actor in server.supervisor.actors():
            s = actor.statistics()
            child = supervised[actor.name]
            actors.append(
                api.ActorStats(
                    name=actor.name,
                    state=child.state,
                    restarts=child.restarts,
                    crashes=child.crashes,
                    last_error=child.last_error,
                    mailbox_used=s.mailbox_used,
                    mailbox_size=s.mailbox_size,
                    details=s.details,
                )
            )
        try:
            counts = store.counts()
        except ActorError:
            counts = None  # the store is restarting: the actors' states matter most now
        return api.Stats(
            version=server.version,
            uptime_s=time.monotonic() - server.started_at,
            process=_process_stats(),
            actors=actors,
            connections=server.listener.connection_stats(),
            methods={name: m.snapshot() for name, m in sorted(server.listener.method_stats.items())},
            store=None if counts is None else api.StoreStats(
                path=str(store.path),
                schema_version=store_ops.SCHEMA_VERSION,
                map_size=counts["map_size"],
                used_bytes=counts["used_bytes"],
                profiles=counts["profiles"],
                identities=counts["identities"],
                tokens=counts["tokens"],
                events=counts["events"],
                commits=store.commits,
                writes=store.writes,
                map_resizes=store.map_resizes,
            ),
        )

    router.add(api.GetHealth, health)
    router.add(api.GetStats, stats)

    # -- profiles -----------------------------------------------------------------------------

    async def get_profile(ctx: CallContext, req: api.GetProfile) -> api.Profile:
        return profile_to_api(store.get_profile(req.identity))

    async def upsert_profile(ctx: CallContext, req: api.UpsertProfile) -> api.Profile:
        return profile_to_api(await store.write(store_ops.upsert_profile, req.identity, req.attributes))

    async def patch_profile(ctx: CallContext, req: api.PatchProfile) -> api.Profile:
        return profile_to_api(await store.write(store_ops.patch_profile, req.identity, req.patch, req.create))

    async def delete_profile(ctx: CallContext, req: api.DeleteProfile) -> api.ProfileDeleted:
        identities, registrations, events = await store.write(store_ops.delete_profile, req.identity)
        return api.ProfileDeleted(identities=identities, registrations=registrations, events=events)

    async def link_identity(ctx: CallContext, req: api.LinkIdentity) -> api.Profile:
        return profile_to_api(await store.write(store_ops.link_identity, req.identity, req.link))

    async def unlink_identity(ctx: CallContext, req: api.UnlinkIdentity) -> api.Profile:
        return profile_to_api(await store.write(store_ops.unlink_identity, req.identity))

    router.add(api.GetProfile, get_profile)
    router.add(api.UpsertProfile, upsert_profile)
    router.add(api.PatchProfile, patch_profile)
    router.add(api.DeleteProfile, delete_profile)
    router.add(api.LinkIdentity, link_identity)
    router.add(api.UnlinkIdentity, unlink_identity)

    # -- tokens and consent -------------------------------------------------------------------

    async def register_token(ctx: CallContext, req: api.RegisterToken) -> api.TokenRegistered:
        token = _check_apns_token(req.platform, req.token)
        registration, created, moved_from, evicted = await store.write(
            store_ops.register_token, req.identity, req.app, req.platform, token
        )
        return api.TokenRegistered(
            registration=api.Registration(
                app=registration.app,
                platform=registration.platform,
                token=registration.token,
                first_seen=from_us(registration.first_seen),
                last_seen=from_us(registration.last_seen),
            ),
            created_profile=created,
            moved_from=moved_from,
            evicted=[registration_to_api(r) for r in evicted],
        )

    async def unregister_token(ctx: CallContext, req: api.UnregisterToken) -> api.TokenUnregistered:
        identity = await store.write(store_ops.unregister_token, req.app, req.token)
        return api.TokenUnregistered(identity=identity)

    async def set_consent(ctx: CallContext, req: api.SetConsent) -> api.ConsentEntry:
        entry = await store.write(store_ops.set_consent, req.identity, req.app, req.push)
        return api.ConsentEntry(push=entry.push, updated=from_us(entry.updated))

    router.add(api.RegisterToken, register_token)
    router.add(api.UnregisterToken, unregister_token)
    router.add(api.SetConsent, set_consent)

    # -- events -------------------------------------------------------------------------------

    async def ingest(ctx: CallContext, req: None) -> api.IngestResult:
        return await server.ingestion.ingest(ctx.body)

    async def list_events(ctx: CallContext, req: api.ListEvents, send: Any) -> None:
        # events past the retention window are not listed, swept or not yet
        oldest = store.clock() - store.retention_us
        since = max(oldest, 0 if req.since is None else to_us(req.since))
        until = _END_OF_TIME_US - 1 if req.until is None else to_us(req.until)
        if until < since:
            store.get_profile(req.identity)  # NOT_FOUND and the identity checks, as for any range
            return  # an empty range (events are never older than 1970)
        remaining = req.limit
        after: tuple[int, int] | None = None
        while remaining > 0:
            page, after = store.read_events(
                req.identity, after=after, since_us=since, until_us=until, reverse=req.reverse, limit=_PAGE,
                max_bytes=_PAGE_BYTES,
            )
            for seq, ts, record in page:
                if req.type is not None and record.type != req.type:
                    continue
                await send(api.StoredEvent(seq=seq, type=record.type, ts=from_us(ts), data=record.data))
                remaining -= 1
                if remaining == 0:
                    return
            if after is None:
                return

    router.add(api.IngestEvents, ingest, raw=True)
    router.add(api.ListEvents, list_events)

    # -- apps -----------------------------------------------------------------------------------

    def channel_for_apps(platform: str) -> Any:
        for channel in server.channels:
            if getattr(channel, "app_platform", None) == platform:
                return channel
        raise FailedPrecondition(f"no channel plugin handles {platform} apps (is it disabled?)")

    def require_app(app: str) -> AppRecord:
        record = store.get_app(app)
        if record is None:
            raise NotFound(f"no app {app!r} is registered (pigeon apps register-ios or register-android ...)", field="$.app")
        return record

    async def store_credentials(app: str, **credentials: Any) -> AppRecord:
        """Store an app's credentials for one platform (``ios=`` or ``android=``), keeping the
        other's, and let the channels retire what they built from the old ones."""
        existing = store.get_app(app)
        record = AppRecord(app=app, **credentials) if existing is None else msgspec.structs.replace(existing, **credentials)
        stored = await store.write(store_ops.put_app, record)
        for channel in server.channels:
            channel.forget_app(app, stored.version)
        return stored

    async def register_ios(ctx: CallContext, req: api.RegisterIosApp) -> api.AppInfo:
        ios = channel_for_apps("ios").check_app(req)
        stored = await store_credentials(req.app, ios=ios)
        log.info("app %s: iOS credentials registered (%s auth, %s)", req.app, ios.auth, ios.environment)
        return stored.info()

    async def register_android(ctx: CallContext, req: api.RegisterAndroidApp) -> api.AppInfo:
        android = channel_for_apps("android").check_app(req)
        stored = await store_credentials(req.app, android=android)
        log.info("app %s: Android credentials registered (project %s)", req.app, android.project_id)
        return stored.info()

    async def get_app(ctx: CallContext, req: api.GetApp) -> api.AppInfo:
        return require_app(req.app).info()

    async def list_apps(ctx: CallContext, req: api.ListApps) -> api.AppList:
        return api.AppList(apps=[record.info() for record in store.list_apps()])

    async def delete_app(ctx: CallContext, req: api.DeleteApp) -> api.AppDeleted:
        await store.write(store_ops.delete_app, req.app)
        for channel in server.channels:
            channel.forget_app(req.app, None)
        return api.AppDeleted(app=req.app)

    router.add(api.RegisterIosApp, register_ios)
    router.add(api.RegisterAndroidApp, register_android)
    router.add(api.GetApp, get_app)
    router.add(api.ListApps, list_apps)
    router.add(api.DeleteApp, delete_app)

    # -- push -----------------------------------------------------------------------------------

    async def push_send(ctx: CallContext, req: api.SendPush) -> api.PushSent:
        if (req.token is None) == (req.identity is None):
            raise InvalidArgument("give either a token (with its platform) or an identity", field="$.token")
        if req.content is not None and (req.raw is not None or req.fcm_raw is not None):
            raise InvalidArgument("give content, or raw payloads (raw for APNs, fcm_raw for FCM), not both", field="$.content")
        if req.content is None and req.raw is None and req.fcm_raw is None:
            raise InvalidArgument("give content, or a raw payload (raw for APNs, fcm_raw for FCM)", field="$.content")
        app = require_app(req.app)
        if req.token is not None:
            if req.platform is None:
                raise InvalidArgument("a token needs its platform (apns, apns-sandbox or fcm)", field="$.platform")
            token = _check_apns_token(req.platform, req.token)
            keys.token_key(req.app, token)  # the same length limit as registered tokens
            targets = [(token, req.platform)]
        else:
            assert req.identity is not None
            registrations = [
                r for r in store.get_profile(req.identity).registrations
                if r.app == req.app and (req.platform is None or r.platform == req.platform)
            ]
            targets = [(r.token, r.platform) for r in registrations if r.state == "active"]
            if not targets:
                excluded = "OnlyInvalidTokens" if registrations else "NoTokenForApp"
                where = ("", 0, "", "", req.app, req.platform or "")
                await server.reporting.record_counts({(*where, "targeted", ""): 1, (*where, "excluded", excluded): 1})
                return api.PushSent(outcomes=[], excluded=excluded)
        jobs = [
            DeliveryJob(
                app=app, token=token, platform=platform, content=req.content, raw=req.raw, fcm_raw=req.fcm_raw,
                apns=req.apns, fcm=req.fcm,
            )
            for token, platform in targets
        ]
        # Counted as messages.send counts (targeted, then sent and the outcome), under no
        # message, even if this call is cancelled meanwhile.
        results = await server.delivery.deliver(jobs, count=True)
        return api.PushSent(
            outcomes=[
                api.PushOutcome(
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
                for (token, platform), result in zip(targets, results)
            ]
        )

    router.add(api.SendPush, push_send)

    # -- channel configurations and messages --------------------------------------------------

    compiled_cache: dict[tuple[str, int], messages.Compiled] = {}

    def compiled(record: messages.MessageRecord) -> messages.Compiled:
        key = (record.message.id, record.version)
        found = compiled_cache.get(key)
        if found is None:
            if len(compiled_cache) >= 1024:
                compiled_cache.clear()
            found = compiled_cache[key] = messages.Compiled(record)
        return found

    def get_config(name: str, version: int | None = None, field: str = "$.name") -> messages.ConfigRecord:
        value = store.get_version("configs", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}channel configuration {name!r} is published (pigeon configs publish FILE)", field=field)
        return messages.decode_config(value)

    def get_message(name: str, version: int | None = None) -> messages.MessageRecord:
        value = store.get_version("messages", name, version)
        if value is None:
            what = f"version {version} of " if version is not None else ""
            raise NotFound(f"no {what}message {name!r} is published (pigeon messages publish FILE)", field="$.id")
        return messages.decode_message(value)

    async def publish_config(ctx: CallContext, req: api.PublishConfig) -> api.ConfigInfo:
        config = req.config
        for i, app in enumerate(config.apps):
            if store.get_app(app) is None:
                raise NotFound(f"no app {app!r} is registered (pigeon apps register-ios or register-android ...)",
                               field=f"$.config.apps[{i}]")
        published = store.clock()

        def encode(version: int) -> bytes:
            return messages.encode(messages.ConfigRecord(config=config, version=version, published_us=published))

        version = await store.write(store_ops.publish_version, "configs", config.name, encode)
        log.info("channel configuration %s: version %d published", config.name, version)
        return messages.ConfigRecord(config=config, version=version, published_us=published).info()

    async def config_get(ctx: CallContext, req: api.GetConfig) -> api.ConfigInfo:
        return get_config(req.name, req.version).info()

    async def configs_list(ctx: CallContext, req: api.ListConfigs) -> api.ConfigList:
        return api.ConfigList(configs=[messages.decode_config(v).info() for v in store.list_latest("configs")])

    async def publish_message(ctx: CallContext, req: api.PublishMessage) -> api.MessageInfo:
        spec = req.message
        get_config(spec.channel, field="$.message.channel")
        draft = messages.MessageRecord(message=spec, version=0, published_us=store.clock())
        check = messages.Compiled(draft)  # raises TemplateSyntax naming the field, line and column
        draft.templates = check.templates

        def encode(version: int) -> bytes:
            draft.version = version
            return messages.encode(draft)

        draft.version = await store.write(store_ops.publish_version, "messages", spec.id, encode)
        log.info("message %s: version %d published (%d templates)", spec.id, draft.version, len(draft.templates))
        return draft.info()

    async def message_get(ctx: CallContext, req: api.GetMessage) -> api.MessageInfo:
        return get_message(req.id, req.version).info()

    async def messages_list(ctx: CallContext, req: api.ListMessages) -> api.MessageList:
        return api.MessageList(messages=[messages.decode_message(v).info() for v in store.list_latest("messages")])

    async def preview(ctx: CallContext, req: api.PreviewMessage) -> api.Preview:
        if (req.identity is None) == (req.profile is None):
            raise InvalidArgument("give either an identity or a sample profile", field="$.identity")
        record = get_message(req.id, req.version)
        spec = record.message
        if req.identity is not None:
            profile = store.get_profile(req.identity)
            attributes, identities, audiences = profile.attributes, profile.identities, []
        else:
            sample = dict(req.profile or {})
            identities = [str(i) for i in sample.pop("identities", [])] if isinstance(sample.get("identities"), list) else []
            audiences = [str(a) for a in sample.pop("audiences", [])] if isinstance(sample.get("audiences"), list) else []
            attributes = sample
        context = messages.context_for(attributes=attributes, identities=identities, audiences=audiences,
                                       event=req.event, message=spec, version=record.version)
        result = api.Preview(id=spec.id, version=record.version)
        try:
            content = compiled(record).render(context)
        except InvalidArgument as exc:
            result.excluded = messages.exclusion(exc)
            result.detail = exc.message
            return result
        rendered_message = messages.to_delivery(spec, content)
        config = get_config(spec.channel, field="$.id").config
        tracking = {"m": spec.id, "v": record.version, "x": "preview"}
        for app in config.apps:
            app_record = store.get_app(app) or AppRecord(app=app)
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

    async def send_message(ctx: CallContext, req: api.SendMessage) -> api.SendResult:
        if bool(req.identities) == (req.audience is not None):
            raise InvalidArgument("give either identities or an audience", field="$.identities")
        record = get_message(req.id, req.version)
        config = get_config(record.message.channel, field="$.id").config
        audience = templates.compile_condition("$.audience", req.audience) if req.audience is not None else None
        run = pipeline.Pipeline(server, record, compiled(record), config, event=req.event, test=req.test,
                                identities=req.identities, audience=req.audience)
        # The execution runs in the server, not in this call: a client that goes away does
        # not stop it, and the reply waits for it.
        result = await server.run_in_background(run.run, audience)
        log.info("message %s v%d execution %s: %d targeted, %d sent, %d delivered", result.message, result.version,
                 result.execution, result.targeted, result.sent, result.delivered)
        return result

    async def report(ctx: CallContext, req: api.GetReport) -> api.Report:
        return server.reporting.report(req)

    async def watch_report(ctx: CallContext, req: api.WatchReport, send: Any) -> None:
        # Until the client cancels, or the server stops (the stream then ends normally).
        reporting = server.reporting
        last = None
        while not server.stopping:
            seen = reporting.changes
            report = reporting.report(req)
            if report != last:  # counts of other messages changed: nothing to send
                await send(report)
                last = report
            with trio.move_on_after(req.interval_s):
                await server.wait_stopping()
            if reporting.changes == seen and not server.stopping:
                await reporting.changed.wait()

    router.add(api.GetReport, report)
    router.add(api.WatchReport, watch_report)
    router.add(api.SendMessage, send_message)
    router.add(api.PublishConfig, publish_config)
    router.add(api.GetConfig, config_get)
    router.add(api.ListConfigs, configs_list)
    router.add(api.PublishMessage, publish_message)
    router.add(api.GetMessage, message_get)
    router.add(api.ListMessages, messages_list)
    router.add(api.PreviewMessage, preview)
    return router
