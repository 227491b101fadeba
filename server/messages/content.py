"""Channel configurations and messages: stored versions, compiled templates, rendering.

A message is published as a new version (versions are never edited, so a journey that uses
one keeps it). Publishing compiles every template of its content (`server.templates`); a
template that does not compile is refused with the field, line and column. `Compiled.render`
personalizes the content for one profile and `to_delivery` turns it into what the channels
take (`PushContent`, `ApnsOptions`, `FcmOptions`).

Templated fields: ``title``, ``subtitle``, ``body``, ``media_url``, ``on_click.url``,
``sound``, every ``buttons[i].label`` and ``buttons[i].url``, every ``data`` value,
``ios.thread_id``, ``ios.collapse_id``, ``android.tag`` and ``android.collapse_key``. Each
text is at most ``api.MAX_TEXT`` characters (the protocol says so), and the templates of a
message at most `MAX_TEMPLATES` together: compiling them is what publishing costs.
"""

from __future__ import annotations

import copy
import json
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
import msgspec.structs

from protocols import api

from server.runtime.errors import InvalidArgument
from server.runtime.values import from_us
from server.channels import AppRecord, DeliveryJob
from server.templates import Field, MissingValue, Scope, TemplateLimit, compile_field

__all__ = [
    "ConfigRecord", "MessageRecord", "Compiled", "Rendered", "encode", "decode_config", "decode_message", "to_delivery",
    "context_for", "exclusion", "MAX_TEMPLATES",
]

#: Characters of templates in one message, all its fields together: twice what a payload
#: holds, so that compiling them when it is published takes a bounded time (about 5 ms a KB).
MAX_TEMPLATES = 8_192

_TEXT = ("title", "subtitle", "body", "media_url", "sound")


class ConfigRecord(msgspec.Struct, kw_only=True):
    config: api.ChannelConfig
    version: int
    published_us: int

    def info(self) -> api.ConfigInfo:
        return api.ConfigInfo(config=self.config, version=self.version, published=_time(self.published_us))


class MessageRecord(msgspec.Struct, kw_only=True):
    message: api.MessageSpec
    version: int
    published_us: int
    templates: list[str] = []

    def info(self) -> api.MessageInfo:
        return api.MessageInfo(message=self.message, version=self.version, published=_time(self.published_us),
                               templates=self.templates)


def _time(us: int) -> datetime:
    return from_us(us)


_encoder = msgspec.msgpack.Encoder()
_config_decoder = msgspec.msgpack.Decoder(ConfigRecord)
_message_decoder = msgspec.msgpack.Decoder(MessageRecord)
_V1 = b"\x01"


def encode(record: ConfigRecord | MessageRecord) -> bytes:
    return _V1 + _encoder.encode(record)


def decode_config(value: bytes) -> ConfigRecord:
    return _config_decoder.decode(memoryview(value)[1:])


def decode_message(value: bytes) -> MessageRecord:
    return _message_decoder.decode(memoryview(value)[1:])


