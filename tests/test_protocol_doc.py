"""Keeps ``protocols/PROTOCOL.md`` true.

The first tests compare the document with the code: every method, field, frame and status it
must mention, its hex and JSON examples decoded with msgspec against the real types. The last
tests run a client written from the document alone (plain sockets and a hand-written
MessagePack codec, no msgspec and nothing from ``protocols`` or ``server``) against a real
server in a child process.

msgspec and the project's packages are imported inside the tests that need them, so the
spec client below cannot use them by accident; `test_spec_client_is_independent` checks it.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

DOC = Path(__file__).resolve().parents[1] / "protocols" / "PROTOCOL.md"


# ---------------------------------------------------------------------------------------------
# reading the document


def doc_text() -> str:
    return DOC.read_text(encoding="utf-8")


_HEADING = re.compile(r"^(#{1,6}) ", re.MULTILINE)


def section(kind: str, name: str) -> str:
    """The text under the heading ``<kind> `<name>` `` up to the next heading of its level."""
    text = doc_text()
    match = re.search(rf"^(#{{2,6}}) {kind} `{re.escape(name)}`.*$", text, re.MULTILINE)
    assert match, f"PROTOCOL.md has no heading for {kind} `{name}`"
    level = len(match.group(1))
    for following in _HEADING.finditer(text, match.end()):
        if len(following.group(1)) <= level:
            return text[match.start() : following.start()]
    return text[match.start() :]


def has_section(kind: str, name: str) -> bool:
    return re.search(rf"^#{{2,6}} {kind} `{re.escape(name)}`", doc_text(), re.MULTILINE) is not None


def json_after(text: str, label: str) -> Any:
    """The JSON block that follows the line starting with ``label`` in ``text``."""
    match = re.search(rf"^{re.escape(label)}.*?\n```json\n(.*?)```", text, re.MULTILINE | re.DOTALL)
    assert match, f"no JSON block after {label!r}"
    return json.loads(match.group(1))


def hex_examples() -> list[tuple[bytes, Any]]:
    """Every ```hex block directly followed by the ```json block that says what it decodes to."""
    pairs = re.findall(r"```hex\n(.*?)```\s*```json\n(.*?)```", doc_text(), re.DOTALL)
    return [(bytes.fromhex(h), json.loads(j)) for h, j in pairs]


def timestamp_table() -> list[tuple[datetime, bytes]]:
    rows = re.findall(r"^\| `(\d{4}-\d\d-\d\dT[0-9:.]+Z)` +\| `([0-9a-f ]+)` +\|", doc_text(), re.MULTILINE)
    return [(datetime.fromisoformat(when.replace("Z", "+00:00")), bytes.fromhex(data)) for when, data in rows]


def from_notation(value: Any) -> Any:
    """JSON as written in the document → Python values (``{"$timestamp": ...}`` → datetime)."""
    if isinstance(value, dict):
        if set(value) == {"$timestamp"}:
            return datetime.fromisoformat(value["$timestamp"].replace("Z", "+00:00"))
        return {k: from_notation(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_notation(v) for v in value]
    return value


def to_notation(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"$timestamp": value.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    if isinstance(value, dict):
        return {k: to_notation(v) for k, v in value.items()}
    if isinstance(value, list):
        return [to_notation(v) for v in value]
    return value


def _struct_types(info: Any, found: dict[type, Any]) -> dict[type, Any]:
    """Every Struct type reachable from a `msgspec.inspect` type, by class."""
    import msgspec.inspect as mi

    if isinstance(info, mi.StructType):
        if info.cls not in found:
            found[info.cls] = info
            for field in info.fields:
                _struct_types(field.type, found)
    elif isinstance(info, mi.Metadata):
        _struct_types(info.type, found)
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            _struct_types(member, found)
    elif isinstance(info, mi.DictType):
        _struct_types(info.value_type, found)
    elif hasattr(info, "item_type"):
        _struct_types(info.item_type, found)
    return found


def _only_known_keys(value: Any, info: Any, path: str = "$") -> None:
    """Fail if an example uses a key its type does not define (responses would tolerate it)."""
    import msgspec.inspect as mi

    if isinstance(info, mi.Metadata):
        _only_known_keys(value, info.type, path)
    elif isinstance(info, mi.StructType):
        names = {f.encode_name: f for f in info.fields}
        unknown = set(value) - set(names) - {info.tag_field}
        assert not unknown, f"{path}: the example uses keys {unknown} that {info.cls.__name__} does not have"
        for key, item in value.items():
            if key in names:  # not the tag
                _only_known_keys(item, names[key].type, f"{path}.{key}")
    elif isinstance(info, mi.UnionType):
        for member in info.types:
            if isinstance(member, mi.StructType) and isinstance(value, dict):
                if member.tag_field is not None and value.get(member.tag_field) != member.tag:
                    continue  # a tagged union's other member
                _only_known_keys(value, member, path)
    elif isinstance(info, mi.DictType) and isinstance(value, dict):
        for key, item in value.items():
            _only_known_keys(item, info.value_type, f"{path}[{key!r}]")
    elif hasattr(info, "item_type") and isinstance(value, list):
        for index, item in enumerate(value):
            _only_known_keys(item, info.item_type, f"{path}[{index}]")


# ---------------------------------------------------------------------------------------------
# (a) methods, (b) frames, (c) statuses


def test_every_method_and_every_field_is_documented():
    import msgspec.inspect as mi

    from protocols import api

    for name, spec in api.METHODS.items():
        text = section("Method", name)
        kind = "Server-streamed" if spec.streaming else "Unary"
        assert kind in text, f"{name}: the document should say it is {kind.lower()}"
        for field in spec.request.__struct_fields__:
            assert f"`{field}`" in text, f"{name}: request field {field!r} is not documented in its section"
        structs = _struct_types(mi.type_info(spec.response), {})
        _struct_types(mi.type_info(spec.request), structs)
        structs.pop(spec.request)
        for cls, info in structs.items():
            where = section("Type", cls.__name__) if has_section("Type", cls.__name__) else text
            for field in info.fields:
                assert f"`{field.encode_name}`" in where, (
                    f"{name}: field {field.encode_name!r} of {cls.__name__} is not documented "
                    f"(in 'Type `{cls.__name__}`' or in the method's section)"
                )


def test_every_frame_and_every_frame_field_is_documented():
    from protocols.frames import AnyFrame

    for cls in typing.get_args(AnyFrame):
        tag = cls.__struct_config__.tag
        text = section("Frame", tag)
        for field in cls.__struct_fields__:
            assert f"`{field}`" in text, f"frame {tag!r}: field {field!r} is not in its section"


def test_every_status_is_in_the_table_with_its_number():
    from protocols.errors import Status

    rows = dict(re.findall(r"^\| `([A-Z_]+)` +\| +(\d+) +\|", doc_text(), re.MULTILINE))
    assert {name: int(number) for name, number in rows.items()} == {s.value: s.number for s in Status}


def test_documented_constants_match_the_code():
    from protocols import api
    from protocols.frames import PROTOCOL_VERSION
    from protocols.framing import DEFAULT_MAX_FRAME
    from server.runtime.config import DEFAULT_LISTEN, Config
    from server.profiles.ingest import MAX_EVENT_DATA_BYTES
    from server.api.connection import _HIGH_WATER, _STREAM_FLUSH_BYTES, _WRITE_CHUNK
    from server.runtime.values import MAX_VALUE_DEPTH as MAX_ATTRIBUTE_DEPTH
    from server.profiles.store import MAX_PROFILE_BYTES, MAX_REGISTRATIONS

    text = doc_text()
    config = Config()
    assert f"# The Pigeon socket protocol, version {PROTOCOL_VERSION}" in text
    assert f"**Default:** `{DEFAULT_LISTEN}`, so the default port is **{DEFAULT_LISTEN.rsplit(':')[1]}**" in text
    assert f"The default is **{DEFAULT_MAX_FRAME}** bytes" in text
    assert config.max_frame == DEFAULT_MAX_FRAME
    assert f"(default {config.max_calls}, configuration key `max_calls`)" in text
    assert f"`max_connections` connections at once (default {config.max_connections})" in text
    assert f"`write_timeout_s` (default {config.write_timeout_s:g} seconds)" in text
    flat = " ".join(text.split())
    assert f"`handshake_timeout_s` (default {config.handshake_timeout_s:g} seconds" in flat
    assert f"`handshake_timeout_s` (default {config.handshake_timeout_s:g} seconds, configuration key `handshake_timeout_s`)" in flat
    assert _HIGH_WATER == 1024 * 1024 and f"1 MiB ({_HIGH_WATER} bytes)" in flat
    assert _STREAM_FLUSH_BYTES == 32 * 1024 and f"32 KiB ({_STREAM_FLUSH_BYTES} bytes)" in flat
    assert _WRITE_CHUNK == 64 * 1024 and f"64 KiB ({_WRITE_CHUNK} bytes)" in flat
    assert f"`store.retention_days`, default {config.store.retention_days:g} days" in flat
    assert f"`shutdown_grace_s` (default {config.shutdown_grace_s:g} seconds)" in text
    assert f"| {api.MAX_EVENTS_PER_BATCH} (`MAX_EVENTS_PER_BATCH`)" in text
    assert f"| Encoded `data` of one event         | {MAX_EVENT_DATA_BYTES} bytes" in text
    assert f"at most {MAX_ATTRIBUTE_DEPTH} further levels" in text
    assert f"| {MAX_PROFILE_BYTES} bytes (256 KiB)" in text
    assert f"| Registrations per profile           | {MAX_REGISTRATIONS} " in text
    assert f"`METHODS` in `protocols/api.py` defines {len(api.METHODS)} methods" in text


def test_server_stats_table_says_which_keys_may_be_nil():
    """Section 14.1: the `Stats` table marks exactly the nilable keys (`store` while the store restarts)."""
    import msgspec
    import msgspec.inspect as mi

    from protocols import api

    text = section("Method", "server.stats")
    rows = dict(re.findall(r"^\| `(\w+)` +\| `([^`]+)` +\|", text, re.MULTILINE))
    info = mi.type_info(api.Stats)
    assert set(rows) == {f.encode_name for f in info.fields}
    for field in info.fields:
        nilable = isinstance(field.type, mi.UnionType) and any(isinstance(m, mi.NoneType) for m in field.type.types)
        assert rows[field.encode_name].endswith("\\| nil") == nilable, field.encode_name
        assert (field.required, field.default) == ((False, None) if nilable else (True, msgspec.NODEFAULT))


# ---------------------------------------------------------------------------------------------
# (d) the examples decode to what the document says


def test_hex_examples_decode_to_the_frames_the_document_shows():
    import msgspec

    from protocols import api
    from protocols.frames import AnyFrame

    examples = hex_examples()
    shown = {expected["t"] for _, expected in examples}
    assert shown == {cls.__struct_config__.tag for cls in typing.get_args(AnyFrame)}, "one example per frame type"
    for data, expected in examples:
        assert int.from_bytes(data[:4], "big") == len(data) - 4, f"length prefix of the {expected['t']} example"
        payload = data[4:]
        assert to_notation(msgspec.msgpack.decode(payload)) == expected
        frame = msgspec.msgpack.decode(payload, type=AnyFrame)
        assert frame.__struct_config__.tag == expected["t"]
        # exactly the bytes the real encoder produces for this frame
        assert msgspec.msgpack.encode(frame) == payload
        if expected["t"] == "call":
            msgspec.msgpack.decode(frame.body, type=api.METHODS[frame.method].request)
        elif expected["t"] == "item":
            msgspec.msgpack.decode(frame.body, type=api.StoredEvent)
        elif expected["t"] == "reply":
            decodable = []
            for spec in api.METHODS.values():
                try:
                    msgspec.msgpack.decode(frame.body, type=spec.response)
                except msgspec.ValidationError:
                    continue
                decodable.append(spec.name)
            assert decodable, "the reply example is no method's response"


def test_timestamp_table_matches_msgspec():
    import msgspec

    rows = timestamp_table()
    assert len(rows) >= 4
    for when, data in rows:
        assert msgspec.msgpack.encode(when) == data, when
        assert msgspec.msgpack.decode(data) == when


def test_method_examples_match_the_request_and_response_types():
    import msgspec
    import msgspec.inspect as mi

    from protocols import api

    for name, spec in api.METHODS.items():
        text = section("Method", name)
        request = from_notation(json_after(text, "Example request"))
        if name == "events.ingest":
            # The example holds a bad event on purpose: exactly the rejected ones must fail.
            response = from_notation(json_after(text, "Example response"))
            failing = set()
            for index, event in enumerate(request["events"]):
                try:
                    msgspec.convert(event, api.Event)
                except msgspec.ValidationError:
                    failing.add(index)
            assert failing == {r["index"] for r in response["rejected"]}
        else:
            msgspec.convert(request, spec.request)
        if spec.streaming:
            items = from_notation(json_after(text, "Example items"))
            assert items, name
            for item in items:
                msgspec.convert(item, spec.response)
                _only_known_keys(item, mi.type_info(spec.response))
        else:
            response = from_notation(json_after(text, "Example response"))
            msgspec.convert(response, spec.response)
            _only_known_keys(response, mi.type_info(spec.response))


def test_reused_call_id_and_calls_after_goaway_behave_as_documented():
    """Sections 7.1 and 10.1, checked on the sans-IO server connection (no timing involved)."""
    import msgspec

    from protocols.connection import ServerConnection
    from protocols.framing import FrameDecoder

    def frame(obj: dict) -> bytes:
        payload = msgspec.msgpack.encode(obj)
        return len(payload).to_bytes(4, "big") + payload

    conn = ServerConnection(server="test")
    conn.receive_data(frame({"t": "hello", "version": 1}))
    conn.receive_data(frame({"t": "call", "id": 5, "method": "server.health"}))
    conn.receive_data(frame({"t": "call", "id": 5, "method": "server.health"}))
    conn.send_goaway("UNAVAILABLE", "the server is shutting down")
    conn.receive_data(frame({"t": "call", "id": 6, "method": "server.health"}))
    conn.send_reply(5, {})
    welcome, duplicate, goaway, refused, reply = map(msgspec.msgpack.decode, FrameDecoder().feed(conn.data_to_send()))
    assert welcome["t"] == "welcome"
    assert duplicate == {
        "t": "error", "id": 0, "code": "INVALID_ARGUMENT", "field": "$.id",
        "message": "call id 5 is already in flight on this connection; "
        "this second call was rejected and the first one continues",
    }
    assert goaway == {"t": "goaway", "code": "UNAVAILABLE", "message": "the server is shutting down", "last_id": 5}
    assert refused == {
        "t": "error", "id": 6, "code": "UNAVAILABLE",
        "message": "the server is shutting down and accepts no new calls; retry on a new connection",
    }
    assert reply == {"t": "reply", "id": 5, "body": {}}
    text = doc_text()
    for message in (duplicate["message"].replace("call id 5", "call id <n>"), refused["message"], goaway["message"]):
        assert message in text


def test_max_calls_refusal_and_last_id_behave_as_documented():
    """Section 7.7 and the goaway's last_id, on the sans-IO server connection."""
    import msgspec

    from protocols.connection import CallReceived, ServerConnection
    from protocols.framing import FrameDecoder

    def frame(obj: dict) -> bytes:
        payload = msgspec.msgpack.encode(obj)
        return len(payload).to_bytes(4, "big") + payload

    def sent() -> list[dict]:
        return [msgspec.msgpack.decode(p) for p in FrameDecoder().feed(conn.data_to_send())]

    conn = ServerConnection(server="test", max_calls=2)
    conn.receive_data(frame({"t": "hello", "version": 1}))
    assert sent()[0]["max_calls"] == 2
    events = conn.receive_data(b"".join(frame({"t": "call", "id": i, "method": "server.health"}) for i in (1, 2, 3)))
    assert [e.call.id for e in events if isinstance(e, CallReceived)] == [1, 2]
    (refused,) = sent()
    assert refused == {
        "t": "error", "id": 3, "code": "RESOURCE_EXHAUSTED",
        "message": "2 calls are already in flight on this connection (welcome.max_calls); "
        "wait for an answer before starting another",
    }
    documented = " ".join(doc_text().split())
    assert refused["message"].replace("2 calls", "<max_calls> calls") in documented
    # The slot is free as soon as the terminal frame is queued, before it is written.
    conn.send_reply(1, {})
    assert [type(e) for e in conn.receive_data(frame({"t": "call", "id": 4, "method": "server.health"}))] == [CallReceived]
    # Refused calls do not count towards last_id.
    conn.receive_data(frame({"t": "call", "id": 9, "method": "server.health"}))
    conn.send_goaway("UNAVAILABLE", "the server is shutting down")
    reply, refused_again, goaway = sent()
    assert reply["id"] == 1 and (refused_again["id"], refused_again["code"]) == (9, "RESOURCE_EXHAUSTED")
    assert goaway["last_id"] == 4


