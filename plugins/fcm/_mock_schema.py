"""The FCM v1 request schema of the mock FCM (`plugins.fcm.mock`; providers.md 2.3): a send
request checked field by field against SendMessageRequest and Message, as FCM's front end does
(`parse_object`: proto field names, lowerCamelCase accepted too, Google's error texts), then the
message's own rules (`message_error`).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import msgspec

__all__ = ["REQUEST", "TARGETS", "Violation", "message_error", "parse_object"]

_TOPIC_RE = re.compile(r"[a-zA-Z0-9\-_.~%]+")
_CONDITION_TOPIC_RE = re.compile(r"'([^']*)'\s+in\s+topics")
_LABEL_RE = re.compile(r"[a-zA-Z0-9\-_.~%]{1,50}")
_COLOR_RE = re.compile(r"#[0-9a-fA-F]{6}")
_DURATION_RE = re.compile(r"(-?)(\d{1,12})(?:\.(\d{1,9}))?s")
_TIMESTAMP_RE = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})")
#: A message's target fields: exactly one is set.
TARGETS = ("token", "topic", "condition", "fid")
_MAX_TTL_S = 2_419_200

_json_encode = msgspec.json.encode


class _Type:
    """A scalar, enum, map or list field type; ``name`` is what Google's errors call it."""

    __slots__ = ("kind", "name", "values", "item")

    def __init__(self, kind: str, name: str, values: tuple[str, ...] = (), item: _Type | None = None) -> None:
        self.kind = kind
        self.name = name
        self.values = values
        self.item = item


class _Schema:
    """A protobuf message: its fields by proto name, and every accepted spelling."""

    __slots__ = ("name", "fields", "names")

    def __init__(self, name: str, fields: dict[str, _Type | _Schema]) -> None:
        self.name = f"type.googleapis.com/{name}"
        self.fields = fields
        self.names: dict[str, str] = {}
        for field in fields:
            head, *rest = field.split("_")
            self.names[field] = field
            self.names[head + "".join(part[:1].upper() + part[1:] for part in rest)] = field


def _enum(name: str, *values: str) -> _Type:
    return _Type("enum", f"type.googleapis.com/google.firebase.fcm.v1.{name}", values)


_STRING = _Type("string", "TYPE_STRING")
_BOOL = _Type("bool", "TYPE_BOOL")
_INT32 = _Type("int32", "TYPE_INT32")
_FLOAT = _Type("float", "TYPE_FLOAT")
_DURATION = _Type("duration", "type.googleapis.com/google.protobuf.Duration")
_TIMESTAMP = _Type("timestamp", "type.googleapis.com/google.protobuf.Timestamp")
_STRUCT = _Type("struct", "type.googleapis.com/google.protobuf.Struct")
_STRING_MAP = _Type("map", "TYPE_STRING", item=_STRING)
_STRING_LIST = _Type("list", "TYPE_STRING", item=_STRING)
_DURATION_LIST = _Type("list", _DURATION.name, item=_DURATION)

