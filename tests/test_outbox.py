"""Crashes in the middle of a send (kill -9), restarts: every profile is sent at least once,
the duplicates are bounded by what was staged, and counted as ``replayed``; however many
crashes, at whatever moment, the reports count each targeted notification once and give it
one outcome.

A real server process on a real data folder, the mock FCM (in its own process) with a delay
on each answer so that the send is still going when the server is killed."""

from __future__ import annotations

import signal
import time

import trio

from bench._crash import redeliveries
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import open_client
from server.messages.pipeline import BATCH, IN_FLIGHT
from server.testing import ServerProcess

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-push")
PROFILES = 10_000


async def _setup(address: str, mock: MockFcmProcess, profiles: int = PROFILES, no_token: int = 0,
                 sandbox: str | None = None) -> None:
    """The app, its configuration, the message ``sale`` and ``profiles`` profiles ``crm:<i>``
    with the token ``tok-<i>`` (none for every ``no_token`` th one, from the first), in
    ``sandbox`` (made if need be)."""
    if sandbox is not None:
        async with open_client(address) as client:
            await client.call(api.CreateSandbox(name=sandbox))
    async with open_client(address, sandbox=sandbox) as client:
        await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(mock.token_uri)))
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="all", apps=[APP], platforms=["android"])))
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id="sale", channel="all", content=api.MessageContent(title="Hi {{ profile.n }}"))))

        async def register(start: int) -> None:
            for i in range(start, profiles, 50):
                await client.call(api.UpsertProfile(identity=f"crm:{i}", attributes={"n": i}))
                if not (no_token and i % no_token == 0):
                    await client.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform="fcm", token=f"tok-{i}"))

        async with trio.open_nursery() as nursery:
            for start in range(50):
                nursery.start_soon(register, start)


async def _send(address: str, audience: str | None = None, sandbox: str | None = None) -> None:
    try:
        async with open_client(address, sandbox=sandbox) as client:
            if audience is None:
                await client.call(api.SendMessage(id="sale", identities=[f"crm:{i}" for i in range(PROFILES)]))
            else:
                await client.call(api.SendMessage(id="sale", audience=audience))
    except (PigeonProtocolError, OSError):
        pass  # the server is killed under it


async def _report(address: str, sandbox: str | None = None) -> api.Report:
    async with open_client(address, sandbox=sandbox) as client:
        return await client.call(api.GetReport(message="sale"))


def _successes(mock: MockFcmProcess) -> int:
    return mock.admin.stats()["successes"]


async def test_a_send_killed_midway_resumes_after_the_restart_with_bounded_duplicates(tmp_path):
    """In sandbox dev: the restart replays and resumes every sandbox's sends in their own."""
    with MockFcmProcess(tmp_path / "fcm", config={"projects": {"acme-push": {"service_accounts": [ACCOUNT.spec()]}}}) as mock:
        mock.admin.set_faults(accept_any_token=True, latency_ms=40)
        env = {"PIGEON_FCM__URL": mock.url, "PIGEON_FCM__TOKEN_URI": mock.token_uri, "PIGEON_FCM__CA_FILE": str(mock.ca_file)}
        server = ServerProcess(tmp_path / "data", env=env)
        server.start()
        try:
            await _setup(server.address, mock, sandbox="dev")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, server.address, None, "dev")
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
            report = await _report(server.address, "dev")
            assert (await _report(server.address)).totals == {}  # nothing of it in sandbox default
        finally:
            server.kill()
        accepted = [a["token"] for a in mock.admin.accepted()]
    assert set(accepted) == {f"tok-{i}" for i in range(PROFILES)}
    duplicates = len(accepted) - PROFILES
    replayed = report.totals.get("replayed", 0)  # none if the kill fell between two batches
    # At most the batches in flight (4 of 500 profiles) were staged and unsettled when the
    # server died; every one of those was delivered again, whether or not it had reached FCM.
    assert 0 <= duplicates <= replayed <= BATCH * IN_FLIGHT
    assert (replayed > 0) == bool(redeliveries(server.log))


