"""Every method of the Pigeon protocol, typed with msgspec Structs.

A request struct names its method (``service.method``) and, through its generic parameter,
its response type: ``GetProfile`` is a ``Request[Profile]``, so ``await client.call(
GetProfile(identity="crm:42"))`` returns a `Profile`. A ``StreamRequest[T]`` yields items of
type ``T`` followed by an end marker.

Requests forbid unknown fields (a misspelt option is an error that names it); responses
tolerate them (an older client can read a newer server). New fields always get defaults.

Why one module of over 1,000 lines: it is the single description of the protocol's request
and answer types, read beside ``PROTOCOL.md``. Its structs refer to each other across
services (a `SendPush` carries `PushContent`, a `Report` is the item of `WatchReport`), and
`METHODS` at the end registers them all; split by service, the method table and the shared
types would have to be reassembled from several modules to see the protocol whole.
Concrete requests repeat ``frozen=True``: msgspec inherits it from `Request` anyway, but type
checkers (``dataclass_transform``, PEP 681) only see it when each class says so.
"""

from __future__ import annotations

import re
import typing
from datetime import datetime
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import msgspec
import msgspec.inspect

__all__ = [
    "IDENTITY_PATTERN",
    "NAME_PATTERN",
    "Identity",
    "AppId",
    "Platform",
    "PushToken",
    "EventType",
    "EVENT_ID_PATTERN",
    "EventId",
    "Timestamp",
    "Request",
    "StreamRequest",
    "MethodSpec",
    "METHODS",
    # server
    "GetHealth",
    "Health",
    "GetStats",
    "Stats",
    "ActorStats",
    "MethodStats",
    "ConnectionStats",
    "ProcessStats",
    "StoreStats",
    # profiles
    "Registration",
    "ConsentEntry",
    "Profile",
    "GetProfile",
    "UpsertProfile",
    "PatchProfile",
    "DeleteProfile",
    "ProfileDeleted",
    "LinkIdentity",
    "UnlinkIdentity",
    # tokens and consent
    "RegisterToken",
    "TokenRegistered",
    "UnregisterToken",
    "TokenUnregistered",
    "SetConsent",
    # events
    "Event",
    "IngestEvents",
    "IngestResult",
    "Rejection",
    "ListEvents",
    "StoredEvent",
    "MAX_EVENTS_PER_BATCH",
    "describe_validation_error",
    # apps
    "AppleId",
    "ApnsEnvironment",
    "ApnsTokenAuth",
    "ApnsCertificateAuth",
    "IosAppInfo",
    "AndroidAppInfo",
    "AppInfo",
    "RegisterIosApp",
    "RegisterAndroidApp",
    "GetApp",
    "AppList",
    "ListApps",
    "AppDeleted",
    "DeleteApp",
    # push
    "CriticalSound",
    "LiveActivity",
    "PushContent",
    "ApnsPushType",
    "ApnsOptions",
    "AndroidNotificationPriority",
    "FcmOptions",
    "PushOutcome",
    "PushSent",
    "SendPush",
    # channel configurations and messages
    "Name",
    "ChannelConfig",
    "ConfigInfo",
    "PublishConfig",
    "GetConfig",
    "ConfigList",
    "ListConfigs",
    "MAX_TEXT",
    "Button",
    "OnClick",
    "IosFields",
    "AndroidFields",
    "MessageContent",
    "MessageSpec",
    "MessageInfo",
    "PublishMessage",
    "GetMessage",
    "MessageList",
    "ListMessages",
    "PlatformPreview",
    "Preview",
    "PreviewMessage",
    "SendResult",
    "SendMessage",
    "MinuteCounts",
    "Report",
    "GetReport",
    "WatchReport",
    # keys
    "KEY_PATTERN",
    "KEY_ID_PATTERN",
    "SCOPES",
    "Scope",
    "KeyId",
    "KeyInfo",
    "CreatedKey",
    "CreateKey",
    "KeyList",
    "ListKeys",
    "KeyRevoked",
    "RevokeKey",
    # sandboxes
    "SANDBOX_PATTERN",
    "SandboxName",
    "SandboxInfo",
    "SandboxList",
    "CreateSandbox",
    "ListSandboxes",
    # journeys
    "DURATION_PATTERN", "Duration", "TIME_OF_DAY_PATTERN", "TimeOfDay", "Weekday", "Expression", "JourneyEntry",
    "Branch", "SplitPath", "PushNode", "ConditionNode", "SplitNode", "WaitNode", "ReactionNode", "UpdateNode",
    "EndNode", "JourneyNode", "Criterion", "QuietHours", "FrequencyCap", "Reentrance", "JourneySpec", "JourneyState",
    "JourneyInfo", "JourneyList", "PublishJourney", "GetJourney", "ListJourneys", "CloseJourney",
    "StopJourney", "PauseJourney", "ResumeJourney", "SimulatedEvent", "SimulatedPush", "TraceStep", "Simulation",
    "SimulateJourney", "TraceJourney",
    # secrets
    "SecretsRotated",
    "RotateSecrets",
]

#: A request's answer type. Covariant: it is only ever produced (decoded from the answer), so a
#: ``Request[IngestResult]`` is also a request whose answer is an ``IngestResult | Exception``.
R = TypeVar("R", covariant=True)

_APP_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}\Z"
_TOKEN_PATTERN = r"^[\x21-\x7e]{1,4096}\Z"
_EVENT_TYPE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z"

