"""The profile methods: ``profiles.*``, ``tokens.*``, ``consent.set`` and ``events.*``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import msgspec.structs

from protocols import api
from server.api.registry import CallContext, Methods
from server.profiles import writes
from server.profiles.keys import normalize_token
from server.profiles.records import profile_to_api, registration_to_api
from server.runtime.errors import NotFound
from server.runtime.values import from_us, to_us

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

methods = Methods()

_END_OF_TIME_US = 2**63 - 1
_PAGE = 256
#: Bytes of events a page of events.list holds at most (and one event more).
_PAGE_BYTES = 16 * 1024


@methods(api.GetProfile, scope="operator")
async def get_profile(server: Server, ctx: CallContext, req: api.GetProfile) -> api.Profile:
    return profile_to_api(server.space(ctx).get_profile(req.identity))


@methods(api.UpsertProfile, scope="operator")
async def upsert_profile(server: Server, ctx: CallContext, req: api.UpsertProfile) -> api.Profile:
    return profile_to_api(await server.space(ctx).write(writes.upsert_profile, req.identity, req.attributes))


@methods(api.PatchProfile, scope="operator")
async def patch_profile(server: Server, ctx: CallContext, req: api.PatchProfile) -> api.Profile:
    return profile_to_api(await server.space(ctx).write(writes.patch_profile, req.identity, req.patch, req.create))


@methods(api.DeleteProfile, scope="operator")
async def delete_profile(server: Server, ctx: CallContext, req: api.DeleteProfile) -> api.ProfileDeleted:
    identities, registrations, events = await server.space(ctx).write(writes.delete_profile, req.identity)
    return api.ProfileDeleted(identities=identities, registrations=registrations, events=events)


@methods(api.LinkIdentity, scope="operator")
async def link_identity(server: Server, ctx: CallContext, req: api.LinkIdentity) -> api.Profile:
    return profile_to_api(await server.space(ctx).write(writes.link_identity, req.identity, req.link))


@methods(api.UnlinkIdentity, scope="operator")
async def unlink_identity(server: Server, ctx: CallContext, req: api.UnlinkIdentity) -> api.Profile:
    return profile_to_api(await server.space(ctx).write(writes.unlink_identity, req.identity))


@methods(api.RegisterToken, scope="ingest")
async def register_token(server: Server, ctx: CallContext, req: api.RegisterToken) -> api.TokenRegistered:
    token = normalize_token(req.platform, req.token)
    registration, created, moved_from, evicted = await server.space(ctx).write(
        writes.register_token, req.identity, req.app, req.platform, token
    )
    registered = api.Registration(
        app=registration.app,
        platform=registration.platform,  # type: ignore[arg-type]  # stored as text, checked when registered
        token=registration.token,
        first_seen=from_us(registration.first_seen),
        last_seen=from_us(registration.last_seen),
    )
    if "operator" not in ctx.scopes:
        # An ingest key (the key an app embeds) reads nothing: not whose the token was (nor
        # since when), whether the profile existed, or the tokens this one pushed out.
        return api.TokenRegistered(registration=msgspec.structs.replace(registered, first_seen=registered.last_seen))
    return api.TokenRegistered(
        registration=registered,
        created_profile=created,
        moved_from=moved_from,
        evicted=[registration_to_api(r) for r in evicted],
    )


@methods(api.UnregisterToken, scope="ingest")
async def unregister_token(server: Server, ctx: CallContext, req: api.UnregisterToken) -> api.TokenUnregistered:
    if "operator" not in ctx.scopes:
        # An ingest key learns neither whose the token was nor whether anyone had it.
        try:
            await server.space(ctx).write(writes.unregister_token, req.app, req.token)
        except NotFound:
            pass
        return api.TokenUnregistered(identity="")
    identity = await server.space(ctx).write(writes.unregister_token, req.app, req.token)
    return api.TokenUnregistered(identity=identity)


@methods(api.SetConsent, scope="ingest")
async def set_consent(server: Server, ctx: CallContext, req: api.SetConsent) -> api.ConsentEntry:
    entry = await server.space(ctx).write(writes.set_consent, req.identity, req.app, req.push)
    return api.ConsentEntry(push=entry.push, updated=from_us(entry.updated))  # type: ignore[arg-type]  # stored as text


@methods(api.IngestEvents, scope="ingest", raw=True)
async def ingest(server: Server, ctx: CallContext, req: None) -> api.IngestResult:
    return await server.ingestion.ingest(ctx.body, server.space(ctx))


@methods(api.ListEvents, scope="operator")
async def list_events(
    server: Server, ctx: CallContext, req: api.ListEvents, send: Callable[[api.StoredEvent], Awaitable[None]]
) -> None:
    store = server.space(ctx)
    # events past the retention window are not listed, swept or not yet
    oldest = store.clock() - server.store.retention_us
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
            # the stored data as it is (encoded MessagePack of the map: msgspec writes it unchanged)
            data = record.data
            await send(api.StoredEvent(seq=seq, type=record.type, ts=from_us(ts), data=data))  # type: ignore[arg-type]
            remaining -= 1
            if remaining == 0:
                return
        if after is None:
            return
