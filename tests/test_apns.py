"""The APNs channel against the mock APNs over TLS and HTTP/2: the real pool, the real server.

The mock runs in its own process (`plugins.apns.mock.MockApnsProcess`), once for the module;
each test resets its keys, tokens, faults and records.
"""

from __future__ import annotations

import collections
import functools
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from plugins.apns._credentials import ProviderToken, check_ios
from plugins.apns._payload import build_request
from plugins.apns._sender import ApnsSender
from plugins.apns.mock import MockApnsProcess, SigningKey, issue_client_certificate
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import Client, open_client
from server import Server
from server.channels import AppRecord, DeliveryJob

from .conftest import make_config

TOPIC = "com.acme.app"
KEY = SigningKey.generate(key_id="ABC123DEFG", team_id="TEAM123456")


def new_token() -> str:
    return secrets.token_hex(32)


def token_auth(key: SigningKey = KEY) -> api.ApnsTokenAuth:
    return api.ApnsTokenAuth(key_pem=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)


@pytest.fixture(scope="module")
def mock_process(tmp_path_factory: pytest.TempPathFactory):
    with MockApnsProcess(tmp_path_factory.mktemp("apns"), environment="sandbox", config={"keys": [KEY.spec()]}) as mock:
        yield mock


@pytest.fixture
def mock(mock_process: MockApnsProcess) -> MockApnsProcess:
    admin = mock_process.admin
    admin.reset_faults()
    admin.clear_tokens()
    admin.set_keys([KEY.spec()])
    admin.clear_accepted()
    admin.clear_stats()
    return mock_process


async def call_admin(mock: MockApnsProcess, name: str, *args: Any, **kwargs: Any) -> Any:
    """A blocking admin call, off the Trio loop."""
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args, **kwargs))


def apns_settings(mock: MockApnsProcess) -> dict[str, Any]:
    endpoint = {"address": mock.address, "ca_file": str(mock.ca_file)}
    return {"production": endpoint, "sandbox": endpoint}


@pytest.fixture
async def apns_server(tmp_path: Path, mock: MockApnsProcess) -> AsyncIterator[Server]:
    srv = Server(make_config(tmp_path / "data", apns=apns_settings(mock)))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        srv.request_stop()


@pytest.fixture
async def client(apns_server: Server) -> AsyncIterator[Client]:
    async with open_client(apns_server.addresses[0]) as c:
        yield c


async def register_app(client: Client, auth: Any = None, environment: str = "sandbox") -> api.AppInfo:
    return await client.call(api.RegisterIosApp(app=TOPIC, auth=auth or token_auth(), environment=environment))  # type: ignore[arg-type]


async def send_to_token(client: Client, token: str, **content: Any) -> api.PushOutcome:
    result = await client.call(
        api.SendPush(app=TOPIC, token=token, platform="apns-sandbox", content=api.PushContent(**(content or {"title": "Hi"})))
    )
    [outcome] = result.outcomes
    return outcome


async def registrations(client: Client, identity: str) -> dict[str, api.Registration]:
    profile = await client.call(api.GetProfile(identity=identity))
    return {r.token: r for r in profile.registrations}


# -- through the server ----------------------------------------------------------------------