#: ``namespace:value``: a lower-case namespace (``crm``, ``email``, ``ecid``) and a value
#: without control characters.
IDENTITY_PATTERN = r"^[a-z][a-z0-9_.-]{0,31}:[^\x00-\x1f\x7f-\x9f]+\Z"
Identity = Annotated[
    str,
    msgspec.Meta(
        pattern=IDENTITY_PATTERN,
        max_length=400,
        description="namespace:value, e.g. crm:42 or email:ana@example.com",
    ),
]
#: An application id: an iOS bundle id or an Android package name.
AppId = Annotated[str, msgspec.Meta(pattern=_APP_PATTERN)]
#: ``apns`` (production), ``apns-sandbox`` (development builds) or ``fcm``.
Platform = Literal["apns", "apns-sandbox", "fcm"]
PushToken = Annotated[str, msgspec.Meta(pattern=_TOKEN_PATTERN)]
EventType = Annotated[str, msgspec.Meta(pattern=_EVENT_TYPE_PATTERN)]
#: A client's id for an event (`Event.id`): 1 to 64 letters, digits, ``_``, ``.``, ``:`` and
#: ``-`` (16 bytes in base64url are 22 of them).
EVENT_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,64}\Z"
EventId = Annotated[str, msgspec.Meta(pattern=EVENT_ID_PATTERN)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
MAX_EVENTS_PER_BATCH = 10_000

_APPLE_ID_PATTERN = r"^[A-Z0-9]{10}\Z"
_COLOR_PATTERN = r"^#[0-9A-Fa-f]{6}\Z"
_LABEL_PATTERN = r"^[a-zA-Z0-9\-_.~%]{1,50}\Z"
_PATTERN_MEANINGS = {
    _COLOR_PATTERN: "a colour like #ff8800",
    _LABEL_PATTERN: "an analytics label (1 to 50 letters, digits, '-', '_', '.', '~', '%')",
    _APPLE_ID_PATTERN: "a 10-character Apple id like ABC123DEFG (upper-case letters and digits)",
    IDENTITY_PATTERN: "an identity like crm:42 (a lower-case namespace, a colon, a value)",
    _APP_PATTERN: "an app id like com.example.app (letters, digits, '.', '_', '-')",
    _TOKEN_PATTERN: "a push token (1 to 4096 printable characters, no spaces)",
    _EVENT_TYPE_PATTERN: "an event type like commerce.purchase (letters, digits, '.', '_', ':', '-'; at most 128)",
    EVENT_ID_PATTERN: "an event id (1 to 64 letters, digits, '_', '.', ':', '-')",
}


def describe_validation_error(
    error: msgspec.ValidationError | str, request_type: type | None = None
) -> tuple[str, str | None]:
    """Turn a msgspec validation message into ``("$.path: what is wrong", "$.path")``.

    Regular expressions are replaced by what they mean; with ``request_type``, a bad choice
    lists the valid ones.
    """
    text = str(error)
    for pattern, meaning in _PATTERN_MEANINGS.items():
        text = text.replace(f"`str` matching regex {pattern!r}", meaning)
    at = text.rfind(" - at `")
    field, message = ("$", text) if at < 0 else (text[at + 7 : -1], text[:at])
    if field.startswith("key` in `"):  # msgspec's form for a bad map key
        field, message = field[len("key` in `") :], f"map keys must be strings ({message})"
    named = re.match(r"Object (?:contains unknown|missing required) field `([^`]+)`", message)
    if named:
        field = f"{field}.{named.group(1)}"
    if request_type is not None and message.startswith("Invalid enum value"):
        choices = _choices(request_type, field)
        if choices:
            message += f"; expected one of {', '.join(map(repr, choices))}"
    return f"{field}: {message}", field


def _choices(struct: type, path: str) -> tuple[Any, ...]:
    """The literal values allowed at ``$.a.b`` of ``struct``, if that field is a Literal."""
    info: Any = msgspec.inspect.type_info(struct)
    for name in path.removeprefix("$.").split("."):
        info = _unwrap(info, msgspec.inspect.StructType)
        if not isinstance(info, msgspec.inspect.StructType):
            return ()
        field = next((f for f in info.fields if f.encode_name == name), None)
        if field is None:
            return ()
        info = field.type
    info = _unwrap(info, msgspec.inspect.LiteralType)
    if isinstance(info, msgspec.inspect.LiteralType):
        return tuple(info.values)
    return ()


def _unwrap(info: Any, kind: type) -> Any:
    """``info`` without constraints, or its member of ``kind`` if it is an optional union."""
    if isinstance(info, msgspec.inspect.Metadata):
        info = info.type
    if isinstance(info, msgspec.inspect.UnionType):
        members = [t for t in info.types if isinstance(t, kind)]
        if len(members) == 1:
            return members[0]
    return info


class Request(
    msgspec.Struct, Generic[R], kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True
):
    """Base of unary requests. Subclasses set ``method`` and parametrize the response type."""

    method: ClassVar[str]


class StreamRequest(Request[R], frozen=True):
    """Base of server-streamed requests; ``R`` is the type of each item."""


class Response(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of responses and items."""


# ---------------------------------------------------------------------------------------------
# server


class Health(Response):
    status: Literal["serving", "stopping"]
    version: str
    protocol: int
    uptime_s: float
    #: On a loopback or unix connection to a server with API keys: the file holding its first
    #: admin key (the ``pigeon`` command of the same user reads it). Nil otherwise.


class GetHealth(Request[Health], frozen=True):
    method: ClassVar[str] = "server.health"


class ActorStats(Response):
    name: str
    #: starting, running, restarting, stopped or failed
    state: str
    restarts: int = 0
    crashes: int = 0
    last_error: str | None = None
    mailbox_used: int = 0
    mailbox_size: int = 0
    details: dict[str, Any] = {}


class MethodStats(Response):
    calls: int = 0
    errors: int = 0
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0


class ConnectionStats(Response):
    open: int = 0
    #: Open connections that have not said hello yet.
    handshaking: int = 0
    #: Connections closed before their hello to make room for new ones.
    evicted: int = 0
    #: Bytes of answers queued, being written or reserved, all connections together.
    buffered_bytes: int = 0
    accepted: int = 0
    closed_by_protocol_error: int = 0
    frames_in: int = 0
    frames_out: int = 0


class ProcessStats(Response):
    pid: int
    cpu_user_s: float
    cpu_system_s: float
    rss_bytes: int
    max_rss_bytes: int


class StoreStats(Response):
    path: str
    schema_version: int
    map_size: int
    used_bytes: int
    profiles: int
    identities: int
    tokens: int
    events: int
    commits: int = 0
    writes: int = 0
    map_resizes: int = 0


class Stats(Response):
    version: str
    uptime_s: float
    process: ProcessStats
    actors: list[ActorStats]
    connections: ConnectionStats
    methods: dict[str, MethodStats]
    #: None while the store is restarting.
    store: StoreStats | None = None


class GetStats(Request[Stats], frozen=True):
    method: ClassVar[str] = "server.stats"


# ---------------------------------------------------------------------------------------------
# profiles


class Registration(Response):
    """A push registration: one app's token on one device."""

    app: str
    platform: Platform
    token: str
    first_seen: Timestamp
    last_seen: Timestamp
    state: Literal["active", "invalid"] = "active"
    invalid_reason: str | None = None
    invalid_at: Timestamp | None = None


class ConsentEntry(Response):
    push: Literal["in", "out"]
    updated: Timestamp


class Profile(Response):
    identities: list[str]
    attributes: dict[str, Any]
    registrations: list[Registration]
    consent: dict[str, ConsentEntry]
    created: Timestamp
    updated: Timestamp


class GetProfile(Request[Profile], frozen=True):
    method: ClassVar[str] = "profiles.get"
    identity: Identity


class UpsertProfile(Request[Profile], frozen=True):
    """Create the profile or replace its attributes (registrations and consent are kept)."""

    method: ClassVar[str] = "profiles.upsert"
    identity: Identity
    attributes: dict[str, Any] = {}


class PatchProfile(Request[Profile], frozen=True):
    """Merge-patch the attributes (RFC 7386: a null value deletes the key)."""

    method: ClassVar[str] = "profiles.patch"
    identity: Identity
    patch: dict[str, Any]
    #: Create the profile when no profile has this identity (else NOT_FOUND).
    create: bool = True


class ProfileDeleted(Response):
    identities: list[str]
    registrations: int
    events: int


class DeleteProfile(Request[ProfileDeleted], frozen=True):
    """Delete the profile and every trace of it: identities, tokens, consent, events."""

    method: ClassVar[str] = "profiles.delete"
    identity: Identity


class LinkIdentity(Request[Profile], frozen=True):
    """Make ``link`` a further identity of the profile found by ``identity``."""

    method: ClassVar[str] = "profiles.link"
    identity: Identity
    link: Identity


class UnlinkIdentity(Request[Profile], frozen=True):
    """Remove ``identity`` from its profile; a profile keeps at least one identity."""

    method: ClassVar[str] = "profiles.unlink"
    identity: Identity


# ---------------------------------------------------------------------------------------------
# tokens and consent


class TokenRegistered(Response):
    registration: Registration
    #: True when the profile was created by this call.
    created_profile: bool = False
    #: An identity of the profile the token was moved from, if it belonged to another one.
    moved_from: str | None = None
    #: Registrations this one pushed out of the profile, least recently seen first: a profile
    #: keeps at most ``store.max_registrations`` (50 by default); their tokens are forgotten.
    evicted: list[Registration] = []


class RegisterToken(Request[TokenRegistered], frozen=True):
    """Register (or refresh) a push token on a profile, creating the profile if needed.

    A token that belongs to another profile moves to this one.
    """

    method: ClassVar[str] = "tokens.register"
    identity: Identity
    app: AppId
    platform: Platform
    token: PushToken


class TokenUnregistered(Response):
    identity: str


class UnregisterToken(Request[TokenUnregistered], frozen=True):
    method: ClassVar[str] = "tokens.unregister"
    app: AppId
    token: PushToken


class SetConsent(Request[ConsentEntry], frozen=True):
    method: ClassVar[str] = "consent.set"
    identity: Identity
    app: AppId
    push: Literal["in", "out"]


# ---------------------------------------------------------------------------------------------
# events


class Event(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """An experience event for the profile with ``identity`` (created if needed)."""

    identity: Identity
    type: EventType
    #: When it happened; the server's clock when omitted.
    ts: Timestamp | None = None
    data: dict[str, Any] = {}
    #: The client's id of the event: an event whose id an event of this sandbox already
    #: stored within the server's window (``ingest.dedupe_window_s``) is not stored again
    #: (`IngestResult.duplicates`). The event batchers give each event a unique one.
    id: EventId | None = None


class Rejection(Response):
    index: int
    code: str
    message: str
    field: str | None = None


class IngestResult(Response):
    accepted: int
    rejected: list[Rejection] = []
    #: Sequence number of the last accepted event (events are numbered in commit order).
    last_seq: int = 0
    #: The index of each event not stored because an event with its id was stored already
    #: (within the window, or earlier in the same batch): neither accepted nor rejected.
    duplicates: list[int] = []


class IngestEvents(Request[IngestResult], frozen=True):
    """Ingest a batch; each event is validated on its own and a bad one is reported by index
    without rejecting its neighbours. The reply comes after the accepted events are durable."""

    method: ClassVar[str] = "events.ingest"
    events: Annotated[list[Event], msgspec.Meta(max_length=MAX_EVENTS_PER_BATCH)]


class StoredEvent(Response):
    seq: int
    type: str
    ts: Timestamp
    data: dict[str, Any] = {}


class ListEvents(StreamRequest[StoredEvent], frozen=True):
    """Stream a profile's events in time order (newest first with ``reverse``)."""

    method: ClassVar[str] = "events.list"
    identity: Identity
    type: EventType | None = None
    since: Timestamp | None = None
    until: Timestamp | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 100
    reverse: bool = False


# ---------------------------------------------------------------------------------------------
# apps and their provider credentials

#: An APNs key id or team id: 10 upper-case letters or digits.
AppleId = Annotated[str, msgspec.Meta(pattern=_APPLE_ID_PATTERN)]
ApnsEnvironment = Literal["production", "sandbox", "both"]


class ApnsTokenAuth(msgspec.Struct, tag="token", tag_field="kind", kw_only=True, forbid_unknown_fields=True):
    """Token-based authentication: the .p8 key Apple issued, its key id and the team id."""

    #: The contents of the .p8 file (a PKCS#8 PEM EC P-256 private key).
    key_pem: str
    key_id: AppleId
    team_id: AppleId


class ApnsCertificateAuth(msgspec.Struct, tag="certificate", tag_field="kind", kw_only=True, forbid_unknown_fields=True):
    """Certificate-based authentication: a .p12 with its password, or certificate and key in PEM."""

    pkcs12: bytes | None = None
    password: str | None = None
    #: Certificate and private key, PEM, in one text.
    pem: str | None = None


class IosAppInfo(Response):
    bundle_id: str
    environment: ApnsEnvironment
    auth: Literal["token", "certificate"]
    updated: Timestamp
    key_id: str | None = None
    team_id: str | None = None
    certificate_subject: str | None = None
    certificate_expires: Timestamp | None = None
    #: Topics the certificate may push to (from Apple's extension), when it lists them.
    certificate_topics: list[str] = []


class AndroidAppInfo(Response):
    package_name: str
    project_id: str
    client_email: str
    private_key_id: str
    updated: Timestamp


class AppInfo(Response):
    """An app and its platforms, without any secret."""

    app: str
    ios: IosAppInfo | None = None
    android: AndroidAppInfo | None = None


class RegisterIosApp(Request[AppInfo], frozen=True):
    """Register (or replace) an app's iOS credentials. They are checked now and never returned."""

    method: ClassVar[str] = "apps.register_ios"
    app: AppId
    auth: ApnsTokenAuth | ApnsCertificateAuth
    #: The APNs topic; the app id when omitted.
    bundle_id: AppId | None = None
    #: Which APNs environments the app uses; with ``both`` a token's platform decides
    #: (``apns`` production, ``apns-sandbox`` sandbox).
    environment: ApnsEnvironment = "both"


class RegisterAndroidApp(Request[AppInfo], frozen=True):
    """Register (or replace) an app's Android (FCM) credentials. They are checked now and never returned."""

    method: ClassVar[str] = "apps.register_android"
    app: AppId
    #: The Firebase service account's JSON key (the file Firebase's console downloads, as an
    #: object): ``project_id``, ``client_email``, ``private_key_id``, ``private_key``, ``token_uri``.
    service_account: dict[str, Any]
    #: The Android package name; the app id when omitted.
    package_name: AppId | None = None


class GetApp(Request[AppInfo], frozen=True):
    method: ClassVar[str] = "apps.get"
    app: AppId


class AppList(Response):
    apps: list[AppInfo]


class ListApps(Request[AppList], frozen=True):
    method: ClassVar[str] = "apps.list"


class AppDeleted(Response):
    app: str


class DeleteApp(Request[AppDeleted], frozen=True):
    method: ClassVar[str] = "apps.delete"
    app: AppId


# ---------------------------------------------------------------------------------------------
# push


class CriticalSound(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A critical alert's sound (iOS): it plays even in silent mode."""

    name: str = "default"
    volume: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0


class LiveActivity(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """The Live Activity part of an APNs payload (push type ``liveactivity``)."""

    event: Literal["start", "update", "end"]
    #: When the update was produced; the system keeps the newest (now when omitted).
    timestamp: Timestamp | None = None
    content_state: dict[str, Any] = {}
    stale_date: Timestamp | None = None
    dismissal_date: Timestamp | None = None
    #: For push-to-start.
    attributes_type: str | None = None
    attributes: dict[str, Any] | None = None


class PushContent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a notification shows and carries, independent of the provider."""

    title: str | None = None
    subtitle: str | None = None
    body: str | None = None
    title_loc_key: str | None = None
    title_loc_args: list[str] = []
    subtitle_loc_key: str | None = None
    subtitle_loc_args: list[str] = []
    loc_key: str | None = None
    loc_args: list[str] = []
    launch_image: str | None = None
    badge: Annotated[int, msgspec.Meta(ge=0)] | None = None
    sound: str | CriticalSound | None = None
    thread_id: str | None = None
    category: str | None = None
    #: A silent background update (no alert, badge or sound).
    content_available: bool = False
    #: Route through the app's notification service extension (set when there is a media URL).
    mutable_content: bool = False
    interruption_level: Literal["passive", "active", "time-sensitive", "critical"] | None = None
    relevance_score: float | None = None
    target_content_id: str | None = None
    filter_criteria: str | None = None
    #: An image, video or GIF the app's extension downloads and attaches.
    media_url: str | None = None
    #: Where a tap leads (a deep link or a web URL).
    deeplink: str | None = None
    #: Custom data, beside the provider's keys.
    data: dict[str, Any] = {}
    live_activity: LiveActivity | None = None


ApnsPushType = Literal[
    "alert", "background", "voip", "liveactivity", "complication", "fileprovider", "location", "mdm",
    "pushtotalk", "controls", "widgets",
]


class ApnsOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """APNs request headers."""

    push_type: ApnsPushType = "alert"
    #: 10 (now), 5 (power-friendly) or 1; by default 10, and 5 for ``background`` (which allows
    #: only 5); ``liveactivity`` and ``location`` allow 10 or 5.
    priority: Literal[10, 5, 1] | None = None
    #: Until when APNs stores and retries the notification; the epoch (0) means a single attempt.
    #: Pigeon also stops retrying after it. APNs's own default (up to 30 days) when omitted.
    expiration: Timestamp | None = None
    collapse_id: str | None = None
    #: A canonical UUID; APNs generates one when omitted.
    apns_id: str | None = None


AndroidNotificationPriority = Literal["min", "low", "default", "high", "max"]


class FcmOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """How a notification goes out through FCM (Android)."""

    #: Send everything in ``data`` for the app's own code to render (Adobe's ``adb_*`` keys, as
    #: its Messaging SDK expects) instead of a notification Android shows by itself.
    data_only: bool = False
    #: Delivery priority: ``high`` wakes the device (the default for notifications), ``normal``
    #: (the default for data-only messages) waits for a good moment.
    priority: Literal["normal", "high"] | None = None
    #: How long FCM keeps the message for an offline device (0: now or never); FCM's own
    #: default, 4 weeks, when omitted. Pigeon also stops retrying after it.
    ttl_s: Annotated[int, msgspec.Meta(ge=0, le=2_419_200)] | None = None
    #: Messages with the same key replace each other while undelivered (FCM keeps at most 4 keys).
    collapse_key: str | None = None
    #: The Android notification channel (the app's manifest default when omitted or unknown).
    channel_id: str | None = None
    notification_priority: AndroidNotificationPriority | None = None
    visibility: Literal["private", "public", "secret"] | None = None
    #: Replaces a notification still shown with the same tag.
    tag: str | None = None
    #: The activity's intent action on a tap (``content.category`` when omitted).
    click_action: str | None = None
    #: Icon colour, ``#rrggbb``.
    color: Annotated[str, msgspec.Meta(pattern=_COLOR_PATTERN)] | None = None
    #: A drawable resource name of the app.
    icon: str | None = None
    #: A sound resource name, or ``default`` (``content.sound`` when omitted).
    sound: str | None = None
    #: FCM's analytics label.
    analytics_label: Annotated[str, msgspec.Meta(pattern=_LABEL_PATTERN)] | None = None


class PushOutcome(Response):
    token: str
    platform: Platform
    #: ``sent``: the provider accepted it; ``failed``: it did not; ``invalid``: the provider
    #: said the token is dead, and it is now marked invalid on its profile.
    status: Literal["sent", "failed", "invalid"]
    reason: str | None = None
    #: A readable explanation when the reason alone is not enough.
    detail: str | None = None
    #: The provider's HTTP status, when it answered.
    status_code: int | None = None
    #: The provider's id for the notification (``apns-id``, FCM's message name).
    provider_id: str | None = None
    #: ``apns-unique-id`` (sandbox only).
    unique_id: str | None = None
    attempts: int = 1


class PushSent(Response):
    outcomes: list[PushOutcome]
    #: Why nothing was sent to a profile (``NoTokenForApp``, ``OnlyInvalidTokens``), if so.
    excluded: str | None = None


class SendPush(Request[PushSent], frozen=True):
    """Send one notification now, to one token or to every valid token a profile has for an app.

    Transactional: consent and frequency rules do not apply. Give ``content`` (built for each
    provider), or the providers' own payloads sent as they are: ``raw`` (APNs) and/or
    ``fcm_raw`` (FCM); a token whose provider has no payload fails with ``NoPayloadForPlatform``."""

    method: ClassVar[str] = "push.send"
    app: AppId
    token: PushToken | None = None
    #: The token's platform; required with ``token``.
    platform: Platform | None = None
    identity: Identity | None = None
    content: PushContent | None = None
    #: An APNs payload, sent as it is.
    raw: dict[str, Any] | None = None
    #: An FCM HTTP v1 ``Message`` object, sent as it is; Pigeon sets its ``token``.
    fcm_raw: dict[str, Any] | None = None
    apns: ApnsOptions = msgspec.field(default_factory=ApnsOptions)
    fcm: FcmOptions = msgspec.field(default_factory=FcmOptions)


# ---------------------------------------------------------------------------------------------
# channel configurations and messages

_NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_.-]{0,99}\Z"
#: Names of messages, channel configurations, journeys and their nodes.
NAME_PATTERN = _NAME_PATTERN
#: A channel configuration's name or a message id: a letter, then letters, digits, '_', '.', '-'.
Name = Annotated[str, msgspec.Meta(pattern=_NAME_PATTERN)]
#: A published version of a configuration or message: 1, 2, ... (stored in 4 bytes).
Version = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]
_PATTERN_MEANINGS[_NAME_PATTERN] = "a name like spring_sale (a letter, then letters, digits, '_', '.', '-'; at most 100)"


class ChannelConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Where a message goes (what journey optimizers call a message preset): apps, platforms
    and the consent its messages need."""

    name: Name
    description: str = ""
    #: The registered apps its messages go to (each to its iOS and Android devices).
    apps: Annotated[list[AppId], msgspec.Meta(min_length=1, max_length=20)]
    platforms: Annotated[list[Literal["ios", "android"]], msgspec.Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["ios", "android"]
    )
    #: ``not_opted_out`` (default: unless the profile opted out of the app's push), ``opt_in``
    #: (only profiles that opted in) or ``none`` (transactional messages).
    consent: Literal["not_opted_out", "opt_in", "none"] = "not_opted_out"


class ConfigInfo(Response):
    config: ChannelConfig
    version: int
    published: Timestamp


class PublishConfig(Request[ConfigInfo], frozen=True):
    """Publish a channel configuration: a new version (earlier ones stay readable)."""

    method: ClassVar[str] = "configs.publish"
    config: ChannelConfig


class GetConfig(Request[ConfigInfo], frozen=True):
    method: ClassVar[str] = "configs.get"
    name: Name
    #: The latest when omitted.
    version: Version | None = None


class ConfigList(Response):
    configs: list[ConfigInfo]


class ListConfigs(Request[ConfigList], frozen=True):
    """The latest version of every channel configuration."""

    method: ClassVar[str] = "configs.list"


#: Characters in each text of a message (a title, a URL, a data key or value...), a template's
#: source included: an APNs or FCM payload is at most 4,096 bytes in all, so no longer text
#: could be sent (a template may render shorter than its source, not this much shorter).
MAX_TEXT = 4_096
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class Button(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """An action button (Android; on iOS the message's ``ios.category`` names the app's buttons)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    label: Text
    action: Literal["open_app", "deeplink", "web_url", "dismiss"] = "open_app"
    url: Text | None = None


class OnClick(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    action: Literal["open_app", "deeplink", "web_url"] = "open_app"
    #: The deep link or web URL (a template, like every text).
    url: Text | None = None


class IosFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    category: Text | None = None
    thread_id: Text | None = None
    interruption_level: Literal["passive", "active", "time-sensitive", "critical"] | None = None
    relevance_score: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    collapse_id: Text | None = None


class AndroidFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    channel_id: Text | None = None
    notification_priority: AndroidNotificationPriority | None = None
    visibility: Literal["private", "public", "secret"] | None = None
    tag: Text | None = None
    collapse_key: Text | None = None
    sticky: bool = False
    icon: Text | None = None
    color: Annotated[str, msgspec.Meta(pattern=_COLOR_PATTERN)] | None = None
    #: Send a data message for the app's SDK to render (Adobe's adb_* keys).
    data_only: bool = False


class MessageContent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a message shows, for both platforms. Every text, URL and data value may be a
    template (``{{ profile.person.firstName }}``)."""

    title: Text | None = None
    subtitle: Text | None = None
    body: Text | None = None
    media_url: Text | None = None
    on_click: OnClick = msgspec.field(default_factory=OnClick)
    buttons: Annotated[list[Button], msgspec.Meta(max_length=3)] = []
    sound: Text | None = None
    badge: Annotated[int, msgspec.Meta(ge=0)] | None = None
    #: A silent update (iOS content-available; an Android data message).
    silent: bool = False
    #: At most 100 entries (a payload of 4,096 bytes holds fewer).
    data: Annotated[dict[Text, Text], msgspec.Meta(max_length=100)] = {}
    ios: IosFields = msgspec.field(default_factory=IosFields)
    android: AndroidFields = msgspec.field(default_factory=AndroidFields)


class MessageSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A push message as authored (a YAML or JSON file, or ``messages.publish``)."""

    id: Name
    #: The channel configuration it is sent through.
    channel: Name
    content: MessageContent
    description: Text = ""
    #: ``high`` (now: APNs 10, FCM HIGH) or ``normal`` (power-friendly: APNs 5, FCM NORMAL).
    priority: Literal["high", "normal"] = "high"
    #: How long the providers keep it for an offline device; their default when omitted.
    ttl_s: Annotated[int, msgspec.Meta(ge=0, le=2_419_200)] | None = None
    #: A value a template uses is missing: render nothing (or its default), or exclude the profile.
    on_missing: Literal["default", "exclude"] = "default"


class MessageInfo(Response):
    message: MessageSpec
    version: int
    published: Timestamp
    #: The fields that are templates (``$.content.title``, ...).
    templates: list[str] = []


class PublishMessage(Request[MessageInfo], frozen=True):
    """Publish a message: its templates are compiled and checked, its channel configuration
    must exist; it becomes a new version (versions are never edited)."""

    method: ClassVar[str] = "messages.publish"
    message: MessageSpec


class GetMessage(Request[MessageInfo], frozen=True):
    method: ClassVar[str] = "messages.get"
    id: Name
    version: Version | None = None


class MessageList(Response):
    messages: list[MessageInfo]


class ListMessages(Request[MessageList], frozen=True):
    """The latest version of every message."""

    method: ClassVar[str] = "messages.list"


class PlatformPreview(Response):
    platform: Literal["ios", "android"]
    app: str
    #: The provider payload exactly as it would be sent (APNs JSON, FCM message).
    payload: dict[str, Any] = {}
    #: APNs request headers (``apns-*``).
    headers: dict[str, str] = {}
    #: Bytes of the payload as sent.
    size: int = 0
    #: Why it could not be built (``PayloadTooLarge``, ``INVALID_ARGUMENT``, ...), if so.
    error: str | None = None
    detail: str | None = None


class Preview(Response):
    id: str
    version: int
    previews: list[PlatformPreview] = []
    #: Why the profile would be excluded (``MissingValue``, ``TemplateError``), if it would.
    excluded: str | None = None
    detail: str | None = None


class PreviewMessage(Request[Preview], frozen=True):
    """Render a message for a profile (a stored one, or a sample given as JSON) and show the
    exact provider payloads, without sending anything."""

    method: ClassVar[str] = "messages.preview"
    id: Name
    version: Version | None = None
    identity: Identity | None = None
    #: A sample profile: attributes (and optionally ``identities``, ``audiences``).
    profile: dict[str, Any] | None = None
    #: The triggering event's data (``type`` and fields), for templates that use ``event``.
    event: dict[str, Any] = {}


#: Unknown identities a `SendResult` lists (it counts them all).
MAX_UNKNOWN_LISTED = 100


class SendResult(Response):
    """What a send did, per notification (a profile with two devices counts twice; an
    excluded profile once). ``targeted`` = ``excluded`` + ``sent``; ``sent`` = ``delivered`` +
    ``failed``; ``bounced`` counts the failed whose token was dead."""

    execution: str
    message: str
    version: int
    profiles: int = 0
    targeted: int = 0
    excluded: dict[str, int] = {}
    sent: int = 0
    delivered: int = 0
    failed: dict[str, int] = {}
    bounced: int = 0
    #: Identities of the request that no profile has (nothing is sent to them, nothing counted):
    #: how many, and the first `MAX_UNKNOWN_LISTED` of them.
    unknown: int = 0
    unknown_identities: list[str] = []
    #: Why the first profile excluded for a reason that needs explaining was (``MissingValue``,
    #: ``TemplateLimit``, ``TemplateError``, ``AudienceError``): ``<identity>: <field>: <problem>``.
    details: dict[str, str] = {}


class SendMessage(Request[SendResult], frozen=True):
    """Send a published message now (a one-shot campaign) to profiles: a list of identities,
    or an audience (a condition over ``profile``, e.g. ``profile.loyalty.tier == 'gold'``).
    Consent and the channel configuration's rules apply; the reply comes once every
    notification is settled."""

    method: ClassVar[str] = "messages.send"
    id: Name
    version: Version | None = None
    identities: Annotated[list[Identity], msgspec.Meta(max_length=10_000)] = []
    audience: Annotated[str, msgspec.Meta(max_length=4096)] | None = None
    #: Only to profiles flagged as test profiles (the attribute ``testProfile`` is true).
    test: bool = False
    #: Data for templates that use ``event``.
    event: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------------
# reports


class MinuteCounts(Response):
    start: Timestamp
    counts: dict[str, int] = {}


class Report(Response):
    """Counts of the notifications that match the request's filters (see `SendResult` for
    how the metrics add up)."""

    window: Literal["live", "all_time"]
    #: ``targeted``, ``excluded``, ``sent``, ``delivered``, ``failed``, ``bounced``, ``opened``, ...
    totals: dict[str, int] = {}
    #: Per metric, per reason (``excluded``: ``NoConsent``...; ``failed``: provider reasons).
    reasons: dict[str, dict[str, int]] = {}
    by_platform: dict[str, dict[str, int]] = {}
    by_app: dict[str, dict[str, int]] = {}
    #: Per journey (notifications sent outside journeys are under ``""``).
    by_journey: dict[str, dict[str, int]] = {}
    #: ``unique_opened`` / ``delivered``, when anything was delivered: the share of
    #: notifications whose profile opened the message (a profile with two devices counts
    #: twice in ``delivered`` and once in ``unique_opened``).
    open_rate: float | None = None
    #: The live window's per-minute counts, oldest first (only minutes with counts).
    minutes: list[MinuteCounts] = []


class GetReport(Request[Report], frozen=True):
    """The counts of the notifications that match every filter given."""

    method: ClassVar[str] = "reports.get"
    message: Name | None = None
    version: Version | None = None
    journey: Name | None = None
    node: Name | None = None
    app: AppId | None = None
    platform: Platform | None = None
    #: Only the counts of this version of the journey (counts from before versions were
    #: counted have none).
    journey_version: Version | None = None
    #: ``all_time`` (stored) or ``live`` (the last 24 hours, by minute).
    window: Literal["live", "all_time"] = "all_time"


class WatchReport(StreamRequest[Report], frozen=True):
    """`GetReport`, streamed: a report at once, then a new one whenever the counts change, at
    most every ``interval_s``, until the client cancels the call."""

    method: ClassVar[str] = "reports.watch"
    message: Name | None = None
    version: Version | None = None
    journey: Name | None = None
    node: Name | None = None
    app: AppId | None = None
    platform: Platform | None = None
    #: Only the counts of this version of the journey (counts from before versions were
    #: counted have none).
    journey_version: Version | None = None
    window: Literal["live", "all_time"] = "all_time"
    interval_s: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 1.0


# ---------------------------------------------------------------------------------------------
# API keys

#: An API key: ``pgn_`` and 43 base64url characters (256 random bits).
KEY_PATTERN = r"^pgn_[A-Za-z0-9_-]{43}\Z"
#: A key's id, which lists show and revocation takes: its first 12 characters.
KEY_ID_PATTERN = r"^pgn_[A-Za-z0-9_-]{8}\Z"
KeyId = Annotated[str, msgspec.Meta(pattern=KEY_ID_PATTERN)]
#: What a key may do (PROTOCOL.md, section 5.1): ``admin`` implies every scope, ``operator``
#: implies ``ingest`` and ``read``.
Scope = Literal["admin", "operator", "ingest", "read"]
SCOPES: tuple[Scope, ...] = ("admin", "operator", "ingest", "read")


#: A sandbox's name (PROTOCOL.md, section 5.2): lower case letters, digits and dashes.
SANDBOX_PATTERN = r"^[a-z][a-z0-9-]{0,31}\Z"
SandboxName = Annotated[str, msgspec.Meta(pattern=SANDBOX_PATTERN)]


class KeyInfo(Response):
    """An API key as lists show it: never the key itself."""

    id: str
    scopes: list[str]
    sandbox: str
    created: Timestamp
    name: str = ""
    last_used: Timestamp | None = None


class CreatedKey(Response):
    #: The whole key: shown in this answer only (the server keeps a keyed hash of it).
    key: str
    info: KeyInfo


class CreateKey(Request[CreatedKey], frozen=True):
    method: ClassVar[str] = "keys.create"
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=4)]
    #: A label for the lists (``ios-app``, ``crm-sync``).
    name: Annotated[str, msgspec.Meta(max_length=100, pattern=r"^[^\x00-\x1f\x7f]*\Z")] = ""
    #: The sandbox the key belongs to (None: the caller's). Another sandbox's needs an admin
    #: key of sandbox ``default``.
    sandbox: SandboxName | None = None


class KeyList(Response):
    keys: list[KeyInfo]


class ListKeys(Request[KeyList], frozen=True):
    method: ClassVar[str] = "keys.list"
    #: The sandbox whose keys to list (None: the caller's). Another sandbox's needs an admin
    #: key of sandbox ``default``.
    sandbox: SandboxName | None = None


# ---------------------------------------------------------------------------------------------
# sandboxes


class SandboxInfo(Response):
    name: str
    created: Timestamp


class SandboxList(Response):
    sandboxes: list[SandboxInfo]


class CreateSandbox(Request[SandboxInfo], frozen=True):
    method: ClassVar[str] = "sandboxes.create"
    name: SandboxName


class ListSandboxes(Request[SandboxList], frozen=True):
    method: ClassVar[str] = "sandboxes.list"


class KeyRevoked(Response):
    id: str
    #: Open connections that used the key, closed by the revocation.
    connections_closed: int = 0


class RevokeKey(Request[KeyRevoked], frozen=True):
    method: ClassVar[str] = "keys.revoke"
    id: KeyId


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
# journeys

#: A duration: whole numbers of ``s``, ``m``, ``h``, ``d`` or ``w``, one or more in a row
#: (``30s``, ``15m``, ``1d12h``, ``2w``).
DURATION_PATTERN = r"^(?:[0-9]{1,7}[smhdw]){1,5}\Z"
Duration = Annotated[str, msgspec.Meta(pattern=DURATION_PATTERN)]
#: A local time of day, ``HH:MM`` on 24 hours.
TIME_OF_DAY_PATTERN = r"^(?:[01][0-9]|2[0-3]):[0-5][0-9]\Z"
TimeOfDay = Annotated[str, msgspec.Meta(pattern=TIME_OF_DAY_PATTERN)]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
#: A condition or a value in the templates' expression language (section 14.7).
Expression = Annotated[str, msgspec.Meta(min_length=1, max_length=2000)]


class _Spec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of what a journey file holds: unknown keys are refused, defaults left out."""


class JourneyEntry(_Spec, kw_only=True):
    """How profiles enter a journey: exactly one of ``event``, ``audience`` and ``read``."""

    #: A unitary event: each event of this type that ``condition`` accepts enters its profile.
    event: EventType | None = None
    #: Over ``event`` and ``profile`` (with ``event``), or ``profile`` (with ``read``).
    condition: Expression | None = None
    #: Audience qualification: a profile enters when it starts (``on: enter``) or stops
    #: (``on: exit``) matching this condition (over ``profile``, ``events``, its event history
    #: by type, and ``now``), evaluated as its events and attributes change.
    audience: Expression | None = None
    on: Literal["enter", "exit"] = "enter"
    #: A read audience: every profile matching ``condition`` (all when omitted), once at
    #: ``at`` (default: when published) and then every ``every`` if given.
    read: bool = False
    at: Timestamp | None = None
    every: Duration | None = None
    #: Read audience: profiles entered per second at most.
    rate: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 1_000


class Branch(_Spec, kw_only=True):
    #: The first branch whose condition holds is taken.
    when: Expression
    next: Name


class SplitPath(_Spec, kw_only=True):
    percent: Annotated[int, msgspec.Meta(ge=1, le=100)]
    next: Name


class _Node(_Spec, kw_only=True, tag_field="type"):
    id: Name
    description: Text = ""


class PushNode(_Node, kw_only=True, tag="push"):
    """Send a published message (personalized for the profile, checked against its
    exclusions, quiet hours and caps)."""

    message: Name
    #: The message's version; default: its latest when the journey is published (pinned then).
    version: Version | None = None
    next: Name | None = None
    #: Where a profile goes when the push is excluded or fails (default: ``next``).
    on_error: Name | None = None


class ConditionNode(_Node, kw_only=True, tag="condition"):
    """Ordered branches over ``profile``, ``event``, ``journey``, ``audiences`` and ``now``
    (in the profile's time zone); the first that holds is taken."""

    branches: Annotated[list[Branch], msgspec.Meta(min_length=1, max_length=20)]
    #: Where the others go (default: they end, with the reason ``no_branch``).
    otherwise: Name | None = None


class SplitNode(_Node, kw_only=True, tag="split"):
    """Percentages (adding up to 100), deterministic per profile and journey."""

    paths: Annotated[list[SplitPath], msgspec.Meta(min_length=2, max_length=10)]


class WaitNode(_Node, kw_only=True, tag="wait"):
    """Wait ``duration``, ``until`` a date-time expression, or until the next local ``time``
    of day on ``days`` (all days when empty): exactly one of the three."""

    duration: Duration | None = None
    until: Expression | None = None
    time: TimeOfDay | None = None
    days: Annotated[list[Weekday], msgspec.Meta(max_length=7)] = []
    next: Name | None = None


class ReactionNode(_Node, kw_only=True, tag="reaction"):
    """Wait for an open or a button action on an earlier push of the journey (``push``, its
    node id), or for an event of type ``event`` that ``condition`` accepts; ``timeout_next``
    after ``timeout`` without it."""

    push: Name | None = None
    on: Literal["opened", "action"] = "opened"
    #: With ``on: action``: the button's id (any button when omitted).
    action: Name | None = None
    event: EventType | None = None
    condition: Expression | None = None
    timeout: Duration
    next: Name | None = None
    timeout_next: Name | None = None


class UpdateNode(_Node, kw_only=True, tag="update"):
    """Merge ``patch`` into the profile's attributes (RFC 7386); string values are templates."""

    patch: dict[str, Any]
    next: Name | None = None


class EndNode(_Node, kw_only=True, tag="end"):
    """The instance ends here (so does one whose node has no ``next``)."""


JourneyNode = PushNode | ConditionNode | SplitNode | WaitNode | ReactionNode | UpdateNode | EndNode


class Criterion(_Spec, kw_only=True):
    """An event of type ``event`` (that ``condition`` accepts), or a ``condition`` over the
    profile that becomes true."""

    event: EventType | None = None
    condition: Expression | None = None


class QuietHours(_Spec, kw_only=True):
    """No push between ``start`` and ``end``, local time (``end`` may be the next day)."""

    start: TimeOfDay
    end: TimeOfDay
    #: ``queue``: the push waits for the end of the window; ``discard``: the instance exits.
    action: Literal["queue", "discard"] = "queue"


class FrequencyCap(_Spec, kw_only=True):
    """At most ``max`` pushes delivered to a profile per ``per`` (rolling), counting every
    journey's and ``messages.send`` 's."""

    max: Annotated[int, msgspec.Meta(ge=1, le=10_000)]
    per: Literal["hour", "day", "week", "month"]


class Reentrance(_Spec, kw_only=True):
    #: Whether a profile whose instance ended may enter again.
    allowed: bool = False
    #: Only once this long has passed since it last entered.
    after: Duration | None = None


class JourneySpec(_Spec, kw_only=True):
    """A journey as authored (a YAML or JSON file, or ``journeys.publish``)."""

    id: Name
    description: Text = ""
    entry: JourneyEntry
    #: The activities; profiles start at the first.
    nodes: Annotated[list[JourneyNode], msgspec.Meta(min_length=1, max_length=200)]
    #: The journey's time zone (an IANA name), for profiles without one of their own.
    timezone: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"
    #: The profile attribute holding a profile's own time zone (``""``: the journey's always).
    profile_timezone: Annotated[str, msgspec.Meta(max_length=100)] = "timezone"
    reentrance: Reentrance | None = None
    #: Entries are taken from ``start`` until ``end``.
    start: Timestamp | None = None
    end: Timestamp | None = None
    #: Profiles entered per second at most, whatever the entry (default: no cap).
    entry_rate: Annotated[int, msgspec.Meta(ge=1, le=100_000)] | None = None
    #: An instance still running after this long exits (reason ``timeout``).
    timeout: Duration = "91d"
    #: What takes a profile out at once, even mid-wait.
    exit: Annotated[list[Criterion], msgspec.Meta(max_length=20)] = []
    #: A conversion: counted per journey, version and node where the profile was.
    goal: Criterion | None = None
    quiet_hours: QuietHours | None = None
    caps: Annotated[list[FrequencyCap], msgspec.Meta(max_length=4)] = []
    #: While paused: entries refused, or held until it resumes.
    paused_entries: Literal["refuse", "queue"] = "refuse"
    #: Test mode: only test profiles (attribute ``testProfile`` true) enter, waits last 10 s
    #: at most, and each instance's steps are kept.
    test: bool = False


#: draft: published, not running; live: entering and running; paused: timers held; closed:
#: no new entries, instances finish; finished: closed and none left; stopped: everyone out.
JourneyState = Literal["draft", "live", "paused", "closed", "finished", "stopped"]


class JourneyInfo(Response):
    journey: JourneySpec
    version: int
    published: Timestamp
    state: JourneyState
    #: The version profiles enter (the latest that is not a draft), if any.
    live_version: int | None = None
    #: ``journeys.get`` and ``journeys.list``: this version's instances running now, by the
    #: node where they are (nodes with none left out).
    waiting: dict[str, int] = {}
    #: ``journeys.get`` and ``journeys.list``: the instances running now, all versions.
    running: int = 0


class JourneyList(Response):
    journeys: list[JourneyInfo]


class PublishJourney(Request[JourneyInfo], frozen=True):
    """Publish a journey: checked whole (the graph, its expressions, its messages), it becomes
    a new version, live unless ``draft``."""

    method: ClassVar[str] = "journeys.publish"
    journey: JourneySpec
    draft: bool = False
    #: Move instances waiting in the live version to this one, at the nodes with the same id.
    move_waiting: bool = False


class GetJourney(Request[JourneyInfo], frozen=True):
    method: ClassVar[str] = "journeys.get"
    id: Name
    version: Version | None = None


class ListJourneys(Request[JourneyList], frozen=True):
    method: ClassVar[str] = "journeys.list"


class CloseJourney(Request[JourneyInfo], frozen=True):
    """No new entries; instances run to their end."""

    method: ClassVar[str] = "journeys.close"
    id: Name


class StopJourney(Request[JourneyInfo], frozen=True):
    """Every instance exits now (reason ``stopped``); no new entries."""

    method: ClassVar[str] = "journeys.stop"
    id: Name


class PauseJourney(Request[JourneyInfo], frozen=True):
    """Timers are held and entries refused or queued (``paused_entries``) until resumed."""

    method: ClassVar[str] = "journeys.pause"
    id: Name


class ResumeJourney(Request[JourneyInfo], frozen=True):
    method: ClassVar[str] = "journeys.resume"
    id: Name


class SimulatedEvent(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """An event of the simulated profile, at a virtual time."""

    at: Timestamp
    type: EventType
    data: dict[str, Any] = {}


class SimulatedPush(Response):
    """What the provider would get for one of the profile's registrations."""

    app: str
    #: The registration's platform (``apns``, ``apns-sandbox``, ``fcm``).
    platform: str
    token: str
    payload: dict[str, Any] = {}
    headers: dict[str, str] = {}
    size: int = 0
    error: str | None = None
    detail: str | None = None


class TraceStep(Response):
    """One step of an instance, at its virtual time (`Step`)."""

    at: Timestamp
    node: str
    #: enter, branch, split, wait, push, excluded, update, reaction, timeout, exit, goal, end.
    kind: str
    #: Why: the branch taken and its condition, what it waits until, the exclusion, ...
    detail: str = ""
    #: For ``excluded``: the reason code (``NoConsent``, ``QuietHours``, ``FrequencyCapped``, ...).
    excluded: str | None = None
    #: For ``push``: exactly what each registration's provider would get.
    pushes: list[SimulatedPush] = []


class Simulation(Response):
    journey: str
    #: The published version simulated (0: the journey given in the request).
    version: int
    #: ``ended``, ``waiting`` (at ``node`` until ``wake``, or for an event), ``not_entered``.
    outcome: Literal["ended", "waiting", "not_entered"]
    node: str = ""
    #: Why it ended, or why it did not enter.
    reason: str = ""
    wake: Timestamp | None = None
    steps: list[TraceStep] = []


class TraceJourney(Request[Simulation], frozen=True):
    """A test-mode journey's instance for a profile: where it is and every step it took."""

    method: ClassVar[str] = "journeys.trace"
    id: Name
    identity: Identity


class SimulateJourney(Request[Simulation], frozen=True):
    """Run a journey for one profile on a virtual clock, without sending or writing anything."""

    method: ClassVar[str] = "journeys.simulate"
    #: A journey to try (checked as ``journeys.publish`` checks it), or ``id`` (and ``version``) of a published one.
    journey: JourneySpec | None = None
    id: Name | None = None
    version: Version | None = None
    #: A stored profile, or a sample: attributes, with ``identities``, ``registrations``
    #: (``[{app, platform, token}]``) and ``consent`` (``{app: "in" | "out"}``) if wanted.
    identity: Identity | None = None
    profile: dict[str, Any] | None = None
    #: The profile's events, in time order (an event entry enters on the first that matches).
    events: Annotated[list[SimulatedEvent], msgspec.Meta(max_length=1000)] = []
    #: When the virtual clock starts (default: now, or the first event's time).
    start: Timestamp | None = None
    #: When it stops (default: 120 days after the start).
    until: Timestamp | None = None


# ---------------------------------------------------------------------------------------------
# secrets


class SecretsRotated(Response):
    #: Sealed values re-encrypted under the new master key.
    resealed: int
    #: The new key's fingerprint: 4 bytes of its SHA-256, in hex (tells keys apart, reveals nothing).
    fingerprint: str
    #: The master key file, which now holds the new key alone.
    key_file: str


class RotateSecrets(Request[SecretsRotated], frozen=True):
    """Re-encrypt every secret the server stores under a new master key, without stopping."""

    method: ClassVar[str] = "secrets.rotate"


# ---------------------------------------------------------------------------------------------
# registry


class MethodSpec(msgspec.Struct, frozen=True):
    name: str
    request: type
    response: type
    streaming: bool


def _spec(cls: type[Request[Any]]) -> MethodSpec:
    # __orig_bases__ is set on generic subclasses at runtime but absent from typeshed's `type`
    # (types.get_original_bases is Python 3.12+).
    bases = cls.__orig_bases__  # type: ignore[attr-defined]
    base = next(b for b in bases if typing.get_origin(b) in (Request, StreamRequest))
    (response,) = typing.get_args(base)
    return MethodSpec(cls.method, cls, response, typing.get_origin(base) is StreamRequest)


#: Every method, by name.
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in map(
        _spec,
        [
            GetHealth,
            GetStats,
            GetProfile,
            UpsertProfile,
            PatchProfile,
            DeleteProfile,
            LinkIdentity,
            UnlinkIdentity,
            RegisterToken,
            UnregisterToken,
            SetConsent,
            IngestEvents,
            ListEvents,
            RegisterIosApp,
            RegisterAndroidApp,
            GetApp,
            ListApps,
            DeleteApp,
            SendPush,
            PublishConfig,
            GetConfig,
            ListConfigs,
            PublishMessage,
            GetMessage,
            ListMessages,
            PreviewMessage,
            SendMessage,
            GetReport,
            WatchReport,
            CreateKey,
            ListKeys,
            RevokeKey,
            CreateSandbox,
            ListSandboxes,
            PublishJourney,
            GetJourney,
            ListJourneys,
            CloseJourney,
            StopJourney,
            PauseJourney,
            ResumeJourney,
            SimulateJourney,
            TraceJourney,
            RotateSecrets,
        ],
    )
}
