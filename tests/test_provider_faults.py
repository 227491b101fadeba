"""Provider fault storms through the mock APNs and the mock FCM, over TLS and HTTP/2: 503 and
429 waves, GOAWAY every few streams, connections reset mid-stream, stalls, a dead endpoint
and a certificate the client does not trust. Whatever the storm: every notification ends
with exactly one result, retries stay within their bounds, a circuit breaker per sender
stops the hammering and recovers by itself, and a healthy app next to a failing one delivers
everything at its first attempt. Counts, not timings, are asserted (the machine is shared).

`CircuitBreaker` is sans-IO: its own rules are tested without sockets first.
"""

from __future__ import annotations

import functools
import gc
import secrets
import ssl
import warnings
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from plugins.apns._credentials import check_ios
from plugins.apns._payload import build_request
from plugins.apns._sender import ApnsSender
from plugins.apns.mock import MockApnsProcess, SigningKey
from plugins.fcm._sender import FcmSender
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from plugins.fcm._credentials import check_android
from plugins.fcm._credentials import ssl_context as fcm_ssl_context
from protocols import api
from protocols.trio_client import open_client
from server import Server
from server.channels import AppRecord, DeliveryResult
from server.delivery.http2 import ConnectionLost, H2Pool
from server.delivery.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from server.delivery.sender import Progress

from .conftest import make_config

TOPIC = "com.acme.app"
KEY = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")
MAX_ATTEMPTS = 8


# -- the breaker's rules, without sockets ---------------------------------------------------


def test_the_breaker_opens_after_a_run_of_failures_and_a_success_resets_the_run():
    breaker = CircuitBreaker(failures=3, cooldown=10)
    for _ in range(5):
        assert not breaker.failure(0.0, "ServiceUnavailable")
        assert not breaker.failure(0.0, "ServiceUnavailable")
        breaker.success()  # two in a row, then a healthy answer: never three
    assert breaker.state == CLOSED
    assert [breaker.failure(1.0, "ServiceUnavailable") for _ in range(3)] == [False, False, True]
    assert breaker.state == OPEN and not breaker.closed(5.0) and breaker.startable(5.0, 10) == 0
    assert breaker.statistics(5.0)["open_for_s"] == 6.0 and breaker.opened == 1


def test_the_breaker_lets_one_probe_through_then_closes_or_opens_for_twice_as_long():
    breaker = CircuitBreaker(failures=1, cooldown=10, cooldown_max=25, probe_timeout=5)
    assert breaker.failure(0.0, "ConnectionLost")
    assert breaker.closed(10.0) and breaker.state == HALF_OPEN
    assert breaker.startable(10.0, 50) == 1
    breaker.started(10.0)
    assert breaker.startable(10.1, 49) == 0  # the others wait for the probe's verdict
    assert breaker.failure(10.2, "ServiceUnavailable")  # the probe failed: open for 20 s
    assert not breaker.closed(30.0) and breaker.closed(30.2)
    breaker.started(30.2)
    assert breaker.startable(36.0, 5) == 1  # no verdict within the probe timeout: another probe
    breaker.started(36.0)
    assert breaker.failure(36.1, "ServiceUnavailable") and breaker.open_until == pytest.approx(61.1)  # 25 s at most
    assert breaker.closed(61.2)
    breaker.started(61.2)
    breaker.success()
    assert breaker.state == CLOSED and breaker.startable(61.3, 7) == 7 and breaker.probes == 4


def test_failed_connections_open_the_breaker_sooner_than_failed_requests():
    breaker = CircuitBreaker(failures=20, connect_failures=3)
    assert not breaker.failure(0.0, "ConnectionFailed", connects_failed=2)
    assert breaker.failure(0.0, "ConnectionFailed", connects_failed=3)


# -- the APNs sender against the mock ---------------------------------------------------------


def ios_app() -> AppRecord:
    ios = check_ios(api.RegisterIosApp(app=TOPIC, environment="sandbox", auth=api.ApnsTokenAuth(
        key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)))
    return AppRecord(app=TOPIC, ios=ios)