def test_clients_map_unknown_status_names_to_unknown():
    """error.code and goaway.code are plain strings; the Python clients map new names to UNKNOWN."""
    import msgspec

    from protocols.connection import ClientConnection, ErrorReceived, GoAwayReceived
    from protocols.errors import Status

    def frame(obj: dict) -> bytes:
        payload = msgspec.msgpack.encode(obj)
        return len(payload).to_bytes(4, "big") + payload

    conn = ClientConnection()
    conn.hello()
    events = conn.receive_data(
        frame({"t": "welcome", "version": 1, "server": "pigeon/9", "max_frame": 4194304, "max_calls": 8})
        + frame({"t": "error", "id": 1, "code": "NOT_FOUND", "message": "known"})
        + frame({"t": "error", "id": 2, "code": "SOMETHING_NEW", "message": "from a newer server"})
        + frame({"t": "goaway", "code": "ALSO_NEW", "message": "bye", "last_id": 2})
    )
    errors = [e for e in events if isinstance(e, ErrorReceived)]
    assert [e.code for e in errors] == [Status.NOT_FOUND, Status.UNKNOWN]
    (goaway,) = [e for e in events if isinstance(e, GoAwayReceived)]
    assert goaway.goaway.code is Status.UNKNOWN and goaway.goaway.last_id == 2


