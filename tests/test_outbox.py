"""Crash in the middle of a 10,000-profile send (kill -9), restart: every profile is sent at
least once, the duplicates are bounded by what was staged, and counted as ``replayed``.

A real server process on a real data folder, the mock FCM (in its own process) with a delay
on each answer so that the send is still going when the server is killed."""

from __future__ import annotations

import signal
import time

import trio

from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import open_client
from server._pipeline import BATCH, IN_FLIGHT
from server.testing import ServerProcess

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-push")
PROFILES = 10_000


async def _setup(address: str, mock: MockFcmProcess) -> None:
    async with open_client(address) as client:
        await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(mock.token_uri)))
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="all", apps=[APP], platforms=["android"])))
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id="sale", channel="all", content=api.MessageContent(title="Hi {{ profile.n }}"))))

        async def register(start: int) -> None:
            for i in range(start, PROFILES, 50):
                await client.call(api.UpsertProfile(identity=f"crm:{i}", attributes={"n": i}))
                await client.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform="fcm", token=f"tok-{i}"))

        async with trio.open_nursery() as nursery:
            for start in range(50):
                nursery.start_soon(register, start)


async def _send(address: str) -> None:
    try:
        async with open_client(address) as client:
            await client.call(api.SendMessage(id="sale", identities=[f"crm:{i}" for i in range(PROFILES)]))
    except (PigeonProtocolError, OSError):
        pass  # the server is killed under it


async def _report(address: str) -> api.Report:
    async with open_client(address) as client:
        return await client.call(api.GetReport(message="sale"))


def _successes(mock: MockFcmProcess) -> int:
    return mock.admin.stats()["successes"]


async def test_a_send_killed_midway_resumes_after_the_restart_with_bounded_duplicates(tmp_path):
    with MockFcmProcess(tmp_path / "fcm", config={"projects": {"acme-push": {"service_accounts": [ACCOUNT.spec()]}}}) as mock:
        mock.admin.set_faults(accept_any_token=True, latency_ms=40)
        env = {"PIGEON_FCM__URL": mock.url, "PIGEON_FCM__TOKEN_URI": mock.token_uri, "PIGEON_FCM__CA_FILE": str(mock.ca_file)}
        server = ServerProcess(tmp_path / "data", env=env)
        server.start()
        try:
            await _setup(server.address, mock)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, server.address)
                with trio.fail_after(60):
                    while await trio.to_thread.run_sync(_successes, mock) < 2_000:
                        await trio.sleep(0.05)
                server.signal(signal.SIGKILL)  # in the middle of the send
                server.wait()
            killed_at = _successes(mock)
            assert killed_at < PROFILES, "the send finished before the kill: nothing tested"
            server.start()  # the same data folder: replay the outbox, resume the send
            deadline = time.monotonic() + 120
            while len({a["token"] for a in mock.admin.accepted()}) < PROFILES:
                assert time.monotonic() < deadline, f"only {_successes(mock)} sent after the restart"
                await trio.sleep(0.2)
            # The replayed notifications were counted before they went out again.
            report = await _report(server.address)
        finally:
            server.kill()
        accepted = [a["token"] for a in mock.admin.accepted()]
    assert set(accepted) == {f"tok-{i}" for i in range(PROFILES)}
    duplicates = len(accepted) - PROFILES
    replayed = report.totals.get("replayed", 0)  # none if the kill fell between two batches
    # At most the batches in flight (4 of 500 profiles) were staged and unsettled when the
    # server died; every one of those was delivered again, whether or not it had reached FCM.
    assert 0 <= duplicates <= replayed <= BATCH * IN_FLIGHT
    assert (replayed > 0) == any("delivering" in line and "again" in line for line in server.log)