_FCM = "google.firebase.fcm.v1."
_COLOR = _Schema("google.type.Color", {"red": _FLOAT, "green": _FLOAT, "blue": _FLOAT, "alpha": _FLOAT})
_LIGHT_SETTINGS = _Schema(
    _FCM + "LightSettings", {"color": _COLOR, "light_on_duration": _DURATION, "light_off_duration": _DURATION}
)
_ANDROID_NOTIFICATION = _Schema(
    _FCM + "AndroidNotification",
    {
        "title": _STRING,
        "body": _STRING,
        "icon": _STRING,
        "color": _STRING,
        "sound": _STRING,
        "tag": _STRING,
        "click_action": _STRING,
        "body_loc_key": _STRING,
        "body_loc_args": _STRING_LIST,
        "title_loc_key": _STRING,
        "title_loc_args": _STRING_LIST,
        "channel_id": _STRING,
        "ticker": _STRING,
        "sticky": _BOOL,
        "event_time": _TIMESTAMP,
        "local_only": _BOOL,
        "notification_priority": _enum(
            "AndroidNotification.NotificationPriority",
            "PRIORITY_UNSPECIFIED", "PRIORITY_MIN", "PRIORITY_LOW", "PRIORITY_DEFAULT", "PRIORITY_HIGH", "PRIORITY_MAX",
        ),
        "default_sound": _BOOL,
        "default_vibrate_timings": _BOOL,
        "default_light_settings": _BOOL,
        "vibrate_timings": _DURATION_LIST,
        "visibility": _enum("AndroidNotification.Visibility", "VISIBILITY_UNSPECIFIED", "PRIVATE", "PUBLIC", "SECRET"),
        "notification_count": _INT32,
        "light_settings": _LIGHT_SETTINGS,
        "image": _STRING,
        "bypass_proxy_notification": _BOOL,
        "proxy": _enum("AndroidNotification.Proxy", "PROXY_UNSPECIFIED", "ALLOW", "DENY", "IF_PRIORITY_LOWERED"),
    },
)
_ANDROID = _Schema(
    _FCM + "AndroidConfig",
    {
        "collapse_key": _STRING,
        "priority": _enum("AndroidMessagePriority", "NORMAL", "HIGH"),
        "ttl": _DURATION,
        "restricted_package_name": _STRING,
        "data": _STRING_MAP,
        "notification": _ANDROID_NOTIFICATION,
        "fcm_options": _Schema(_FCM + "AndroidFcmOptions", {"analytics_label": _STRING}),
        "direct_boot_ok": _BOOL,
        "bandwidth_constrained_ok": _BOOL,
        "restricted_satellite_ok": _BOOL,
    },
)
_APNS = _Schema(
    _FCM + "ApnsConfig",
    {
        "headers": _STRING_MAP,
        "payload": _STRUCT,
        "fcm_options": _Schema(_FCM + "ApnsFcmOptions", {"analytics_label": _STRING, "image": _STRING}),
        "live_activity_token": _STRING,
    },
)
_WEBPUSH = _Schema(
    _FCM + "WebpushConfig",
    {
        "headers": _STRING_MAP,
        "data": _STRING_MAP,
        "notification": _STRUCT,
        "fcm_options": _Schema(_FCM + "WebpushFcmOptions", {"link": _STRING, "analytics_label": _STRING}),
    },
)
_MESSAGE = _Schema(
    _FCM + "Message",
    {
        "name": _STRING,
        "data": _STRING_MAP,
        "notification": _Schema(_FCM + "Notification", {"title": _STRING, "body": _STRING, "image": _STRING}),
        "android": _ANDROID,
        "webpush": _WEBPUSH,
        "apns": _APNS,
        "fcm_options": _Schema(_FCM + "FcmOptions", {"analytics_label": _STRING}),
        "token": _STRING,
        "topic": _STRING,
        "condition": _STRING,
        "fid": _STRING,
    },
)
REQUEST = _Schema(_FCM + "SendMessageRequest", {"validate_only": _BOOL, "message": _MESSAGE})

_BAD = object()
Violation = tuple[str | None, str]  # (field path or None, description)


def _show(value: Any) -> str:
    text = _json_encode(value).decode()
    return text if len(text) <= 100 else text[:97] + "..."


def _at(path: str) -> str:
    return f" at '{path}'" if path else ""


def parse_object(doc: dict[str, Any], schema: _Schema, path: str, errors: list[Violation]) -> dict[str, Any]:
    """``doc`` checked against ``schema``, with proto field names; problems go to ``errors``."""
    out: dict[str, Any] = {}
    names = schema.names
    fields = schema.fields
    for key, value in doc.items():
        name = names.get(key)
        if name is None:
            errors.append((path or None, f'Invalid JSON payload received. Unknown name "{key}"{_at(path)}: Cannot find field.'))
            continue
        if value is None:
            continue
        parsed = _parse_value(value, fields[name], path, name, key, errors)
        if parsed is not _BAD:
            out[name] = parsed
    if schema is _MESSAGE:
        given = [name for name in TARGETS if name in out]
        if len(given) > 1:
            errors.append(
                (path, f"Invalid JSON payload received. Oneof field 'target' is already set. Cannot set '{given[1]}'")
            )
    return out


def _parse_value(value: Any, spec: _Type | _Schema, parent: str, name: str, key: str, errors: list[Violation]) -> Any:
    path = f"{parent}.{name}" if parent else name
    t = type(value)
    if isinstance(spec, _Schema):
        if t is dict:
            return parse_object(value, spec, path, errors)
    else:
        kind = spec.kind
        if kind == "string":
            if t is str:
                return value
        elif kind == "map":
            if t is dict:
                for index, item in enumerate(value.values()):
                    if type(item) is not str:
                        where = f"{path}[{index}].value"
                        errors.append((where, f"Invalid value at '{where}' (TYPE_STRING), {_show(item)}"))
                return value
        elif kind == "list":
            if t is list:
                assert spec.item is not None
                items = []
                for index, item in enumerate(value):
                    parsed = _parse_scalar(item, spec.item)
                    if parsed is _BAD:
                        where = f"{path}[{index}]"
                        errors.append((where, f"Invalid value at '{where}' ({spec.item.name}), {_show(item)}"))
                    items.append(parsed)
                return items
        elif kind == "struct":
            if t is dict:
                return value
        else:
            parsed = _parse_scalar(value, spec)
            if parsed is not _BAD:
                return parsed
    if t is list:
        errors.append(
            (
                parent or None,
                f'Invalid JSON payload received. Unknown name "{key}"{_at(parent)}: Proto field is not repeating, cannot start list.',
            )
        )
    else:
        errors.append((path, f"Invalid value at '{path}' ({spec.name}), {_show(value)}"))
    return _BAD


