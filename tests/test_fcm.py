"""The FCM channel against the mock FCM over TLS and HTTP/2: the real pool, the real server.

The mock runs in its own process (`plugins.fcm.mock.MockFcmProcess`), once for the module;
each test resets its projects, faults and records. Sender-level tests drive an `FcmSender`
directly (short retry delays); the others go through a real server on a real socket.
"""

from __future__ import annotations

import functools
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from plugins.fcm._credentials import check_android, ssl_context
from plugins.fcm._message import build_message, encode_send
from plugins.fcm._sender import FcmSender
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import CallError, Status
from protocols.trio_client import Client, open_client
from server import Server
from server.channels import AndroidRecord

from .conftest import make_config

PROJECT = "acme-push"
APP = "com.acme.android"
ACCOUNT = ServiceAccount.generate(PROJECT)
OTHER = ServiceAccount.generate("other-project")


def new_token() -> str:
    return "f" + secrets.token_urlsafe(40)


@pytest.fixture(scope="module")
def mock_process(tmp_path_factory: pytest.TempPathFactory):
    with MockFcmProcess(tmp_path_factory.mktemp("fcm")) as mock:
        yield mock


@pytest.fixture
def mock(mock_process: MockFcmProcess) -> MockFcmProcess:
    admin = mock_process.admin
    admin.reset_faults()
    admin.clear_tokens()
    admin.set_project(PROJECT, service_accounts=[ACCOUNT.spec()])
    admin.set_project("other-project", service_accounts=[OTHER.spec()])
    admin.clear_accepted()
    admin.clear_stats()
    return mock_process


async def call_admin(mock: MockFcmProcess, name: str, *args: Any, **kwargs: Any) -> Any:
    """A blocking admin call, off the Trio loop."""
    return await trio.to_thread.run_sync(functools.partial(getattr(mock.admin, name), *args, **kwargs))


def record(mock: MockFcmProcess, account: ServiceAccount = ACCOUNT) -> AndroidRecord:
    request = api.RegisterAndroidApp(app=APP, service_account=account.info(mock.token_uri))
    return check_android(request, token_uri_setting=mock.token_uri)


@asynccontextmanager
async def running_sender(mock: MockFcmProcess, account: ServiceAccount = ACCOUNT, **kwargs: Any) -> AsyncIterator[FcmSender]:
    kwargs.setdefault("backoff_min", 0.05)
    async with httpx.AsyncClient(verify=ssl_context(str(mock.ca_file))) as http:
        sender = FcmSender(record(mock, account), host=mock.host, port=mock.port, http=http, token_uri=mock.token_uri,
                           ca_file=str(mock.ca_file), **kwargs)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.run)
            yield sender
            nursery.cancel_scope.cancel()


def bodies(tokens: list[str], **content: Any) -> list[bytes]:
    message = build_message(content=api.PushContent(**(content or {"title": "Hi", "body": "there"})))
    return [encode_send(message, token) for token in tokens]


# -- the sender -------------------------------------------------------------------------------


