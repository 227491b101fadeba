"""Conformance: Google's own Python SDK (firebase-admin) against the mock FCM.

The SDK gets a generated service-account key whose ``token_uri`` is the mock's token endpoint
(google-auth signs its assertion with ``aud`` = Google's token URL, which the mock accepts),
sends to ``_MessagingService.FCM_URL`` pointed at the mock, and trusts the mock's CA through
the environment: ``REQUESTS_CA_BUNDLE`` for its synchronous path (requests, HTTP/1.1) and
``SSL_CERT_FILE`` for its async path (httpx, HTTP/2). It must see message names, and the
exceptions it maps from the mock's error bodies: UnregisteredError, InvalidArgumentError,
SenderIdMismatchError, QuotaExceededError; and renew its access token on a 401.

Found on the way (firebase-admin 7.7): its synchronous path retries a 429 that carries
``Retry-After`` four more times (urllib3's default ``Retry`` honours the header on 413/429/503;
``Retry-After: 0`` makes it back off 0 + 1 + 2 + 4 s instead), its async path does not retry it; `messaging.Message.token` is deprecated in favour of ``fid``; and
``delete_app`` closes the async httpx client in a new event loop, which fails once that client
has connections, so the async test closes it in its own loop first.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import re
import time
from collections.abc import Iterator

import firebase_admin
import pytest
from firebase_admin import credentials, exceptions, messaging

from plugins.fcm.mock import MockFcmProcess, ServiceAccount

pytestmark = pytest.mark.filterwarnings("ignore:Message.token is deprecated:DeprecationWarning")

PROJECT = "conformance-a"
OTHER_PROJECT = "conformance-b"
GOOD = "fGood:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx"
GONE = "fGone:APA91bHun4MxP5egoKMwt2KZFBaFUH-2RYqx"
OTHERS = "fOther:APA91bHun4MxP5egoKMwt2KZFBaFUH-3RYqx"
UNKNOWN = "fUnknown:APA91bHun4MxP5egoKMwt2KZFBaFUH-4RYqx"
NAME_RE = re.compile(rf"projects/{PROJECT}/messages/0:\d+%[0-9a-f]{{16}}")
_app_names = itertools.count()


@pytest.fixture(scope="module")
def sa() -> ServiceAccount:
    return ServiceAccount.generate(PROJECT)


@pytest.fixture(scope="module")
def mock(tmp_path_factory: pytest.TempPathFactory, sa: ServiceAccount) -> Iterator[MockFcmProcess]:
    config = {
        "projects": {
            PROJECT: {"service_accounts": [sa.spec()], "tokens": {GOOD: {}, GONE: {"unregistered": True}}},
            OTHER_PROJECT: {"service_accounts": [ServiceAccount.generate(OTHER_PROJECT).spec()], "tokens": {OTHERS: {}}},
        }
    }
    with MockFcmProcess(tmp_path_factory.mktemp("fcm"), config=config) as m:
        yield m


@pytest.fixture
def app(mock: MockFcmProcess, sa: ServiceAccount, monkeypatch: pytest.MonkeyPatch) -> Iterator[firebase_admin.App]:
    """A firebase-admin app of its own, sending to the mock; deleted afterwards."""
    mock.admin.reset_faults()
    mock.admin.clear_accepted()
    mock.admin.clear_stats()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(mock.ca_file))  # requests: token exchange and sync sends
    monkeypatch.setenv("SSL_CERT_FILE", str(mock.ca_file))  # httpx: async sends
    monkeypatch.setattr(messaging._MessagingService, "FCM_URL", mock.url + "/v1/projects/{0}/messages:send")
    firebase_app = firebase_admin.initialize_app(
        credentials.Certificate(sa.info(mock.token_uri)), name=f"conformance-{next(_app_names)}"
    )
    try:
        yield firebase_app
    finally:
        firebase_admin.delete_app(firebase_app)


def test_send_returns_the_message_name(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    message = messaging.Message(
        token=GOOD,
        data={"order": "42"},
        notification=messaging.Notification(title="Hello", body="World"),
        android=messaging.AndroidConfig(
            priority="high",
            ttl=dt.timedelta(seconds=3.5),
            collapse_key="orders",
            notification=messaging.AndroidNotification(
                color="#ff0000",
                priority="max",
                visibility="public",
                vibrate_timings_millis=[100, 200],
                event_timestamp=dt.datetime.now(dt.UTC),
                light_settings=messaging.LightSettings("#11223344", 100, 200),
                proxy="deny",
            ),
        ),
        apns=messaging.APNSConfig(headers={"apns-priority": "10"}, payload=messaging.APNSPayload(aps=messaging.Aps(badge=1))),
        webpush=messaging.WebpushConfig(
            headers={"TTL": "60"},
            notification=messaging.WebpushNotification(title="w", actions=[messaging.WebpushNotificationAction("a", "A")]),
            fcm_options=messaging.WebpushFCMOptions(link="https://example.com"),
        ),
        fcm_options=messaging.FCMOptions(analytics_label="conformance"),
    )
    name = messaging.send(message, app=app)
    assert NAME_RE.fullmatch(name)
    [item] = mock.admin.accepted()
    assert item["name"] == name and item["token"] == GOOD and item["protocol"] == "http/1.1"
    android = item["message"]["android"]
    assert android["priority"] == "HIGH" and android["ttl"] == "3.500000000s"
    assert android["notification"]["notification_priority"] == "PRIORITY_MAX"
    assert android["notification"]["visibility"] == "PUBLIC" and android["notification"]["proxy"] == "DENY"
    assert item["message"]["apns"]["payload"] == {"aps": {"badge": 1}}
    assert mock.admin.stats()["token_grants"] == 1


def test_fid_target(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    assert NAME_RE.fullmatch(messaging.send(messaging.Message(fid=GOOD), app=app))
    assert mock.admin.accepted()[0]["fid"] == GOOD


def test_dry_run(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    name = messaging.send(messaging.Message(token=GOOD), dry_run=True, app=app)
    assert name == f"projects/{PROJECT}/messages/fake_message_id"
    assert mock.admin.accepted() == []
    with pytest.raises(messaging.UnregisteredError):
        messaging.send(messaging.Message(token=GONE), dry_run=True, app=app)


def test_unregistered_error(app: firebase_admin.App) -> None:
    with pytest.raises(messaging.UnregisteredError) as info:
        messaging.send(messaging.Message(token=GONE), app=app)
    assert str(info.value) == "Requested entity was not found."
    assert info.value.code == exceptions.NOT_FOUND and info.value.http_response.status_code == 404


def test_invalid_argument_error_for_an_unknown_token(app: firebase_admin.App) -> None:
    with pytest.raises(exceptions.InvalidArgumentError) as info:
        messaging.send(messaging.Message(token=UNKNOWN), app=app)
    assert str(info.value) == "The registration token is not a valid FCM registration token"


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        ({"token": GOOD, "android": messaging.AndroidConfig(ttl=dt.timedelta(days=29))}, "TTL must be between"),
        ({"token": GOOD, "data": {"from": "me"}}, "Invalid data payload key: from"),
        ({"topic": "news", "data": {"k": "x" * 2100}}, "Request contains an invalid argument."),
    ],
    ids=["ttl_over_4_weeks", "reserved_data_key", "topic_message_over_2048_bytes"],
)
def test_invalid_argument_error_for_what_the_sdk_does_not_check(app: firebase_admin.App, fields: dict, text: str) -> None:
    with pytest.raises(exceptions.InvalidArgumentError) as info:
        messaging.send(messaging.Message(**fields), app=app)
    assert str(info.value).startswith(text)


def test_sender_id_mismatch_error(app: firebase_admin.App) -> None:
    with pytest.raises(messaging.SenderIdMismatchError) as info:
        messaging.send(messaging.Message(token=OTHERS), app=app)
    assert str(info.value) == "SenderId mismatch"


def test_quota_exceeded_error(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    # Without Retry-After: with one, the SDK's urllib3 would retry four times first (module docstring).
    mock.admin.set_faults(quota_per_minute=1, retry_after_s=None)
    messaging.send(messaging.Message(token=GOOD), app=app)
    with pytest.raises(messaging.QuotaExceededError) as info:
        messaging.send(messaging.Message(token=GOOD), app=app)
    assert info.value.http_response.status_code == 429
    stats = mock.admin.stats()
    assert stats["requests"] == 2 and stats["errors"] == {"QUOTA_EXCEEDED": 1}


def test_access_token_is_renewed_on_401(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    messaging.send(messaging.Message(token=GOOD), app=app)
    mock.admin.set_faults(revoke_tokens_before=time.time())
    messaging.send(messaging.Message(token=GOOD), app=app)
    stats = mock.admin.stats()
    assert stats["token_grants"] == 2 and stats["errors"] == {"UNAUTHENTICATED": 1} and stats["successes"] == 2


def test_send_each_with_mixed_outcomes(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    tokens = [GOOD, GONE, UNKNOWN, OTHERS, GOOD]
    batch = messaging.send_each([messaging.Message(token=t, data={"i": str(i)}) for i, t in enumerate(tokens)], app=app)
    assert (batch.success_count, batch.failure_count) == (2, 3)
    kinds = [type(r.exception) if r.exception else None for r in batch.responses]
    assert kinds == [None, messaging.UnregisteredError, exceptions.InvalidArgumentError, messaging.SenderIdMismatchError, None]
    assert all(NAME_RE.fullmatch(r.message_id) for r in batch.responses if r.success)
    assert sorted(item["message"]["data"]["i"] for item in mock.admin.accepted()) == ["0", "4"]


def test_send_each_async_over_http2(mock: MockFcmProcess, app: firebase_admin.App) -> None:
    tokens = [GOOD, GONE, UNKNOWN, GOOD, OTHERS, GOOD]

    async def run() -> messaging.BatchResponse:
        try:
            return await asyncio.wait_for(
                messaging.send_each_async([messaging.Message(token=t) for t in tokens], app=app), 60
            )
        finally:
            # firebase-admin's delete_app would close this client in another event loop.
            await messaging._get_messaging_service(app)._async_client.aclose()

    batch = asyncio.run(run())
    assert (batch.success_count, batch.failure_count) == (3, 3)
    kinds = [type(r.exception) if r.exception else None for r in batch.responses]
    assert kinds == [
        None,
        messaging.UnregisteredError,
        exceptions.InvalidArgumentError,
        None,
        messaging.SenderIdMismatchError,
        None,
    ]
    stats = mock.admin.stats()
    assert stats["protocols"]["h2"]["requests"] == 6  # the token exchange goes over requests (HTTP/1.1)
    assert stats["protocols"]["http/1.1"]["requests"] == 1
    assert {item["protocol"] for item in mock.admin.accepted()} == {"h2"}