def _paths(content: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """(field name, path into the content's builtins) of every text that may be a template."""
    out: list[tuple[str, tuple[Any, ...]]] = []
    for name in _TEXT:
        if isinstance(content.get(name), str):
            out.append((f"$.content.{name}", (name,)))
    if isinstance(content.get("on_click", {}).get("url"), str):
        out.append(("$.content.on_click.url", ("on_click", "url")))
    for i, button in enumerate(content.get("buttons", [])):
        for key in ("label", "url"):
            if isinstance(button.get(key), str):
                out.append((f"$.content.buttons[{i}].{key}", ("buttons", i, key)))
    for key, value in content.get("data", {}).items():
        if isinstance(value, str):
            out.append((f"$.content.data.{key}", ("data", key)))
    for section, keys in (("ios", ("thread_id", "collapse_id")), ("android", ("tag", "collapse_key"))):
        for key in keys:
            if isinstance(content.get(section, {}).get(key), str):
                out.append((f"$.content.{section}.{key}", (section, key)))
    return out


class Compiled:
    """A message version with its templates compiled (once), ready to render per profile.

    Raises (from the constructor):
        TemplateSyntax: a template does not compile (names field, line, column).
        TemplateLimit: a template is too long or nested too deep, or the templates are
            longer than `MAX_TEMPLATES` together.
    """

    def __init__(self, record: MessageRecord) -> None:
        self.record = record
        self.spec = record.message
        self._content = msgspec.to_builtins(self.spec.content)
        self._fields: list[tuple[tuple[Any, ...], Field]] = []
        size = 0
        for name, path in _paths(self._content):
            field = compile_field(name, _get(self._content, path), self.spec.on_missing)
            if field.is_template:
                self._fields.append((path, field))
                size += len(field.source)
                if size > MAX_TEMPLATES:
                    raise TemplateLimit(f"$.content: the templates have more than {MAX_TEMPLATES} characters in all "
                                        f"(at {name})", field="$.content")
        #: The containers a render writes into, parents first: copied per render, the rest shared.
        self._copies = sorted({path[:i] for path, _ in self._fields for i in range(1, len(path))}, key=len)

        data = self.spec.content.data
        for key, filled in (("adb_act", bool(self.spec.content.buttons)), ("adb_sticky", self.spec.content.android.sticky)):
            if filled and key in data:
                raise InvalidArgument(f"$.content.data.{key}: Pigeon fills this key (from the buttons or sticky)",
                                      field=f"$.content.data.{key}")

    @property
    def templates(self) -> list[str]:
        return [field.name for _, field in self._fields]

    def render(self, context: dict[str, Any] | Scope) -> api.MessageContent:
        """The content for one profile (its names, or its `Scope`).

        Raises:
            TemplateError: `MissingValue` (with ``on_missing: exclude``), `TemplateLimit`, or
                another failure, naming the field.
        """
        if not self._fields:
            return self.spec.content
        scope = context if type(context) is Scope else Scope(context)  # type: ignore[arg-type]
        content = dict(self._content)
        for prefix in self._copies:
            parent = _get(content, prefix[:-1])
            parent[prefix[-1]] = copy.copy(parent[prefix[-1]])
        for path, field in self._fields:
            _set(content, path, field.render(scope))
        try:
            return msgspec.convert(content, api.MessageContent)
        except msgspec.ValidationError as exc:  # a rendered value breaks a rule (a colour, say)
            raise InvalidArgument(f"the rendered content is invalid: {exc}") from None


def _get(doc: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        doc = doc[key]
    return doc


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def context_for(
    *, attributes: dict[str, Any], identities: list[str], audiences: list[str] | None = None,
    event: dict[str, Any] | None = None, journey: dict[str, Any] | None = None, message: api.MessageSpec, version: int,
) -> dict[str, Any]:
    """The names a template sees (`server.templates`)."""
    return {
        "profile": {**attributes, "identities": identities, "audiences": audiences or []},
        "event": event or {},
        "journey": journey or {},
        "message": {"id": message.id, "version": version},
    }


_ACTION_TYPES = {"open_app": "OPENAPP", "deeplink": "DEEPLINK", "web_url": "WEBURL", "dismiss": "DISMISS"}


class Rendered(NamedTuple):
    """A message rendered for one profile, as the channels take it: the iOS content and APNs
    options, the Android content and FCM options (the iOS category is not Android's click
    action)."""

    ios: api.PushContent
    apns: api.ApnsOptions
    android: api.PushContent
    fcm: api.FcmOptions

    def job(self, app: AppRecord, token: str, platform: str, tracking: dict[str, Any]) -> DeliveryJob:
        """The delivery job for one registration (platform ``apns``, ``apns-sandbox`` or ``fcm``)."""
        return DeliveryJob(app=app, token=token, platform=platform, content=self.android if platform == "fcm" else self.ios,
                           apns=self.apns, fcm=self.fcm, tracking=tracking)


def exclusion(exc: InvalidArgument) -> str:
    """Why a profile is excluded when its content does not render."""
    return type(exc).__name__ if isinstance(exc, (MissingValue, TemplateLimit)) else "TemplateError"


def to_delivery(spec: api.MessageSpec, content: api.MessageContent, *, now: float | None = None) -> Rendered:
    """What the channels take, from rendered content."""
    data = dict(content.data)
    if content.buttons:
        # Adobe's key for action buttons (its SDKs render them on Android).
        data["adb_act"] = json.dumps(
            [{"aid": b.id, "label": b.label, "uri": b.url or "", "type": _ACTION_TYPES[b.action]} for b in content.buttons],
            separators=(",", ":"),
        )
    if content.android.sticky:
        data["adb_sticky"] = "true"
    link = content.on_click.url if content.on_click.action != "open_app" else None
    alert = any((content.title, content.subtitle, content.body))
    push = api.PushContent(
        title=content.title,
        subtitle=content.subtitle,
        body=content.body,
        media_url=content.media_url,
        badge=content.badge,
        sound=content.sound,
        category=content.ios.category,
        thread_id=content.ios.thread_id,
        content_available=content.silent,
        interruption_level=content.ios.interruption_level,
        relevance_score=content.ios.relevance_score,
        deeplink=link,
        data=data,
    )
    silent_only = content.silent and not alert and content.badge is None and content.sound is None
    apns = api.ApnsOptions(
        push_type="background" if silent_only else "alert",
        priority=5 if silent_only or spec.priority == "normal" else 10,
        expiration=None if spec.ttl_s is None else datetime.fromtimestamp(int(time.time() if now is None else now) + spec.ttl_s, UTC),
        collapse_id=content.ios.collapse_id,
    )
    android = content.android
    fcm = api.FcmOptions(
        data_only=android.data_only or content.silent,
        priority="normal" if content.silent else spec.priority,
        ttl_s=spec.ttl_s,
        collapse_key=android.collapse_key,
        channel_id=android.channel_id,
        notification_priority=android.notification_priority,
        visibility=android.visibility,
        tag=android.tag,
        color=android.color,
        icon=android.icon,
    )
    return Rendered(push, apns, msgspec.structs.replace(push, category=None), fcm)
