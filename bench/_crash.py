"""Shared by the crash scenarios (`bench.chaos`, `bench.journey_crash`, and the outbox tests):
the mock FCM and a ``pigeon serve`` process that delivers to it, a SIGKILL, and what a start
delivered again.

A start delivers again what the last stop or kill left in the outbox, and logs it (the pipeline's
"delivering N notifications again"); `redeliveries` reads those lines from a server's log.
"""

from __future__ import annotations

import re
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.trio_client import Client
from server.testing import ServerProcess

__all__ = ["REPLAYING", "redeliveries", "replays", "fcm_and_server", "sigkill", "successes", "wait_for_delivery",
           "register_tokens"]

#: The line a start logs for what it delivers again.
REPLAYING = re.compile(r"delivering (\d+) notifications again")


def redeliveries(log: list[str]) -> list[int]:
    """The notifications each start in ``log`` delivered again, in order."""
    return [int(m.group(1)) for line in log if (m := REPLAYING.search(line))]


def replays(log: list[str]) -> int:
    """What the starts in ``log`` delivered again, in all."""
    return sum(redeliveries(log))


@asynccontextmanager
async def fcm_and_server(folder: Path, account: ServiceAccount, project: str,
                         latency_ms: int) -> AsyncIterator[tuple[MockFcmProcess, ServerProcess]]:
    """The mock FCM (project ``project`` with ``account``, accepting any token, each answer
    ``latency_ms`` late) in ``folder/fcm``, and a started server on ``folder/data`` that
    delivers to it; the server is killed on the way out (a clean stop is the caller's)."""
    config = {"projects": {project: {"service_accounts": [account.spec()]}}}
    with MockFcmProcess(folder / "fcm", config=config) as mock:
        mock.admin.set_faults(accept_any_token=True, latency_ms=latency_ms)
        env = {"PIGEON_FCM__URL": mock.url, "PIGEON_FCM__TOKEN_URI": mock.token_uri,
               "PIGEON_FCM__CA_FILE": str(mock.ca_file)}
        server = ServerProcess(folder / "data", env=env)
        server.start()
        try:
            yield mock, server
        finally:
            server.kill()


async def sigkill(server: ServerProcess) -> None:
    """Kill the server with SIGKILL, and wait until it is gone."""
    server.signal(signal.SIGKILL)
    await trio.to_thread.run_sync(server.wait)


def successes(mock: MockFcmProcess) -> int:
    """The messages the mock FCM accepted so far."""
    return int(mock.admin.stats()["successes"])


async def wait_for_delivery(mock: MockFcmProcess, beyond: int, timeout: float) -> bool:
    """Wait until the mock FCM accepted more than ``beyond`` (False: not within ``timeout``):
    a kill after this falls in a delivery."""
    with trio.move_on_after(timeout):
        while await trio.to_thread.run_sync(successes, mock) <= beyond:
            await trio.sleep(0.01)
        return True
    return False


async def register_tokens(client: Client, app: str, profiles: int) -> None:
    """Profiles ``crm:0`` ... with the FCM token ``tok-0`` ... for ``app``, 20 calls at a time."""

    async def register(start: int) -> None:
        for i in range(start, profiles, 20):
            await client.call(api.RegisterToken(identity=f"crm:{i}", app=app, platform="fcm", token=f"tok-{i}"))

    async with trio.open_nursery() as nursery:
        for start in range(20):
            nursery.start_soon(register, start)
