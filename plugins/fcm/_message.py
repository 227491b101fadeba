"""FCM HTTP v1 messages from Pigeon's push content.

Sans-IO: `build_message` turns a `PushContent` (or a raw FCM ``Message``) and `FcmOptions`
into the ``Message`` object without its target; `encode_send` adds the token and returns the
request body, ready for an h2 stream. What FCM documents as a client mistake is checked here,
before anything is sent, and raises `PayloadError` (the reason is FCM's error code where one
applies, ``INVALID_ARGUMENT``).

A notification (the default) is shown by Android itself::

    {"notification": {"title": ..., "body": ..., "image": <media_url>},
     "android": {"priority": "HIGH", "ttl": "3600s", "collapse_key": ...,
                 "notification": {"channel_id": ..., "notification_priority": "PRIORITY_HIGH",
                                  "visibility": "PUBLIC", "sound": ..., "tag": ...,
                                  "click_action": <category>, "color": ..., "icon": ...,
                                  "notification_count": <badge>, "title_loc_key": ..., ...}},
     "data": {"<data key>": "<value>", ...,        # PushContent.data; non-strings as JSON
              "adb_uri": ..., "adb_a_type": ...,   # PushContent.deeplink
              "_p": "<tracking envelope, JSON>"}}

A data-only message (``FcmOptions.data_only``) carries everything in ``data`` under the keys
Adobe's Messaging SDK reads (``adb_title``, ``adb_body``, ``adb_image``, ``adb_sound``,
``adb_n_count``, ``adb_n_priority``, ``adb_n_visibility``, ``adb_channel_id``, ``adb_icon``,
``adb_tag``, ``adb_clr_icon``, ``adb_uri``, ``adb_a_type``), so an app built on it renders the
notification and reports the interaction itself; its delivery priority is ``NORMAL`` unless
set.

FCM's data values are strings: other values in ``PushContent.data`` are JSON-encoded
(``3`` becomes ``"3"``, ``{"a": 1}`` becomes ``'{"a":1}'``). Keys FCM reserves (``from``,
``message_type``, ``google*``, ``gcm*``) and the keys Pigeon fills are refused. The message,
target excluded, is at most 4,096 bytes of JSON.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from protocols.api import CriticalSound, FcmOptions, PushContent
from server.channels import json_problem

__all__ = ["PayloadError", "build_message", "encode_send", "MESSAGE_LIMIT", "TRACKING_KEY", "LINK_KEY", "LINK_TYPE_KEY"]

#: FCM's limit for a message to a token (keys and values; we count the JSON without the token).
MESSAGE_LIMIT = 4096
TRACKING_KEY = "_p"
LINK_KEY = "adb_uri"
LINK_TYPE_KEY = "adb_a_type"
_TARGETS = ("token", "topic", "condition", "fid")
_RESERVED = re.compile(r"^(from|message_type|google.*|gcm.*)\Z", re.IGNORECASE)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+\Z")

_encoder = msgspec.json.Encoder()


class PayloadError(Exception):
    """A message FCM would refuse, found before sending.

    Attributes:
        reason: FCM's error code (``INVALID_ARGUMENT``) or Pigeon's (``PayloadEmpty``).
        field: the offending field, as in a ``push.send`` request (``$.content.data.from``).
        message: what is wrong.
    """

    def __init__(self, reason: str, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.reason = reason
        self.field = field
        self.message = message


def _string(value: Any) -> str:
    if isinstance(value, str):
        return value
    encoded = _encoder.encode(value)
    # What JSON holds as a string (bytes as base64, a datetime in RFC 3339) goes without quotes.
    return msgspec.json.decode(encoded) if encoded[:1] == b'"' else encoded.decode()


def _data(data: dict[str, Any], field: str, filled: set[str]) -> dict[str, str]:
    out = {}
    for key, value in data.items():
        if _RESERVED.match(key):
            raise PayloadError("INVALID_ARGUMENT", f"{field}.{key}", "FCM reserves this data key (from, message_type, google*, gcm*)")
        if key in filled:
            raise PayloadError("INVALID_ARGUMENT", f"{field}.{key}", "Pigeon fills this data key itself")
        try:
            out[key] = _string(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise PayloadError("INVALID_ARGUMENT", f"{field}.{key}", f"cannot be encoded as JSON ({exc})") from None
    return out


def _link(link: str) -> dict[str, str]:
    if not _URL.match(link):
        raise PayloadError("INVALID_ARGUMENT", "$.content.deeplink", f"{link!r} is not an absolute URL (scheme:...)")
    kind = "WEBURL" if link.lower().startswith(("http://", "https://")) else "DEEPLINK"
    return {LINK_KEY: link, LINK_TYPE_KEY: kind}


def _sound(content: PushContent, options: FcmOptions) -> str | None:
    if options.sound is not None:
        return options.sound
    sound = content.sound
    return sound.name if isinstance(sound, CriticalSound) else sound


def _android(options: FcmOptions, default_priority: str) -> dict[str, Any]:
    android: dict[str, Any] = {"priority": (options.priority or default_priority).upper()}
    if options.ttl_s is not None:
        android["ttl"] = f"{options.ttl_s}s"
    if options.collapse_key is not None:
        android["collapse_key"] = options.collapse_key
    if options.analytics_label is not None:
        android["fcm_options"] = {"analytics_label": options.analytics_label}
    return android


def _from_content(content: PushContent, options: FcmOptions, tracking: bool) -> dict[str, Any]:
    if content.live_activity is not None:
        raise PayloadError("INVALID_ARGUMENT", "$.content.live_activity", "Live Activities are iOS only")
    filled = set()
    if content.deeplink is not None:
        filled |= {LINK_KEY, LINK_TYPE_KEY}
    if tracking:
        filled.add(TRACKING_KEY)
    if options.data_only:
        filled |= {"adb_title", "adb_body", "adb_image", "adb_sound", "adb_n_count", "adb_n_priority",
                   "adb_n_visibility", "adb_channel_id", "adb_icon", "adb_tag", "adb_clr_icon"}
    data = _data(content.data, "$.content.data", filled)
    if content.deeplink is not None:
        data.update(_link(content.deeplink))
    sound = _sound(content, options)
    if options.data_only:
        fields = {
            "adb_title": content.title,
            "adb_body": content.body,
            "adb_image": content.media_url,
            "adb_sound": sound,
            "adb_n_count": None if content.badge is None else str(content.badge),
            "adb_n_priority": None if options.notification_priority is None else f"PRIORITY_{options.notification_priority.upper()}",
            "adb_n_visibility": None if options.visibility is None else options.visibility.upper(),
            "adb_channel_id": options.channel_id,
            "adb_icon": options.icon,
            "adb_tag": options.tag,
            "adb_clr_icon": None if options.color is None else options.color[1:],
        }
        data.update({key: value for key, value in fields.items() if value is not None})
        if not data:
            raise PayloadError("PayloadEmpty", "$.content", "nothing to send (no title, body or data)")
        message: dict[str, Any] = {"data": data, "android": _android(options, "normal")}
        return message
    notification = {
        key: value
        for key, value in (("title", content.title), ("body", content.body), ("image", content.media_url))
        if value is not None
    }
    android_notification = {
        key: value
        for key, value in (
            ("channel_id", options.channel_id),
            ("notification_priority", None if options.notification_priority is None else f"PRIORITY_{options.notification_priority.upper()}"),
            ("visibility", None if options.visibility is None else options.visibility.upper()),
            ("sound", sound),
            ("tag", options.tag),
            ("click_action", options.click_action or content.category),
            ("color", options.color),
            ("icon", options.icon),
            ("notification_count", content.badge),
            ("title_loc_key", content.title_loc_key),
            ("title_loc_args", content.title_loc_args or None),
            ("body_loc_key", content.loc_key),
            ("body_loc_args", content.loc_args or None),
        )
        if value is not None
    }
    if not notification and not content.title_loc_key and not content.loc_key:
        # Nothing to show (a sound, a badge or a channel alone do not make a notification).
        if not data:
            raise PayloadError("PayloadEmpty", "$.content", "nothing to send (no title, body, sound, badge or data)")
        # Only data (a silent update): a data message, delivered at normal priority.
        return {"data": data, "android": _android(options, "normal")}
    message = {"android": _android(options, "high")}
    if notification:
        message["notification"] = notification
    if android_notification:
        message["android"]["notification"] = android_notification
    if data:
        message["data"] = data
    return message


def _from_raw(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PayloadError("INVALID_ARGUMENT", "$.fcm_raw", f"expected a JSON object (an FCM Message), got {type(raw).__name__}")
    for target in _TARGETS:
        if target in raw:
            raise PayloadError("INVALID_ARGUMENT", f"$.fcm_raw.{target}", "Pigeon sets the target (the token): leave it out")
    if "message" in raw:
        raise PayloadError("INVALID_ARGUMENT", "$.fcm_raw.message", "give the Message itself, not the request body around it")
    if not raw:
        raise PayloadError("PayloadEmpty", "$.fcm_raw", "the message is an empty object")
    return dict(raw)


def build_message(
    *,
    content: PushContent | None = None,
    raw: dict[str, Any] | None = None,
    options: FcmOptions | None = None,
    tracking: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The FCM ``Message`` for ``content`` (or ``raw``, sent as it is), without its target.

    Args:
        content: what to show; built as described in the module docstring.
        raw: an FCM ``Message`` object without a target (``options`` do not apply to it).
        options: how to send it (`FcmOptions`).
        tracking: an opaque tracking envelope, put in ``data`` under ``"_p"`` as JSON.

    Raises:
        PayloadError: naming the field and what is wrong.
    """
    if (content is None) == (raw is None):
        raise PayloadError("INVALID_ARGUMENT", "$.content", "give content or fcm_raw, one of them")
    if raw is not None:
        message = _from_raw(raw)
    else:
        assert content is not None
        message = _from_content(content, options or FcmOptions(), tracking is not None)
    if tracking is not None:
        data = message.get("data")
        if data is not None and not isinstance(data, dict):
            raise PayloadError("INVALID_ARGUMENT", "$.fcm_raw.data", f"expected a JSON object, got {type(data).__name__}")
        if data and TRACKING_KEY in data:
            raise PayloadError("INVALID_ARGUMENT", f"$.fcm_raw.data.{TRACKING_KEY}", "Pigeon fills this data key itself")
        message["data"] = {**(data or {}), TRACKING_KEY: _string(tracking)}
    where = "$.fcm_raw" if raw is not None else "$.content"
    try:
        size = len(_encoder.encode(message))
    except (TypeError, ValueError, RecursionError) as exc:  # only a raw message can hold such values
        field, problem = json_problem(raw if raw is not None else message, where) or (where, str(exc))
        raise PayloadError("INVALID_ARGUMENT", field, f"not JSON-encodable: {problem}") from None
    if size > MESSAGE_LIMIT:
        raise PayloadError("INVALID_ARGUMENT", where, f"the message is {size} bytes of JSON; FCM allows {MESSAGE_LIMIT}")
    return message


def encode_send(message: dict[str, Any], token: str) -> bytes:
    """The body of a ``messages:send`` request for ``message`` to ``token``."""
    return _encoder.encode({"message": {**message, "token": token}})