def requests(count: int) -> list[tuple[Any, str]]:
    request = build_request(bundle_id=TOPIC, options=api.ApnsOptions(), content=api.PushContent(title="hi"))
    return [(request, secrets.token_hex(32)) for _ in range(count)]


@pytest.fixture(scope="module")
def apns_process(tmp_path_factory: pytest.TempPathFactory):
    config = {"keys": [KEY.spec()], "accept_any_token": True}
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), environment="sandbox", config=config) as mock:
        yield mock


def fresh(mock: Any) -> Any:
    """``mock`` without faults, accepting any token, its accepted and its stats cleared."""
    mock.admin.reset_faults()
    mock.admin.set_faults(accept_any_token=True)
    mock.admin.clear_accepted()
    mock.admin.clear_stats()
    return mock


@pytest.fixture
def apns(apns_process: MockApnsProcess) -> MockApnsProcess:
    return fresh(apns_process)


async def admin(mock: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args, **kwargs))


class Told(Progress):
    """What a sender told as it went: each result in order, and the most waiting for a retry."""

    def __init__(self) -> None:
        self.told: list[tuple[int, DeliveryResult]] = []
        self.waiting_now = 0
        self.waiting_most = 0

    def result(self, index: int, result: DeliveryResult) -> None:
        self.told.append((index, result))

    def waiting(self, delta: int) -> None:
        self.waiting_now += delta
        assert self.waiting_now >= 0
        self.waiting_most = max(self.waiting_most, self.waiting_now)