async def test_a_push_to_a_token_reaches_apns_with_the_provider_token(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    info = await register_app(client)
    assert info.ios is not None and info.ios.key_id == KEY.key_id
    outcome = await send_to_token(client, token.upper(), title="Order shipped", body="It arrives Tuesday", badge=2)
    assert (outcome.status, outcome.status_code, outcome.attempts) == ("sent", 200, 1)
    assert uuid.UUID(outcome.provider_id) and uuid.UUID(outcome.unique_id)  # the sandbox adds apns-unique-id
    [accepted] = await call_admin(mock, "accepted")
    assert accepted["token"] == token  # the upper-case hex was normalized
    assert (accepted["topic"], accepted["push_type"], accepted["priority"]) == (TOPIC, "alert", 10)
    assert accepted["auth"] == f"token:{KEY.key_id}"
    assert accepted["apns_id"] == outcome.provider_id
    assert accepted["payload"]["aps"] == {"alert": {"title": "Order shipped", "body": "It arrives Tuesday"}, "badge": 2}


async def test_a_raw_payload_and_headers_are_sent_as_given(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    await register_app(client)
    apns_id = str(uuid.uuid4())
    expiration = datetime.now(UTC) + timedelta(hours=1)
    result = await client.call(
        api.SendPush(
            app=TOPIC, token=token, platform="apns-sandbox",
            raw={"aps": {"content-available": 1}, "sync": "orders"},
            apns=api.ApnsOptions(push_type="background", collapse_id="orders", apns_id=apns_id, expiration=expiration),
        )
    )
    assert result.outcomes[0].status == "sent"
    assert result.outcomes[0].provider_id == apns_id
    [accepted] = await call_admin(mock, "accepted")
    assert accepted["payload"] == {"aps": {"content-available": 1}, "sync": "orders"}
    assert (accepted["push_type"], accepted["priority"], accepted["collapse_id"]) == ("background", 5, "orders")
    assert accepted["expiration"] == int(expiration.timestamp())


async def test_dead_tokens_are_marked_invalid_on_the_profile_and_skipped_afterwards(client, mock):
    alive, unregistered, unknown, other_topic = new_token(), new_token(), new_token(), new_token()
    await register_app(client)
    for token in (alive, unregistered, unknown, other_topic):
        await client.call(api.RegisterToken(identity="crm:7", app=TOPIC, platform="apns-sandbox", token=token))
    # Apple's timestamp comes after the registration: the token is dead.
    gone_at_ms = int(time.time() * 1000) + 5
    await trio.sleep(0.02)
    await call_admin(
        mock, "set_tokens",
        {alive: [TOPIC], unregistered: {"topics": [TOPIC], "unregistered_at_ms": gone_at_ms}, other_topic: ["com.other.app"]},
    )
    result = await client.call(api.SendPush(app=TOPIC, identity="crm:7", content=api.PushContent(body="Hello")))
    outcomes = {o.token: o for o in result.outcomes}
    assert outcomes[alive].status == "sent"
    assert (outcomes[unregistered].status, outcomes[unregistered].reason, outcomes[unregistered].status_code) == ("invalid", "Unregistered", 410)
    assert (outcomes[unknown].status, outcomes[unknown].reason) == ("invalid", "BadDeviceToken")
    assert (outcomes[other_topic].status, outcomes[other_topic].reason) == ("invalid", "DeviceTokenNotForTopic")

    regs = await registrations(client, "crm:7")
    assert regs[alive].state == "active"
    for token, reason in ((unregistered, "Unregistered"), (unknown, "BadDeviceToken"), (other_topic, "DeviceTokenNotForTopic")):
        assert (regs[token].state, regs[token].invalid_reason) == ("invalid", reason)

    await call_admin(mock, "clear_accepted")
    again = await client.call(api.SendPush(app=TOPIC, identity="crm:7", content=api.PushContent(body="Again")))
    assert [(o.token, o.status) for o in again.outcomes] == [(alive, "sent")]
    assert [a["token"] for a in await call_admin(mock, "accepted")] == [alive]


async def test_a_token_registered_again_after_apples_timestamp_stays_valid(client, mock):
    token = new_token()
    await register_app(client)
    # APNs learnt the token was dead an hour ago; the app registered it again just now.
    await call_admin(mock, "set_tokens", {token: {"topics": [TOPIC], "unregistered_at_ms": int(time.time() * 1000) - 3_600_000}})
    await client.call(api.RegisterToken(identity="crm:8", app=TOPIC, platform="apns-sandbox", token=token))
    result = await client.call(api.SendPush(app=TOPIC, identity="crm:8", content=api.PushContent(body="x")))
    [outcome] = result.outcomes
    assert (outcome.status, outcome.reason, outcome.status_code) == ("failed", "Unregistered", 410)
    assert "registered again" in outcome.detail
    assert (await registrations(client, "crm:8"))[token].state == "active"


async def test_a_profile_without_tokens_for_the_app_is_excluded_with_a_reason(client, mock):
    await register_app(client)
    await client.call(api.UpsertProfile(identity="crm:9", attributes={}))
    result = await client.call(api.SendPush(app=TOPIC, identity="crm:9", content=api.PushContent(body="x")))
    assert (result.outcomes, result.excluded) == ([], "NoTokenForApp")


async def test_refused_credentials_stop_requests_until_the_app_is_registered_again(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    stranger = SigningKey.generate(key_id="ZZZ999ZZZZ", team_id="TEAM123456")  # APNs does not know this key
    await register_app(client, token_auth(stranger))
    first = await send_to_token(client, token)
    assert (first.status, first.reason, first.status_code) == ("failed", "InvalidProviderToken", 403)
    requests_before = (await call_admin(mock, "stats"))["requests"]
    second = await send_to_token(client, token)
    assert (second.status, second.reason, second.attempts) == ("failed", "InvalidProviderToken", 0)
    assert (await call_admin(mock, "stats"))["requests"] == requests_before  # APNs was not asked again

    await register_app(client)  # the right key: the refused pool is retired
    assert (await send_to_token(client, token)).status == "sent"


async def test_a_key_for_the_other_environment_is_refused(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    await call_admin(mock, "set_keys", [KEY.spec(environment="production")])
    await register_app(client)
    outcome = await send_to_token(client, token)
    assert (outcome.status, outcome.reason) == ("failed", "BadEnvironmentKeyIdInToken")


async def test_an_expired_provider_token_is_renewed_and_the_notification_retried_once(client, mock, monkeypatch):
    monkeypatch.setattr(ProviderToken, "MIN_AGE", 0.5)  # Apple's 20 minutes, shortened
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    # A token's iat is in whole seconds: a fresh token may look up to a second old, so the
    # mock's limit leaves room for that.
    await call_admin(mock, "set_faults", token_max_age_s=2)
    await register_app(client)
    assert (await send_to_token(client, token)).status == "sent"
    await trio.sleep(2.6)  # the mock now finds the token too old
    outcome = await send_to_token(client, token)
    assert (outcome.status, outcome.attempts) == ("sent", 1)
    stats = await call_admin(mock, "stats")
    assert stats["rejected"] == {"ExpiredProviderToken": 1}
    assert stats["accepted"] == 2


async def test_an_expired_provider_token_younger_than_the_minimum_is_not_renewed(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    await call_admin(mock, "set_faults", token_max_age_s=0)  # every token is too old for this APNs
    await register_app(client)
    outcome = await send_to_token(client, token)
    assert (outcome.status, outcome.reason) == ("failed", "ExpiredProviderToken")
    # Renewing a token younger than 20 minutes would be refused as TooManyProviderTokenUpdates:
    # no new token, and no more requests until it may be renewed.
    assert (await call_admin(mock, "stats"))["rejected"] == {"ExpiredProviderToken": 2}
    outcome = await send_to_token(client, token)
    assert (outcome.status, outcome.reason, outcome.attempts) == ("failed", "ExpiredProviderToken", 0)
    assert (await call_admin(mock, "stats"))["requests"] == 2


async def test_an_oversize_payload_fails_before_any_request(client, mock):
    token = new_token()
    await register_app(client)
    outcome = await send_to_token(client, token, body="x" * 5000)
    assert (outcome.status, outcome.reason, outcome.attempts) == ("failed", "PayloadTooLarge", 0)
    assert "4096" in outcome.detail
    assert (await call_admin(mock, "stats"))["requests"] == 0


async def test_a_production_token_needs_an_app_registered_for_production(client, mock):
    await register_app(client, environment="sandbox")
    result = await client.call(api.SendPush(app=TOPIC, token=new_token(), platform="apns", content=api.PushContent(title="x")))
    assert (result.outcomes[0].status, result.outcomes[0].reason) == ("failed", "EnvironmentNotEnabled")


async def test_deleting_and_registering_an_app_again_uses_the_new_credentials(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    other = SigningKey.generate(key_id="OTHER12345", team_id="TEAM123456")
    await call_admin(mock, "set_keys", [KEY.spec(), other.spec()])
    await register_app(client)
    assert (await send_to_token(client, token)).status == "sent"
    await client.call(api.DeleteApp(app=TOPIC))
    with pytest.raises(CallError) as info:
        await send_to_token(client, token)
    assert info.value.status is Status.NOT_FOUND
    await register_app(client, token_auth(other))
    assert (await send_to_token(client, token)).status == "sent"
    assert [a["auth"] for a in await call_admin(mock, "accepted")] == [f"token:{KEY.key_id}", f"token:{other.key_id}"]


async def test_delivery_statistics_show_the_pool(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", {token: [TOPIC]})
    await register_app(client)
    await send_to_token(client, token)
    stats = await client.call(api.GetStats())
    delivery = {a.name: a for a in stats.actors}["delivery"].details
    [sender] = delivery["channels"]["apns"].values()
    assert sender["environment"] == "sandbox"
    assert sender["pool"]["connections"] == 1 and sender["pool"]["completed"] == 1
    assert sender["outcomes"] == {"sent": 1}
    assert delivery["notifications"] == 1


# -- certificate auth ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert_mock(tmp_path_factory: pytest.TempPathFactory):
    with MockApnsProcess(tmp_path_factory.mktemp("apns-cert"), environment="sandbox", client_certs="optional") as mock:
        yield mock


async def test_certificate_auth_sends_with_the_client_certificate(tmp_path, cert_mock):
    token = new_token()
    await call_admin(cert_mock, "set_tokens", {token: [TOPIC]})
    certificate, key = issue_client_certificate(cert_mock.dir, TOPIC, environment="sandbox")
    wrong_env, wrong_key = issue_client_certificate(cert_mock.dir, TOPIC, environment="production")
    srv = Server(make_config(tmp_path / "data", apns=apns_settings(cert_mock)))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as client:
            info = await register_app(client, api.ApnsCertificateAuth(pem=(certificate + key).decode()))
            assert info.ios is not None and TOPIC in info.ios.certificate_topics
            outcome = await send_to_token(client, token)
            assert outcome.status == "sent", outcome
            [accepted] = await call_admin(cert_mock, "accepted")
            assert accepted["auth"] == "certificate"

            await register_app(client, api.ApnsCertificateAuth(pem=(wrong_env + wrong_key).decode()))
            outcome = await send_to_token(client, token)
            assert (outcome.status, outcome.reason) == ("failed", "BadCertificateEnvironment")
        srv.request_stop()


# -- the sender and its pool, directly --------------------------------------------------------


def ios_app(key: SigningKey = KEY) -> AppRecord:
    return AppRecord(app=TOPIC, ios=check_ios(api.RegisterIosApp(app=TOPIC, auth=token_auth(key), environment="sandbox")))


@asynccontextmanager
async def running_sender(mock: MockApnsProcess, **options: Any) -> AsyncIterator[ApnsSender]:
    options.setdefault("backoff_min", 0.05)
    sender = ApnsSender(ios_app(), "sandbox", host=mock.host, port=mock.port, ca_file=str(mock.ca_file), **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        yield sender
        nursery.cancel_scope.cancel()


def requests_for(tokens: list[str], **options: Any) -> list[tuple[Any, str]]:
    return [
        (build_request(bundle_id=TOPIC, options=api.ApnsOptions(apns_id=str(uuid.uuid4()), **options),
                       content=api.PushContent(title=f"n{i}")), token)
        for i, token in enumerate(tokens)
    ]


async def test_goaway_mid_burst_loses_nothing_and_sends_nothing_twice(mock):
    tokens = [new_token() for _ in range(300)]
    await call_admin(mock, "set_faults", accept_any_token=True, goaway_after_streams=40, latency_ms=2)
    async with running_sender(mock, max_connections=2, streams_per_connection=25) as sender:
        jobs = requests_for(tokens)
        results = await sender.send(jobs)
        assert sender.pool.goaways >= 5
    assert [r.status for r in results] == ["sent"] * 300
    accepted = await call_admin(mock, "accepted")
    counts = collections.Counter(a["apns_id"] for a in accepted)
    assert set(counts) == {request.apns_id for request, _ in jobs}
    assert max(counts.values()) == 1  # each sent exactly once
    assert [r.provider_id for r in results] == [request.apns_id for request, _ in jobs]
    stats = await call_admin(mock, "stats")
    assert stats["goaways_sent"] >= 5 and stats["connections_opened"] >= 6


async def test_the_servers_max_concurrent_streams_is_respected(mock):
    await call_admin(mock, "set_faults", accept_any_token=True, max_concurrent_streams=3, latency_ms=5)
    async with running_sender(mock, max_connections=2, streams_per_connection=100) as sender:
        results = await sender.send(requests_for([new_token() for _ in range(120)]))
    assert all(r.status == "sent" for r in results)
    stats = await call_admin(mock, "stats")
    assert stats["refused_streams"] == 0
    assert 1 <= max(stats["max_concurrent_streams"].values()) <= 3


async def test_a_stalled_apns_produces_backpressure_not_memory_growth(mock):
    await call_admin(mock, "set_faults", accept_any_token=True, stall=True)
    async with running_sender(mock, max_connections=1, streams_per_connection=10, max_queue=50) as sender:
        results: list[Any] = []

        async def send_all() -> None:
            results.extend(await sender.send(requests_for([new_token() for _ in range(200)])))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all)
            with trio.fail_after(10):
                while sender.pool.statistics().in_flight < 10:
                    await trio.sleep(0.01)
            await trio.sleep(0.3)
            # 10 streams in flight, the rest of the 50 allowed queued behind them, and the
            # caller waits for room.
            assert sender.pool.statistics().in_flight == 10
            assert sender.pool.statistics().connections == 1
            assert sender.held == 50
            assert 39 <= sender.statistics()["queued"] <= 40
            assert not results
            assert (await call_admin(mock, "stats"))["stalled"] == 10
            await call_admin(mock, "set_faults", stall=False)
        assert [r.status for r in results] == ["sent"] * 200


async def test_429_and_503_are_retried_with_backoff(mock):
    await call_admin(mock, "set_faults", accept_any_token=True, ratio_429=0.2, ratio_503=0.2)
    async with running_sender(mock) as sender:
        results = await sender.send(requests_for([new_token() for _ in range(60)]))
    assert [r.status for r in results] == ["sent"] * 60
    assert any(r.attempts > 1 for r in results)
    rejected = (await call_admin(mock, "stats"))["rejected"]
    assert set(rejected) <= {"TooManyRequests", "ServiceUnavailable"} and sum(rejected.values()) > 0
    assert sender.counts["retries"] == sum(rejected.values())


async def test_retries_stop_at_the_notifications_expiration(mock):
    await call_admin(mock, "set_faults", accept_any_token=True, ratio_503=1.0)
    expiration = datetime.now(UTC) + timedelta(seconds=2.5)  # APNs takes whole seconds
    async with running_sender(mock) as sender:
        with trio.fail_after(10):
            [result] = await sender.send(requests_for([new_token()], expiration=expiration))
    assert (result.status, result.reason, result.status_code) == ("failed", "ServiceUnavailable", 503)
    assert 1 < result.attempts < 8


async def test_other_4xx_answers_are_final(mock):
    await call_admin(mock, "set_faults", accept_any_token=True)
    [(request, token)] = requests_for([new_token()])
    bad = msgspec.structs.replace(request, headers=[*request.headers, (b"apns-collapse-id", b"x" * 65)])
    async with running_sender(mock) as sender:
        [result] = await sender.send([(bad, token)])
    assert (result.status, result.reason, result.status_code, result.attempts) == ("failed", "BadCollapseId", 400, 1)


async def test_connection_resets_are_retried_on_a_new_connection(mock):
    await call_admin(mock, "set_faults", accept_any_token=True, reset_after_streams=15)
    async with running_sender(mock, max_connections=1, streams_per_connection=10) as sender:
        jobs = requests_for([new_token() for _ in range(60)])
        results = await sender.send(jobs)
    assert [r.status for r in results] == ["sent"] * 60
    accepted = {a["apns_id"] for a in await call_admin(mock, "accepted")}
    assert accepted == {request.apns_id for request, _ in jobs}
    assert (await call_admin(mock, "stats"))["resets"] >= 1


async def test_an_unreachable_apns_fails_each_notification_by_its_expiration(tmp_path):
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = ApnsSender(ios_app(), "sandbox", host="127.0.0.1", port=port, backoff_min=0.05)
    expiration = datetime.now(UTC) + timedelta(seconds=2.5)  # APNs takes whole seconds
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        with trio.fail_after(10):
            results = await sender.send(requests_for([new_token(), new_token()], expiration=expiration))
        nursery.cancel_scope.cancel()
    assert {(r.status, r.reason) for r in results} == {("failed", "ConnectionFailed")}
    assert "cannot connect to 127.0.0.1" in results[0].detail
    assert sender.pool.connect_failures >= 2


async def test_the_provider_token_is_renewed_after_50_minutes(mock):
    offset = [0.0]
    # The mock's clock is not moved: let it take a new token at once.
    await call_admin(mock, "set_faults", accept_any_token=True, token_update_interval_s=0)
    async with running_sender(mock, clock=lambda: time.time() + offset[0]) as sender:
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        offset[0] = 49 * 60
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        assert sender.token is not None and sender.token.renewals == 1
        offset[0] = 51 * 60
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        assert sender.token.renewals == 2
    assert len(await call_admin(mock, "accepted")) == 3


async def test_idle_connections_are_pinged_and_closed(mock):
    await call_admin(mock, "set_faults", accept_any_token=True)
    async with running_sender(mock) as sender:
        pool = sender.pool
        pool.ping_interval, pool.idle_timeout = 0.1, 0.5
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        assert pool.statistics().connections == 1
        with trio.fail_after(5):
            while pool.statistics().connections:
                await trio.sleep(0.05)
        # The next notification opens a new connection.
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
    assert (await call_admin(mock, "stats"))["connections_opened"] == 2


async def test_credentials_are_checked_again_before_a_pool_opens(tmp_path, apns_server, mock):
    certificate, key = issue_client_certificate(mock.dir, TOPIC, environment="sandbox")
    ios = check_ios(api.RegisterIosApp(app=TOPIC, auth=api.ApnsCertificateAuth(pem=(certificate + key).decode()), environment="sandbox"))
    expired = msgspec.structs.replace(ios, certificate_expires=datetime.now(UTC) - timedelta(days=1))
    unreadable = msgspec.structs.replace(ios, certificate_pem="-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    jobs = [
        DeliveryJob(app=AppRecord(app=TOPIC, ios=record, version=100 + i), token=new_token(), platform="apns-sandbox",
                    content=api.PushContent(title="x"))
        for i, record in enumerate((expired, unreadable))
    ]
    first, second = await apns_server.delivery.deliver(jobs)
    assert (first.status, first.reason, first.attempts) == ("failed", "CertificateExpired", 0)
    assert "expired on" in first.detail and "BEGIN" not in first.detail
    assert (second.status, second.reason) == ("failed", "InvalidCredentials")
    assert "cannot be loaded" in second.detail and "nope" not in second.detail
    assert (await call_admin(mock, "stats"))["connections_opened"] == 0


async def test_a_renewed_provider_token_goes_out_on_new_connections(mock):
    # The mock, like APNs, refuses a second token on a connection younger than 20 minutes
    # (TooManyProviderTokenUpdates): a connection keeps the token it started with.
    offset = [0.0]
    await call_admin(mock, "set_faults", accept_any_token=True)
    async with running_sender(mock, clock=lambda: time.time() + offset[0]) as sender:
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        offset[0] = 51 * 60  # our clock says renew; the mock's says the connection is brand new
        [sent] = await sender.send(requests_for([new_token()]))
        assert (sent.status, sent.attempts) == ("sent", 1)
        assert sender.token.renewals == 2
    stats = await call_admin(mock, "stats")
    assert stats["connections_opened"] == 2


async def test_too_many_provider_token_updates_twice_stops_sending_for_20_minutes(mock, monkeypatch):
    offset = [0.0]
    await call_admin(mock, "set_faults", accept_any_token=True)
    async with running_sender(mock, clock=lambda: time.time() + offset[0]) as sender:
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"
        # Keep the connection (as a buggy sender would): the renewed token meets the old connection.
        monkeypatch.setattr(sender.pool, "drop_connections", lambda: None)
        offset[0] = 51 * 60
        [refused] = await sender.send(requests_for([new_token()]))
        # Tried once more (in vain, on the same connection), then refused.
        assert (refused.status, refused.reason, refused.status_code) == ("failed", "TooManyProviderTokenUpdates", 429)
        requests = (await call_admin(mock, "stats"))["requests"]
        [again] = await sender.send(requests_for([new_token()]))
        assert (again.status, again.reason, again.attempts) == ("failed", "TooManyProviderTokenUpdates", 0)
        assert (await call_admin(mock, "stats"))["requests"] == requests  # APNs was left alone
        offset[0] = 72 * 60  # 20 minutes later the sender tries again
        await call_admin(mock, "set_faults", token_update_interval_s=0)
        assert (await sender.send(requests_for([new_token()])))[0].status == "sent"


async def test_a_connection_that_starts_with_one_stream_widens_after_the_first_answer(mock):
    # APNs allows one stream on a token-auth connection until a valid token has been seen.
    await call_admin(mock, "set_faults", accept_any_token=True, one_stream_until_valid_token=True, latency_ms=2)
    async with running_sender(mock, max_connections=1) as sender:
        results = await sender.send(requests_for([new_token() for _ in range(200)]))
        assert sender.pool._connections[0].limit == 100
    assert [r.status for r in results] == ["sent"] * 200
    stats = await call_admin(mock, "stats")
    assert stats["refused_streams"] == 0 and stats["connections_opened"] == 1
    assert max(stats["max_concurrent_streams"].values()) > 1
