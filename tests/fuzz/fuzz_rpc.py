"""Coverage-guided fuzzing of how the server decodes a call's body (atheris).

    .venv/bin/python tests/fuzz/fuzz_rpc.py -max_total_time=60

The input's first byte picks a method (every method the router decodes; ``events.ingest``,
which decodes its own body, has tests/fuzz/fuzz_ingest.py), the rest is the call's body. It
goes the way `server.api.connection.Connection._answer` takes it, through a real `Router`:
the route's decoder either gives the request or raises one of `DECODE_ERRORS`, which
`describe_validation_error` turns into ``"$.path: what is wrong"`` naming a path of the body
(and nothing else escapes it); a request's free-form maps (`Route.maps`) pass `check_depth`
or raise `InvalidArgument`; and a request re-encodes to bytes that decode to the same bytes.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["protocols", "server"]):
    import msgspec
    import msgspec.inspect

    from protocols import api
    from protocols.framing import DECODE_ERRORS, decode_error_text
    from server.api.registry import Router
    from server.runtime.errors import InvalidArgument
    from server.runtime.values import check_depth

from _fuzz import bounded, main


async def _handler(*args: Any) -> None:
    raise AssertionError("not called")


ROUTER = Router()
for _spec in api.METHODS.values():
    if _spec.name != "events.ingest":
        ROUTER.add(_spec.request, _handler, scope="admin")
METHODS = sorted(ROUTER.routes)


@bounded(2.0)
def test_one_input(data: bytes) -> None:
    if not data:
        return
    route = ROUTER.routes[METHODS[data[0] % len(METHODS)]]
    body = data[1:]
    assert route.decoder is not None
    try:
        request = route.decoder.decode(body)
    except DECODE_ERRORS as exc:
        message, field = api.describe_validation_error(decode_error_text(exc), route.spec.request)
        assert field is None or field.startswith("$"), (message, field)
        assert message.startswith(field or "$"), (message, field)
        return
    for name in route.maps:
        value = getattr(request, name)
        if value:
            try:
                check_depth(value, f"$.{name}", name)
            except InvalidArgument as exc:
                assert exc.field is not None and exc.field.startswith(f"$.{name}"), exc
    encoded = msgspec.msgpack.encode(request)
    assert msgspec.msgpack.encode(route.decoder.decode(encoded)) == encoded


def _body(request: Any) -> bytes:
    return bytes([METHODS.index(request.method)]) + msgspec.msgpack.encode(request)


def seeds() -> list[bytes]:
    content = api.MessageContent(title="Hi {{ profile.name }}", body="b", data={"k": "v"},
                                 buttons=[api.Button(id="yes", label="Yes")])
    requests = [
        api.UpsertProfile(identity="crm:1", attributes={"name": "Ada", "tags": ["a"], "n": {"m": [1, 2.5, None]}}),
        api.PatchProfile(identity="crm:1", patch={"name": None, "x": {"y": 1}}),
        api.RegisterToken(identity="crm:1", app="com.acme.app", platform="fcm", token="fcm-token-1"),
        api.SendPush(app="com.acme.app", identity="crm:1", content=api.PushContent(title="t"), raw={"aps": {}}),
        api.PublishMessage(message=api.MessageSpec(id="m", channel="c", content=content)),
        api.SendMessage(id="m", identities=["crm:1", "crm:2"], audience="profile.n > 1", test=True),
        api.ListEvents(identity="crm:1", limit=10),
        api.RegisterAndroidApp(app="com.acme.android", service_account={"project_id": "p", "client_email": "e"}),
        api.PublishConfig(config=api.ChannelConfig(name="c", apps=["com.acme.app"])),
        api.GetReport(message="m"),
    ]
    out = [_body(r) for r in requests]
    out += [bytes([i]) + b"\x80" for i in range(len(METHODS))]
    return out


def _names() -> set[str]:
    names: set[str] = set(METHODS)

    def walk(info: Any, seen: set[int]) -> None:
        if id(info) in seen:
            return
        seen.add(id(info))
        if isinstance(info, msgspec.inspect.StructType):
            for field in info.fields:
                names.add(field.encode_name)
                walk(field.type, seen)
        elif isinstance(info, msgspec.inspect.LiteralType):
            names.update(v for v in info.values if isinstance(v, str))
        for child in ("type", "item_type", "key_type", "value_type"):
            if hasattr(info, child):
                walk(getattr(info, child), seen)
        for member in getattr(info, "types", ()):
            walk(member, seen)

    for method in METHODS:
        walk(msgspec.inspect.type_info(ROUTER.routes[method].spec.request), set())
    return names


TOKENS = [msgspec.msgpack.encode(name) for name in sorted(_names())] + [
    b"\xd6\xff", b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff", b"\xcb\x7f\xf8", b"\x91", b"\x81", b"\xc0", b"\xc3"]

if __name__ == "__main__":
    main(test_one_input, seeds(), TOKENS)
    sys.exit(0)
