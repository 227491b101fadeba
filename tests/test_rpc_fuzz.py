"""Hostile requests for every method, against a real server process: each call is answered
(a reply, or an error that is not INTERNAL), the connection stays usable, the server stays up.

Each example starts from a valid request of the method (the strategies of test_api.py) and
breaks it: a field's value replaced by a value of another type, a very long string or list,
an integer at the edges of MessagePack, a float that is not a number, bytes, an extension,
an invalid timestamp, MessagePack nested hundreds or thousands of levels; or a key added.
Bounded in time: a fixed number of examples per method, on one connection.

The server runs with API keys (the connection uses its admin key, which may call every
method), and the hello's ``api_key`` is fuzzed too: a hello is welcomed (no key, or the admin
key) or refused with one goaway that repeats nothing of the key. Refusals are not slowed down
here (``refusal_delay_max_s`` is tiny); tests/test_access.py measures that.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from plugins.fcm.mock import ServiceAccount
from protocols import api
from protocols.errors import Status
from protocols.frames import PROTOCOL_VERSION, AnyFrame, Call, End, Error, GoAway, Hello, Item, Reply, Welcome
from protocols.framing import FrameDecoder, FrameEncoder
from server.testing import ServerProcess

from .test_api import REQUEST_STRATEGIES

_encoder = FrameEncoder()
_decoder = msgspec.msgpack.Decoder(AnyFrame)


class _Connection:
    """A blocking connection that sends a call and reads until its terminal frame."""

    def __init__(self, address: str, api_key: str | None = None) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        self.frames = FrameDecoder(64 * 1024 * 1024)
        self.pending: list[Any] = []
        self.ids = iter(range(1, 2**62))
        self.sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION, client="fuzz", api_key=api_key)))
        assert isinstance(self._next(), Welcome)

    def _next(self) -> Any:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.pending.extend(_decoder.decode(p) for p in self.frames.feed(data))
        return self.pending.pop(0)

    def call(self, method: str, body: bytes, timeout_ms: int = 5_000) -> Any:
        """The terminal frame of the call (items of a stream are skipped)."""
        call_id = next(self.ids)
        self.sock.sendall(_encoder.frame(Call(id=call_id, method=method, body=msgspec.Raw(body), timeout_ms=timeout_ms)))
        while True:
            frame = self._next()
            if isinstance(frame, GoAway):
                raise AssertionError(f"goaway: {frame}")
            if isinstance(frame, Item):
                continue
            if isinstance(frame, (Reply, End, Error)) and frame.id in (call_id, 0):
                return frame


#: What the fuzzed server holds, so that requests naming it reach past "not found".
APP_IOS, APP_ANDROID, IDENTITY, CONFIG, MESSAGE = "com.fuzz.ios", "com.fuzz.android", "crm:fuzz", "fuzz", "fuzz"
_ACCOUNT = ServiceAccount.generate("fuzz-project")


def _p8() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _seed(connection: _Connection) -> None:
    for request in (
        api.RegisterIosApp(app=APP_IOS, auth=api.ApnsTokenAuth(key_pem=_p8(), key_id="ABCDE12345", team_id="TEAM123456")),
        api.RegisterAndroidApp(app=APP_ANDROID, service_account=_ACCOUNT.info(_TOKEN_URI)),
        api.UpsertProfile(identity=IDENTITY, attributes={"name": "Ada", "testProfile": True}),
        api.RegisterToken(identity=IDENTITY, app=APP_IOS, platform="apns", token="ab" * 32),
        api.RegisterToken(identity=IDENTITY, app=APP_ANDROID, platform="fcm", token="fcm-token-1"),
        api.PublishConfig(config=api.ChannelConfig(name=CONFIG, apps=[APP_IOS, APP_ANDROID])),
        api.PublishMessage(message=api.MessageSpec(id=MESSAGE, channel=CONFIG, content=api.MessageContent(
            title="Hi {{ profile.name }}", body="{{ event.total | currency('EUR') }}"))),
    ):
        answer = connection.call(request.method, msgspec.msgpack.encode(request))
        assert isinstance(answer, Reply), answer


#: Nothing listens there: sends fail fast, on loopback.
_TOKEN_URI = "https://127.0.0.1:9/token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    env = {"PIGEON_FCM__URL": "https://127.0.0.1:9", "PIGEON_FCM__TOKEN_URI": _TOKEN_URI,
           "PIGEON_APNS__PRODUCTION__ADDRESS": "127.0.0.1:9", "PIGEON_APNS__SANDBOX__ADDRESS": "127.0.0.1:9",
           "PIGEON_REFUSAL_DELAY_MAX_S": "0.001"}
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz") / "data", env=env, auth="keys").start()
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def connection(server: ServerProcess) -> Iterator[_Connection]:
    connection = _Connection(server.address, api_key=server.admin_key)
    try:
        _seed(connection)
        yield connection
    finally:
        connection.sock.close()


def _nested(depth: int) -> msgspec.Raw:
    return msgspec.Raw(b"\x91" * depth + b"\x01")


#: Values that break a field: other types, sizes, edges, and what MessagePack has beyond JSON.
_hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e308]),
    st.text(max_size=30),
    st.sampled_from(["", " ", "\x00", "a" * 70_000, "é" * 40_000, "{{ 7 * 7 }}", "\ud7ff" * 10]),
    st.binary(max_size=40),
    st.builds(msgspec.msgpack.Ext, st.integers(-128, 127), st.binary(max_size=16)),
    # an invalid timestamp: nanoseconds out of range
    st.just(msgspec.msgpack.Ext(-1, (2**32 - 1).to_bytes(4, "big") + (0).to_bytes(8, "big"))),
    st.integers(2, 6_000).map(_nested),
    st.lists(st.integers(-(2**63), 2**64 - 1), max_size=5),
    st.just(list(range(20_000))),
    st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3),
    st.just({1: "int key", b"b": "bytes key"}),
    st.just({f"k{i}": i for i in range(5_000)}),
)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*path, index))


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    copy = list(value)
    copy[head] = _replace(copy[head], rest, new)
    return copy


_contents = st.builds(
    api.MessageContent,
    title=st.none() | st.sampled_from(["Hi {{ profile.name }}", "{{ event.n * 2 }}", "plain"]),
    body=st.none() | st.text(max_size=20),
    media_url=st.none() | st.just("https://example.invalid/a.png"),
    buttons=st.lists(st.builds(api.Button, id=st.sampled_from(["yes", "no"]), label=st.text(max_size=10)), max_size=3),
    badge=st.none() | st.integers(0, 99),
    data=st.dictionaries(st.sampled_from(["a", "b"]), st.text(max_size=5), max_size=2),
    ios=st.builds(api.IosFields, category=st.none() | st.just("CART"), relevance_score=st.none() | st.floats(0, 1)),
    android=st.builds(api.AndroidFields, channel_id=st.none() | st.just("promo"), color=st.none() | st.just("#ff0000")),
)
_raw = st.dictionaries(st.sampled_from(["aps", "data", "android", "notification", "x"]),
                       st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2), max_size=3)

#: Requests that name what the server holds (`_seed`), beside test_api's random ones.
_KNOWN: dict[str, st.SearchStrategy[Any]] = {
    "push.send": st.builds(api.SendPush, app=st.sampled_from([APP_IOS, APP_ANDROID]), identity=st.just(IDENTITY),
                           content=st.none() | st.builds(api.PushContent, title=st.text(max_size=10)),
                           raw=st.none() | _raw, fcm_raw=st.none() | _raw),
    "messages.publish": st.builds(api.PublishMessage, message=st.builds(
        api.MessageSpec, id=st.just(MESSAGE), channel=st.just(CONFIG), content=_contents,
        on_missing=st.sampled_from(["default", "exclude"]))),
    "messages.preview": st.builds(api.PreviewMessage, id=st.just(MESSAGE), identity=st.none() | st.just(IDENTITY),
                                  event=st.dictionaries(st.sampled_from(["total", "n"]), st.integers(0, 10**6), max_size=2)),
    "messages.send": st.builds(api.SendMessage, id=st.just(MESSAGE), identities=st.just([IDENTITY]), test=st.just(True),
                               event=st.dictionaries(st.sampled_from(["total", "n"]), st.integers(0, 10**6), max_size=2)),
    "profiles.patch": st.builds(api.PatchProfile, identity=st.just(IDENTITY),
                                patch=st.dictionaries(st.sampled_from(["name", "n"]), st.text(max_size=5), max_size=2)),
    "events.ingest": st.builds(api.IngestEvents, events=st.lists(st.builds(
        api.Event, identity=st.just(IDENTITY), type=st.sampled_from(["app.launch", "pushTracking.applicationOpened"]),
        data=st.dictionaries(st.sampled_from(["_p", "n"]), st.text(max_size=5), max_size=2)), min_size=1, max_size=3)),
    "events.list": st.builds(api.ListEvents, identity=st.just(IDENTITY), limit=st.integers(1, 10)),
    "tokens.register": st.builds(api.RegisterToken, identity=st.just(IDENTITY), app=st.just(APP_ANDROID),
                                 platform=st.just("fcm"), token=st.sampled_from(["fcm-token-1", "fcm-token-2"])),
    "reports.get": st.builds(api.GetReport, message=st.just(MESSAGE)),
}


@st.composite
def _broken_bodies(draw: st.DrawFn, method: str) -> bytes:
    strategy = REQUEST_STRATEGIES[method]
    if method in _KNOWN:
        strategy = strategy | _KNOWN[method]
    body = msgspec.to_builtins(draw(strategy))
    paths = list(_paths(body))
    if draw(st.integers(0, 9)) == 0:
        body = {**body, draw(st.text(min_size=1, max_size=8)): draw(_hostile)}  # a key the method does not have
    else:
        body = _replace(body, draw(st.sampled_from(paths)), draw(_hostile))
    return msgspec.msgpack.encode(body)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
@pytest.mark.parametrize("method", sorted(api.METHODS))
def test_a_broken_request_is_answered_and_costs_only_itself(method: str, data: st.DataObject, connection: _Connection) -> None:
    body = data.draw(_broken_bodies(method))
    answer = connection.call(method, body)
    if isinstance(answer, Error):
        assert answer.code not in (Status.INTERNAL, Status.UNKNOWN), answer
    health = connection.call("server.health", msgspec.msgpack.encode({}))
    assert isinstance(health, Reply)


_keys = st.one_of(
    st.none(),
    st.text(max_size=60),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", min_size=43, max_size=43).map(
        lambda s: "pgn_" + s),
    st.sampled_from(["", "pgn_", "\x00", "a" * 70_000, "é" * 40_000]),
    st.binary(max_size=40), st.integers(-(2**63), 2**64 - 1), st.lists(st.text(max_size=4), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)


def _answer_to_hello(server: ServerProcess, **fields: Any) -> Any:
    """The server's first frame to a hello with ``fields`` (sent raw, so anything goes)."""
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        hello = {"t": "hello", "version": PROTOCOL_VERSION, "client": "fuzz", **fields}
        payload = msgspec.msgpack.encode(hello)
        sock.sendall(len(payload).to_bytes(4, "big") + payload)
        frames = FrameDecoder(1 << 20)
        first: list[bytes] = []
        while not first:
            data = sock.recv(1 << 16)
            assert data, "closed without a goaway"
            first = frames.feed(data)
    return _decoder.decode(first[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(key=_keys)
def test_a_hello_s_api_key_is_welcomed_or_refused_and_costs_only_its_connection(
    key: Any, server: ServerProcess, connection: _Connection
) -> None:
    frame = _answer_to_hello(server, api_key=key)
    if key is None or key == "":
        assert isinstance(frame, Welcome)
    elif isinstance(key, str):
        assert isinstance(frame, GoAway) and frame.code == Status.UNAUTHENTICATED, frame
        # The same words whatever the key: nothing of it comes back.
        assert frame.message == ("the API key is not valid: it was revoked, mistyped, or made by another server; "
                                 "ask an admin for a key (pigeon keys create)")
    else:
        assert isinstance(frame, GoAway) and frame.code == Status.INVALID_ARGUMENT, frame
    assert isinstance(connection.call("server.health", msgspec.msgpack.encode({})), Reply)


_sandboxes = st.one_of(
    st.none(), st.from_regex(api.SANDBOX_PATTERN, fullmatch=True), st.text(max_size=40), _hostile,
    st.sampled_from(["default", "Default", "dev/../default", "a" * 33, "\x00", "a" * 70_000]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(sandbox=_sandboxes)
def test_a_hello_s_sandbox_is_welcomed_or_refused_and_costs_only_its_connection(
    sandbox: Any, server: ServerProcess, connection: _Connection
) -> None:
    """Without a key (keys on: health only) a well-formed sandbox is welcomed, whatever it
    names (nothing is told of which exist); anything else is a malformed hello."""
    frame = _answer_to_hello(server, sandbox=sandbox)
    if sandbox is None or isinstance(sandbox, str) and re.fullmatch(api.SANDBOX_PATTERN, sandbox):
        assert isinstance(frame, Welcome), frame
    else:
        assert isinstance(frame, GoAway) and frame.code == Status.INVALID_ARGUMENT, frame
    assert isinstance(connection.call("server.health", msgspec.msgpack.encode({})), Reply)


def test_the_server_survived_the_fuzzing_without_a_restart(server: ServerProcess, connection: _Connection) -> None:
    stats = msgspec.msgpack.decode(connection.call("server.stats", msgspec.msgpack.encode({})).body, type=api.Stats)
    assert all(actor.restarts == 0 and actor.crashes == 0 for actor in stats.actors), stats.actors
    assert stats.methods.get("(unknown method)") is None
    assert not [line for line in server.log if "Traceback" in line or "internal error" in line]