# ---------------------------------------------------------------------------------------------
# --- spec client: begin ----------------------------------------------------------------------
# Written from PROTOCOL.md only, with the standard library (socket, struct, datetime).

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Ext(typing.NamedTuple):
    code: int
    data: bytes


def mp_pack(value: Any) -> bytes:
    """MessagePack encoding of nil, bool, int, float, str, bin, array, map and timestamps."""
    if value is None:
        return b"\xc0"
    if value is True:
        return b"\xc3"
    if value is False:
        return b"\xc2"
    if isinstance(value, int):
        if 0 <= value <= 0x7F or -32 <= value < 0:
            return struct.pack(">b" if value < 0 else ">B", value)
        if value >= 0:
            for marker, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16), (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if value < limit:
                    return bytes([marker]) + struct.pack(fmt, value)
        for marker, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15), (0xD2, ">i", 2**31), (0xD3, ">q", 2**63)):
            if -limit <= value:
                return bytes([marker]) + struct.pack(fmt, value)
        raise OverflowError(value)
    if isinstance(value, float):
        return b"\xcb" + struct.pack(">d", value)
    if isinstance(value, str):
        data = value.encode("utf-8")
        n = len(data)
        if n < 32:
            return bytes([0xA0 | n]) + data
        head = b"\xd9" + struct.pack(">B", n) if n < 2**8 else b"\xda" + struct.pack(">H", n) if n < 2**16 else b"\xdb" + struct.pack(">I", n)
        return head + data
    if isinstance(value, (bytes, bytearray)):
        n = len(value)
        head = b"\xc4" + struct.pack(">B", n) if n < 2**8 else b"\xc5" + struct.pack(">H", n) if n < 2**16 else b"\xc6" + struct.pack(">I", n)
        return head + bytes(value)
    if isinstance(value, datetime):
        # Timestamp extension -1, smallest layout (PROTOCOL.md section 4.3).
        micros = (value - _EPOCH) // timedelta(microseconds=1)
        seconds, micro = divmod(micros, 1_000_000)
        nanos = micro * 1000
        if nanos == 0 and 0 <= seconds < 2**32:
            return b"\xd6\xff" + struct.pack(">I", seconds)
        if 0 <= seconds < 2**34:
            return b"\xd7\xff" + struct.pack(">Q", nanos << 34 | seconds)
        return b"\xc7\x0c\xff" + struct.pack(">Iq", nanos, seconds)
    if isinstance(value, (list, tuple)):
        n = len(value)
        head = bytes([0x90 | n]) if n < 16 else b"\xdc" + struct.pack(">H", n) if n < 2**16 else b"\xdd" + struct.pack(">I", n)
        return head + b"".join(mp_pack(v) for v in value)
    if isinstance(value, dict):
        n = len(value)
        head = bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n) if n < 2**16 else b"\xdf" + struct.pack(">I", n)
        return head + b"".join(mp_pack(k) + mp_pack(v) for k, v in value.items())
    raise TypeError(f"cannot encode {type(value).__name__}")


