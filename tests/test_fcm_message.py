"""FCM messages from push content (plugins/fcm/_message.py), sans-IO."""

from __future__ import annotations

import json

import msgspec
import pytest

from plugins.fcm._message import MESSAGE_LIMIT, PayloadError, build_message, encode_send
from protocols.api import CriticalSound, FcmOptions, LiveActivity, PushContent


def test_a_notification_with_android_options_and_data() -> None:
    content = PushContent(
        title="Your order shipped",
        body="Order 1042 is on its way.",
        media_url="https://cdn.example.com/box.png",
        badge=2,
        sound="chime",
        category="ORDER",
        deeplink="myapp://orders/1042",
        data={"order": 1042, "gift": True, "note": "fragile", "items": [1, 2]},
    )
    options = FcmOptions(
        priority="normal", ttl_s=3600, collapse_key="orders", channel_id="orders", notification_priority="high",
        visibility="private", tag="order-1042", color="#ff8800", icon="ic_box", analytics_label="orders_1",
    )
    message = build_message(content=content, options=options, tracking={"m": "msg1", "j": "j1"})
    assert message == {
        "notification": {"title": "Your order shipped", "body": "Order 1042 is on its way.", "image": "https://cdn.example.com/box.png"},
        "android": {
            "priority": "NORMAL",
            "ttl": "3600s",
            "collapse_key": "orders",
            "fcm_options": {"analytics_label": "orders_1"},
            "notification": {
                "channel_id": "orders",
                "notification_priority": "PRIORITY_HIGH",
                "visibility": "PRIVATE",
                "sound": "chime",
                "tag": "order-1042",
                "click_action": "ORDER",
                "color": "#ff8800",
                "icon": "ic_box",
                "notification_count": 2,
            },
        },
        # FCM data values are strings: the others are sent as JSON.
        "data": {
            "order": "1042", "gift": "true", "note": "fragile", "items": "[1,2]",
            "adb_uri": "myapp://orders/1042", "adb_a_type": "DEEPLINK",
            "_p": '{"m":"msg1","j":"j1"}',
        },
    }
    body = json.loads(encode_send(message, "tok-1"))
    assert body == {"message": {**message, "token": "tok-1"}}


def test_defaults_high_priority_for_notifications_and_localized_keys() -> None:
    content = PushContent(title_loc_key="T", title_loc_args=["a"], loc_key="B", loc_args=["b", "c"],
                          sound=CriticalSound(name="alarm"), deeplink="https://example.com/x")
    message = build_message(content=content)
    assert message["android"] == {
        "priority": "HIGH",
        "notification": {"sound": "alarm", "title_loc_key": "T", "title_loc_args": ["a"], "body_loc_key": "B",
                         "body_loc_args": ["b", "c"]},
    }
    assert "notification" not in message
    assert message["data"] == {"adb_uri": "https://example.com/x", "adb_a_type": "WEBURL"}


def test_data_only_uses_adobes_keys_and_normal_priority() -> None:
    content = PushContent(title="Hi", body="There", media_url="https://cdn/x.png", badge=3, sound="default",
                          deeplink="https://example.com", data={"k": "v"})
    options = FcmOptions(data_only=True, channel_id="c1", notification_priority="low", visibility="public",
                         icon="ic", tag="t", color="#00ff00")
    message = build_message(content=content, options=options)
    assert message == {
        "data": {
            "k": "v", "adb_uri": "https://example.com", "adb_a_type": "WEBURL",
            "adb_title": "Hi", "adb_body": "There", "adb_image": "https://cdn/x.png", "adb_sound": "default",
            "adb_n_count": "3", "adb_n_priority": "PRIORITY_LOW", "adb_n_visibility": "PUBLIC",
            "adb_channel_id": "c1", "adb_icon": "ic", "adb_tag": "t", "adb_clr_icon": "00ff00",
        },
        "android": {"priority": "NORMAL"},
    }


def test_content_with_only_data_is_a_data_message() -> None:
    message = build_message(content=PushContent(content_available=True, data={"sync": "1"}))
    assert message == {"data": {"sync": "1"}, "android": {"priority": "NORMAL"}}


@pytest.mark.parametrize(
    ("content", "options", "reason", "field"),
    [
        (PushContent(), FcmOptions(), "PayloadEmpty", "$.content"),
        (PushContent(), FcmOptions(data_only=True), "PayloadEmpty", "$.content"),
        (PushContent(title="x", data={"from": "me"}), FcmOptions(), "INVALID_ARGUMENT", "$.content.data.from"),
        (PushContent(title="x", data={"google.x": "1"}), FcmOptions(), "INVALID_ARGUMENT", "$.content.data.google.x"),
        (PushContent(title="x", data={"GCM_x": "1"}), FcmOptions(), "INVALID_ARGUMENT", "$.content.data.GCM_x"),
        (PushContent(title="x", data={"message_type": "1"}), FcmOptions(), "INVALID_ARGUMENT", "$.content.data.message_type"),
        (PushContent(title="x", deeplink="myapp://x", data={"adb_uri": "y"}), FcmOptions(), "INVALID_ARGUMENT", "$.content.data.adb_uri"),
        (PushContent(sound="chime", badge=1), FcmOptions(channel_id="c"),
         "PayloadEmpty", "$.content"),
        (PushContent(title="x", data={"adb_title": "y"}), FcmOptions(data_only=True), "INVALID_ARGUMENT", "$.content.data.adb_title"),
        (PushContent(title="x", deeplink="not a url"), FcmOptions(), "INVALID_ARGUMENT", "$.content.deeplink"),
        (PushContent(live_activity=LiveActivity(event="end")), FcmOptions(), "INVALID_ARGUMENT", "$.content.live_activity"),
        (PushContent(body="x" * MESSAGE_LIMIT), FcmOptions(), "INVALID_ARGUMENT", "$.content"),
    ],
)
def test_what_fcm_would_refuse_is_refused_before_sending(content, options, reason, field) -> None:
    with pytest.raises(PayloadError) as caught:
        build_message(content=content, options=options)
    assert (caught.value.reason, caught.value.field) == (reason, field)
    assert str(caught.value).startswith(field)


