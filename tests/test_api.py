"""Tests for protocols/api.py: the method registry, field patterns and validation messages."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols import api
from protocols.framing import FrameEncoder

# =============================================================================================
# the registry

EXPECTED_METHODS = {
    "server.health": (api.GetHealth, api.Health, False),
    "server.stats": (api.GetStats, api.Stats, False),
    "profiles.get": (api.GetProfile, api.Profile, False),
    "profiles.upsert": (api.UpsertProfile, api.Profile, False),
    "profiles.patch": (api.PatchProfile, api.Profile, False),
    "profiles.delete": (api.DeleteProfile, api.ProfileDeleted, False),
    "profiles.link": (api.LinkIdentity, api.Profile, False),
    "profiles.unlink": (api.UnlinkIdentity, api.Profile, False),
    "tokens.register": (api.RegisterToken, api.TokenRegistered, False),
    "tokens.unregister": (api.UnregisterToken, api.TokenUnregistered, False),
    "consent.set": (api.SetConsent, api.ConsentEntry, False),
    "events.ingest": (api.IngestEvents, api.IngestResult, False),
    "events.list": (api.ListEvents, api.StoredEvent, True),
    "apps.register_ios": (api.RegisterIosApp, api.AppInfo, False),
    "apps.register_android": (api.RegisterAndroidApp, api.AppInfo, False),
    "configs.publish": (api.PublishConfig, api.ConfigInfo, False),
    "configs.get": (api.GetConfig, api.ConfigInfo, False),
    "configs.list": (api.ListConfigs, api.ConfigList, False),
    "messages.publish": (api.PublishMessage, api.MessageInfo, False),
    "messages.get": (api.GetMessage, api.MessageInfo, False),
    "messages.list": (api.ListMessages, api.MessageList, False),
    "messages.preview": (api.PreviewMessage, api.Preview, False),
    "messages.send": (api.SendMessage, api.SendResult, False),
    "reports.get": (api.GetReport, api.Report, False),
    "reports.watch": (api.WatchReport, api.Report, True),
    "apps.get": (api.GetApp, api.AppInfo, False),
    "apps.list": (api.ListApps, api.AppList, False),
    "apps.delete": (api.DeleteApp, api.AppDeleted, False),
    "push.send": (api.SendPush, api.PushSent, False),
    "keys.create": (api.CreateKey, api.CreatedKey, False),
    "keys.list": (api.ListKeys, api.KeyList, False),
    "keys.revoke": (api.RevokeKey, api.KeyRevoked, False),
    "sandboxes.create": (api.CreateSandbox, api.SandboxInfo, False),
    "sandboxes.list": (api.ListSandboxes, api.SandboxList, False),
    "journeys.publish": (api.PublishJourney, api.JourneyInfo, False),
    "journeys.get": (api.GetJourney, api.JourneyInfo, False),
    "journeys.list": (api.ListJourneys, api.JourneyList, False),
    "journeys.close": (api.CloseJourney, api.JourneyInfo, False),
    "journeys.stop": (api.StopJourney, api.JourneyInfo, False),
    "journeys.pause": (api.PauseJourney, api.JourneyInfo, False),
    "journeys.resume": (api.ResumeJourney, api.JourneyInfo, False),
    "journeys.simulate": (api.SimulateJourney, api.Simulation, False),
    "journeys.trace": (api.TraceJourney, api.Simulation, False),
    "secrets.rotate": (api.RotateSecrets, api.SecretsRotated, False),
}


def test_methods_registry_is_exactly_the_expected_table() -> None:
    assert {
        name: (spec.request, spec.response, spec.streaming) for name, spec in api.METHODS.items()
    } == EXPECTED_METHODS


@pytest.mark.parametrize("name", sorted(api.METHODS))
def test_method_spec_is_consistent(name: str) -> None:
    spec = api.METHODS[name]
    assert spec.name == name
    assert spec.request.method == name
    assert re.fullmatch(r"[a-z]+\.[a-z][a-z_]*", name)
    assert issubclass(spec.request, api.Request)
    assert issubclass(spec.response, msgspec.Struct)
    assert spec.streaming == issubclass(spec.request, api.StreamRequest)
    # The method name is a class constant, never a wire field.
    assert "method" not in spec.request.__struct_fields__


def _all_subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_all_subclasses(sub)}
    return found


def test_every_request_class_is_registered() -> None:
    requests = {c for c in _all_subclasses(api.Request) if c.__module__ == "protocols.api"} - {api.StreamRequest}
    # Parametrized aliases (Request[Health]) are not subclasses; only concrete requests remain.
    assert requests == {spec.request for spec in api.METHODS.values()}


# =============================================================================================
# requests forbid unknown fields, responses tolerate them

NOW = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)

#: One valid request per method.
SAMPLES: dict[str, api.Request[Any]] = {
    "server.health": api.GetHealth(),
    "server.stats": api.GetStats(),
    "profiles.get": api.GetProfile(identity="crm:42"),
    "profiles.upsert": api.UpsertProfile(identity="crm:42", attributes={"name": "Ana"}),
    "profiles.patch": api.PatchProfile(identity="crm:42", patch={"name": None}, create=False),
    "profiles.delete": api.DeleteProfile(identity="crm:42"),
    "profiles.link": api.LinkIdentity(identity="crm:42", link="email:ana@example.com"),
    "profiles.unlink": api.UnlinkIdentity(identity="email:ana@example.com"),
    "tokens.register": api.RegisterToken(identity="crm:42", app="com.example.app", platform="apns", token="ab" * 32),
    "tokens.unregister": api.UnregisterToken(app="com.example.app", token="ab" * 32),
    "consent.set": api.SetConsent(identity="crm:42", app="com.example.app", push="out"),
    "events.ingest": api.IngestEvents(
        events=[api.Event(identity="crm:42", type="commerce.purchase", ts=NOW, data={"sku": "A1", "qty": 2})]
    ),
    "events.list": api.ListEvents(identity="crm:42", type="app.open", since=NOW, limit=10, reverse=True),
    "apps.register_ios": api.RegisterIosApp(
        app="com.example.app",
        auth=api.ApnsTokenAuth(key_pem="-----BEGIN PRIVATE KEY-----", key_id="ABCDE12345", team_id="TEAM123456"),
        environment="sandbox",
    ),
    "apps.register_android": api.RegisterAndroidApp(
        app="com.example.app",
        service_account={"project_id": "example-1", "client_email": "sa@example-1.iam.gserviceaccount.com"},
        package_name="com.example.android",
    ),
    "apps.get": api.GetApp(app="com.example.app"),
    "apps.list": api.ListApps(),
    "apps.delete": api.DeleteApp(app="com.example.app"),
    "push.send": api.SendPush(
        app="com.example.app",
        identity="crm:42",
        content=api.PushContent(title="Hi", body="Your order shipped", badge=1, sound=api.CriticalSound(volume=0.5)),
        apns=api.ApnsOptions(push_type="alert", priority=5, expiration=NOW, collapse_id="order"),
        fcm=api.FcmOptions(priority="normal", ttl_s=3600, channel_id="orders", color="#ff8800"),
    ),
    "configs.publish": api.PublishConfig(config=api.ChannelConfig(name="shop-push", apps=["com.example.app"], consent="opt_in")),
    "configs.get": api.GetConfig(name="shop-push", version=2),
    "configs.list": api.ListConfigs(),
    "messages.publish": api.PublishMessage(message=api.MessageSpec(
        id="cart", channel="shop-push", ttl_s=3600, on_missing="exclude",
        content=api.MessageContent(
            title="Hi {{ profile.person.firstName }}", body="Still thinking?", badge=1,
            on_click=api.OnClick(action="deeplink", url="shop://cart"),
            buttons=[api.Button(id="buy", label="Buy", action="deeplink", url="shop://buy")],
            data={"sku": "{{ event.sku }}"}, ios=api.IosFields(category="CART"),
            android=api.AndroidFields(channel_id="offers", sticky=True),
        ),
    )),
    "messages.get": api.GetMessage(id="cart"),
    "messages.list": api.ListMessages(),
    "messages.preview": api.PreviewMessage(id="cart", identity="crm:42", event={"sku": "S1"}),
    "messages.send": api.SendMessage(id="cart", audience="profile.tier == 'gold'", test=True, event={"sku": "S1"}),
    "reports.get": api.GetReport(message="cart", platform="fcm", window="live"),
    "reports.watch": api.WatchReport(message="cart", journey="welcome", node="push-1", journey_version=2,
                                     interval_s=0.5),
    "keys.create": api.CreateKey(scopes=["ingest", "read"], name="ios-app"),
    "keys.list": api.ListKeys(),
    "keys.revoke": api.RevokeKey(id="pgn_Xq3vT0aB"),
    "sandboxes.create": api.CreateSandbox(name="dev"),
    "sandboxes.list": api.ListSandboxes(),
    "journeys.publish": api.PublishJourney(journey=api.JourneySpec(
        id="welcome", entry=api.JourneyEntry(event="app.installed"),
        nodes=[api.PushNode(id="hello", message="hello", next="wait"), api.WaitNode(id="wait", duration="1d")])),
    "journeys.get": api.GetJourney(id="welcome"),
    "journeys.list": api.ListJourneys(),
    "journeys.close": api.CloseJourney(id="welcome"),
    "journeys.stop": api.StopJourney(id="welcome"),
    "journeys.pause": api.PauseJourney(id="welcome"),
    "journeys.resume": api.ResumeJourney(id="welcome"),
    "journeys.trace": api.TraceJourney(id="welcome", identity="crm:42"),
    "journeys.simulate": api.SimulateJourney(id="welcome", profile={"name": "Ana"}, events=[
        api.SimulatedEvent(at=dt.datetime(2026, 12, 8, tzinfo=dt.UTC), type="app.installed")]),
    "secrets.rotate": api.RotateSecrets(),
}


def test_samples_cover_every_method() -> None:
    assert set(SAMPLES) == set(api.METHODS)
    for name, sample in SAMPLES.items():
        assert type(sample) is api.METHODS[name].request


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_round_trips_through_msgpack(name: str) -> None:
    sample = SAMPLES[name]
    cls = api.METHODS[name].request
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(sample), type=cls) == sample


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_request_forbids_unknown_fields(name: str) -> None:
    cls = api.METHODS[name].request
    fields = msgspec.to_builtins(SAMPLES[name])
    data = msgspec.msgpack.encode({**fields, "zz": 1})
    with pytest.raises(msgspec.ValidationError, match="unknown field `zz`") as info:
        msgspec.msgpack.decode(data, type=cls)
    message, _ = api.describe_validation_error(info.value)
    assert "`zz`" in message


def test_event_forbids_unknown_fields_and_names_its_index() -> None:
    data = {"events": [{"identity": "crm:1", "type": "a"}, {"identity": "crm:1", "type": "a", "zz": 1}]}
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert(data, api.IngestEvents)
    assert api.describe_validation_error(info.value) == (
        "$.events[1].zz: Object contains unknown field `zz`",
        "$.events[1].zz",
    )


def test_responses_tolerate_unknown_fields() -> None:
    data = {"status": "serving", "version": "0.1.0", "protocol": 1, "uptime_s": 1.5, "new_field": [1]}
    health = msgspec.msgpack.decode(msgspec.msgpack.encode(data), type=api.Health)
    assert health == api.Health(status="serving", version="0.1.0", protocol=1, uptime_s=1.5)


def test_requests_are_frozen() -> None:
    request = api.GetProfile(identity="crm:42")
    with pytest.raises(AttributeError):
        request.identity = "crm:43"  # type: ignore[misc]


def test_requests_omit_defaults_on_the_wire() -> None:
    assert msgspec.msgpack.encode(api.GetHealth()) == b"\x80"
    assert msgspec.to_builtins(api.ListEvents(identity="crm:1")) == {"identity": "crm:1"}


# =============================================================================================
# field patterns


def accepts(tp: Any, value: str) -> bool:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError:
        return False
    return True


@pytest.mark.parametrize(
    "value",
    [
        "crm:42",
        "email:ana@example.com",
        "ecid:48213592039185711924038617293843302941",
        "a:b",
        "phone:+33 6 12 34 56 78",
        "urn:isbn:0451450523",  # the value may contain colons
        "user_id.v2-x:José",
        "n" * 32 + ":1",
        "crm:" + "9" * 396,  # 400 characters in all
    ],
)
def test_identity_accepts(value: str) -> None:
    assert accepts(api.Identity, value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "crm42",  # no namespace
        ":42",  # empty namespace
        "crm:",  # empty value
        "CRM:42",  # upper-case namespace
        "Crm:42",
        "1crm:42",  # namespace starts with a digit
        "cr m:42",
        "crm:42\n",  # trailing newline
        "crm:4\n2",
        "crm:\t42",
        "crm:42\x00",
        "crm:42\x1b[31m",
        "crm:42\x7f",
        "n" * 33 + ":1",  # namespace over 32 characters
        "crm:" + "9" * 397,  # over 400 characters
    ],
)
def test_identity_rejects(value: str) -> None:
    assert not accepts(api.Identity, value)


def test_identity_rejects_c1_control_characters() -> None:
    """BUG: the pattern excludes only C0 controls and DEL, so C1 controls (U+0080..U+009F) pass,
    although IDENTITY_PATTERN is documented as "a value without control characters". U+0085 is
    a line break for `str.splitlines`, U+009B is the one-character CSI of terminal escapes."""
    accepted = [f"U+{code:04X}" for code in range(0x80, 0xA0) if accepts(api.Identity, f"crm:42{chr(code)}")]
    assert accepted == []


@given(st.from_regex(api.IDENTITY_PATTERN).filter(lambda s: len(s) <= 400))
def test_identity_pattern_matches_what_it_promises(value: str) -> None:
    namespace, _, rest = value.partition(":")
    assert re.fullmatch(r"[a-z][a-z0-9_.-]{0,31}", namespace)
    assert rest and not any(ord(c) < 0x20 or c == "\x7f" for c in rest)
    assert accepts(api.Identity, value)


@pytest.mark.parametrize(
    "value", ["com.example.app", "com.example_app-2", "A", "9app", "a" * 200, "com.Example.App"]
)
def test_app_id_accepts(value: str) -> None:
    assert accepts(api.AppId, value)


@pytest.mark.parametrize(
    "value", ["", ".com.example", "-app", "com example", "com/example", "a" * 201, "app\n", "appé"]
)
def test_app_id_rejects(value: str) -> None:
    assert not accepts(api.AppId, value)


@pytest.mark.parametrize(
    "value",
    [
        "0f" * 32,  # APNs: 64 hex digits
        "dQw4w9WgXcQ:APA91bH-x_y~z",  # FCM style
        "!",
        "~" * 4096,
    ],
)
def test_push_token_accepts(value: str) -> None:
    assert accepts(api.PushToken, value)


@pytest.mark.parametrize("value", ["", "ab cd", "abcd\n", "abc\x00", "é", "x" * 4097])
def test_push_token_rejects(value: str) -> None:
    assert not accepts(api.PushToken, value)


@pytest.mark.parametrize(
    "value", ["commerce.purchase", "app:open", "a", "A_b-c.d:e", "x" * 128, "2fa.enabled"]
)
def test_event_type_accepts(value: str) -> None:
    assert accepts(api.EventType, value)


@pytest.mark.parametrize("value", ["", ".purchase", "_x", "a b", "x" * 129, "open\n", "café"])
def test_event_type_rejects(value: str) -> None:
    assert not accepts(api.EventType, value)


@pytest.mark.parametrize("platform", ["apns", "apns-sandbox", "fcm"])
def test_platform_accepts(platform: str) -> None:
    assert accepts(api.Platform, platform)


@pytest.mark.parametrize("platform", ["APNS", "web", ""])
def test_platform_rejects(platform: str) -> None:
    assert not accepts(api.Platform, platform)


def test_timestamp_requires_a_timezone() -> None:
    assert msgspec.convert("2024-05-01T12:30:00Z", api.Timestamp) == NOW
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        msgspec.convert("2024-05-01T12:30:00", api.Timestamp)


def test_ingest_batch_size_is_limited() -> None:
    event = {"identity": "crm:1", "type": "a"}
    assert len(msgspec.convert({"events": [event] * api.MAX_EVENTS_PER_BATCH}, api.IngestEvents).events) == 10_000
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"events": [event] * (api.MAX_EVENTS_PER_BATCH + 1)}, api.IngestEvents)
    assert api.describe_validation_error(info.value) == (
        "$.events: Expected `array` of length <= 10000",
        "$.events",
    )


@pytest.mark.parametrize("limit, ok", [(0, False), (1, True), (1_000_000, True), (1_000_001, False)])
def test_list_events_limit_bounds(limit: int, ok: bool) -> None:
    assert accepts(api.ListEvents, {"identity": "crm:1", "limit": limit}) is ok  # type: ignore[arg-type]


# =============================================================================================
# describe_validation_error


@pytest.mark.parametrize(
    "cls, data, field, meaning",
    [
        (
            api.GetProfile,
            {"identity": "CRM:42"},
            "$.identity",
            "an identity like crm:42 (a lower-case namespace, a colon, a value)",
        ),
        (
            api.UnregisterToken,
            {"app": "com example", "token": "t"},
            "$.app",
            "an app id like com.example.app (letters, digits, '.', '_', '-')",
        ),
        (
            api.UnregisterToken,
            {"app": "com.example", "token": "t t"},
            "$.token",
            "a push token (1 to 4096 printable characters, no spaces)",
        ),
        (
            api.ListEvents,
            {"identity": "crm:1", "type": "a b"},
            "$.type",
            "an event type like commerce.purchase (letters, digits, '.', '_', ':', '-'; at most 128)",
        ),
    ],
    ids=["identity", "app", "token", "event-type"],
)
def test_describe_validation_error_replaces_patterns_by_their_meaning(
    cls: type, data: dict[str, Any], field: str, meaning: str
) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.msgpack.decode(msgspec.msgpack.encode(data), type=cls)
    assert "regex" in str(info.value)
    expected = (f"{field}: Expected {meaning}", field)
    assert api.describe_validation_error(info.value) == expected
    # The server passes the message as a string.
    assert api.describe_validation_error(str(info.value)) == expected


def test_describe_validation_error_names_the_nested_path() -> None:
    events = [{"identity": "crm:1", "type": "ok"}] * 3 + [{"identity": "crm:1", "type": "bad type"}]
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"events": events}, api.IngestEvents)
    message, field = api.describe_validation_error(info.value)
    assert field == "$.events[3].type"
    assert message == (
        "$.events[3].type: Expected an event type like commerce.purchase "
        "(letters, digits, '.', '_', ':', '-'; at most 128)"
    )


def test_describe_validation_error_keeps_other_messages() -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.convert({"identity": "crm:1", "limit": 0}, api.ListEvents)
    assert api.describe_validation_error(info.value) == ("$.limit: Expected `int` >= 1", "$.limit")


def test_describe_validation_error_without_a_path_is_about_the_root() -> None:
    assert api.describe_validation_error("Expected `object`, got `int`") == ("$: Expected `object`, got `int`", "$")
    assert api.describe_validation_error("Object missing required field `identity`") == (
        "$.identity: Object missing required field `identity`",
        "$.identity",
    )


# =============================================================================================
# Hypothesis round trips of every request type

_identities = st.from_regex(api.IDENTITY_PATTERN).filter(lambda s: len(s) <= 400)
_apps = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,40}\Z")
_tokens = st.from_regex(r"\A[\x21-\x7e]{1,200}\Z")
_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.-]{0,40}\Z")
_durations = st.from_regex(r"\A[0-9]{1,3}[smhdw]\Z")
_journey_nodes = st.one_of(
    st.builds(api.PushNode, id=_names, message=_names, next=st.none() | _names),
    st.builds(api.WaitNode, id=_names, duration=_durations, next=st.none() | _names),
    st.builds(api.ConditionNode, id=_names, branches=st.lists(st.builds(api.Branch, when=st.text(min_size=1, max_size=20),
                                                                         next=_names), min_size=1, max_size=3)),
    st.builds(api.ReactionNode, id=_names, push=st.none() | _names, timeout=_durations, next=st.none() | _names),
    st.builds(api.EndNode, id=_names),
)
_journeys = st.builds(
    api.JourneySpec, id=_names, entry=st.builds(api.JourneyEntry, event=st.none() | _names, read=st.booleans()),
    nodes=st.lists(_journey_nodes, min_size=1, max_size=5), timezone=st.sampled_from(["UTC", "Europe/Paris", "Nowhere"]),
)
_event_types = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,40}\Z")
_timestamps = st.datetimes(
    min_value=dt.datetime(1900, 1, 1),
    max_value=dt.datetime(2200, 1, 1),
    timezones=st.sampled_from(
        [dt.UTC, dt.timezone(dt.timedelta(hours=5, minutes=30)), dt.timezone(dt.timedelta(hours=-8))]
    ),
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_attributes = st.dictionaries(st.text(max_size=10), _values, max_size=5)
_platforms = st.sampled_from(["apns", "apns-sandbox", "fcm"])
_apple_ids = st.from_regex(r"\A[A-Z0-9]{10}\Z")
_auths = st.builds(api.ApnsTokenAuth, key_pem=st.text(max_size=50), key_id=_apple_ids, team_id=_apple_ids) | st.builds(
    api.ApnsCertificateAuth, pkcs12=st.none() | st.binary(max_size=30), password=st.none() | st.text(max_size=10),
    pem=st.none() | st.text(max_size=30),
)
_contents = st.builds(
    api.PushContent,
    title=st.none() | st.text(max_size=20),
    body=st.none() | st.text(max_size=40),
    badge=st.none() | st.integers(0, 1000),
    sound=st.none() | st.text(max_size=10) | st.builds(api.CriticalSound, name=st.text(max_size=10), volume=st.floats(0, 1)),
    data=st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    content_available=st.booleans(),
)
_events = st.builds(
    api.Event,
    identity=_identities,
    type=_event_types,
    ts=st.none() | _timestamps,
    data=_attributes,
    id=st.none() | st.from_regex(api.EVENT_ID_PATTERN),
)

REQUEST_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    "server.health": st.builds(api.GetHealth),
    "server.stats": st.builds(api.GetStats),
    "profiles.get": st.builds(api.GetProfile, identity=_identities),
    "profiles.upsert": st.builds(api.UpsertProfile, identity=_identities, attributes=_attributes),
    "profiles.patch": st.builds(api.PatchProfile, identity=_identities, patch=_attributes, create=st.booleans()),
    "profiles.delete": st.builds(api.DeleteProfile, identity=_identities),
    "profiles.link": st.builds(api.LinkIdentity, identity=_identities, link=_identities),
    "profiles.unlink": st.builds(api.UnlinkIdentity, identity=_identities),
    "tokens.register": st.builds(
        api.RegisterToken, identity=_identities, app=_apps, platform=_platforms, token=_tokens
    ),
    "tokens.unregister": st.builds(api.UnregisterToken, app=_apps, token=_tokens),
    "consent.set": st.builds(api.SetConsent, identity=_identities, app=_apps, push=st.sampled_from(["in", "out"])),
    "events.ingest": st.builds(api.IngestEvents, events=st.lists(_events, max_size=5)),
    "events.list": st.builds(
        api.ListEvents,
        identity=_identities,
        type=st.none() | _event_types,
        since=st.none() | _timestamps,
        until=st.none() | _timestamps,
        limit=st.integers(1, 1_000_000),
        reverse=st.booleans(),
    ),
    "apps.register_ios": st.builds(
        api.RegisterIosApp, app=_apps, auth=_auths, bundle_id=st.none() | _apps,
        environment=st.sampled_from(["production", "sandbox", "both"]),
    ),
    "apps.register_android": st.builds(
        api.RegisterAndroidApp, app=_apps, package_name=st.none() | _apps,
        service_account=st.dictionaries(st.sampled_from(["project_id", "client_email", "private_key"]), st.text(max_size=20)),
    ),
    "configs.publish": st.builds(api.PublishConfig, config=st.builds(
        api.ChannelConfig, name=_names, apps=st.lists(_apps, min_size=1, max_size=3),
        consent=st.sampled_from(["not_opted_out", "opt_in", "none"]))),
    "configs.get": st.builds(api.GetConfig, name=_names, version=st.none() | st.integers(1, 2**31)),
    "configs.list": st.builds(api.ListConfigs),
    "messages.publish": st.builds(api.PublishMessage, message=st.builds(
        api.MessageSpec, id=_names, channel=_names,
        content=st.builds(api.MessageContent, title=st.none() | st.text(max_size=30), body=st.none() | st.text(max_size=30),
                          data=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3)),
        priority=st.sampled_from(["high", "normal"]), ttl_s=st.none() | st.integers(0, 2_419_200))),
    "messages.get": st.builds(api.GetMessage, id=_names, version=st.none() | st.integers(1, 2**31)),
    "messages.list": st.builds(api.ListMessages),
    "messages.preview": st.builds(api.PreviewMessage, id=_names, identity=st.none() | _identities,
                                  profile=st.none() | st.dictionaries(st.text(max_size=8), st.integers(-2**63, 2**63 - 1), max_size=3)),
    "messages.send": st.builds(api.SendMessage, id=_names, identities=st.lists(_identities, max_size=3),
                               audience=st.none() | st.text(max_size=40), test=st.booleans()),
    "reports.get": st.builds(api.GetReport, message=st.none() | _names, app=st.none() | _apps,
                             journey=st.none() | _names, window=st.sampled_from(["live", "all_time"])),
    "reports.watch": st.builds(api.WatchReport, message=st.none() | _names, node=st.none() | _names,
                               window=st.sampled_from(["live", "all_time"]), interval_s=st.floats(0.1, 3600)),
    "keys.create": st.builds(api.CreateKey, scopes=st.lists(st.sampled_from(api.SCOPES), min_size=1, max_size=4),
                             name=st.text(st.characters(min_codepoint=32, max_codepoint=0x7e), max_size=100)),
    "keys.list": st.builds(api.ListKeys, sandbox=st.none() | st.from_regex(api.SANDBOX_PATTERN, fullmatch=True)),
    "sandboxes.create": st.builds(api.CreateSandbox, name=st.from_regex(api.SANDBOX_PATTERN, fullmatch=True)),
    "sandboxes.list": st.builds(api.ListSandboxes),
    "journeys.publish": st.builds(api.PublishJourney, journey=_journeys, draft=st.booleans()),
    "journeys.get": st.builds(api.GetJourney, id=_names, version=st.none() | st.integers(1, 10)),
    "journeys.list": st.builds(api.ListJourneys),
    "journeys.close": st.builds(api.CloseJourney, id=_names),
    "journeys.stop": st.builds(api.StopJourney, id=_names),
    "journeys.pause": st.builds(api.PauseJourney, id=_names),
    "journeys.resume": st.builds(api.ResumeJourney, id=_names),
    "journeys.trace": st.builds(api.TraceJourney, id=_names, identity=_identities),
    "journeys.simulate": st.builds(api.SimulateJourney, journey=st.none() | _journeys, id=st.none() | _names,
                                   identity=st.none() | _identities,
                                   profile=st.none() | st.dictionaries(st.sampled_from(["name", "timezone"]),
                                                                       st.text(max_size=10), max_size=2)),
    "keys.revoke": st.builds(api.RevokeKey, id=st.from_regex(api.KEY_ID_PATTERN, fullmatch=True)),
    "secrets.rotate": st.builds(api.RotateSecrets),
    "apps.get": st.builds(api.GetApp, app=_apps),
    "apps.list": st.builds(api.ListApps),
    "apps.delete": st.builds(api.DeleteApp, app=_apps),
    "push.send": st.builds(
        api.SendPush, app=_apps, token=st.none() | _tokens, platform=st.none() | _platforms,
        identity=st.none() | _identities, content=st.none() | _contents,
        apns=st.builds(api.ApnsOptions, push_type=st.sampled_from(["alert", "background", "voip"]),
                       priority=st.none() | st.sampled_from([10, 5, 1]), expiration=st.none() | _timestamps),
        fcm=st.builds(api.FcmOptions, data_only=st.booleans(), priority=st.none() | st.sampled_from(["normal", "high"]),
                      ttl_s=st.none() | st.integers(0, 2_419_200)),
    ),
}


def test_request_strategies_cover_every_method() -> None:
    assert set(REQUEST_STRATEGIES) == set(api.METHODS)


@given(data=st.data())
@pytest.mark.parametrize("name", sorted(REQUEST_STRATEGIES))
def test_request_round_trips_through_msgpack(name: str, data: st.DataObject) -> None:
    request = data.draw(REQUEST_STRATEGIES[name])
    cls = api.METHODS[name].request
    # Through msgpack, as a call body is embedded in a frame and decoded by the server.
    encoded = FrameEncoder().body(request)
    decoded = msgspec.msgpack.decode(encoded, type=cls)
    assert decoded == request
    # Datetimes come back in UTC, but the msgpack timestamp is the same instant: same bytes.
    assert msgspec.msgpack.encode(decoded) == bytes(encoded)


@pytest.mark.parametrize("name", sorted(n for n, s in api.METHODS.items() if "version" in s.request.__struct_fields__))
def test_a_version_is_refused_beyond_what_a_stored_version_can_be(name: str) -> None:
    """A version is stored in 4 bytes: 2**63-1 reached the store and failed there (INTERNAL)."""
    cls = api.METHODS[name].request
    sample = msgspec.to_builtins(SAMPLES[name])
    msgspec.msgpack.decode(msgspec.msgpack.encode({**sample, "version": 2**32 - 1}), type=cls)
    with pytest.raises(msgspec.ValidationError) as info:
        msgspec.msgpack.decode(msgspec.msgpack.encode({**sample, "version": 2**32}), type=cls)
    assert api.describe_validation_error(info.value, cls)[1] == "$.version"