async def test_messages_are_sent_with_an_access_token_from_the_token_endpoint(mock):
    tokens = [new_token() for _ in range(50)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    async with running_sender(mock) as sender:
        results = await sender.send(bodies(tokens))
        assert sender.token.renewals == 1  # one exchange for the 50
    assert {r.status for r in results} == {"sent"}
    assert all(r.provider_id.startswith(f"projects/{PROJECT}/messages/") for r in results)
    accepted = await call_admin(mock, "accepted")
    assert sorted(a["token"] for a in accepted) == sorted(tokens)
    assert accepted[0]["message"]["notification"] == {"title": "Hi", "body": "there"}
    stats = await call_admin(mock, "stats")
    assert stats["token_grants"] == 1


async def test_each_error_class_is_reported_with_fcms_code(mock):
    good, gone, foreign, unknown = new_token(), new_token(), new_token(), new_token()
    await call_admin(mock, "set_tokens", PROJECT, {good: {}, gone: {"unregistered": True}})
    await call_admin(mock, "set_tokens", "other-project", {foreign: {}})
    bad_ttl = encode_send({"android": {"ttl": "forever"}, "notification": {"title": "x"}}, good)
    async with running_sender(mock) as sender:
        results = await sender.send([*bodies([good, gone, foreign, unknown]), bad_ttl])
    outcomes = [(r.status, r.reason, r.status_code, r.attempts) for r in results]
    assert outcomes == [
        ("sent", None, 200, 1),
        ("invalid", "UNREGISTERED", 404, 1),
        ("invalid", "SENDER_ID_MISMATCH", 403, 1),
        ("invalid", "INVALID_ARGUMENT", 400, 1),  # "not a valid FCM registration token"
        ("failed", "INVALID_ARGUMENT", 400, 1),  # a bad message: final, the token stays valid
    ]
    assert "registration token" in results[3].detail
    assert "ttl" in results[4].detail


async def test_the_token_is_renewed_before_it_expires_and_after_it_does(mock):
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    await call_admin(mock, "set_faults", token_lifetime_s=3)
    async with running_sender(mock) as sender:
        assert (await sender.send(bodies([token])))[0].status == "sent"
        await trio.sleep(1.7)  # past half its life: renewed in the background, the old one still sends
        assert (await sender.send(bodies([token])))[0].status == "sent"
        with trio.fail_after(5):
            while sender.token.renewals < 2:
                await trio.sleep(0.05)
        await trio.sleep(3.2)  # expired: renewed before the next send goes out
        assert (await sender.send(bodies([token])))[0].status == "sent"
        assert sender.token.renewals == 3
    stats = await call_admin(mock, "stats")
    assert stats["token_grants"] == 3
    assert stats["errors"].get("UNAUTHENTICATED", 0) == 0  # never sent an expired token


async def test_a_revoked_token_is_renewed_once_on_a_401_and_the_message_retried(mock):
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    async with running_sender(mock) as sender:
        assert (await sender.send(bodies([token])))[0].status == "sent"
        await trio.sleep(1.1)  # tokens are stamped in seconds
        await call_admin(mock, "set_faults", revoke_tokens_before=int(time.time()))
        [again] = await sender.send(bodies([token]))
        assert (again.status, again.attempts) == ("sent", 1)
        assert sender.token.renewals == 2
        assert sender.counts.get("token_rejected") == 1


async def test_a_refused_service_account_fails_at_once_without_a_retry_storm(mock):
    token = new_token()
    stranger = ServiceAccount.generate(PROJECT)  # its key is not registered with "Google"
    async with running_sender(mock, stranger) as sender:
        results = await sender.send(bodies([token] * 5))
        assert {(r.status, r.reason) for r in results} == {("failed", "InvalidCredentials")}
        assert "invalid_client" in results[0].detail or "invalid_grant" in results[0].detail
        [later] = await sender.send(bodies([token]))  # refused for a while: the endpoint is left alone
        assert (later.reason, later.attempts) == ("InvalidCredentials", 0)
        assert sum((await call_admin(mock, "stats"))["token_errors"].values()) == 1
    stats = await call_admin(mock, "stats")
    assert stats["requests"] == 0  # nothing went to messages:send


async def _send_until_quota_lifted(mock, sender, tokens) -> tuple[list[Any], float]:
    started = trio.current_time()
    results: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            results.extend(await sender.send(bodies(tokens)))

        nursery.start_soon(send)
        with trio.fail_after(10):
            while (await call_admin(mock, "stats"))["errors"].get("QUOTA_EXCEEDED", 0) == 0:
                await trio.sleep(0.05)
        await call_admin(mock, "set_faults", quota_per_minute=None)  # the quota window turns
    return results, trio.current_time() - started


async def test_a_burst_of_401s_refuses_the_credentials_once_not_for_ten_minutes(mock):
    tokens = [new_token() for _ in range(40)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    await call_admin(mock, "set_faults", revoke_tokens_before=int(time.time()) + 3600)  # every token refused
    async with running_sender(mock) as sender:
        results = await sender.send(bodies(tokens))
        assert {r.status for r in results} == {"failed"}
        assert {r.reason for r in results} <= {"UNAUTHENTICATED", "InvalidCredentials"}
        assert sender.refused_until - time.time() <= sender.REFUSAL_MIN  # one episode, the first period
        assert sender.token.renewals <= 2  # one renewal for the whole burst
    assert (await call_admin(mock, "stats"))["token_grants"] <= 2


async def test_quota_exceeded_retries_the_message_after_retry_after(mock):
    tokens = [new_token() for _ in range(3)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    await call_admin(mock, "set_faults", quota_per_minute=2, retry_after_s=1)
    async with running_sender(mock, streams_per_connection=1, max_connections=1) as sender:
        results, elapsed = await _send_until_quota_lifted(mock, sender, tokens)
        # One QUOTA_EXCEEDED may be one device over its own rate: the project goes on.
        assert sender.counts.get("quota_pauses") is None
    assert [r.status for r in results] == ["sent"] * 3
    assert sorted(r.attempts for r in results) == [1, 1, 2]
    assert elapsed >= 1.0  # Retry-After: 1 was honoured


async def test_quota_exceeded_again_and_again_pauses_the_project(mock):
    tokens = [new_token() for _ in range(8)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    await call_admin(mock, "set_faults", quota_per_minute=2, retry_after_s=1)
    async with running_sender(mock, streams_per_connection=8, max_connections=1) as sender:
        results, elapsed = await _send_until_quota_lifted(mock, sender, tokens)
        assert sender.counts.get("quota_pauses", 0) >= 1
    assert [r.status for r in results] == ["sent"] * 8
    assert elapsed >= 1.0


async def test_a_ttl_running_out_during_a_quota_pause_fails_the_message(mock):
    tokens = [new_token() for _ in range(6)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    await call_admin(mock, "set_faults", quota_per_minute=1, retry_after_s=3600)
    async with running_sender(mock, streams_per_connection=6, max_connections=1) as sender:
        with trio.fail_after(10):
            results = await sender.send(bodies(tokens), [2] * 6)
        assert sender.paused_until - time.time() <= sender.QUOTA_PAUSE_MAX  # Retry-After is capped
    assert [r.status for r in results].count("sent") == 1
    assert {r.reason for r in results if r.status != "sent"} == {"QUOTA_EXCEEDED"}


async def test_unavailable_is_retried_and_gives_up_at_the_ttl(mock):
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    await call_admin(mock, "set_faults", ratio_503=1.0)
    async with running_sender(mock) as sender:
        body = encode_send(build_message(content=api.PushContent(title="x"), options=api.FcmOptions(ttl_s=1)), token)
        [result] = await sender.send([body], [1])
        assert (result.status, result.reason, result.status_code) == ("failed", "UNAVAILABLE", 503)
        assert result.attempts >= 2
        await call_admin(mock, "set_faults", ratio_503=0.0, ratio_502_html=1.0)
        [html] = await sender.send(bodies([token]), [0])  # ttl 0: one attempt
        assert (html.status, html.reason, html.attempts) == ("failed", "HTTP502", 1)
        await call_admin(mock, "set_faults", ratio_502_html=0.0)
        assert (await sender.send(bodies([token])))[0].status == "sent"


async def test_a_slow_fcm_produces_backpressure_not_memory(mock):
    tokens = [new_token() for _ in range(40)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    await call_admin(mock, "set_faults", latency_ms=50)
    most = 0
    async with running_sender(mock, max_queue=8, max_connections=1, streams_per_connection=4) as sender:
        async with trio.open_nursery() as nursery:
            results: list[Any] = []

            async def send(chunk: list[str]) -> None:
                results.extend(await sender.send(bodies(chunk)))

            for i in range(0, 40, 10):
                nursery.start_soon(send, tokens[i : i + 10])
            while len(results) < 40:
                most = max(most, sender.held)
                assert sender.pool.statistics().in_flight <= 4
                await trio.sleep(0.005)
    assert most <= 8
    assert [r.status for r in results] == ["sent"] * 40


async def test_the_rate_limit_spreads_messages(mock):
    tokens = [new_token() for _ in range(25)]
    await call_admin(mock, "set_tokens", PROJECT, {t: {} for t in tokens})
    async with running_sender(mock, rate_per_minute=600) as sender:  # 10 a second, 10 at once
        started = trio.current_time()
        results = await sender.send(bodies(tokens))
        elapsed = trio.current_time() - started
    assert [r.status for r in results] == ["sent"] * 25
    assert elapsed >= 1.4  # 10 at once, then 15 at 10 a second


# -- through the server -----------------------------------------------------------------------


@pytest.fixture
async def fcm_server(tmp_path: Path, mock: MockFcmProcess) -> AsyncIterator[Server]:
    # The mock's token endpoint is not Google's: only the fcm.token_uri setting lets accounts name it.
    settings = {"url": mock.url, "token_uri": mock.token_uri, "ca_file": str(mock.ca_file), "retry_min_s": 0.05}
    srv = Server(make_config(tmp_path / "data", fcm=settings))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        yield srv
        srv.request_stop()


@pytest.fixture
async def client(fcm_server: Server) -> AsyncIterator[Client]:
    async with open_client(fcm_server.addresses[0]) as c:
        yield c


async def register(client: Client, account: ServiceAccount = ACCOUNT, mock: MockFcmProcess | None = None) -> api.AppInfo:
    info = account.info(mock.token_uri) if mock else account.info()  # Google's token endpoint
    return await client.call(api.RegisterAndroidApp(app=APP, service_account=info))


async def test_an_android_app_is_registered_and_shown_without_its_key(client, mock):
    info = await register(client, mock=mock)
    assert info.android is not None
    assert (info.android.project_id, info.android.client_email, info.android.package_name) == (
        PROJECT, ACCOUNT.client_email, APP,
    )
    shown = json.dumps(msgspec_json(await client.call(api.GetApp(app=APP))))
    assert "PRIVATE KEY" not in shown and ACCOUNT.private_key_pem.splitlines()[1] not in shown
    with pytest.raises(CallError) as caught:
        await client.call(api.RegisterAndroidApp(app=APP, service_account={"project_id": PROJECT}))
    assert caught.value.status == Status.INVALID_ARGUMENT and caught.value.field == "$.service_account.client_email"


def msgspec_json(obj: Any) -> Any:
    return json.loads(msgspec.json.encode(obj))


async def test_push_send_reaches_fcm_and_dead_tokens_are_marked_on_the_profile(client, mock):
    good, gone = new_token(), new_token()
    await call_admin(mock, "set_tokens", PROJECT, {good: {}, gone: {"unregistered": True}})
    await register(client, mock=mock)
    for token in (good, gone):
        await client.call(api.RegisterToken(identity="crm:7", app=APP, platform="fcm", token=token))
    result = await client.call(api.SendPush(
        app=APP, identity="crm:7", content=api.PushContent(title="Sale", body="Today only", data={"sku": 42}),
        fcm=api.FcmOptions(channel_id="promos", ttl_s=3600),
    ))
    by_token = {o.token: o for o in result.outcomes}
    assert (by_token[good].status, by_token[good].platform) == ("sent", "fcm")
    assert by_token[good].provider_id.startswith(f"projects/{PROJECT}/messages/")
    assert (by_token[gone].status, by_token[gone].reason) == ("invalid", "UNREGISTERED")
    profile = await client.call(api.GetProfile(identity="crm:7"))
    states = {r.token: (r.state, r.invalid_reason) for r in profile.registrations}
    assert states == {good: ("active", None), gone: ("invalid", "UNREGISTERED")}
    [accepted] = await call_admin(mock, "accepted")
    message = accepted["message"]
    assert message["data"] == {"sku": "42"}
    assert message["android"]["ttl"] == "3600s" and message["android"]["notification"] == {"channel_id": "promos"}
    # The next push skips the dead token.
    again = await client.call(api.SendPush(app=APP, identity="crm:7", content=api.PushContent(title="x")))
    assert [o.token for o in again.outcomes] == [good]


async def test_a_raw_fcm_message_and_a_payload_for_the_other_platform(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    await register(client, mock=mock)
    raw = {"data": {"kind": "sync"}, "android": {"priority": "normal", "collapse_key": "sync"}}
    result = await client.call(api.SendPush(app=APP, token=token, platform="fcm", fcm_raw=raw))
    assert result.outcomes[0].status == "sent"
    [accepted] = await call_admin(mock, "accepted")
    assert accepted["message"]["data"] == {"kind": "sync"} and accepted["message"]["android"]["collapse_key"] == "sync"
    apns_only = await client.call(api.SendPush(app=APP, token=token, platform="fcm", raw={"aps": {"alert": "x"}}))
    assert (apns_only.outcomes[0].status, apns_only.outcomes[0].reason) == ("failed", "NoPayloadForPlatform")
    with pytest.raises(CallError, match="not both"):
        await client.call(api.SendPush(app=APP, token=token, platform="fcm", content=api.PushContent(title="x"), fcm_raw=raw))


async def test_re_registering_with_another_service_account_switches_senders(client, mock):
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    stranger = ServiceAccount.generate(PROJECT)
    await register(client, stranger, mock=mock)
    refused = await client.call(api.SendPush(app=APP, token=token, platform="fcm", content=api.PushContent(title="x")))
    assert refused.outcomes[0].reason == "InvalidCredentials"
    await register(client, ACCOUNT, mock=mock)  # the right key: sends at once, no refusal period
    sent = await client.call(api.SendPush(app=APP, token=token, platform="fcm", content=api.PushContent(title="x")))
    assert sent.outcomes[0].status == "sent"


@pytest.mark.parametrize("setting", [False, True], ids=["default", "token_uri set"])
async def test_a_service_account_cannot_make_the_server_post_where_it_likes(tmp_path, mock, setting):
    """The key file names the token endpoint, and the server POSTs signed assertions there:
    only Google's (or the fcm.token_uri setting's) may be named."""
    requests: list[bytes] = []

    async def listener(stream: trio.SocketStream) -> None:
        requests.append(await stream.receive_some(65536))
        await stream.aclose()

    fcm = {"url": mock.url, "ca_file": str(mock.ca_file), "retry_min_s": 0.05}
    if setting:
        fcm["token_uri"] = mock.token_uri
    srv = Server(make_config(tmp_path / "data", fcm=fcm))
    async with trio.open_nursery() as nursery:
        [internal] = await nursery.start(functools.partial(trio.serve_tcp, listener, 0, host="127.0.0.1"))
        target = f"http://127.0.0.1:{internal.socket.getsockname()[1]}/internal-admin?action=delete"
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as client:
            token = new_token()
            await call_admin(mock, "set_tokens", PROJECT, {token: {}})
            try:
                await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(target)))
                refusal = None
            except CallError as exc:
                refusal = exc
            try:  # what used to make the server call the target
                await client.call(api.SendPush(app=APP, token=token, platform="fcm", content=api.PushContent(title="x")))
            except CallError:
                pass
            assert requests == []
            assert refusal is not None and refusal.status is Status.INVALID_ARGUMENT
            assert refusal.field == "$.service_account.token_uri"
            assert "not Google's token endpoint" in refusal.message and "fcm.token_uri" in refusal.message
            # Google's own endpoint is always accepted (its key files name it)
            info = await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info()))
            assert info.android is not None
        srv.request_stop()
        nursery.cancel_scope.cancel()


async def test_a_raw_fcm_message_json_cannot_hold_fails_with_its_field(client, mock):
    """Not a channel error with a traceback: the notification fails before any request, naming the field."""
    token = new_token()
    await call_admin(mock, "set_tokens", PROJECT, {token: {}})
    await register(client, mock=mock)
    for raw, field in (({"data": {"k": msgspec.msgpack.Ext(5, b"x")}}, "$.fcm_raw.data.k"),
                       ({"android": {"notification": {(1, 2): "x"}}}, "$.fcm_raw.android.notification")):
        result = await client.call(api.SendPush(app=APP, token=token, platform="fcm", fcm_raw=raw))
        [outcome] = result.outcomes
        assert (outcome.status, outcome.reason, outcome.attempts) == ("failed", "INVALID_ARGUMENT", 0)
        assert outcome.detail.startswith(f"{field}: not JSON-encodable")
    assert await call_admin(mock, "accepted") == []
    good = await client.call(api.SendPush(app=APP, token=token, platform="fcm", fcm_raw={"data": {"k": "v"}}))
    assert good.outcomes[0].status == "sent"  # the channel is still there