def mp_unpack(data: bytes) -> Any:
    value, end = _unpack(data, 0)
    if end != len(data):
        raise ValueError(f"{len(data) - end} trailing bytes")
    return value


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise ValueError("truncated MessagePack")
    return data[pos : pos + n], pos + n


def _unpack(data: bytes, pos: int) -> tuple[Any, int]:
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0x80 <= b <= 0x8F:
        return _unpack_map(data, pos, b & 0x0F)
    if 0x90 <= b <= 0x9F:
        return _unpack_array(data, pos, b & 0x0F)
    if 0xA0 <= b <= 0xBF:
        raw, pos = _take(data, pos, b & 0x1F)
        return raw.decode("utf-8"), pos
    if b == 0xC0:
        return None, pos
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos
    sized = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
    if b in sized:
        raw, pos = _take(data, pos, sized[b])
        body, pos = _take(data, pos, int.from_bytes(raw, "big"))
        return (bytes(body) if b <= 0xC6 else body.decode("utf-8")), pos
    if b in (0xC7, 0xC8, 0xC9):
        raw, pos = _take(data, pos, {0xC7: 1, 0xC8: 2, 0xC9: 4}[b])
        code, pos = _take(data, pos, 1)
        body, pos = _take(data, pos, int.from_bytes(raw, "big"))
        return _ext(struct.unpack(">b", code)[0], body), pos
    if b in (0xCA, 0xCB):
        raw, pos = _take(data, pos, 4 if b == 0xCA else 8)
        return struct.unpack(">f" if b == 0xCA else ">d", raw)[0], pos
    numbers = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
    if b in numbers:
        raw, pos = _take(data, pos, struct.calcsize(numbers[b]))
        return struct.unpack(numbers[b], raw)[0], pos
    if 0xD4 <= b <= 0xD8:
        code, pos = _take(data, pos, 1)
        body, pos = _take(data, pos, 1 << (b - 0xD4))
        return _ext(struct.unpack(">b", code)[0], body), pos
    if b in (0xDC, 0xDD):
        raw, pos = _take(data, pos, 2 if b == 0xDC else 4)
        return _unpack_array(data, pos, int.from_bytes(raw, "big"))
    if b in (0xDE, 0xDF):
        raw, pos = _take(data, pos, 2 if b == 0xDE else 4)
        return _unpack_map(data, pos, int.from_bytes(raw, "big"))
    raise ValueError(f"invalid MessagePack byte {b:#x}")


def _unpack_array(data: bytes, pos: int, n: int) -> tuple[list[Any], int]:
    out = []
    for _ in range(n):
        item, pos = _unpack(data, pos)
        out.append(item)
    return out, pos


def _unpack_map(data: bytes, pos: int, n: int) -> tuple[dict[Any, Any], int]:
    out = {}
    for _ in range(n):
        key, pos = _unpack(data, pos)
        out[key], pos = _unpack(data, pos)
    return out, pos


def _ext(code: int, body: bytes) -> Any:
    if code != -1:
        return Ext(code, body)
    if len(body) == 4:
        seconds, nanos = struct.unpack(">I", body)[0], 0
    elif len(body) == 8:
        packed = struct.unpack(">Q", body)[0]
        seconds, nanos = packed & (2**34 - 1), packed >> 34
    elif len(body) == 12:
        nanos, seconds = struct.unpack(">Iq", body)
    else:
        raise ValueError("bad timestamp length")
    return _EPOCH + timedelta(seconds=seconds, microseconds=round(nanos / 1000))


