"""APNs requests from Pigeon's push content: the JSON payload and the ``apns-*`` headers.

Sans-IO: `build_request` turns a `PushContent` (or a raw payload) and `ApnsOptions` into an
`ApnsRequest` whose headers and body are ready for an h2 stream; the sender adds only the
pseudo-headers (``:method``, ``:scheme``, ``:path``, ``:authority``) and ``authorization``.
Everything Apple documents as a client mistake is checked here, before anything is sent, and
raises `PayloadError` with Apple's reason string where one applies.

Payload layout (Apple's keys in ``aps``, custom keys beside it)::

    {"aps": {"alert": {"title": ..., "body": ...}, "badge": 3, "sound": "default", ...},
     "<data key>": <value>, ...,          # PushContent.data, as given
     "adb_media": "https://…/a.jpg",      # PushContent.media_url (sets mutable-content: 1)
     "adb_uri": "myapp://orders/42",      # PushContent.deeplink
     "adb_a_type": "DEEPLINK",            # "WEBURL" for http(s) links, "DEEPLINK" otherwise
     "_p": {...}}                         # the tracking envelope, opaque here

Custom key names: ``adb_media``, ``adb_uri`` and ``adb_a_type`` are the keys Adobe Journey
Optimizer documents for its push payload, so an app built on Adobe's Messaging SDK (or one
that copies its conventions) shows the media and follows the link without changes; with no
link the key is left out (AJO's default action, ``OPENAPP``). The tracking envelope goes
under the single short key ``_p``. A ``PushContent.data`` key may not be ``aps``, nor one of
these keys when Pigeon fills it.

Rules enforced (Apple's, from "Sending notification requests to APNs" and "Generating a
remote notification"):

- ``apns-topic`` is the bundle id plus the push type's suffix (``.voip``, ``.complication``,
  ``.pushkit.fileprovider``, ``.push-type.liveactivity``, ``.location-query``, ``.voip-ptt``,
  ``.push-type.controls``, ``.push-type.widgets``; none for ``alert``, ``background`` and
  ``mdm``, whose topic is the bundle id as given).
- ``apns-priority`` is 10 by default and 5 for ``background``; ``background`` only allows 5,
  ``liveactivity`` and ``location`` allow 5 or 10, the other push types 10, 5 or 1.
- A ``background`` push carries ``aps`` with ``content-available: 1`` and nothing else.
- ``apns-expiration`` is UNIX seconds (0 for the epoch itself: one delivery attempt).
- ``apns-collapse-id`` is at most 64 bytes of UTF-8; ``apns-id`` is a canonical UUID, sent
  lower-cased.
- The payload is at most 4096 bytes (5120 for ``voip``) and not empty.
- Live Activity keys (``timestamp``, ``event``, ``content-state``, ...; dates as UNIX seconds)
  only with push type ``liveactivity``, which needs them; ``start`` also needs
  ``attributes-type``, ``attributes`` and an alert. As in Apple's Live Activity examples, the
  sound goes inside ``alert`` there.

The alert is always a dictionary (a body-only alert too). Values in ``data``, ``tracking`` and
``raw`` are encoded by msgspec, so its JSON mapping applies (bytes become base64, a set a list).

Error fields are named as in a ``push.send`` request: ``$.content.*``, ``$.raw``,
``$.apns.*`` (the `ApnsOptions`), plus ``$.tracking`` and ``$.bundle_id``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec

from protocols.api import ApnsOptions, ApnsPushType, CriticalSound, LiveActivity, PushContent
from server.channels import json_problem

__all__ = [
    "ApnsRequest",
    "PayloadError",
    "build_request",
    "TOPIC_SUFFIXES",
    "PAYLOAD_LIMIT",
    "VOIP_PAYLOAD_LIMIT",
    "MAX_COLLAPSE_ID_BYTES",
    "MEDIA_KEY",
    "LINK_KEY",
    "LINK_TYPE_KEY",
    "TRACKING_KEY",
]

#: Apple's payload limit for every push type but ``voip``.
PAYLOAD_LIMIT = 4096
#: Apple's payload limit for ``voip``.
VOIP_PAYLOAD_LIMIT = 5120
MAX_COLLAPSE_ID_BYTES = 64

#: Custom key of the media URL (AJO's name).
MEDIA_KEY = "adb_media"
#: Custom key of the link a tap opens (AJO's name).
LINK_KEY = "adb_uri"
#: Custom key of the link's kind: ``WEBURL`` (http, https) or ``DEEPLINK`` (AJO's name).
LINK_TYPE_KEY = "adb_a_type"
#: Custom key of the tracking envelope.
TRACKING_KEY = "_p"

#: ``apns-topic`` = bundle id + this suffix, per push type.
TOPIC_SUFFIXES: dict[str, str] = {
    "alert": "",
    "background": "",
    "voip": ".voip",
    "complication": ".complication",
    "fileprovider": ".pushkit.fileprovider",
    "liveactivity": ".push-type.liveactivity",
    "location": ".location-query",
    "mdm": "",
    "pushtotalk": ".voip-ptt",
    "controls": ".push-type.controls",
    "widgets": ".push-type.widgets",
}

_ALL_PRIORITIES = frozenset({10, 5, 1})
#: (default, allowed) priorities where Apple restricts them; (10, {10, 5, 1}) elsewhere.
_PRIORITIES: dict[str, tuple[int, frozenset[int]]] = {
    "background": (5, frozenset({5})),
    "liveactivity": (10, frozenset({10, 5})),
    "location": (10, frozenset({10, 5})),
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_TOPIC = re.compile(r"[\x21-\x7e]+")
# h2 refuses control characters and surrounding whitespace in header values.
_BAD_HEADER_TEXT = re.compile(r"[\x00-\x1f\x7f]|^[ \t]|[ \t]\Z")

_encode = msgspec.json.Encoder().encode

# Alert dictionary: (PushContent attribute, aps.alert key); the *-args lists go in only when
# non-empty and only with their key.
_ALERT_TEXT = (
    ("title", "title"),
    ("subtitle", "subtitle"),
    ("body", "body"),
    ("launch_image", "launch-image"),
    ("title_loc_key", "title-loc-key"),
    ("subtitle_loc_key", "subtitle-loc-key"),
    ("loc_key", "loc-key"),
)
_ALERT_ARGS = (
    ("title_loc_args", "title-loc-args", "title_loc_key"),
    ("subtitle_loc_args", "subtitle-loc-args", "subtitle_loc_key"),
    ("loc_args", "loc-args", "loc_key"),
)
# aps key -> the PushContent fields that produce it (for error messages).
_APS_SOURCES = {
    "alert": tuple(attr for attr, _ in _ALERT_TEXT) + tuple(attr for attr, _, _ in _ALERT_ARGS),
    "badge": ("badge",),
    "sound": ("sound",),
    "thread-id": ("thread_id",),
    "category": ("category",),
    "mutable-content": ("mutable_content", "media_url"),
    "interruption-level": ("interruption_level",),
    "relevance-score": ("relevance_score",),
    "target-content-id": ("target_content_id",),
    "filter-criteria": ("filter_criteria",),
    "content-available": ("content_available",),
}


class PayloadError(Exception):
    """A notification APNs would refuse, or that breaks one of Apple's documented rules.

    Attributes:
        reason: Apple's reason string where one applies (``PayloadTooLarge``,
            ``PayloadEmpty``, ``BadCollapseId``, ``BadMessageId``, ``BadPriority``,
            ``BadExpirationDate``, ``BadTopic``, ``InvalidPushType``), else ``InvalidPayload``.
        message: what is wrong, starting with the offending field (``$.apns.collapse_id: ...``).
        field: that field's path (``$.apns.collapse_id``).
    """

    def __init__(self, reason: str, field: str, problem: str) -> None:
        self.reason = reason
        self.field = field
        self.message = f"{field}: {problem}"
        super().__init__(reason, self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class ApnsRequest(msgspec.Struct, kw_only=True, frozen=True):
    """One APNs notification, ready to send on an HTTP/2 stream.

    Attributes:
        topic: ``apns-topic``.
        push_type: ``apns-push-type``.
        priority: ``apns-priority`` (10, 5 or 1).
        expiration: ``apns-expiration`` in UNIX seconds, or None for APNs's default storage.
        collapse_id: ``apns-collapse-id``, if any.
        apns_id: ``apns-id`` (lower-case canonical UUID), if any.
        headers: the ``apns-*`` headers as lower-case byte pairs for h2, in the order topic,
            push type, priority, expiration, collapse id, id; without the pseudo-headers and
            ``authorization``, which the sender adds.
        payload: the JSON body (UTF-8, at most 4096 bytes, 5120 for ``voip``).
    """

    topic: str
    push_type: ApnsPushType
    priority: int
    expiration: int | None
    collapse_id: str | None
    apns_id: str | None
    headers: list[tuple[bytes, bytes]]
    payload: bytes


# (bundle id, push type, priority or None) -> (topic, priority, fixed headers)
_Fixed = tuple[str, int, tuple[tuple[bytes, bytes], ...]]
_fixed_cache: dict[tuple[str, str, int | None], _Fixed] = {}
_FIXED_CACHE_SIZE = 4096


def _fixed_headers(bundle_id: str, push_type: str, priority: int | None) -> _Fixed:
    """Topic, priority and the headers that depend only on them, checked (not cached)."""
    suffix = TOPIC_SUFFIXES.get(push_type)
    if suffix is None:
        raise PayloadError(
            "InvalidPushType",
            "$.apns.push_type",
            f"unknown push type {push_type!r}; expected one of {', '.join(TOPIC_SUFFIXES)}",
        )
    if not isinstance(bundle_id, str) or not _TOPIC.fullmatch(bundle_id):
        raise PayloadError("BadTopic", "$.bundle_id", f"{bundle_id!r} is not a bundle id (printable ASCII, no spaces)")
    default, allowed = _PRIORITIES.get(push_type, (10, _ALL_PRIORITIES))
    if priority is None:
        priority = default
    elif priority not in allowed or isinstance(priority, bool):
        if priority in _ALL_PRIORITIES:
            problem = (
                f"push type {push_type!r} allows priority {' or '.join(map(str, sorted(allowed, reverse=True)))},"
                f" not {priority!r}"
            )
        else:
            problem = f"{priority!r} is not an APNs priority (10, 5 or 1)"
        raise PayloadError("BadPriority", "$.apns.priority", problem)
    topic = bundle_id + suffix
    headers = (
        (b"apns-topic", topic.encode("ascii")),
        (b"apns-push-type", push_type.encode("ascii")),
        (b"apns-priority", str(priority).encode("ascii")),
    )
    return topic, priority, headers


def _seconds(value: Any, field: str) -> int:
    """UNIX seconds (rounded down) of an aware datetime."""
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise PayloadError("InvalidPayload", field, f"expected a timezone-aware datetime, got {value!r}")
    since = value - _EPOCH  # exact; normalized so that seconds is in [0, 86400)
    return since.days * 86400 + since.seconds


def _alert(content: PushContent) -> dict[str, Any]:
    alert: dict[str, Any] = {}
    for attr, key in _ALERT_TEXT:
        value = getattr(content, attr)
        if value is not None:
            alert[key] = value
    for attr, key, needs in _ALERT_ARGS:
        args = getattr(content, attr)
        if args:
            if getattr(content, needs) is None:
                raise PayloadError(
                    "InvalidPayload", f"$.content.{attr}", f"needs $.content.{needs} (the format the arguments fill)"
                )
            alert[key] = args
    return alert


def _sound(sound: str | CriticalSound) -> str | dict[str, Any]:
    if isinstance(sound, CriticalSound):
        volume = sound.volume
        if not 0.0 <= volume <= 1.0:
            raise PayloadError("InvalidPayload", "$.content.sound.volume", f"{volume!r} is not between 0.0 and 1.0")
        return {"critical": 1, "name": sound.name, "volume": volume}
    return sound


def _live_activity(aps: dict[str, Any], live: LiveActivity, has_alert: bool) -> None:
    timestamp = live.timestamp
    aps["timestamp"] = (
        int(time.time()) if timestamp is None else _seconds(timestamp, "$.content.live_activity.timestamp")
    )
    event = live.event
    if event not in ("start", "update", "end"):
        raise PayloadError(
            "InvalidPayload", "$.content.live_activity.event", f"{event!r} is not one of 'start', 'update', 'end'"
        )
    aps["event"] = event
    aps["content-state"] = live.content_state
    if live.stale_date is not None:
        aps["stale-date"] = _seconds(live.stale_date, "$.content.live_activity.stale_date")
    if live.dismissal_date is not None:
        aps["dismissal-date"] = _seconds(live.dismissal_date, "$.content.live_activity.dismissal_date")
    if live.attributes_type is not None:
        aps["attributes-type"] = live.attributes_type
    if live.attributes is not None:
        aps["attributes"] = live.attributes
    if event == "start":
        for attr in ("attributes_type", "attributes"):
            if getattr(live, attr) is None:
                raise PayloadError(
                    "InvalidPayload", f"$.content.live_activity.{attr}", "required to start a Live Activity"
                )
        if not has_alert:
            raise PayloadError(
                "InvalidPayload", "$.content.title", "starting a Live Activity needs an alert (title or body)"
            )


def _content_payload(content: PushContent, push_type: str) -> dict[str, Any]:
    """The payload dictionary for ``content``, without tracking."""
    if not isinstance(content, PushContent):
        raise PayloadError("InvalidPayload", "$.content", f"expected PushContent, got {type(content).__name__}")
    aps: dict[str, Any] = {}
    alert = _alert(content)
    if alert:
        aps["alert"] = alert
    if content.badge is not None:
        if content.badge < 0:
            raise PayloadError("InvalidPayload", "$.content.badge", f"{content.badge!r} is negative")
        aps["badge"] = content.badge
    live = content.live_activity
    if content.sound is not None:
        if live is not None:
            # Apple's Live Activity payloads carry the sound inside the alert.
            aps.setdefault("alert", {})["sound"] = _sound(content.sound)
        else:
            aps["sound"] = _sound(content.sound)
    if content.thread_id is not None:
        aps["thread-id"] = content.thread_id
    if content.category is not None:
        aps["category"] = content.category
    if content.content_available:
        aps["content-available"] = 1
    media_url = content.media_url
    if content.mutable_content or media_url is not None:
        aps["mutable-content"] = 1
    if content.interruption_level is not None:
        aps["interruption-level"] = content.interruption_level
    if content.relevance_score is not None:
        aps["relevance-score"] = content.relevance_score
    if content.target_content_id is not None:
        aps["target-content-id"] = content.target_content_id
    if content.filter_criteria is not None:
        aps["filter-criteria"] = content.filter_criteria

    if push_type == "liveactivity":
        if live is None:
            raise PayloadError(
                "InvalidPayload", "$.content.live_activity", "push type 'liveactivity' needs the Live Activity keys"
            )
        _live_activity(aps, live, bool(alert))
    elif live is not None:
        raise PayloadError(
            "InvalidPayload",
            "$.content.live_activity",
            f"only for push type 'liveactivity', not {push_type!r}",
        )
    elif push_type == "background":
        _check_background(aps, content)

    payload: dict[str, Any] = {"aps": aps}
    data = content.data
    if data:
        if "aps" in data:
            raise PayloadError(
                "InvalidPayload", "$.content.data.aps", "'aps' is Apple's key; custom data goes beside it"
            )
        payload.update(data)
    if media_url is not None:
        if MEDIA_KEY in data:
            raise _reserved(MEDIA_KEY, "media_url")
        payload[MEDIA_KEY] = media_url
    link = content.deeplink
    if link is not None:
        if LINK_KEY in data or LINK_TYPE_KEY in data:
            raise _reserved(LINK_KEY if LINK_KEY in data else LINK_TYPE_KEY, "deeplink")
        scheme = _SCHEME.match(link)
        if scheme is None:
            raise PayloadError("InvalidPayload", "$.content.deeplink", f"{link!r} is not an absolute URL (scheme:...)")
        payload[LINK_KEY] = link
        payload[LINK_TYPE_KEY] = "WEBURL" if scheme.group(1).lower() in ("http", "https") else "DEEPLINK"
    if not aps and len(payload) == 1:
        raise PayloadError("PayloadEmpty", "$.content", "nothing to send (no alert, badge, sound, flag or data)")
    return payload


def _reserved(key: str, attr: str) -> PayloadError:
    return PayloadError(
        "InvalidPayload", f"$.content.data.{key}", f"{key!r} is where $.content.{attr} goes; use another key"
    )


def _check_background(aps: Any, content: PushContent | None) -> None:
    """Apple: a background push's ``aps`` holds ``content-available: 1`` and nothing else."""
    if not isinstance(aps, dict) or aps.get("content-available") != 1:
        field = "$.raw.aps" if content is None else "$.content.content_available"
        raise PayloadError("InvalidPayload", field, "a 'background' push must carry aps content-available: 1")
    if len(aps) > 1:
        extra = [key for key in aps if key != "content-available"]
        if content is None:
            fields = [f"$.raw.aps.{key}" for key in extra]
        else:
            fields = [
                f"$.content.{attr}" for key in extra for attr in _APS_SOURCES[key] if _is_set(getattr(content, attr))
            ]
        raise PayloadError(
            "InvalidPayload",
            fields[0],
            f"a 'background' push carries only content-available (no alert, badge, sound or other aps key);"
            f" remove {', '.join(fields)}",
        )