MANY = 20_000
NO_TOKEN = 20  # every 20th profile has no token: excluded (NoTokenForApp)


async def _accepted_reach(mock: MockFcmProcess, count: int) -> None:
    with trio.fail_after(40):
        while await trio.to_thread.run_sync(_successes, mock) < count:
            await trio.sleep(0.02)


async def _replaying(server: ServerProcess) -> int:
    """How many notifications the server, just started, delivers again (from its log)."""
    with trio.fail_after(10):
        while not (found := redeliveries(server.log)):
            await trio.sleep(0.01)
    return found[0]


async def _settled(address: str, mock: MockFcmProcess, tokens: set[str]) -> api.Report:
    """The report once every token was accepted and nothing moves any more (1 s)."""
    last: tuple[int, api.Report] | None = None
    with trio.fail_after(60):
        while True:
            await trio.sleep(0.5)
            now = (await trio.to_thread.run_sync(_successes, mock), await _report(address))
            if now == last and now[0] >= len(tokens):
                accepted = await trio.to_thread.run_sync(mock.admin.accepted)
                if tokens <= {a["token"] for a in accepted}:
                    return now[1]
            last = now


async def test_three_kills_during_a_send_keep_the_books_exact_and_the_duplicates_bounded(tmp_path):
    """The second kill comes while the server delivers again what the first left in the
    outbox (half of it accepted again), the third in the resumed send."""
    tokens = {f"tok-{i}" for i in range(MANY) if i % NO_TOKEN}
    with MockFcmProcess(tmp_path / "fcm", config={"projects": {"acme-push": {"service_accounts": [ACCOUNT.spec()]}}}) as mock:
        mock.admin.set_faults(accept_any_token=True, latency_ms=40)
        env = {"PIGEON_FCM__URL": mock.url, "PIGEON_FCM__TOKEN_URI": mock.token_uri, "PIGEON_FCM__CA_FILE": str(mock.ca_file)}
        server = ServerProcess(tmp_path / "data", env=env)
        server.start()
        log: list[str] = []
        try:
            await _setup(server.address, mock, MANY, no_token=NO_TOKEN)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_send, server.address, "true")
                await _accepted_reach(mock, 4_000)
                server.signal(signal.SIGKILL)
                server.wait()
            for kill in ("in the replay", "in the resumed send"):
                log += server.log
                before = _successes(mock)
                server.start()  # the outbox delivered again, then the send resumed
                replaying = await _replaying(server)
                await _accepted_reach(mock, before + (replaying // 2 if kill == "in the replay" else replaying + 3_000))
                server.signal(signal.SIGKILL)
                server.wait()
            log += server.log
            server.start()
            assert _successes(mock) < len(tokens), "the send finished before the last kill: nothing tested"
            report = await _settled(server.address, mock, tokens)
        finally:
            server.kill()
            log += server.log
        accepted = [a["token"] for a in mock.admin.accepted()]
    in_flight = redeliveries(log)
    totals = report.totals
    replayed, duplicates = totals.get("replayed", 0), len(accepted) - len(tokens)
    print(f"three kills: {totals}, provider accepted {len(accepted)}, duplicates {duplicates}, "
          f"in flight at the kills {in_flight}")
    # One outcome per targeted notification, whatever the kills interrupted.
    assert totals["targeted"] == MANY and totals["excluded"] == MANY // NO_TOKEN == report.reasons["excluded"]["NoTokenForApp"]
    assert totals["targeted"] == totals["excluded"] + totals["sent"]
    assert totals["sent"] == totals["delivered"] + totals.get("failed", 0) == len(tokens)
    assert report.by_platform["fcm"]["sent"] == report.by_platform["fcm"]["targeted"] == len(tokens)
    assert set(accepted) == tokens
    # Each kill left at most four batches staged and not settled; only those went out twice,
    # each counted as replayed before it went out again.
    assert len(in_flight) == 3 and all(n <= BATCH * IN_FLIGHT for n in in_flight)
    assert 0 <= duplicates <= replayed <= sum(in_flight)
