"""The key methods: ``keys.create``, ``keys.list`` and ``keys.revoke`` (admin scope)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocols import api
from protocols.errors import Status
from server.api.registry import CallContext, Methods

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

log = logging.getLogger("pigeon.access")

methods = Methods()


@methods(api.CreateKey, scope="admin")
async def create_key(server: Server, ctx: CallContext, req: api.CreateKey) -> api.CreatedKey:
    key, record = await server.access.create(list(req.scopes), req.name)
    log.info("API key %s created (%s) by %s", record.id, ", ".join(record.scopes), ctx.peer)
    return api.CreatedKey(key=key, info=record.info())


@methods(api.ListKeys, scope="admin")
async def list_keys(server: Server, ctx: CallContext, req: api.ListKeys) -> api.KeyList:
    return api.KeyList(keys=[record.info() for record in server.access.list()])


@methods(api.RevokeKey, scope="admin")
async def revoke_key(server: Server, ctx: CallContext, req: api.RevokeKey) -> api.KeyRevoked:
    record = await server.access.revoke(req.id)
    closed = server.listener.close_key(record.id, Status.UNAUTHENTICATED, "the API key of this connection was revoked")
    log.info("API key %s revoked by %s (%d connections closed)", record.id, ctx.peer, closed)
    return api.KeyRevoked(id=record.id, connections_closed=closed)