class SpecClient:
    """One connection: frames out, frames in, answers matched by call id."""

    def __init__(self, address: str, *, timeout: float = 10.0, rcvbuf: int | None = None) -> None:
        host, _, port = address.rpartition(":")
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # a small receive buffer, set before connecting, makes a slow reader
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host.strip("[]"), int(port)))
        self.buffer = b""
        #: frames read while waiting for something else, in arrival order
        self.pending: list[dict[str, Any]] = []
        #: bytes asked for per recv, and seconds to sleep after each one (to read slowly)
        self.recv_size = 65536
        self.recv_pause = 0.0

    def close(self) -> None:
        self.sock.close()

    def send(self, *frames: dict[str, Any]) -> None:
        """Send frames in one write (pipelined)."""
        self.send_payloads(*(mp_pack(f) for f in frames))

    def send_payloads(self, *payloads: bytes) -> None:
        self.sock.sendall(b"".join(struct.pack(">I", len(p)) + p for p in payloads))

    def read(self) -> dict[str, Any] | None:
        """The next frame from the wire; None once the server has closed (or reset) the connection."""
        while True:
            if len(self.buffer) >= 4:
                (size,) = struct.unpack(">I", self.buffer[:4])
                if len(self.buffer) >= 4 + size:
                    payload, self.buffer = self.buffer[4 : 4 + size], self.buffer[4 + size :]
                    return mp_unpack(payload)
            try:
                data = self.sock.recv(self.recv_size)
            except ConnectionResetError:
                return None
            if not data:
                return None
            self.buffer += data
            if self.recv_pause:
                time.sleep(self.recv_pause)

    def next_frame(self) -> dict[str, Any] | None:
        return self.pending.pop(0) if self.pending else self.read()

    def hello(self, max_frame: int | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "hello", "version": 1, "client": "spec-client/1"}
        if max_frame is not None:
            frame["max_frame"] = max_frame
        self.send(frame)
        welcome = self.read()
        assert welcome is not None and welcome["t"] == "welcome", welcome
        return welcome

    def start(self, call_id: int, method: str, body: dict[str, Any] | None = None, **extra: Any) -> None:
        frame = {"t": "call", "id": call_id, "method": method, **extra}
        if body is not None:
            frame["body"] = body
        self.send(frame)

    def answer(self, call_id: int) -> tuple[list[Any], dict[str, Any]]:
        """Items and terminal frame of a call; other frames are kept for later."""
        items: list[Any] = []
        kept: list[dict[str, Any]] = []
        queued, self.pending = self.pending, []
        try:
            while True:
                frame = queued.pop(0) if queued else self.read()
                assert frame is not None, f"connection closed before call {call_id} was answered"
                if frame.get("id") != call_id or frame["t"] not in ("reply", "item", "end", "error"):
                    kept.append(frame)
                elif frame["t"] == "item":
                    items.append(frame["body"])
                else:
                    return items, frame
        finally:
            self.pending = kept + queued + self.pending

    def call(self, call_id: int, method: str, body: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """A unary call: the reply body, or the error frame."""
        self.start(call_id, method, body, **extra)
        items, terminal = self.answer(call_id)
        assert not items
        return terminal["body"] if terminal["t"] == "reply" else terminal


def _goaway_and_close(client: SpecClient) -> dict[str, Any]:
    frame = client.read()
    assert frame is not None and frame["t"] == "goaway", frame
    assert client.read() is None, "the server should close after a fatal goaway"
    return frame


def _frames_until(client: SpecClient, kind: str) -> list[dict[str, Any]]:
    """Frames read up to and including the first of type ``kind``; the others stay pending."""
    seen = []
    while True:
        frame = client.next_frame()
        assert frame is not None, f"connection closed before a {kind!r} frame"
        seen.append(frame)
        if frame["t"] == kind:
            client.pending = [f for f in seen if f["t"] != kind] + client.pending
            return seen


# --- spec client: end ------------------------------------------------------------------------


def test_spec_client_is_independent():
    source = Path(__file__).read_text(encoding="utf-8")
    client = source.split("# --- spec client: begin")[1].split("# --- spec client: end")[0]
    for word in ("msgspec", "protocols", "import server", "from server"):
        assert word not in client, f"the spec client must not use {word}"
    module_imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("msgspec" in line or "protocols" in line or "server" in line for line in module_imports)


def test_spec_client_codec_matches_the_documented_bytes():
    for when, data in timestamp_table():
        assert mp_pack(when) == data
        assert mp_unpack(data) == when
    for data, expected in hex_examples():
        assert to_notation(mp_unpack(data[4:])) == expected
        assert mp_pack(from_notation(expected)) == data[4:]


def test_a_client_written_from_the_spec_alone(server_process):
    client = SpecClient(server_process.address)
    try:
        welcome = client.hello()
        assert welcome["version"] == 1
        assert welcome["server"].startswith("pigeon/")
        assert welcome["max_frame"] == 4194304 and welcome["max_calls"] >= 1

        # profiles.upsert: every MessagePack type in the attributes comes back as sent
        since = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
        attributes = {
            "name": "Ana", "age": 41, "vip": True, "score": 1.5, "tags": ["a", "b"], "raw": b"\x00\x01\xff",
            "nothing": None, "since": since, "nested": {"deep": {"x": -5}}, "big": 2**40, "neg": -(2**40),
        }
        profile = client.call(1, "profiles.upsert", {"identity": "crm:spec-1", "attributes": attributes})
        assert profile["identities"] == ["crm:spec-1"]
        assert profile["attributes"] == attributes
        assert profile["registrations"] == [] and profile["consent"] == {}
        assert profile["created"] <= profile["updated"]

        # tokens.register: APNs tokens are stored in lower case; omitted fields take their defaults
        registered = client.call(
            2, "tokens.register",
            {"identity": "crm:spec-1", "app": "com.example.app", "platform": "apns", "token": "ABCDEF0123456789"},
        )
        registration = registered["registration"]
        assert registration["token"] == "abcdef0123456789"
        assert registration.get("state", "active") == "active"
        assert registered.get("created_profile", False) is False
        assert registered.get("moved_from") is None

        # events.ingest: one good event, one rejected by index
        ts = (datetime.now(UTC) - timedelta(minutes=1)).replace(microsecond=654321)
        result = client.call(3, "events.ingest", {"events": [
            {"identity": "crm:spec-1", "type": "app.open", "ts": ts, "data": {"screen": "home", "n": 1}},
            {"identity": "crm:spec-1", "type": "not a type!"},
        ]})
        assert result["accepted"] == 1
        (rejection,) = result["rejected"]
        assert rejection["index"] == 1 and rejection["code"] == "INVALID_ARGUMENT"
        assert rejection["field"] == "$.events[1].type"
        assert rejection["message"].startswith("$.events[1].type: ")
        assert result["last_seq"] >= 1

        # profiles.get
        profile = client.call(4, "profiles.get", {"identity": "crm:spec-1"})
        assert profile["identities"] == ["crm:spec-1"]
        assert profile["attributes"] == attributes
        (stored,) = profile["registrations"]
        assert (stored["app"], stored["platform"], stored["token"]) == ("com.example.app", "apns", "abcdef0123456789")
        assert stored.get("state", "active") == "active"
        assert stored["first_seen"] == registration["first_seen"] <= stored["last_seen"]
        assert profile["created"] <= profile["updated"] and profile["updated"].tzinfo is not None

        # events.list: a stream of item frames, then end
        client.start(5, "events.list", {"identity": "crm:spec-1"})
        items, terminal = client.answer(5)
        assert terminal == {"t": "end", "id": 5}
        assert items == [{"seq": result["last_seq"], "type": "app.open", "ts": ts, "data": {"screen": "home", "n": 1}}]

        # pipelining: two calls and a ping in one write; answers matched by id, not by order
        client.send(
            {"t": "call", "id": 10, "method": "profiles.get", "body": {"identity": "crm:spec-1"}},
            {"t": "call", "id": 11, "method": "server.health", "timeout_ms": 5000},
            {"t": "ping", "nonce": 99},
        )
        _, health = client.answer(11)
        _, got = client.answer(10)
        assert health["t"] == "reply" and health["body"]["status"] == "serving" and health["body"]["protocol"] == 1
        assert got["t"] == "reply" and got["body"]["identities"] == ["crm:spec-1"]
        assert client.next_frame() == {"t": "pong", "nonce": 99}

        # errors of a call
        unknown = client.call(12, "profiles.frobnicate", {})
        assert (unknown["t"], unknown["id"], unknown["code"], unknown["field"]) == ("error", 12, "UNIMPLEMENTED", "$.method")
        bad = client.call(13, "profiles.get", {"identity": "CRM:upper"})
        assert (bad["code"], bad["field"]) == ("INVALID_ARGUMENT", "$.identity")
        extra = client.call(14, "profiles.get", {"identity": "crm:spec-1", "colour": "red"})
        assert (extra["code"], extra["field"]) == ("INVALID_ARGUMENT", "$.colour")
        not_a_map = client.call(17, "profiles.get", ["crm:spec-1"])
        assert (not_a_map["code"], not_a_map["field"]) == ("INVALID_ARGUMENT", "$")
        missing = client.call(15, "profiles.get", {"identity": "crm:nobody"})
        assert (missing["code"], missing["field"]) == ("NOT_FOUND", "$.identity")

        # map keys: the top-level keys of attributes and event data must be strings (sections 4.2, 8.2)
        int_key = client.call(20, "profiles.upsert", {"identity": "crm:spec-2", "attributes": {1: "x"}})
        assert (int_key["code"], int_key["field"]) == ("INVALID_ARGUMENT", "$.attributes")
        assert int_key["message"] == "$.attributes: map keys must be strings (Expected `str`, got `int`)"
        nested = client.call(21, "profiles.upsert", {"identity": "crm:spec-2", "attributes": {"a": {1: "x"}}})
        assert nested["attributes"] == {"a": {1: "x"}}
        keyed = client.call(22, "events.ingest", {"events": [
            {"identity": "crm:spec-2", "type": "t", "data": {7: "top-level int key"}},
            {"identity": "crm:spec-2", "type": "t", "data": {"ok": {7: "nested int key"}}},
        ]})
        assert keyed["accepted"] == 1
        assert keyed["rejected"] == [{
            "index": 0, "code": "INVALID_ARGUMENT", "field": "$.events[0].data",
            "message": "$.events[0].data: data's keys must be strings",
        }]
        # an identity over 511 bytes (but at most 400 characters) in profiles.link is reported on $.link
        too_long = "crm:" + "\u00e9" * 300
        link = client.call(23, "profiles.link", {"identity": "crm:spec-2", "link": too_long})
        assert (link["code"], link["field"]) == ("INVALID_ARGUMENT", "$.link")
        assert link["message"] == "$.link: the identity is 604 bytes long; at most 511 bytes are allowed"
        # events.list: an until before 1970 (or before since) is an empty stream
        client.start(24, "events.list", {"identity": "crm:spec-2", "until": datetime(1960, 1, 1, tzinfo=UTC)})
        assert client.answer(24) == ([], {"t": "end", "id": 24})
        client.start(25, "events.list", {"identity": "crm:spec-2", "since": ts, "until": ts - timedelta(seconds=1)})
        assert client.answer(25) == ([], {"t": "end", "id": 25})
        # ... and the identity is still checked, as for any range (section 14.4)
        for call_id, body in (
            (40, {"identity": "crm:nobody", "until": datetime(1960, 1, 1, tzinfo=UTC)}),
            (41, {"identity": "crm:nobody", "since": ts, "until": ts - timedelta(seconds=1)}),
            (42, {"identity": "crm:nobody", "until": datetime.now(UTC) - timedelta(days=91)}),
        ):
            client.start(call_id, "events.list", body)
            assert client.answer(call_id) == ([], {
                "t": "error", "id": call_id, "code": "NOT_FOUND", "field": "$.identity",
                "message": "no profile has the identity 'crm:nobody'",
            })
        client.start(43, "events.list", {"identity": too_long, "until": datetime(1960, 1, 1, tzinfo=UTC)})
        items, over = client.answer(43)
        assert not items and (over["code"], over["field"]) == ("INVALID_ARGUMENT", "$.identity")

        # tokens.unregister: another spelling finds an APNs token (stored in lower case), never an FCM one
        client.call(44, "tokens.register", {"identity": "crm:spec-2", "app": "com.example.app", "platform": "fcm", "token": "fcm-abc"})
        wrong_case = client.call(45, "tokens.unregister", {"app": "com.example.app", "token": "FCM-ABC"})
        assert (wrong_case["code"], wrong_case["field"]) == ("NOT_FOUND", "$.token")
        assert client.call(46, "tokens.unregister", {"app": "com.example.app", "token": "fcm-abc"}) == {"identity": "crm:spec-2"}
        assert client.call(47, "tokens.unregister", {"app": "com.example.app", "token": "ABCDEF0123456789"}) == {"identity": "crm:spec-1"}

        # calls to names that are not methods share one stats entry
        assert client.call(26, "nothing.here", {})["code"] == "UNIMPLEMENTED"
        stats = client.call(27, "server.stats")
        assert stats["methods"]["(unknown method)"]["calls"] == 2
        assert not {"profiles.frobnicate", "nothing.here"} & set(stats["methods"])

        # a garbage frame: an id-0 error, and the connection stays usable
        client.send_payloads(b"\xc1")
        garbage = client.next_frame()
        assert garbage["t"] == "error" and garbage["id"] == 0 and garbage["code"] == "INVALID_ARGUMENT"
        assert garbage["message"].startswith("malformed frame: ") and "field" not in garbage
        assert client.call(16, "server.health")["status"] == "serving"
    finally:
        client.close()


def test_flow_controlled_stream_from_the_spec(server_process):
    """Section 7.4: at most `window` items, then nothing until a credit, then the rest and end."""
    client = SpecClient(server_process.address)
    try:
        client.hello()
        events = [{"identity": "crm:flow", "type": "tick", "data": {"i": i}} for i in range(5)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 5
        client.start(2, "events.list", {"identity": "crm:flow"}, window=2)
        first = [client.read(), client.read()]
        assert [f["t"] for f in first] == ["item", "item"]
        client.sock.settimeout(0.5)
        try:
            early = client.read()
        except TimeoutError:
            early = None
        assert early is None, f"the server sent {early} beyond the window"
        client.sock.settimeout(10.0)
        client.send({"t": "credit", "id": 2, "items": 10})
        items, terminal = client.answer(2)
        assert terminal == {"t": "end", "id": 2}
        assert [f["body"]["data"]["i"] for f in first] + [i["data"]["i"] for i in items] == [0, 1, 2, 3, 4]
        # a credit sent in the same write as its call counts
        client.send(
            {"t": "call", "id": 4, "method": "events.list", "body": {"identity": "crm:flow"}, "window": 1},
            {"t": "credit", "id": 4, "items": 4},
        )
        items, terminal = client.answer(4)
        assert terminal == {"t": "end", "id": 4} and [i["data"]["i"] for i in items] == [0, 1, 2, 3, 4]
        # window is ignored for a unary call; credit for an unknown call is ignored
        client.send({"t": "credit", "id": 99, "items": 1})
        assert client.call(3, "server.health", None, window=1)["status"] == "serving"
    finally:
        client.close()


def test_protocol_violations_from_the_spec(server_process):
    """Section 5 and section 9, against a real server."""
    address = server_process.address

    def fresh(*, hello: bool) -> SpecClient:
        client = SpecClient(address)
        if hello:
            client.hello()
        return client

    cases = [
        ([b"\xc1"], "INVALID_ARGUMENT", "malformed hello frame: "),
        ([mp_pack({"t": "call", "id": 1, "method": "server.health"})], "FAILED_PRECONDITION", "expected a hello frame first, got 'call'"),
        ([mp_pack({"t": "hello", "version": 2})], "FAILED_PRECONDITION", "unsupported protocol version 2; this server speaks version 1"),
    ]
    for payloads, code, message in cases:
        client = fresh(hello=False)
        try:
            client.send_payloads(*payloads)
            goaway = _goaway_and_close(client)
            assert goaway["code"] == code and goaway["message"].startswith(message)
            assert goaway.get("last_id", 0) == 0
        finally:
            client.close()

    # oversized frame: refused from its length prefix alone
    client = fresh(hello=True)
    try:
        assert client.call(1, "server.health")["status"] == "serving"
        client.sock.sendall(struct.pack(">I", 4194304 + 1))
        goaway = _goaway_and_close(client)
        assert goaway["code"] == "RESOURCE_EXHAUSTED" and goaway["last_id"] == 1
        assert goaway["message"] == "frame of 4194305 bytes exceeds the maximum frame size of 4194304 bytes"
    finally:
        client.close()

    # section 10.4: after a fatal goaway the calls already received are still answered, then close
    client = fresh(hello=True)
    try:
        calls = [
            {"t": "call", "id": 2, "method": "events.ingest", "body": {"events": [{"identity": "crm:fatal", "type": "t"}]}},
            {"t": "call", "id": 3, "method": "server.health"},
        ]
        client.sock.sendall(b"".join(struct.pack(">I", len(p)) + p for p in map(mp_pack, calls)) + struct.pack(">I", 4194305))
        frames = []
        while (frame := client.read()) is not None:
            frames.append(frame)
        (goaway,) = [f for f in frames if f["t"] == "goaway"]
        assert (goaway["code"], goaway["last_id"]) == ("RESOURCE_EXHAUSTED", 3)
        answers = {f["id"]: f for f in frames if f["t"] != "goaway"}
        assert set(answers) == {2, 3} and len(frames) == 3
        assert answers[2]["body"]["accepted"] == 1 and answers[3]["body"]["status"] == "serving"
    finally:
        client.close()

    # non-fatal violations: each answered with an error, the connection stays usable
    client = fresh(hello=True)
    try:
        client.send({"t": "reply", "id": 1, "body": {}})
        assert client.next_frame() == {"t": "error", "id": 0, "code": "INVALID_ARGUMENT", "message": "a client may not send a 'reply' frame", "field": "$.t"}
        client.send({"t": "hello", "version": 1})
        assert client.next_frame()["message"] == "a client may not send a 'hello' frame"
        client.send({"t": "stream", "id": 5})
        unknown = client.next_frame()
        assert (unknown["id"], unknown["code"], unknown["field"]) == (5, "INVALID_ARGUMENT", "$.t")
        client.send({"t": "call", "id": 0, "method": "server.health"})
        zero = client.next_frame()
        assert (zero["id"], zero["field"]) == (0, "$.id")
        client.send({"t": "call", "id": 6, "method": "server.health", "timeout_ms": 0})
        timeout = client.next_frame()
        assert (timeout["id"], timeout["code"], timeout["field"]) == (6, "INVALID_ARGUMENT", "$.timeout_ms")
        # a cancel for an unknown id and an unsolicited pong are ignored: the pong is next
        client.send({"t": "cancel", "id": 77}, {"t": "pong", "nonce": 3}, {"t": "ping", "nonce": 4})
        assert client.next_frame() == {"t": "pong", "nonce": 4}
        # unknown keys in a frame are ignored
        assert client.call(7, "server.health", None, future_key=1)["status"] == "serving"
    finally:
        client.close()


def test_max_calls_from_the_spec(spawn_server):
    """Section 7.7: a call beyond max_calls is refused on its id; the server keeps reading."""
    server = spawn_server(env={"PIGEON_MAX_CALLS": "2"})
    client = SpecClient(server.address)
    try:
        assert client.hello()["max_calls"] == 2
        events = [{"identity": "crm:slots", "type": "tick", "data": {"i": i}} for i in range(3)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 3
        # two flow-controlled streams use up their window and wait for credit: 2 calls in flight
        client.start(2, "events.list", {"identity": "crm:slots"}, window=1)
        client.start(3, "events.list", {"identity": "crm:slots"}, window=1)
        client.start(4, "server.health")
        _, refused = client.answer(4)
        assert refused == {
            "t": "error", "id": 4, "code": "RESOURCE_EXHAUSTED",
            "message": "2 calls are already in flight on this connection (welcome.max_calls); "
            "wait for an answer before starting another",
        }
        # ping, cancel and credit are still read while every slot is taken
        client.send({"t": "ping", "nonce": 8})
        assert [f for f in _frames_until(client, "pong") if f["t"] == "pong"] == [{"t": "pong", "nonce": 8}]
        client.send({"t": "cancel", "id": 2})
        items, cancelled = client.answer(2)
        assert len(items) <= 1 and cancelled == {"t": "error", "id": 2, "code": "CANCELLED", "message": "cancelled by the client"}
        # the slot is free once the terminal frame has arrived
        assert client.call(5, "server.health")["status"] == "serving"
        client.send({"t": "credit", "id": 3, "items": 10})
        items, end = client.answer(3)
        assert end == {"t": "end", "id": 3} and [i["data"]["i"] for i in items] == [0, 1, 2]
    finally:
        client.close()


def test_handshake_timeout_from_the_spec(spawn_server):
    """Section 5: no valid hello within handshake_timeout_s closes the connection, without a goaway."""
    server = spawn_server(env={"PIGEON_HANDSHAKE_TIMEOUT_S": "0.3"})
    silent, partial, greeted = (SpecClient(server.address) for _ in range(3))
    try:
        greeted.hello()
        partial.sock.sendall(b"\x00\x00\x00\x10\x82")  # a hello that never completes
        assert silent.read() is None
        assert partial.read() is None
        # after the hello there is no timeout
        assert greeted.call(1, "server.health")["status"] == "serving"
    finally:
        for client in (silent, partial, greeted):
            client.close()


def test_stream_item_over_hello_max_frame_from_the_spec(server_process):
    """Sections 3 and 7.3: an item larger than hello.max_frame ends the stream with RESOURCE_EXHAUSTED."""
    client = SpecClient(server_process.address)
    try:
        client.hello(max_frame=1024)
        events = [{"identity": "crm:big", "type": "t", "data": {"pad": "x" * size}} for size in (10, 2000, 10)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 3
        client.start(2, "events.list", {"identity": "crm:big"})
        items, terminal = client.answer(2)
        assert [i["data"]["pad"] for i in items] == ["x" * 10]
        assert (terminal["t"], terminal["code"]) == ("error", "RESOURCE_EXHAUSTED")
        assert re.fullmatch(
            r"the answer is \d+ bytes; this client accepts frames of at most 1024 bytes \(hello.max_frame\)",
            terminal["message"],
        )
        assert client.call(3, "server.health")["status"] == "serving"
    finally:
        client.close()


def test_a_cancel_sent_with_its_call_from_the_spec(spawn_server):
    """Section 7.5: a cancel in the same write as its call ends it with CANCELLED, whatever the
    method. One slot (max_calls 1) shows that every call has ended when its terminal frame
    arrives."""
    server = spawn_server(env={"PIGEON_MAX_CALLS": "1"})
    client = SpecClient(server.address)
    try:
        assert client.hello()["max_calls"] == 1
        events = [{"identity": "crm:cancel", "type": "t", "data": {"i": i, "pad": "x" * 1000}} for i in range(200)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 200
        cancelled = {"code": "CANCELLED", "message": "cancelled by the client"}
        for call_id in (2, 4, 6):
            # a windowed stream: at most its window of items, then CANCELLED, and the slot is free
            client.send(
                {"t": "call", "id": call_id, "method": "events.list", "body": {"identity": "crm:cancel", "limit": 200}, "window": 2},
                {"t": "cancel", "id": call_id},
            )
            items, terminal = client.answer(call_id)
            assert len(items) <= 2 and terminal == {"t": "error", "id": call_id, **cancelled}
            assert client.call(call_id + 1, "server.health")["status"] == "serving"
        # a stream without a window stops at its first 32 KiB pause (each item is over 1000 bytes)
        client.send(
            {"t": "call", "id": 8, "method": "events.list", "body": {"identity": "crm:cancel", "limit": 200}},
            {"t": "cancel", "id": 8},
        )
        items, terminal = client.answer(8)
        assert terminal == {"t": "error", "id": 8, **cancelled}
        assert len(items) < 64, f"{len(items)} items of about 1 KiB were sent after a cancel that came with the call"
        # a write cancelled before it reaches the store is not applied
        client.send(
            {"t": "call", "id": 9, "method": "profiles.upsert", "body": {"identity": "crm:never", "attributes": {"a": 1}}},
            {"t": "cancel", "id": 9},
        )
        assert client.answer(9) == ([], {"t": "error", "id": 9, **cancelled})
        assert client.call(10, "profiles.get", {"identity": "crm:never"})["code"] == "NOT_FOUND"
        # every call checks for cancellation as it starts, even one that never suspends (7.5)
        client.send({"t": "call", "id": 11, "method": "server.health"}, {"t": "cancel", "id": 11})
        assert client.answer(11) == ([], {"t": "error", "id": 11, **cancelled})
        # and a cancel for a call already answered is ignored
        client.send({"t": "cancel", "id": 11}, {"t": "ping", "nonce": 5})
        assert client.next_frame() == {"t": "pong", "nonce": 5}
    finally:
        client.close()


def test_windows_are_lifted_once_the_server_stops_reading_from_the_spec(server_process):
    """Sections 7.4, 9 and 10.4: after a fatal violation, or the client's half-close, no credit
    can arrive, so a windowed stream sends the rest of its items and its end."""
    client = SpecClient(server_process.address)
    try:
        client.hello()
        events = [{"identity": "crm:lifted", "type": "tick", "data": {"i": i}} for i in range(5)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 5
        # a fatal violation while the stream waits for credit
        client.start(2, "events.list", {"identity": "crm:lifted"}, window=1)
        first = client.read()
        assert first is not None and first["t"] == "item" and first["body"]["data"]["i"] == 0
        client.sock.sendall(struct.pack(">I", 4194305))
        frames = []
        while (frame := client.read()) is not None:
            frames.append(frame)
        (goaway,) = [f for f in frames if f["t"] == "goaway"]
        assert (goaway["code"], goaway["last_id"]) == ("RESOURCE_EXHAUSTED", 2)
        stream = [f for f in frames if f["t"] != "goaway"]
        assert [f["body"]["data"]["i"] for f in stream[:-1]] == [1, 2, 3, 4] and stream[-1] == {"t": "end", "id": 2}
    finally:
        client.close()

    client = SpecClient(server_process.address)
    try:
        client.hello()
        # the client closes its sending side right after the call: no goaway, every item, end, close
        client.start(3, "events.list", {"identity": "crm:lifted"}, window=2)
        client.sock.shutdown(socket.SHUT_WR)
        frames = []
        while (frame := client.read()) is not None:
            frames.append(frame)
        assert [f["body"]["data"]["i"] for f in frames[:-1]] == [0, 1, 2, 3, 4]
        assert frames[-1] == {"t": "end", "id": 3}
    finally:
        client.close()


def test_events_past_the_retention_window_are_never_listed_from_the_spec(spawn_server):
    """Section 14.4: events older than the retention window are not listed, swept or not."""
    retention_s = 1.5
    server = spawn_server(env={"PIGEON_STORE__RETENTION_DAYS": repr(retention_s / 86400)})
    client = SpecClient(server.address)
    try:
        client.hello()
        assert client.call(1, "events.ingest", {"events": [{"identity": "crm:old", "type": "t"}]})["accepted"] == 1
        stored = datetime.now(UTC)
        client.start(2, "events.list", {"identity": "crm:old"})
        items, _ = client.answer(2)
        assert len(items) == 1
        time.sleep(retention_s + 0.3)  # the first sweep is a minute away: the event is still stored
        client.start(3, "events.list", {"identity": "crm:old", "since": datetime(1960, 1, 1, tzinfo=UTC)})
        assert client.answer(3) == ([], {"t": "end", "id": 3})
        client.start(4, "events.list", {"identity": "crm:old", "until": stored})
        assert client.answer(4) == ([], {"t": "end", "id": 4})
        client.start(5, "events.list", {"identity": "crm:nobody", "until": stored})
        assert client.answer(5)[1]["code"] == "NOT_FOUND"
    finally:
        client.close()


def test_a_slow_but_steady_reader_is_served_from_the_spec(spawn_server):
    """Section 7.8: the write timeout applies to each 64 KiB piece, not to everything queued."""
    server = spawn_server(env={"PIGEON_WRITE_TIMEOUT_S": "1"})
    client = SpecClient(server.address)
    try:
        client.hello()
        events = [{"identity": "crm:slow", "type": "t", "data": {"n": i, "pad": "x" * 3000}} for i in range(400)]
        assert client.call(1, "events.ingest", {"events": events})["accepted"] == 400
    finally:
        client.close()
    client = SpecClient(server.address, rcvbuf=16384)
    try:
        client.hello()
        # about 1.2 MB without a window, taken at about 400 KB/s: 3 s, more than write_timeout_s
        client.recv_size, client.recv_pause = 16384, 0.04
        started = time.monotonic()
        client.start(2, "events.list", {"identity": "crm:slow", "limit": 400})
        items, terminal = client.answer(2)
        assert terminal == {"t": "end", "id": 2} and [i["data"]["n"] for i in items] == list(range(400))
        assert time.monotonic() - started > 1.5, "the client did not read slowly enough to test anything"
    finally:
        client.close()