@asynccontextmanager
async def apns_sender(mock: MockApnsProcess, *, port: int | None = None, ca_file: str | None = None,
                      breaker: CircuitBreaker | None = None, **options: Any) -> AsyncIterator[ApnsSender]:
    options.setdefault("backoff_min", 0.05)
    options.setdefault("backoff_max", 0.4)
    sender = ApnsSender(ios_app(), "sandbox", host="127.0.0.1", port=port or mock.port,
                        ca_file=ca_file or str(mock.ca_file), breaker=breaker, max_attempts=MAX_ATTEMPTS, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        yield sender
        nursery.cancel_scope.cancel()


async def send(sender: ApnsSender, count: int, told: Told | None = None) -> list[DeliveryResult]:
    told = told or Told()
    with trio.fail_after(60):
        results = await sender.send(requests(count), told)
    return told_once(results, told)


def told_once(results: list[DeliveryResult], told: Told) -> list[DeliveryResult]:
    """``results``, once checked: exactly one result a notification, told once, and the same as
    the one returned."""
    assert sorted(i for i, _ in told.told) == list(range(len(results)))
    assert all(results[i] is r for i, r in told.told)
    assert told.waiting_now == 0
    return results


async def test_503_on_half_the_requests_every_one_settles_within_its_attempts(apns):
    await admin(apns, "set_faults", ratio_503=0.5)
    told = Told()
    async with apns_sender(apns, breaker=CircuitBreaker()) as sender:
        results = await send(sender, 300, told)
    stats = await admin(apns, "stats")
    assert all(1 <= r.attempts <= MAX_ATTEMPTS for r in results)
    assert {r.reason for r in results if r.status != "sent"} <= {"ServiceUnavailable"}
    assert sum(r.status == "sent" for r in results) >= 290  # 8 attempts at 1/2: 1 in 256 fails
    assert stats["requests"] == sum(r.attempts for r in results)  # each attempt one request, no more
    assert sender.breaker is not None and sender.breaker.opened == 0  # half the answers are healthy
    # The first attempts' successes were told before any retry's result: not held back.
    first = [n for n, (_, r) in enumerate(told.told) if r.attempts > 1]
    assert first and all(r.attempts == 1 for _, r in told.told[: first[0]])
    assert sum(r.attempts == 1 and r.status == "sent" for _, r in told.told[: first[0]]) >= 100
    assert told.waiting_most >= 100


async def test_a_503_wave_opens_the_breaker_which_fails_fast_then_recovers_by_itself(apns):
    await admin(apns, "set_faults", ratio_503=1.0)
    breaker = CircuitBreaker(failures=10, cooldown=0.5)
    async with apns_sender(apns, breaker=breaker) as sender:
        results = await send(sender, 200)
        requests_in_the_wave = (await admin(apns, "stats"))["requests"]
        refused = await send(sender, 50)  # still open: fails at once, nothing sent
        stats = sender.statistics()
        await admin(apns, "set_faults", ratio_503=0.0)
        await trio.sleep(0.6)
        healed = await send(sender, 100)  # a probe, then the others
    reasons = {r.reason for r in results}
    assert reasons <= {"ServiceUnavailable", "CircuitOpen"} and "CircuitOpen" in reasons
    # The hammering stopped: what was in flight when it opened, not 200 x 8 attempts.
    assert requests_in_the_wave <= 200 + 10
    assert all(r.reason == "CircuitOpen" and r.attempts == 0 for r in refused)
    assert "failure(s) in a row (last: ServiceUnavailable)" in refused[0].detail
    assert stats["breaker"]["state"] == "open" and stats["breaker"]["opened"] == 1
    assert stats["breaker"]["refused"] == stats["outcomes"]["failed:CircuitOpen"] >= 50 + 1
    assert all(r.status == "sent" for r in healed)
    assert breaker.state == CLOSED and breaker.probes == 1


async def test_a_429_wave_opens_the_breaker_too(apns):
    await admin(apns, "set_faults", ratio_429=1.0)
    async with apns_sender(apns, breaker=CircuitBreaker(failures=10, cooldown=30)) as sender:
        results = await send(sender, 100)
    assert {r.reason for r in results} <= {"TooManyRequests", "CircuitOpen"}
    assert sender.breaker is not None and sender.breaker.state == OPEN
    assert (await admin(apns, "stats"))["requests"] <= 100 + 10


async def test_a_dead_endpoint_opens_the_breaker_after_a_few_connections(apns):
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    breaker = CircuitBreaker(connect_failures=3, cooldown=0.3)
    async with apns_sender(apns, port=port, breaker=breaker) as sender:
        results = await send(sender, 100)
        await trio.sleep(0.35)
        again = await send(sender, 10)  # the cool-down passed: a probe connects, fails, opens again
    assert {r.reason for r in results} <= {"CircuitOpen", "ConnectionFailed"} and results[-1].reason == "CircuitOpen"
    assert all(r.reason == "CircuitOpen" for r in again)
    # A handful of connections, not one per notification and attempt.
    assert 3 <= sender.pool.connect_failures <= 6
    assert breaker.opened == 2 and breaker.statistics(0)["last_failure"] == "ConnectionFailed"


async def test_a_certificate_the_client_does_not_trust_opens_the_breaker(apns, monkeypatch):
    # The system's CAs: none of them signed the mock's certificate.
    monkeypatch.setattr("plugins.apns._sender.client_ssl_context", lambda record, ca_file: ssl.create_default_context())
    breaker = CircuitBreaker(connect_failures=3, cooldown=30)
    async with apns_sender(apns, breaker=breaker) as sender:
        results = await send(sender, 50)
    assert {r.reason for r in results} <= {"CircuitOpen", "ConnectionFailed"} and breaker.state == OPEN
    assert "certificate verify failed" in (sender.pool.last_connect_error or "")
    assert (await admin(apns, "stats"))["requests"] == 0 and sender.pool.connect_failures <= 4


async def test_a_refused_certificate_leaves_no_socket_open(apns):
    """The defect: a failed TLS handshake left its TCP socket to the garbage collector."""
    pool = H2Pool("127.0.0.1", apns.port, ssl_context=ssl.create_default_context())
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with pytest.raises(ConnectionLost, match="certificate verify failed"):
            await pool.wait_capacity()
        nursery.cancel_scope.cancel()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


# -- FCM --------------------------------------------------------------------------------------

ACCOUNT = ServiceAccount.generate("fault-project")


@pytest.fixture(scope="module")
def fcm_process(tmp_path_factory: pytest.TempPathFactory):
    config = {"projects": {"fault-project": {"service_accounts": [ACCOUNT.spec()]}}, "faults": {"accept_any_token": True}}
    with MockFcmProcess(tmp_path_factory.mktemp("fcm"), config=config) as mock:
        yield mock


@pytest.mark.parametrize("fault", ["ratio_503", "ratio_500", "ratio_502_html"])
async def test_fcm_5xx_waves_open_the_breaker_without_waiting_for_the_retry_delays(fcm_process, fault):
    fcm_process.admin.reset_faults()
    fcm_process.admin.set_faults(accept_any_token=True, **{fault: 1.0})
    fcm_process.admin.clear_stats()
    record = check_android(api.RegisterAndroidApp(app="com.acme.android",
                                                  service_account=ACCOUNT.info(fcm_process.token_uri)),
                           token_uri_setting=fcm_process.token_uri)
    breaker = CircuitBreaker(failures=10, cooldown=30)
    async with httpx.AsyncClient(verify=fcm_ssl_context(str(fcm_process.ca_file))) as http:
        sender = FcmSender(record, host=fcm_process.host, port=fcm_process.port, http=http,
                           token_uri=fcm_process.token_uri, ca_file=str(fcm_process.ca_file), breaker=breaker)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            told = Told()
            with trio.fail_after(30):  # FCM asks for 10 s before a retry: the breaker fails them before that
                results = await sender.send([b'{"message": {"token": "t-%d"}}' % i for i in range(60)], None, told)
            nursery.cancel_scope.cancel()
    assert sorted(i for i, _ in told.told) == list(range(60)) and told.waiting_now == 0
    assert {r.reason for r in results} == {"CircuitOpen"} and breaker.state == OPEN
    assert fcm_process.admin.stats()["requests"] <= 60


@pytest.fixture
def fcm(fcm_process: MockFcmProcess) -> MockFcmProcess:
    return fresh(fcm_process)


@asynccontextmanager
async def fcm_sender(mock: MockFcmProcess, *, breaker: CircuitBreaker | None = None,
                     **options: Any) -> AsyncIterator[FcmSender]:
    """The FCM sender of ``fault-project`` against ``mock``, with short retry delays (as `apns_sender`)."""
    options.setdefault("backoff_min", 0.05)
    options.setdefault("backoff_max", 0.4)
    record = check_android(api.RegisterAndroidApp(app="com.acme.android", service_account=ACCOUNT.info(mock.token_uri)),
                           token_uri_setting=mock.token_uri)
    async with httpx.AsyncClient(verify=fcm_ssl_context(str(mock.ca_file))) as http:
        sender = FcmSender(record, host=mock.host, port=mock.port, http=http, token_uri=mock.token_uri,
                           ca_file=str(mock.ca_file), breaker=breaker, max_attempts=MAX_ATTEMPTS, **options)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            yield sender
            nursery.cancel_scope.cancel()


async def send_fcm(sender: FcmSender, count: int) -> list[DeliveryResult]:
    told = Told()
    with trio.fail_after(60):
        results = await sender.send([b'{"message": {"token": "t-%d", "data": {"n": "%d"}}}' % (i, i)
                                     for i in range(count)], None, told)
    return told_once(results, told)


# -- both providers: the storms each sender weathers alike ------------------------------------


class Provider:
    """A provider's mock (reset: the ``apns`` or ``fcm`` fixture) and its sender."""

    def __init__(self, name: str, mock: Any) -> None:
        self.name, self.mock = name, mock
        #: The mock's count of the notifications it accepted.
        self.accepted = "accepted" if name == "apns" else "successes"

    def sender(self, **options: Any) -> AbstractAsyncContextManager[Any]:
        return (apns_sender if self.name == "apns" else fcm_sender)(self.mock, **options)

    async def send(self, sender: Any, count: int) -> list[DeliveryResult]:
        return await (send(sender, count) if self.name == "apns" else send_fcm(sender, count))


@pytest.fixture(params=["apns", "fcm"])
def provider(request: pytest.FixtureRequest) -> Provider:
    return Provider(request.param, request.getfixturevalue(request.param))


async def test_goaway_every_few_streams_every_notification_is_sent_once(provider):
    mock = provider.mock
    await admin(mock, "set_faults", goaway_after_streams=7)
    async with provider.sender(breaker=CircuitBreaker()) as sender:
        results = await provider.send(sender, 200)
        pool = sender.pool.statistics()
    assert all(r.status == "sent" for r in results), {(r.reason, r.detail) for r in results if r.status != "sent"}
    assert all(1 <= r.attempts <= MAX_ATTEMPTS for r in results)
    stats = await admin(mock, "stats")
    assert pool.goaways >= 200 // 7 - 1 and stats["goaways_sent"] >= 200 // 7 - 1
    # A stream beyond a GOAWAY's last stream id is refused unprocessed and tried again: every
    # notification reached the provider once, and no more.
    assert stats["requests"] == 200 and stats["refused_streams"] >= 1
    # Each one delivered once: the mock accepted each of them (each its own token) exactly once.
    assert len({a["token"] for a in await admin(mock, "accepted")}) == stats[provider.accepted] == 200
    assert sender.breaker is not None and sender.breaker.opened == 0


async def test_connections_reset_mid_stream_every_notification_settles_once(provider):
    mock = provider.mock
    await admin(mock, "set_faults", reset_after_streams=20)
    async with provider.sender(breaker=CircuitBreaker(), streams_per_connection=10) as sender:
        results = await provider.send(sender, 200)
    assert all(1 <= r.attempts <= MAX_ATTEMPTS for r in results), {(r.reason, r.attempts) for r in results}
    assert sum(r.status == "sent" for r in results) >= 180
    assert {r.reason for r in results if r.status != "sent"} <= {"ConnectionLost", "CircuitOpen"}
    stats = await admin(mock, "stats")
    assert stats["resets"] >= 1
    assert len(await admin(mock, "accepted")) == stats[provider.accepted] <= sum(r.attempts for r in results)


async def test_a_stall_fails_requests_after_the_timeout_then_the_breaker_opens_and_recovers(provider):
    mock = provider.mock
    await admin(mock, "set_faults", stall=True)
    breaker = CircuitBreaker(failures=5, cooldown=0.5, probe_timeout=2)
    async with provider.sender(breaker=breaker, request_timeout=0.5) as sender:
        stalled = await provider.send(sender, 20)
        await admin(mock, "set_faults", stall=False)
        await trio.sleep(0.6)
        healed = await provider.send(sender, 20)
    assert {r.reason for r in stalled} <= {"ConnectionLost", "CircuitOpen"} and "CircuitOpen" in {r.reason for r in stalled}
    assert "(last: ConnectionLost)" in next(r.detail for r in stalled if r.reason == "CircuitOpen")
    assert breaker.opened >= 1 and sender.pool.timeouts >= 5
    assert all(r.status == "sent" for r in healed) and breaker.state == CLOSED




# -- end to end: a campaign, and a healthy app beside a failing one ---------------------------


@pytest.fixture(scope="module")
def calm_process(tmp_path_factory: pytest.TempPathFactory):
    config = {"keys": [KEY.spec()], "accept_any_token": True}
    with MockApnsProcess(tmp_path_factory.mktemp("calm"), environment="production", config=config) as mock:
        yield mock


@asynccontextmanager
async def two_apps(tmp_path: Path, storm: MockApnsProcess, calm: MockApnsProcess, **apns: Any) -> AsyncIterator[Any]:
    """A server whose APNs sandbox is ``storm`` and production ``calm``; app ``storm`` on the
    first, ``calm`` on the second, each with a configuration and a message, and ``count``
    profiles each."""
    settings = {"sandbox": {"address": storm.address, "ca_file": str(storm.ca_file)},
                "production": {"address": calm.address, "ca_file": str(calm.ca_file)}, **apns}
    srv = Server(make_config(tmp_path / "data", apns=settings))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as client:
            auth = api.ApnsTokenAuth(key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id)
            for app, environment in (("storm", "sandbox"), ("calm", "production")):
                await client.call(api.RegisterIosApp(app=f"com.acme.{app}", environment=environment, auth=auth))
                await client.call(api.PublishConfig(config=api.ChannelConfig(name=app, apps=[f"com.acme.{app}"])))
                await client.call(api.PublishMessage(message=api.MessageSpec(
                    id=app, channel=app, content=api.MessageContent(title="Hi"))))
            yield srv, client
        srv.request_stop()


async def profiles(client: Any, app: str, count: int) -> list[str]:
    platform = "apns-sandbox" if app == "storm" else "apns"
    for i in range(count):
        await client.call(api.RegisterToken(identity=f"{app}:{i}", app=f"com.acme.{app}", platform=platform,
                                            token=secrets.token_hex(32)))
    return [f"{app}:{i}" for i in range(count)]


async def test_a_campaigns_successes_are_settled_while_its_failures_are_retried(tmp_path, apns, calm_process):
    """The defect: a batch was settled once its slowest member was; with 503 on half the
    requests its successes were counted (and its slot freed) only at the end."""
    await admin(apns, "set_faults", ratio_503=0.5)
    async with two_apps(tmp_path, apns, calm_process) as (srv, client):
        identities = await profiles(client, "storm", 50)  # one batch
        seen: list[tuple[int, int]] = []  # (delivered in the reports, sent) while the send runs
        done = trio.Event()
        result: list[api.SendResult] = []

        async def campaign() -> None:
            result.append(await client.call(api.SendMessage(id="storm", identities=identities)))
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(campaign)
            with trio.fail_after(60):
                while not done.is_set():
                    report = await client.call(api.GetReport(message="storm"))
                    if not done.is_set():
                        seen.append((report.totals.get("delivered", 0), report.totals.get("sent", 0)))
                    await trio.sleep(0.02)
        final = await client.call(api.GetReport(message="storm"))
    [sent] = result
    # Before the send returned, part of the batch was settled and part was not.
    assert any(0 < delivered and sent < 50 for delivered, sent in seen), seen[-5:]
    # One outcome each, and the reports and the result agree.
    assert sent.sent == 50 == sent.delivered + sum(sent.failed.values())
    assert final.totals["sent"] == 50 and final.totals["delivered"] == sent.delivered


async def test_a_healthy_app_delivers_everything_at_once_beside_an_app_whose_provider_fails(
        tmp_path, apns, calm_process):
    calm_process.admin.clear_stats()
    await admin(apns, "set_faults", ratio_503=1.0)
    apns_settings = {"breaker_failures": 20, "breaker_cooldown_s": 0.5}
    async with two_apps(tmp_path, apns, calm_process, **apns_settings) as (srv, client):
        storm_ids, calm_ids = await profiles(client, "storm", 300), await profiles(client, "calm", 300)
        results: dict[str, api.SendResult] = {}

        async def campaign(name: str, identities: list[str]) -> None:
            results[name] = await client.call(api.SendMessage(id=name, identities=identities))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(campaign, "storm", storm_ids)
                nursery.start_soon(campaign, "calm", calm_ids)
        stats = await client.call(api.GetStats())
        senders = next(a for a in stats.actors if a.name == "delivery").details["channels"]["apns"]
        storm_stats = next(s for name, s in senders.items() if name.startswith("com.acme.storm"))
        await admin(apns, "set_faults", ratio_503=0.0)
        await trio.sleep(0.6)
        with trio.fail_after(30):
            healed = await client.call(api.SendMessage(id="storm", identities=storm_ids[:50]))
        report = await client.call(api.GetReport(message="storm"))
    storm, calm = results["storm"], results["calm"]
    assert calm.delivered == 300 and calm.sent == 300
    assert calm_process.admin.stats()["requests"] == 300  # every one at its first attempt
    assert storm.sent == 300 and storm.delivered == 0 and storm.failed.get("CircuitOpen", 0) >= 200
    assert set(storm.failed) <= {"CircuitOpen", "ServiceUnavailable"}
    assert storm_stats["breaker"]["state"] == "open" and storm_stats["breaker"]["refused"] == storm.failed["CircuitOpen"]
    assert (await admin(apns, "stats"))["requests"] < 300  # stopped hammering
    assert healed.delivered == 50  # recovered by itself: a probe, then the rest
    assert report.totals["sent"] == 350 and report.totals["failed"] == 300
    assert report.reasons["failed"]["CircuitOpen"] == storm.failed["CircuitOpen"]