def test_pigeons_own_keys_are_refused_only_when_pigeon_fills_them() -> None:
    assert build_message(content=PushContent(title="x", data={"_p": "mine", "adb_uri": "u"}))["data"] == {"_p": "mine", "adb_uri": "u"}
    with pytest.raises(PayloadError) as caught:
        build_message(content=PushContent(title="x", data={"_p": "mine"}), tracking={"m": 1})
    assert caught.value.field == "$.content.data._p"
    with pytest.raises(PayloadError) as caught:
        build_message(raw={"data": {"_p": "mine"}}, tracking={"m": 1})
    assert caught.value.field == "$.fcm_raw.data._p"


def test_strings_json_holds_go_without_quotes() -> None:
    from datetime import UTC, datetime

    data = build_message(content=PushContent(title="x", data={"b": b"ab", "t": datetime(2025, 1, 2, tzinfo=UTC), "n": None}))["data"]
    assert data == {"b": "YWI=", "t": "2025-01-02T00:00:00Z", "n": "null"}


def test_the_size_limit_counts_the_json_of_the_message() -> None:
    base = len(msgspec.json.encode(build_message(content=PushContent(body=""))))
    at_limit = PushContent(body="x" * (MESSAGE_LIMIT - base))
    assert len(msgspec.json.encode(build_message(content=at_limit))) == MESSAGE_LIMIT
    with pytest.raises(PayloadError, match=f"{MESSAGE_LIMIT + 1} bytes"):
        build_message(content=PushContent(body="x" * (MESSAGE_LIMIT - base + 1)))


def test_raw_messages_are_sent_as_they_are_with_tracking_added() -> None:
    raw = {"data": {"a": "1"}, "android": {"priority": "high"}, "apns": {"payload": {"aps": {"badge": 1}}}}
    message = build_message(raw=raw, tracking={"m": "x"}, options=FcmOptions(ttl_s=5))
    assert message == {**raw, "data": {"a": "1", "_p": '{"m":"x"}'}}
    assert raw["data"] == {"a": "1"}  # the caller's map is not changed
    assert build_message(raw={"notification": {"title": "t"}}) == {"notification": {"title": "t"}}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"token": "x", "data": {}}, "$.fcm_raw.token"),
        ({"topic": "news"}, "$.fcm_raw.topic"),
        ({"condition": "'a' in topics"}, "$.fcm_raw.condition"),
        ({"message": {"notification": {}}}, "$.fcm_raw.message"),
        ({}, "$.fcm_raw"),
        ([1], "$.fcm_raw"),
        ({"data": {"k": "x" * 5000}}, "$.fcm_raw"),
    ],
)
def test_raw_messages_must_leave_the_target_to_pigeon(raw, field) -> None:
    with pytest.raises(PayloadError) as caught:
        build_message(raw=raw)
    assert caught.value.field == field


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("raw", "field", "problem"),
    [
        ({"data": {None: "x"}}, "$.fcm_raw.data", "key None is not a string"),
        ({"android": {"notification": {(1, 2): "x"}}}, "$.fcm_raw.android.notification", "key (1, 2) is not a string"),
        ({"data": {"k": msgspec.msgpack.Ext(5, b"x")}}, "$.fcm_raw.data.k", "msgspec.msgpack.Ext is unsupported"),
        ({"apns": {"payload": [1, {"x": msgspec.msgpack.Ext(-2, b"")}]}}, "$.fcm_raw.apns.payload[1].x", "Ext"),
        ({"data": {"k": _deep(100_000)}}, "$.fcm_raw", "nests too deeply"),
    ],
)
def test_a_raw_message_json_cannot_hold_names_its_field(raw, field, problem) -> None:
    """As APNs's raw payloads: a PayloadError naming the field, not a TypeError from the encoder."""
    with pytest.raises(PayloadError) as caught:
        build_message(raw=raw, tracking={"m": "x"})
    assert (caught.value.reason, caught.value.field) == ("INVALID_ARGUMENT", field)
    assert caught.value.message.startswith("not JSON-encodable: ") and problem in caught.value.message


def test_tracking_needs_a_data_map_in_a_raw_message() -> None:
    with pytest.raises(PayloadError, match=r"\$\.fcm_raw\.data"):
        build_message(raw={"data": "x"}, tracking={"m": 1})


def test_content_or_raw_exactly() -> None:
    with pytest.raises(PayloadError):
        build_message()
    with pytest.raises(PayloadError):
        build_message(content=PushContent(title="x"), raw={"data": {}})
