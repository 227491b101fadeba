"""Tests for plugins/apns/_payload.py: APNs payloads and headers, and Apple's rules."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from plugins.apns._payload import (
    PAYLOAD_LIMIT,
    TOPIC_SUFFIXES,
    VOIP_PAYLOAD_LIMIT,
    ApnsRequest,
    PayloadError,
    build_request,
)
from protocols.api import ApnsOptions, CriticalSound, LiveActivity, PushContent

BUNDLE = "com.example.app"


def build(content: PushContent | None = None, **kwargs: Any) -> ApnsRequest:
    """`build_request` with the test bundle id and options from keywords."""
    raw = kwargs.pop("raw", None)
    tracking = kwargs.pop("tracking", None)
    bundle_id = kwargs.pop("bundle_id", BUNDLE)
    return build_request(
        bundle_id=bundle_id, options=ApnsOptions(**kwargs), content=content, raw=raw, tracking=tracking
    )


def payload_of(content: PushContent | None = None, **kwargs: Any) -> Any:
    return json.loads(build(content, **kwargs).payload)


def error(content: PushContent | None = None, **kwargs: Any) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        build(content, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# alerts


def test_typical_alert_payload_and_headers() -> None:
    content = PushContent(
        title="Hello",
        body="Your order shipped",
        sound="default",
        badge=3,
        data={"order": 42, "kind": "ship", "tags": ["a", "b"], "meta": {"x": None}},
    )
    request = build(content, tracking={"m": "msg-1", "j": "jv-2"})
    assert json.loads(request.payload) == {
        "aps": {"alert": {"title": "Hello", "body": "Your order shipped"}, "badge": 3, "sound": "default"},
        "order": 42,
        "kind": "ship",
        "tags": ["a", "b"],
        "meta": {"x": None},
        "_p": {"m": "msg-1", "j": "jv-2"},
    }
    assert request.headers == [
        (b"apns-topic", b"com.example.app"),
        (b"apns-push-type", b"alert"),
        (b"apns-priority", b"10"),
    ]
    assert request.topic == BUNDLE
    assert request.push_type == "alert"
    assert request.priority == 10
    assert (request.expiration, request.collapse_id, request.apns_id) == (None, None, None)
    # Compact UTF-8 JSON, aps first.
    assert request.payload.startswith(b'{"aps":{"alert":{"title":"Hello"')
    assert b" " not in request.payload.replace(b"Your order shipped", b"")


def test_body_only_alert_stays_a_dictionary() -> None:
    assert payload_of(PushContent(body="Hi")) == {"aps": {"alert": {"body": "Hi"}}}


def test_non_ascii_text_is_sent_as_utf8_not_escaped() -> None:
    request = build(PushContent(title="Olá 👋", body="日本語"))
    assert "Olá 👋".encode() in request.payload
    assert "日本語".encode() in request.payload
    assert json.loads(request.payload)["aps"]["alert"] == {"title": "Olá 👋", "body": "日本語"}


def test_localized_alert() -> None:
    content = PushContent(
        title_loc_key="GAME_TITLE",
        title_loc_args=["Ana"],
        subtitle_loc_key="GAME_SUB",
        subtitle_loc_args=["3", "1"],
        loc_key="GAME_PLAY_REQUEST_FORMAT",
        loc_args=["Jenna", "Frank"],
        launch_image="launch.png",
    )
    assert payload_of(content) == {
        "aps": {
            "alert": {
                "launch-image": "launch.png",
                "title-loc-key": "GAME_TITLE",
                "title-loc-args": ["Ana"],
                "subtitle-loc-key": "GAME_SUB",
                "subtitle-loc-args": ["3", "1"],
                "loc-key": "GAME_PLAY_REQUEST_FORMAT",
                "loc-args": ["Jenna", "Frank"],
            }
        }
    }


def test_localization_key_without_arguments_has_no_args_key() -> None:
    assert payload_of(PushContent(loc_key="HELLO")) == {"aps": {"alert": {"loc-key": "HELLO"}}}


@pytest.mark.parametrize(
    ("args_field", "key_field"),
    [("loc_args", "loc_key"), ("title_loc_args", "title_loc_key"), ("subtitle_loc_args", "subtitle_loc_key")],
)
def test_localization_arguments_need_their_key(args_field: str, key_field: str) -> None:
    exc = error(PushContent(body="x", **{args_field: ["a"]}))
    assert exc.reason == "InvalidPayload"
    assert exc.field == f"$.content.{args_field}"
    assert f"$.content.{key_field}" in exc.message


def test_every_aps_key() -> None:
    content = PushContent(
        title="T",
        subtitle="S",
        body="B",
        badge=0,
        sound="chime.aiff",
        thread_id="thread-1",
        category="INVITE",
        content_available=True,
        mutable_content=True,
        interruption_level="time-sensitive",
        relevance_score=0.75,
        target_content_id="window-2",
        filter_criteria="work",
    )
    assert payload_of(content) == {
        "aps": {
            "alert": {"title": "T", "subtitle": "S", "body": "B"},
            "badge": 0,
            "sound": "chime.aiff",
            "thread-id": "thread-1",
            "category": "INVITE",
            "content-available": 1,
            "mutable-content": 1,
            "interruption-level": "time-sensitive",
            "relevance-score": 0.75,
            "target-content-id": "window-2",
            "filter-criteria": "work",
        }
    }


def test_critical_sound() -> None:
    content = PushContent(
        title="Alarm", sound=CriticalSound(name="siren.caf", volume=0.5), interruption_level="critical"
    )
    assert payload_of(content)["aps"] == {
        "alert": {"title": "Alarm"},
        "sound": {"critical": 1, "name": "siren.caf", "volume": 0.5},
        "interruption-level": "critical",
    }
    assert payload_of(PushContent(body="x", sound=CriticalSound()))["aps"]["sound"] == {
        "critical": 1,
        "name": "default",
        "volume": 1.0,
    }


def test_critical_sound_volume_out_of_range() -> None:
    exc = error(PushContent(body="x", sound=CriticalSound(volume=1.5)))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.sound.volume")


def test_negative_badge() -> None:
    exc = error(PushContent(badge=-1))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.badge")


def test_not_push_content() -> None:
    with pytest.raises(PayloadError) as info:
        build_request(bundle_id=BUNDLE, options=ApnsOptions(), content={"title": "x"})  # type: ignore[arg-type]
    assert info.value.field == "$.content"


# ---------------------------------------------------------------------------------------------
# custom keys: data, media, deep link, tracking


def test_custom_data_goes_beside_aps() -> None:
    payload = payload_of(PushContent(body="b", data={"acme1": "bar", "acme2": 42, "flag": True}))
    assert payload == {"aps": {"alert": {"body": "b"}}, "acme1": "bar", "acme2": 42, "flag": True}


def test_data_key_aps_is_refused() -> None:
    exc = error(PushContent(body="b", data={"aps": {"badge": 1}}))
    assert exc.reason == "InvalidPayload"
    assert exc.field == "$.content.data.aps"
    assert "'aps'" in exc.message


def test_data_only_push() -> None:
    assert payload_of(PushContent(data={"k": "v"})) == {"aps": {}, "k": "v"}


def test_media_url_sets_mutable_content() -> None:
    payload = payload_of(PushContent(title="Look", media_url="https://cdn.example.com/a.jpg"))
    assert payload == {
        "aps": {"alert": {"title": "Look"}, "mutable-content": 1},
        "adb_media": "https://cdn.example.com/a.jpg",
    }


@pytest.mark.parametrize(
    ("link", "kind"),
    [
        ("https://example.com/orders/42", "WEBURL"),
        ("http://example.com", "WEBURL"),
        ("HTTPS://EXAMPLE.COM", "WEBURL"),
        ("myapp://orders/42", "DEEPLINK"),
        ("my-app+x.y:orders", "DEEPLINK"),
        ("httpx://host", "DEEPLINK"),
    ],
)
def test_deep_link_keys(link: str, kind: str) -> None:
    payload = payload_of(PushContent(body="b", deeplink=link))
    assert payload == {"aps": {"alert": {"body": "b"}}, "adb_uri": link, "adb_a_type": kind}


@pytest.mark.parametrize("link", ["", "/orders/42", "orders/42", "1app://x", "://x"])
def test_deep_link_needs_a_scheme(link: str) -> None:
    exc = error(PushContent(body="b", deeplink=link))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.deeplink")


def test_media_and_link_together_with_data() -> None:
    content = PushContent(
        body="b", media_url="https://x/a.gif", deeplink="app://home", data={"k": 1}, mutable_content=False
    )
    assert payload_of(content, tracking={"m": 1}) == {
        "aps": {"alert": {"body": "b"}, "mutable-content": 1},
        "k": 1,
        "adb_media": "https://x/a.gif",
        "adb_uri": "app://home",
        "adb_a_type": "DEEPLINK",
        "_p": {"m": 1},
    }


@pytest.mark.parametrize(
    ("key", "extra"),
    [
        ("adb_media", {"media_url": "https://x/a.png"}),
        ("adb_uri", {"deeplink": "app://x"}),
        ("adb_a_type", {"deeplink": "app://x"}),
    ],
)
def test_data_may_not_collide_with_pigeon_keys(key: str, extra: dict[str, str]) -> None:
    exc = error(PushContent(body="b", data={key: "mine"}, **extra))
    assert (exc.reason, exc.field) == ("InvalidPayload", f"$.content.data.{key}")


def test_pigeon_key_names_are_free_when_unused() -> None:
    data = {"adb_media": "m", "adb_uri": "u", "adb_a_type": "t", "_p": "p"}
    assert payload_of(PushContent(data=data)) == {"aps": {}, **data}


def test_tracking_key() -> None:
    tracking = {"e": "exec-1", "m": "msg-9", "v": 3}
    payload = payload_of(PushContent(body="b"), tracking=tracking)
    assert payload == {"aps": {"alert": {"body": "b"}}, "_p": tracking}


def test_empty_tracking_is_left_out() -> None:
    assert payload_of(PushContent(body="b"), tracking={}) == {"aps": {"alert": {"body": "b"}}}


def test_tracking_collides_with_data() -> None:
    exc = error(PushContent(body="b", data={"_p": 1}), tracking={"m": 1})
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.data._p")


def test_unencodable_data_names_the_key() -> None:
    exc = error(PushContent(body="b", data={"ok": 1, "nested": {"when": object()}}))
    assert exc.reason == "InvalidPayload"
    assert exc.field == "$.content.data.nested.when"
    assert "JSON" in exc.message


def test_unencodable_tracking() -> None:
    exc = error(PushContent(body="b"), tracking={"x": [1, object()]})
    assert exc.field == "$.tracking.x[1]"


def test_lone_surrogate_is_invalid() -> None:
    exc = error(PushContent(title="bad \ud800"))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.title")


def test_empty_content() -> None:
    exc = error(PushContent())
    assert (exc.reason, exc.field) == ("PayloadEmpty", "$.content")
    exc = error(PushContent(), tracking={"m": 1})
    assert exc.reason == "PayloadEmpty"


def test_neither_content_nor_raw() -> None:
    assert error().reason == "PayloadEmpty"


def test_both_content_and_raw() -> None:
    exc = error(PushContent(body="b"), raw={"aps": {}})
    assert exc.reason == "InvalidPayload"
    assert "not both" in exc.message


# ---------------------------------------------------------------------------------------------
# raw payloads


def test_raw_payload_as_given() -> None:
    raw = {"aps": {"alert": "Hello"}, "custom": [1, 2, {"x": "é"}]}
    request = build(raw=raw)
    assert request.payload == msgspec.json.encode(raw)
    assert json.loads(request.payload) == raw


def test_raw_payload_gets_tracking_without_being_changed() -> None:
    raw = {"aps": {"alert": "Hello"}}
    assert payload_of(raw=raw, tracking={"m": 1}) == {"aps": {"alert": "Hello"}, "_p": {"m": 1}}
    assert raw == {"aps": {"alert": "Hello"}}


def test_raw_tracking_collision() -> None:
    exc = error(raw={"aps": {}, "_p": 1}, tracking={"m": 1})
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.raw._p")


def test_raw_must_be_an_object() -> None:
    exc = error(raw=["aps"])
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.raw")


def test_raw_empty() -> None:
    exc = error(raw={})
    assert (exc.reason, exc.field) == ("PayloadEmpty", "$.raw")


def test_raw_aps_must_be_an_object() -> None:
    exc = error(raw={"aps": "Hello"})
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.raw.aps")


def test_raw_unencodable_value() -> None:
    exc = error(raw={"aps": {}, "x": {"y": {1, object()}}})
    assert exc.reason == "InvalidPayload"
    assert exc.field == "$.raw.x.y"


def test_raw_size_limit() -> None:
    base = len(msgspec.json.encode({"aps": {}, "x": ""}))
    assert len(build(raw={"aps": {}, "x": "a" * (PAYLOAD_LIMIT - base)}).payload) == PAYLOAD_LIMIT
    exc = error(raw={"aps": {}, "x": "a" * (PAYLOAD_LIMIT - base + 1)})
    assert (exc.reason, exc.field) == ("PayloadTooLarge", "$.raw")


# ---------------------------------------------------------------------------------------------
# background pushes


def test_background_push() -> None:
    content = PushContent(content_available=True, data={"acme1": "bar", "acme2": 42})
    request = build(content, push_type="background")
    assert json.loads(request.payload) == {"aps": {"content-available": 1}, "acme1": "bar", "acme2": 42}
    assert request.priority == 5
    assert request.topic == BUNDLE
    assert request.headers == [
        (b"apns-topic", b"com.example.app"),
        (b"apns-push-type", b"background"),
        (b"apns-priority", b"5"),
    ]
    assert build(content, push_type="background", priority=5).priority == 5


@pytest.mark.parametrize("priority", [10, 1])
def test_background_priority_must_be_5(priority: int) -> None:
    exc = error(PushContent(content_available=True), push_type="background", priority=priority)
    assert (exc.reason, exc.field) == ("BadPriority", "$.apns.priority")
    assert "5" in exc.message and "'background'" in exc.message


def test_background_needs_content_available() -> None:
    exc = error(PushContent(data={"k": 1}), push_type="background")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.content_available")
    assert "content-available" in exc.message


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"title": "t"}, "$.content.title"),
        ({"body": "b"}, "$.content.body"),
        ({"loc_key": "K"}, "$.content.loc_key"),
        ({"badge": 0}, "$.content.badge"),
        ({"sound": "default"}, "$.content.sound"),
        ({"sound": CriticalSound()}, "$.content.sound"),
        ({"media_url": "https://x/a.png"}, "$.content.media_url"),
        ({"mutable_content": True}, "$.content.mutable_content"),
        ({"category": "C"}, "$.content.category"),
    ],
)
def test_background_carries_nothing_but_content_available(extra: dict[str, Any], field: str) -> None:
    exc = error(PushContent(content_available=True, **extra), push_type="background")
    assert (exc.reason, exc.field) == ("InvalidPayload", field)
    assert field in exc.message


def test_background_error_names_every_offending_field() -> None:
    exc = error(PushContent(content_available=True, title="t", badge=1), push_type="background")
    assert "$.content.title" in exc.message and "$.content.badge" in exc.message


def test_background_raw() -> None:
    raw = {"aps": {"content-available": 1}, "k": "v"}
    assert build(raw=raw, push_type="background").payload == msgspec.json.encode(raw)
    exc = error(raw={"k": "v"}, push_type="background")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.raw.aps")
    exc = error(raw={"aps": {"content-available": 1, "alert": "x"}}, push_type="background")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.raw.aps.alert")


# ---------------------------------------------------------------------------------------------
# topics, push types, priorities


@pytest.mark.parametrize(
    ("push_type", "topic"),
    [
        ("alert", "com.example.app"),
        ("background", "com.example.app"),
        ("voip", "com.example.app.voip"),
        ("complication", "com.example.app.complication"),
        ("fileprovider", "com.example.app.pushkit.fileprovider"),
        ("liveactivity", "com.example.app.push-type.liveactivity"),
        ("location", "com.example.app.location-query"),
        ("mdm", "com.example.app"),
        ("pushtotalk", "com.example.app.voip-ptt"),
        ("controls", "com.example.app.push-type.controls"),
        ("widgets", "com.example.app.push-type.widgets"),
    ],
)
def test_topic_suffixes(push_type: str, topic: str) -> None:
    if push_type == "background":
        content = PushContent(content_available=True)
    elif push_type == "liveactivity":
        content = PushContent(live_activity=LiveActivity(event="update"))
    else:
        content = PushContent(body="b")
    request = build(content, push_type=push_type)
    assert request.topic == topic
    assert request.push_type == push_type
    assert request.headers[:2] == [(b"apns-topic", topic.encode()), (b"apns-push-type", push_type.encode())]


def test_topic_table_covers_every_push_type() -> None:
    from protocols.api import ApnsPushType

    assert set(TOPIC_SUFFIXES) == set(ApnsPushType.__args__)  # type: ignore[attr-defined]


def test_mdm_topic_is_the_bundle_id_as_given() -> None:
    topic = "com.apple.mgmt.External.0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
    assert build(raw={"mdm": "token"}, push_type="mdm", bundle_id=topic).topic == topic


@pytest.mark.parametrize("bundle_id", ["", "com.example app", "com.exämple", "com.example\n"])
def test_bad_bundle_id(bundle_id: str) -> None:
    exc = error(PushContent(body="b"), bundle_id=bundle_id)
    assert (exc.reason, exc.field) == ("BadTopic", "$.bundle_id")


def test_unknown_push_type() -> None:
    exc = error(PushContent(body="b"), push_type="fax")
    assert (exc.reason, exc.field) == ("InvalidPushType", "$.apns.push_type")
    assert "'fax'" in exc.message and "alert" in exc.message


@pytest.mark.parametrize("priority", [10, 5, 1])
@pytest.mark.parametrize("push_type", ["alert", "voip", "mdm", "widgets"])
def test_priorities_allowed(push_type: str, priority: int) -> None:
    request = build(PushContent(body="b"), push_type=push_type, priority=priority)
    assert request.priority == priority
    assert (b"apns-priority", str(priority).encode()) in request.headers


@pytest.mark.parametrize("push_type", ["alert", "voip", "location", "liveactivity", "pushtotalk"])
def test_default_priority_is_10(push_type: str) -> None:
    live = LiveActivity(event="update") if push_type == "liveactivity" else None
    assert build(PushContent(body="b", live_activity=live), push_type=push_type).priority == 10


@pytest.mark.parametrize("push_type", ["liveactivity", "location"])
def test_priority_1_refused_where_apple_names_5_or_10(push_type: str) -> None:
    live = LiveActivity(event="update") if push_type == "liveactivity" else None
    content = PushContent(body="b", live_activity=live)
    assert build(content, push_type=push_type, priority=5).priority == 5
    exc = error(content, push_type=push_type, priority=1)
    assert (exc.reason, exc.field) == ("BadPriority", "$.apns.priority")
    assert "10 or 5" in exc.message


@pytest.mark.parametrize("priority", [0, 7, 11, -1])
def test_unknown_priority(priority: int) -> None:
    exc = error(PushContent(body="b"), priority=priority)
    assert (exc.reason, exc.field) == ("BadPriority", "$.apns.priority")
    assert str(priority) in exc.message


# ---------------------------------------------------------------------------------------------
# headers


def test_every_header_exact() -> None:
    options = ApnsOptions(
        push_type="alert",
        priority=5,
        expiration=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
        collapse_id="score-update",
        apns_id="EABEAE54-14A8-11E5-B60B-1697F925EC7B",
    )
    request = build_request(bundle_id=BUNDLE, options=options, content=PushContent(body="b"))
    assert request.headers == [
        (b"apns-topic", b"com.example.app"),
        (b"apns-push-type", b"alert"),
        (b"apns-priority", b"5"),
        (b"apns-expiration", b"1893553445"),
        (b"apns-collapse-id", b"score-update"),
        (b"apns-id", b"eabeae54-14a8-11e5-b60b-1697f925ec7b"),
    ]
    for name, value in request.headers:
        assert isinstance(name, bytes) and isinstance(value, bytes)
        assert name == name.lower()
        assert not name.startswith(b":") and name != b"authorization"
    assert request.expiration == 1893553445
    assert request.collapse_id == "score-update"
    assert request.apns_id == "eabeae54-14a8-11e5-b60b-1697f925ec7b"


def test_headers_are_a_fresh_list_each_time() -> None:
    first = build(PushContent(body="b"))
    first.headers.append((b"x", b"y"))
    assert build(PushContent(body="b")).headers == first.headers[:-1]


def test_collapse_id_64_bytes() -> None:
    collapse_id = "é" * 32  # 64 bytes of UTF-8, 32 characters
    request = build(PushContent(body="b"), collapse_id=collapse_id)
    assert (b"apns-collapse-id", collapse_id.encode()) in request.headers
    assert build(PushContent(body="b"), collapse_id="a" * 64).collapse_id == "a" * 64


@pytest.mark.parametrize("collapse_id", ["é" * 32 + "a", "a" * 65, "😀" * 17])
def test_collapse_id_over_64_bytes(collapse_id: str) -> None:
    exc = error(PushContent(body="b"), collapse_id=collapse_id)
    assert (exc.reason, exc.field) == ("BadCollapseId", "$.apns.collapse_id")
    assert f"{len(collapse_id.encode())} bytes" in exc.message and "64" in exc.message


@pytest.mark.parametrize("collapse_id", ["", "a\nb", "a\x00", " lead", "trail\t", "bad \ud800"])
def test_collapse_id_not_a_header_value(collapse_id: str) -> None:
    exc = error(PushContent(body="b"), collapse_id=collapse_id)
    assert (exc.reason, exc.field) == ("BadCollapseId", "$.apns.collapse_id")


def test_apns_id_is_lower_cased() -> None:
    request = build(PushContent(body="b"), apns_id="123E4567-E89B-12D3-A456-426614174000")
    assert request.apns_id == "123e4567-e89b-12d3-a456-426614174000"
    assert request.headers[-1] == (b"apns-id", b"123e4567-e89b-12d3-a456-426614174000")


@pytest.mark.parametrize(
    "apns_id",
    [
        "",
        "123e4567e89b12d3a456426614174000",
        "{123e4567-e89b-12d3-a456-426614174000}",
        "urn:uuid:123e4567-e89b-12d3-a456-426614174000",
        "123e4567-e89b-12d3-a456-42661417400",
        "123e4567-e89b-12d3-a456-4266141740000",
        "123e4567-e89b-12d3-a456-42661417400g",
        "123e4567-e89b-12d3-a456-426614174000\n",
        " 123e4567-e89b-12d3-a456-426614174000",
    ],
)
def test_apns_id_must_be_a_canonical_uuid(apns_id: str) -> None:
    exc = error(PushContent(body="b"), apns_id=apns_id)
    assert (exc.reason, exc.field) == ("BadMessageId", "$.apns.apns_id")
    assert "UUID" in exc.message


@pytest.mark.parametrize(
    ("when", "seconds"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), 0),
        (datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), 1),
        (datetime(2025, 6, 1, 12, 0, 0, 999_999, tzinfo=UTC), 1748779200),
        (datetime(2025, 6, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2))), 1748779200),
    ],
)
def test_expiration_in_epoch_seconds(when: datetime, seconds: int) -> None:
    request = build(PushContent(body="b"), expiration=when)
    assert request.expiration == seconds
    assert (b"apns-expiration", str(seconds).encode()) in request.headers


def test_expiration_before_1970() -> None:
    exc = error(PushContent(body="b"), expiration=datetime(1969, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert (exc.reason, exc.field) == ("BadExpirationDate", "$.apns.expiration")


def test_naive_expiration() -> None:
    exc = error(PushContent(body="b"), expiration=datetime(2030, 1, 1))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.apns.expiration")
    assert "timezone" in exc.message


# ---------------------------------------------------------------------------------------------
# Live Activities


def test_live_activity_update() -> None:
    live = LiveActivity(
        event="update",
        timestamp=datetime(2025, 1, 1, tzinfo=UTC),
        content_state={"score": "2-1", "minute": 67},
        stale_date=datetime(2025, 1, 1, 1, tzinfo=UTC),
        dismissal_date=datetime(2025, 1, 1, 4, 0, 0, 500_000, tzinfo=UTC),
    )
    request = build(
        PushContent(title="Goal!", body="2-1", sound="chime.aiff", relevance_score=75.0, live_activity=live),
        push_type="liveactivity",
        priority=5,
    )
    assert request.topic == "com.example.app.push-type.liveactivity"
    assert json.loads(request.payload) == {
        "aps": {
            "alert": {"title": "Goal!", "body": "2-1", "sound": "chime.aiff"},
            "relevance-score": 75.0,
            "timestamp": 1735689600,
            "event": "update",
            "content-state": {"score": "2-1", "minute": 67},
            "stale-date": 1735693200,
            "dismissal-date": 1735704000,
        }
    }


def test_live_activity_timestamp_defaults_to_now() -> None:
    before = int(time.time())
    aps = payload_of(PushContent(live_activity=LiveActivity(event="end")), push_type="liveactivity")["aps"]
    assert before <= aps["timestamp"] <= time.time()
    assert aps == {"timestamp": aps["timestamp"], "event": "end", "content-state": {}}


def test_live_activity_push_to_start() -> None:
    live = LiveActivity(
        event="start",
        timestamp=datetime(2025, 1, 1, tzinfo=UTC),
        content_state={"eta": 10},
        attributes_type="DeliveryAttributes",
        attributes={"order": "42"},
    )
    aps = payload_of(PushContent(title="On its way", live_activity=live), push_type="liveactivity")["aps"]
    assert aps == {
        "alert": {"title": "On its way"},
        "timestamp": 1735689600,
        "event": "start",
        "content-state": {"eta": 10},
        "attributes-type": "DeliveryAttributes",
        "attributes": {"order": "42"},
    }


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"attributes_type": None}, "$.content.live_activity.attributes_type"),
        ({"attributes": None}, "$.content.live_activity.attributes"),
        ({"title": None}, "$.content.title"),
    ],
)
def test_live_activity_start_needs_attributes_and_alert(changes: dict[str, Any], field: str) -> None:
    live = {"event": "start", "attributes_type": "A", "attributes": {}}
    text = {"title": "t"}
    for key, value in changes.items():
        (text if key == "title" else live)[key] = value
    content = PushContent(live_activity=LiveActivity(**live), sound="x", **{k: v for k, v in text.items() if v})
    exc = error(content, push_type="liveactivity")
    assert (exc.reason, exc.field) == ("InvalidPayload", field)


def test_live_activity_needs_its_push_type() -> None:
    exc = error(PushContent(body="b", live_activity=LiveActivity(event="update")))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.live_activity")
    assert "liveactivity" in exc.message


def test_liveactivity_push_type_needs_live_activity() -> None:
    exc = error(PushContent(body="b"), push_type="liveactivity")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.live_activity")


def test_live_activity_naive_timestamp() -> None:
    live = LiveActivity(event="update", stale_date=datetime(2030, 1, 1))
    exc = error(PushContent(live_activity=live), push_type="liveactivity")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.live_activity.stale_date")


# ---------------------------------------------------------------------------------------------
# size


def sized_alert(size: int, char: str = "a") -> PushContent:
    """A body-only alert whose payload is exactly ``size`` bytes (``char`` is 1 or 2 bytes)."""
    base = len(msgspec.json.encode({"aps": {"alert": {"body": ""}}}))
    width = len(char.encode())
    fill, rest = divmod(size - base, width)
    return PushContent(body=char * fill + "a" * rest)


@pytest.mark.parametrize("char", ["a", "é"])
def test_payload_exactly_at_the_limit(char: str) -> None:
    request = build(sized_alert(PAYLOAD_LIMIT, char))
    assert len(request.payload) == PAYLOAD_LIMIT == 4096


@pytest.mark.parametrize("char", ["a", "é"])
def test_payload_one_byte_over_the_limit(char: str) -> None:
    exc = error(sized_alert(PAYLOAD_LIMIT + 1, char))
    assert (exc.reason, exc.field) == ("PayloadTooLarge", "$.content")
    assert "4097 bytes" in exc.message and "4096" in exc.message and "'alert'" in exc.message


def test_voip_limit_is_5120() -> None:
    assert len(build(sized_alert(4097), push_type="voip").payload) == 4097
    request = build(sized_alert(VOIP_PAYLOAD_LIMIT), push_type="voip")
    assert len(request.payload) == VOIP_PAYLOAD_LIMIT == 5120
    assert request.topic == "com.example.app.voip"
    exc = error(sized_alert(VOIP_PAYLOAD_LIMIT + 1), push_type="voip")
    assert exc.reason == "PayloadTooLarge"
    assert "5121 bytes" in exc.message and "5120" in exc.message


def test_tracking_counts_towards_the_limit() -> None:
    content = sized_alert(PAYLOAD_LIMIT - len(b',"_p":{"m":1}'))
    assert len(build(content, tracking={"m": 1}).payload) == PAYLOAD_LIMIT
    assert error(content, tracking={"m": 12}).reason == "PayloadTooLarge"


# ---------------------------------------------------------------------------------------------
# errors


def test_payload_error_attributes() -> None:
    exc = error(PushContent(body="b"), collapse_id="x" * 65)
    assert isinstance(exc, Exception)
    assert exc.reason == "BadCollapseId"
    assert exc.message.startswith("$.apns.collapse_id: ")
    assert str(exc) == f"BadCollapseId: {exc.message}"


def test_errors_are_not_cached() -> None:
    """The header cache keeps only good combinations; a bad one fails every time."""
    for _ in range(2):
        assert error(PushContent(body="b"), push_type="background", priority=10).reason == "BadPriority"


# ---------------------------------------------------------------------------------------------
# properties

text = st.text()
optional_text = st.none() | text
text_lists = st.lists(text, max_size=3)


@st.composite
def contents(draw: st.DrawFn) -> PushContent:
    keys = {
        name: draw(optional_text)
        for name in ("title", "subtitle", "body", "launch_image", "thread_id", "category", "target_content_id")
    }
    loc = {}
    for key, args in (
        ("title_loc_key", "title_loc_args"),
        ("subtitle_loc_key", "subtitle_loc_args"),
        ("loc_key", "loc_args"),
    ):
        value = draw(optional_text)
        if value is not None:
            loc[key] = value
            loc[args] = draw(text_lists)
    sound = draw(st.none() | text | st.builds(CriticalSound, name=text, volume=st.floats(0.0, 1.0)))
    data = draw(
        st.dictionaries(
            text.filter(lambda k: k not in ("aps", "adb_media", "adb_uri", "adb_a_type", "_p")), text, max_size=3
        )
    )
    media = draw(st.none() | text.map(lambda t: "https://cdn.example.com/" + t))
    link = draw(st.none() | text.map(lambda t: "myapp://" + t))
    big = draw(st.none() | st.text(min_size=1000, max_size=3000))
    if big is not None:
        keys["body"] = big
    return PushContent(
        **keys,
        **loc,
        sound=sound,
        data=data,
        media_url=media,
        deeplink=link,
        badge=draw(st.none() | st.integers(0, 99)),
    )


def strings_in(value: Any) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set(value).union(*(strings_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(strings_in(v) for v in value))
    return set()


def expected_strings(content: PushContent) -> set[str]:
    """Every string ``content`` carries (data keys included), which the payload must hold."""
    found: set[str] = set()
    for name in content.__struct_fields__:
        value = getattr(content, name)
        found |= {value.name} if isinstance(value, CriticalSound) else strings_in(value)
    return found


@settings(max_examples=300, deadline=None)
@given(contents(), st.sampled_from(["alert", "voip"]))
def test_any_text_builds_or_is_too_large(content: PushContent, push_type: str) -> None:
    limit = VOIP_PAYLOAD_LIMIT if push_type == "voip" else PAYLOAD_LIMIT
    try:
        request = build(content, push_type=push_type, tracking={"m": "id"})
    except PayloadError as exc:
        if exc.reason == "PayloadEmpty":
            assert content == PushContent()
            return
        assert exc.reason == "PayloadTooLarge", exc
        assert f"at most {limit}" in exc.message
        return
    assert len(request.payload) <= limit
    payload = json.loads(request.payload.decode("utf-8"))
    assert strings_in(payload) >= expected_strings(content)
    aps = payload["aps"]
    if content.title is not None:
        assert aps["alert"]["title"] == content.title
    if content.body is not None:
        assert aps["alert"]["body"] == content.body
    for key, value in content.data.items():
        assert payload[key] == value
    if content.media_url is not None:
        assert payload["adb_media"] == content.media_url
        assert aps["mutable-content"] == 1
    if content.deeplink is not None:
        assert payload["adb_uri"] == content.deeplink
    assert payload["_p"] == {"m": "id"}


def test_live_activity_unknown_event() -> None:
    live = LiveActivity(event="pause")  # type: ignore[arg-type]
    exc = error(PushContent(live_activity=live), push_type="liveactivity")
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.live_activity.event")


def test_data_key_that_is_not_a_string() -> None:
    exc = error(PushContent(body="b", data={"k": {(1, 2): "v"}}))
    assert (exc.reason, exc.field) == ("InvalidPayload", "$.content.data.k")
    assert "(1, 2)" in exc.message
