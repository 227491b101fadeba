"""The server's own methods: ``server.health``, ``server.stats`` and ``secrets.rotate``."""

from __future__ import annotations

import os
import resource
import time
from typing import TYPE_CHECKING

from protocols import api
from protocols.frames import PROTOCOL_VERSION
from server.api.registry import CallContext, Methods
from server.profiles import sealing
from server.profiles.records import SCHEMA_VERSION
from server.profiles.sandboxes import DEFAULT
from server.runtime.errors import ActorError, PermissionDenied

if TYPE_CHECKING:
    from server.runtime.app import Server

__all__ = ["methods"]

methods = Methods()


@methods(api.GetHealth, scope="public")
async def health(server: Server, ctx: CallContext, req: api.GetHealth) -> api.Health:
    return api.Health(
        status="stopping" if server.stopping else "serving",
        version=server.version,
        protocol=PROTOCOL_VERSION,
        uptime_s=time.monotonic() - server.started_at,
    )


@methods(api.RotateSecrets, scope="admin")
async def rotate_secrets(server: Server, ctx: CallContext, req: api.RotateSecrets) -> api.SecretsRotated:
    if ctx.sandbox != DEFAULT:  # the master key seals every sandbox's secrets
        raise PermissionDenied("the master key is rotated with an admin key of sandbox default")
    # In the server's nursery: a caller that goes away does not stop it half-way (which would
    # be safe, but leave the old key in the file until the next start).
    done = await server.run_in_background(sealing.rotate, server.store)
    return api.SecretsRotated(resealed=done.resealed, fingerprint=done.fingerprint, key_file=done.key_file)


@methods(api.GetStats, scope="read")
async def stats(server: Server, ctx: CallContext, req: api.GetStats) -> api.Stats:
    return api.Stats(
        version=server.version,
        uptime_s=time.monotonic() - server.started_at,
        process=_process_stats(),
        actors=_actor_stats(server, details=ctx.sandbox == DEFAULT),
        connections=server.listener.connection_stats(),
        methods={name: m.snapshot() for name, m in sorted(server.listener.method_stats.items())},
        store=_store_stats(server, ctx.sandbox),
    )


def _actor_stats(server: Server, *, details: bool) -> list[api.ActorStats]:
    """Each actor's state, and its details (which name apps and counts of every sandbox) for
    callers of sandbox ``default``."""
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
                details=s.details if details else {},
            )
        )
    return actors


def _store_stats(server: Server, sandbox: str) -> api.StoreStats | None:
    """The store's figures: the map's, and the counts of ``sandbox`` 's records."""
    store = server.store
    try:
        counts = store.counts() | store.space(sandbox).counts()
    except ActorError:
        return None  # the store is restarting: the actors' states matter most now
    return api.StoreStats(
        path=str(store.path),
        schema_version=SCHEMA_VERSION,
        map_size=counts["map_size"],
        used_bytes=counts["used_bytes"],
        profiles=counts["profiles"],
        identities=counts["identities"],
        tokens=counts["tokens"],
        events=counts["events"],
        commits=store.commits,
        writes=store.writes,
        map_resizes=store.map_resizes,
    )


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