def _is_set(value: Any) -> bool:
    return value is not None and value is not False and value != []


def _raw_payload(raw: Any, push_type: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PayloadError("InvalidPayload", "$.raw", f"expected a JSON object, got {type(raw).__name__}")
    if not raw:
        raise PayloadError("PayloadEmpty", "$.raw", "the payload is an empty object")
    aps = raw.get("aps")
    if aps is not None and not isinstance(aps, dict):
        raise PayloadError("InvalidPayload", "$.raw.aps", f"expected a JSON object, got {type(aps).__name__}")
    if push_type == "background":
        _check_background(aps, None)
    return raw


def build_request(
    *,
    bundle_id: str,
    options: ApnsOptions,
    content: PushContent | None = None,
    raw: dict[str, Any] | None = None,
    tracking: dict[str, Any] | None = None,
) -> ApnsRequest:
    """Build the APNs request for one notification.

    Args:
        bundle_id: the app's bundle id; the topic adds the push type's suffix to it (``mdm``
            uses it as given).
        options: the APNs headers to send.
        content: what to show and carry; exactly one of ``content`` and ``raw``.
        raw: the payload to send as it is (a JSON object; its ``aps``, if any, an object).
        tracking: an opaque tracking envelope put under ``"_p"`` (with ``content`` or ``raw``);
            left out when None or empty.

    Returns:
        The request: its headers (without pseudo-headers and ``authorization``) and body.

    Raises:
        PayloadError: when APNs would refuse the request or Apple's rules forbid it: bad push
            type, priority, collapse id, apns-id or expiration, a background push with more
            than ``content-available``, an empty payload, a payload over the size limit, a
            custom key that clashes with ``aps`` or Pigeon's keys, or a value that is not JSON.
    """
    push_type = options.push_type
    topic, priority, fixed_headers = _cached_fixed_headers(bundle_id, push_type, options.priority)
    headers = list(fixed_headers)
    expiration = _expiration_seconds(options.expiration)
    if expiration is not None:
        headers.append((b"apns-expiration", str(expiration).encode("ascii")))
    collapse_id = options.collapse_id
    if collapse_id is not None:
        headers.append((b"apns-collapse-id", _checked_collapse_id(collapse_id)))
    apns_id = options.apns_id
    if apns_id is not None:
        apns_id = _checked_apns_id(apns_id)
        headers.append((b"apns-id", apns_id.encode("ascii")))
    payload, where = _payload(content, raw, tracking, push_type)
    return ApnsRequest(
        topic=topic,
        push_type=push_type,
        priority=priority,
        expiration=expiration,
        collapse_id=collapse_id,
        apns_id=apns_id,
        headers=headers,
        payload=_body(payload, content, where, push_type),
    )


def _cached_fixed_headers(bundle_id: str, push_type: str, priority: int | None) -> _Fixed:
    """`_fixed_headers`, cached: an app's notifications repeat its topic and priority."""
    key = (bundle_id, push_type, priority)
    fixed = _fixed_cache.get(key)
    if fixed is None:
        fixed = _fixed_headers(bundle_id, push_type, priority)
        if len(_fixed_cache) >= _FIXED_CACHE_SIZE:
            _fixed_cache.clear()
        _fixed_cache[key] = fixed
    return fixed


def _expiration_seconds(expiration: datetime | None) -> int | None:
    """``apns-expiration``: the UNIX seconds of ``$.apns.expiration``, if it is given."""
    if expiration is None:
        return None
    seconds = _seconds(expiration, "$.apns.expiration")
    if seconds < 0:
        raise PayloadError("BadExpirationDate", "$.apns.expiration", f"{expiration.isoformat()} is before 1970")
    return seconds


def _checked_collapse_id(collapse_id: str) -> bytes:
    """``apns-collapse-id``: ``$.apns.collapse_id`` in UTF-8, within Apple's limit."""
    try:
        encoded = collapse_id.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError("BadCollapseId", "$.apns.collapse_id", "contains a lone surrogate") from None
    if len(encoded) > MAX_COLLAPSE_ID_BYTES:
        raise PayloadError(
            "BadCollapseId",
            "$.apns.collapse_id",
            f"is {len(encoded)} bytes in UTF-8; APNs allows at most {MAX_COLLAPSE_ID_BYTES}",
        )
    if not encoded or _BAD_HEADER_TEXT.search(collapse_id):
        raise PayloadError(
            "BadCollapseId",
            "$.apns.collapse_id",
            f"{collapse_id!r} must be non-empty, without control characters or surrounding blanks",
        )
    return encoded


def _checked_apns_id(apns_id: str) -> str:
    """``apns-id``: ``$.apns.apns_id``, a canonical UUID, lower-cased."""
    if not isinstance(apns_id, str) or not _UUID.fullmatch(apns_id):
        raise PayloadError(
            "BadMessageId",
            "$.apns.apns_id",
            f"{apns_id!r} is not a canonical UUID (8-4-4-4-12 hexadecimal digits)",
        )
    return apns_id.lower()


def _payload(
    content: PushContent | None, raw: dict[str, Any] | None, tracking: dict[str, Any] | None, push_type: str
) -> tuple[dict[str, Any], str]:
    """The payload, with the tracking envelope, and the field its errors name (``$.content``
    or ``$.raw``). ``raw`` itself is never changed."""
    if content is not None:
        if raw is not None:
            raise PayloadError("InvalidPayload", "$.raw", "give content or raw, not both")
        payload = _content_payload(content, push_type)
        where = "$.content"
    elif raw is not None:
        payload = _raw_payload(raw, push_type)
        where = "$.raw"
    else:
        raise PayloadError("PayloadEmpty", "$.content", "give content or raw")
    if tracking:
        if TRACKING_KEY in payload:
            field = f"$.content.data.{TRACKING_KEY}" if where == "$.content" else f"$.raw.{TRACKING_KEY}"
            raise PayloadError("InvalidPayload", field, f"{TRACKING_KEY!r} is where the tracking envelope goes")
        if payload is raw:
            payload = dict(raw)
        payload[TRACKING_KEY] = tracking
    return payload, where


def _body(payload: dict[str, Any], content: PushContent | None, where: str, push_type: str) -> bytes:
    """The payload as JSON, within Apple's size limit for ``push_type``."""
    try:
        body = _encode(payload)
    except (TypeError, ValueError) as exc:
        field, problem = _find_unencodable(payload, content, where) or (where, str(exc))
        raise PayloadError("InvalidPayload", field, f"not JSON-encodable: {problem}") from None
    limit = VOIP_PAYLOAD_LIMIT if push_type == "voip" else PAYLOAD_LIMIT
    if len(body) > limit:
        raise PayloadError(
            "PayloadTooLarge",
            where,
            f"the payload is {len(body)} bytes; APNs allows at most {limit} for push type {push_type!r}",
        )
    return body


def _find_unencodable(payload: dict[str, Any], content: PushContent | None, where: str) -> tuple[str, str] | None:
    """Name the field behind an encoding failure (error path only)."""
    if TRACKING_KEY in payload:
        found = json_problem(payload[TRACKING_KEY], "$.tracking")
        if found:
            return found
    if content is None:
        return json_problem({k: v for k, v in payload.items() if k != TRACKING_KEY}, where)
    found = json_problem(content.data, "$.content.data")
    if found:
        return found
    for attr in content.__struct_fields__:
        if attr != "data":
            found = json_problem(getattr(content, attr), f"$.content.{attr}")
            if found:
                return found
    return None
