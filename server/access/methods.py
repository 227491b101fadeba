"""The access methods (admin scope): ``keys.create``, ``keys.list`` and ``keys.revoke``, in the
caller's sandbox; ``sandboxes.create`` and ``sandboxes.list``, and the keys of other sandboxes,
for admin keys of sandbox ``default`` (the organization's own: `server.profiles.sandboxes`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from protocols import api
from protocols.errors import Status
from server.api.registry import CallContext, Methods
from server.profiles import sandboxes
from server.runtime.errors import PermissionDenied
from server.runtime.values import from_us

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

log = logging.getLogger("pigeon.access")

methods = Methods()


def _sandbox(ctx: CallContext, asked: str | None, what: str) -> str:
    """The sandbox a key method works on: the caller's, or the one it names if it may."""
    if asked is None or asked == ctx.sandbox:
        return ctx.sandbox
    if ctx.sandbox != sandboxes.DEFAULT:
        raise PermissionDenied(f"{what} in another sandbox needs an admin key of sandbox default", field="$.sandbox")
    return asked


@methods(api.CreateKey, scope="admin")
async def create_key(server: Server, ctx: CallContext, req: api.CreateKey) -> api.CreatedKey:
    sandbox = _sandbox(ctx, req.sandbox, "making a key")
    key, record = await server.access.create(list(req.scopes), req.name, sandbox)
    log.info("API key %s created (%s, sandbox %s) by %s", record.id, ", ".join(record.scopes), sandbox, ctx.peer)
    return api.CreatedKey(key=key, info=record.info())


@methods(api.ListKeys, scope="admin")
async def list_keys(server: Server, ctx: CallContext, req: api.ListKeys) -> api.KeyList:
    sandbox = _sandbox(ctx, req.sandbox, "listing keys")
    return api.KeyList(keys=[record.info() for record in server.access.list(sandbox)])


@methods(api.RevokeKey, scope="admin")
async def revoke_key(server: Server, ctx: CallContext, req: api.RevokeKey) -> api.KeyRevoked:
    # An admin of sandbox default revokes any key; another admin only its sandbox's.
    record = await server.access.revoke(req.id, None if ctx.sandbox == sandboxes.DEFAULT else ctx.sandbox)
    closed = server.listener.close_key(record.id, Status.UNAUTHENTICATED, "the API key of this connection was revoked")
    log.info("API key %s revoked by %s (%d connections closed)", record.id, ctx.peer, closed)
    return api.KeyRevoked(id=record.id, connections_closed=closed)


def _organization(ctx: CallContext) -> None:
    if ctx.sandbox != sandboxes.DEFAULT:
        raise PermissionDenied("sandboxes are managed with an admin key of sandbox default")


@methods(api.CreateSandbox, scope="admin")
async def create_sandbox(server: Server, ctx: CallContext, req: api.CreateSandbox) -> api.SandboxInfo:
    _organization(ctx)
    record = await server.store.write(sandboxes.create_sandbox, req.name)
    log.info("sandbox %s created by %s", record.name, ctx.peer)
    return _info(record)


@methods(api.ListSandboxes, scope="admin")
async def list_sandboxes(server: Server, ctx: CallContext, req: api.ListSandboxes) -> api.SandboxList:
    _organization(ctx)
    return api.SandboxList(sandboxes=[_info(space.record) for space in server.store.spaces()])


def _info(record: sandboxes.SandboxRecord) -> api.SandboxInfo:
    return api.SandboxInfo(name=record.name, created=from_us(record.created_us))