def _parse_scalar(value: Any, spec: _Type) -> Any:
    t = type(value)
    kind = spec.kind
    if kind == "string":
        return value if t is str else _BAD
    if kind == "bool":
        return value if t is bool else _BAD
    if kind == "int32":
        if t is str and re.fullmatch(r"-?\d{1,10}", value):
            value, t = int(value), int
        elif t is float and value.is_integer():
            value, t = int(value), int
        return value if t is int and -(2**31) <= value < 2**31 else _BAD
    if kind == "float":
        if t is int or t is float:
            return value
        if t is str:
            try:
                return float(value)
            except ValueError:
                return _BAD
        return _BAD
    if kind == "enum":
        if t is str:
            upper = value.upper()
            return upper if upper in spec.values else _BAD
        if t is int and 0 <= value < len(spec.values):
            return spec.values[value]
        return _BAD
    if kind == "duration":
        return value if t is str and _DURATION_RE.fullmatch(value) else _BAD
    if kind == "timestamp":
        match = _TIMESTAMP_RE.fullmatch(value) if t is str else None
        if match is None:
            return _BAD
        try:
            dt.datetime.fromisoformat(match.group(1))
        except ValueError:
            return _BAD
        return value
    return _BAD  # pragma: no cover - every kind is handled above


def _duration_s(text: str) -> float:
    match = _DURATION_RE.fullmatch(text)
    assert match is not None
    sign, whole, frac = match.groups()
    seconds = int(whole) + (int(frac.ljust(9, "0")) / 1e9 if frac else 0.0)
    return -seconds if sign else seconds


def _reserved(key: str) -> bool:
    low = key.lower()
    return low in ("from", "message_type") or low.startswith(("google", "gcm"))


def _check_label(options: Any, path: str) -> Violation | None:
    label = options.get("analytics_label") if options else None
    if label is not None and not _LABEL_RE.fullmatch(label):
        return (f"{path}.analytics_label", f"Invalid analytics_label: {label!r}")
    return None


def message_error(msg: dict[str, Any]) -> Violation | None:
    """The first thing FCM would refuse in a well-formed Message (step 4), or None."""
    if not any(msg.get(name) for name in TARGETS):
        return ("message", "Recipient of the message is not set.")
    topic = msg.get("topic")
    if topic and not _TOPIC_RE.fullmatch(topic):
        return ("message.topic", f"Invalid topic name: {topic!r}")
    condition = msg.get("condition")
    if condition:
        topics = _CONDITION_TOPIC_RE.findall(condition)
        if not 1 <= len(topics) <= 5 or not all(_TOPIC_RE.fullmatch(t) for t in topics):
            return ("message.condition", f"Invalid condition (1 to 5 'topic' in topics terms): {condition!r}")
    for key in msg.get("data") or ():
        if _reserved(key):
            return ("message.data", f"Invalid data payload key: {key}")
    error = _check_label(msg.get("fcm_options"), "message.fcm_options")
    if error:
        return error
    android = msg.get("android")
    if android:
        ttl = android.get("ttl")
        if ttl is not None and not 0 <= _duration_s(ttl) <= _MAX_TTL_S:
            return ("message.android.ttl", f"TTL must be between 0s and {_MAX_TTL_S}s, not {ttl}")
        for key in android.get("data") or ():
            if _reserved(key):
                return ("message.android.data", f"Invalid data payload key: {key}")
        error = _check_label(android.get("fcm_options"), "message.android.fcm_options")
        if error:
            return error
        notification = android.get("notification")
        if notification:
            color = notification.get("color")
            if color is not None and not _COLOR_RE.fullmatch(color):
                return ("message.android.notification.color", f"Invalid color {color!r}: expected #rrggbb")
            light = (notification.get("light_settings") or {}).get("color") or {}
            for part, amount in light.items():
                if not 0.0 <= amount <= 1.0:
                    where = f"message.android.notification.light_settings.color.{part}"
                    return (where, f"Color components must be between 0 and 1, not {amount}")
    apns = msg.get("apns")
    if apns:
        error = _check_label(apns.get("fcm_options"), "message.apns.fcm_options")
        if error:
            return error
    webpush = msg.get("webpush")
    if webpush:
        options = webpush.get("fcm_options") or {}
        link = options.get("link")
        if link is not None and not link.startswith("https://"):
            return ("message.webpush.fcm_options.link", f"The link must be an HTTPS URL: {link!r}")
        error = _check_label(options, "message.webpush.fcm_options")
        if error:
            return error
    return None

