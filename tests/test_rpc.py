"""The socket protocol server on real sockets: bad input, deadlines, cancel, goaway, limits."""

from __future__ import annotations

import socket
import time
from typing import Any

import msgspec
import pytest
import trio

from protocols import api
from protocols.errors import CallError, ConnectionClosed, Status
from protocols.frames import PROTOCOL_VERSION, AnyFrame, Call, Cancel, End, Error, GoAway, Hello, Item, Ping, Pong, Reply, Welcome
from protocols.framing import FrameDecoder, FrameEncoder
from protocols.trio_client import open_client
from server import Server
from server.api.registry import Route as _Route

from .conftest import make_config

_encoder = FrameEncoder()
_decoder = msgspec.msgpack.Decoder(AnyFrame)


class Raw:
    """A hand-driven connection: send any bytes, read decoded frames. Closed after each test."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.frames = FrameDecoder(64 * 1024 * 1024)
        self.queue: list[Any] = []

    @classmethod
    async def connect(cls, address: str, *, hello: bool = True) -> Raw:
        host, port = address.rsplit(":", 1)
        raw = cls(await trio.open_tcp_stream(host, int(port)))
        if hello:
            await raw.send(Hello(version=PROTOCOL_VERSION, client="raw"))
            assert isinstance(await raw.receive(), Welcome)
        return raw

    async def send(self, frame: Any) -> None:
        await self.stream.send_all(frame if isinstance(frame, bytes) else _encoder.frame(frame))

    async def call(self, call_id: int, method: str, body: Any) -> None:
        await self.send(Call(id=call_id, method=method, body=_encoder.body(body)))

    async def receive(self) -> Any:
        """The next frame, or None at EOF."""
        with trio.fail_after(10):
            while not self.queue:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.queue.extend(_decoder.decode(p) for p in self.frames.feed(data))
        return self.queue.pop(0)

    async def aclose(self) -> None:
        await self.stream.aclose()


@pytest.fixture
async def connect():
    """``await connect(address)`` opens a `Raw` connection, closed after the test."""
    opened: list[Raw] = []

    async def open_raw(address: str, *, hello: bool = True) -> Raw:
        raw = await Raw.connect(address, hello=hello)
        opened.append(raw)
        return raw

    yield open_raw
    for raw in opened:
        await raw.aclose()


async def assert_serving(address: str) -> None:
    async with open_client(address) as c:
        assert (await c.call(api.GetHealth())).status == "serving"


@pytest.fixture
def address(server: Server) -> str:
    return server.addresses[0]


async def test_garbage_frame_gets_a_connection_error_and_the_connection_survives(address, connect):
    raw = await connect(address)
    await raw.send(len(b"\xc1garbage").to_bytes(4, "big") + b"\xc1garbage")
    error = await raw.receive()
    assert isinstance(error, Error) and error.id == 0 and error.code == Status.INVALID_ARGUMENT
    assert "malformed frame" in error.message
    await raw.call(1, "server.health", {})
    reply = await raw.receive()
    assert isinstance(reply, Reply) and reply.id == 1
    await assert_serving(address)


async def test_frame_with_a_bad_envelope_field_is_answered_on_its_call_id(address, connect):
    raw = await connect(address)
    bad = msgspec.msgpack.encode({"t": "call", "id": 7, "method": 12})
    await raw.send(len(bad).to_bytes(4, "big") + bad)
    error = await raw.receive()
    assert isinstance(error, Error) and error.id == 7
    assert error.code == Status.INVALID_ARGUMENT and error.field == "$.method"


async def test_truncated_msgpack_inside_a_frame_is_a_malformed_frame(address, connect):
    raw = await connect(address)
    payload = _encoder.frame(Call(id=3, method="server.health", body=_encoder.body({})))[4:]
    cut = payload[:-3]
    await raw.send(len(cut).to_bytes(4, "big") + cut)
    error = await raw.receive()
    assert isinstance(error, Error) and error.code == Status.INVALID_ARGUMENT
    await assert_serving(address)


async def test_connection_closed_mid_frame_does_not_disturb_the_server(address, server, caplog, connect):
    raw = await connect(address)
    await raw.send((1000).to_bytes(4, "big") + b"\x80" * 10)
    await raw.aclose()
    await assert_serving(address)
    with trio.fail_after(5):
        while "in the middle of a frame" not in caplog.text:
            await trio.sleep(0.01)
    assert "10 bytes discarded" in caplog.text or "14 bytes discarded" in caplog.text


async def test_oversized_frame_is_refused_before_its_body_is_sent(address, server, connect):
    raw = await connect(address)
    # announce 1 GiB and send nothing more: the server must answer from the header alone
    await raw.send((1 << 30).to_bytes(4, "big"))
    goaway = await raw.receive()
    assert isinstance(goaway, GoAway) and goaway.code == Status.RESOURCE_EXHAUSTED
    assert str(1 << 30) in goaway.message and str(server.config.max_frame) in goaway.message
    assert await raw.receive() is None  # closed
    assert server.listener.protocol_errors == 1
    await assert_serving(address)


async def test_wrong_type_in_a_body_field_names_the_field(address, connect):
    raw = await connect(address)
    await raw.call(1, "profiles.get", {"identity": 5})
    await raw.call(2, "profiles.upsert", {"identity": "crm:1", "attributes": "nope"})
    await raw.call(3, "profiles.get", {"identity": "crm:1", "extra": True})
    await raw.call(4, "tokens.register", {"identity": "crm:1", "app": "a", "platform": "windows", "token": "t"})
    answers = {f.id: f for f in [await raw.receive() for _ in range(4)]}
    assert all(isinstance(f, Error) and f.code == Status.INVALID_ARGUMENT for f in answers.values())
    assert answers[1].field == "$.identity" and "Expected `str`, got `int`" in answers[1].message
    assert answers[2].field == "$.attributes"
    assert "extra" in answers[3].message
    assert answers[4].field == "$.platform" and "'windows'" in answers[4].message
    assert "'apns', 'apns-sandbox', 'fcm'" in answers[4].message


async def test_unknown_method(address, connect):
    raw = await connect(address)
    await raw.call(1, "profiles.explode", {})
    error = await raw.receive()
    assert error.code == Status.UNIMPLEMENTED and error.field == "$.method" and "profiles.explode" in error.message


async def test_call_id_reused_while_in_flight(address, connect):
    raw = await connect(address)
    first = _encoder.frame(Call(id=9, method="server.health", body=_encoder.body({})))
    # both frames arrive in one read: the first is still in flight when the second is seen
    await raw.send(first + first)
    frames = [await raw.receive(), await raw.receive()]
    errors = [f for f in frames if isinstance(f, Error)]
    replies = [f for f in frames if isinstance(f, Reply)]
    assert len(errors) == 1 and len(replies) == 1
    assert errors[0].id == 0 and errors[0].field == "$.id" and "call id 9 is already in flight" in errors[0].message
    assert replies[0].id == 9


async def test_call_before_hello_is_refused_with_a_goaway(address, connect):
    raw = await connect(address, hello=False)
    await raw.call(1, "server.health", {})
    goaway = await raw.receive()
    assert isinstance(goaway, GoAway) and goaway.code == Status.FAILED_PRECONDITION
    assert await raw.receive() is None


async def test_unsupported_version_is_refused(address, connect):
    raw = await connect(address, hello=False)
    await raw.send(Hello(version=99))
    goaway = await raw.receive()
    assert isinstance(goaway, GoAway) and "99" in goaway.message and str(PROTOCOL_VERSION) in goaway.message


async def test_ping(address, connect):
    raw = await connect(address)
    await raw.send(Ping(nonce=42))
    assert await raw.receive() == Pong(nonce=42)
    async with open_client(address) as c:
        assert 0 < await c.ping() < 5


async def test_pipelined_calls_are_answered_out_of_order(server, address, connect):
    gate = _add_slow_route(server)
    raw = await connect(address)
    await raw.call(1, "test.slow", {})
    await raw.call(2, "server.health", {})
    first = await raw.receive()
    assert first.id == 2  # the quick call overtakes the slow one
    gate.set()
    assert (await raw.receive()).id == 1


def _add_route(server: Server, name: str, handler: Any) -> None:
    spec = api.MethodSpec(name, api.GetHealth, api.Health, False)
    server.listener.router.routes[name] = _Route(spec, handler, msgspec.msgpack.Decoder(api.GetHealth))


def _add_slow_route(server: Server) -> trio.Event:
    """A method ``test.slow`` that answers once the returned event is set."""
    gate = trio.Event()

    async def slow(ctx, req):
        await gate.wait()
        return api.Health(status="serving", version="slow", protocol=1, uptime_s=0)

    _add_route(server, "test.slow", slow)
    return gate


async def test_deadline_exceeded_and_client_cancel(server, address, connect):
    async def sleepy(ctx, req):
        await trio.sleep(30)

    _add_route(server, "test.sleep", sleepy)
    raw = await connect(address)
    await raw.send(Call(id=1, method="test.sleep", body=_encoder.body({}), timeout_ms=50))
    error = await raw.receive()
    assert error.id == 1 and error.code == Status.DEADLINE_EXCEEDED and "50 ms" in error.message

    await raw.call(2, "test.sleep", {})
    await trio.sleep(0.05)
    await raw.send(Cancel(id=2))
    error = await raw.receive()
    assert error.id == 2 and error.code == Status.CANCELLED

    # the Trio client turns a fail_after into the call's deadline
    async with open_client(address) as c:
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.2):
                await _call_sleep(c)
        assert (await c.call(api.GetHealth())).status == "serving"
    # the server saw the client's deadline too (timeout_ms) and ended the call itself
    with trio.fail_after(5):
        while server.listener.stats_for("test.sleep").calls < 3:
            await trio.sleep(0.01)
    assert server.listener.stats_for("test.sleep").errors == 3


async def _call_sleep(client) -> None:
    class Sleep(api.Request[api.Health]):
        method = "test.sleep"

    await client.call(Sleep())


async def test_handler_crash_is_an_internal_error_and_the_server_keeps_serving(server, address, caplog, connect):
    async def broken(ctx, req):
        raise ZeroDivisionError("boom")

    _add_route(server, "test.broken", broken)
    raw = await connect(address)
    await raw.call(1, "test.broken", {})
    error = await raw.receive()
    assert error.code == Status.INTERNAL and "test.broken" in error.message and "boom" not in error.message
    assert "ZeroDivisionError" in caplog.text
    await assert_serving(address)


async def test_max_connections(tmp_path, connect):
    srv = Server(make_config(tmp_path / "d", max_connections=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        address = srv.addresses[0]
        a = await connect(address)
        b = await connect(address)
        c = await connect(address, hello=False)
        goaway = await c.receive()
        assert isinstance(goaway, GoAway) and goaway.code == Status.RESOURCE_EXHAUSTED
        await a.aclose()
        with trio.fail_after(5):
            while len(srv.listener.connections) > 1:
                await trio.sleep(0.01)
        await assert_serving(address)
        await b.aclose()
        srv.request_stop()


async def test_shutdown_finishes_calls_in_flight_and_refuses_new_ones(tmp_path, connect):
    srv = Server(make_config(tmp_path / "d"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        gate = _add_slow_route(srv)
        raw = await connect(srv.addresses[0])
        await raw.call(1, "test.slow", {})
        await trio.sleep(0.05)
        srv.request_stop()
        goaway = await raw.receive()
        assert isinstance(goaway, GoAway) and goaway.code == Status.UNAVAILABLE and goaway.last_id == 1
        await raw.call(2, "server.health", {})
        refused = await raw.receive()
        assert refused.id == 2 and refused.code == Status.UNAVAILABLE
        gate.set()
        finished = await raw.receive()
        assert isinstance(finished, Reply) and finished.id == 1
        assert await raw.receive() is None  # closed once idle
    # the server has stopped: nothing listens any more
    host, port = srv.addresses[0].rsplit(":", 1)
    with pytest.raises(OSError):
        await trio.open_tcp_stream(host, int(port))


async def test_goaway_fails_new_calls_in_the_trio_client(tmp_path):
    srv = Server(make_config(tmp_path / "d"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        gate = _add_slow_route(srv)
        async with open_client(srv.addresses[0]) as c:
            async with trio.open_nursery() as calls:
                result: list[Any] = []

                async def slow_call() -> None:
                    class Slow(api.Request[api.Health]):
                        method = "test.slow"

                    result.append(await c.call(Slow()))

                calls.start_soon(slow_call)
                await trio.sleep(0.05)
                srv.request_stop()
                await trio.sleep(0.05)
                with pytest.raises((ConnectionClosed, CallError)) as info:
                    await c.call(api.GetHealth())
                assert info.value.status is Status.UNAVAILABLE
                gate.set()
            assert result[0]["version"] == "slow"  # a method unknown to the client decodes as plain data


def test_a_client_that_stops_reading_does_not_grow_server_memory(spawn_server):
    proc = spawn_server(env={"PIGEON_WRITE_TIMEOUT_S": "8", "PIGEON_MAX_CALLS": "64"})
    host, port = proc.address.rsplit(":", 1)

    async def setup_and_stats() -> tuple[int, int]:
        async with open_client(proc.address) as c:
            await c.call(api.UpsertProfile(identity="crm:big", attributes={"blob": "x" * 200_000}))
            stats = await c.call(api.GetStats())
            return stats.process.rss_bytes, stats.connections.open

    rss_before, _ = trio.run(setup_and_stats)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION)))
    call = _encoder.body(api.GetProfile(identity="crm:big"))
    sock.settimeout(1)
    sent = 0
    started = time.monotonic()
    try:
        # ~200 KB per reply: 300,000 calls would be 60 GB of replies if the server queued them
        # all; the calls themselves (~60 bytes each) overflow any kernel socket buffer.
        while sent < 300_000 and time.monotonic() - started < 60:
            chunk = b"".join(
                _encoder.frame(Call(id=sent + i + 1, method="profiles.get", body=call)) for i in range(1000)
            )
            sock.sendall(chunk)
            sent += 1000
    except TimeoutError:
        pass  # the server stopped reading: backpressure reached the client
    rss_after, open_connections = trio.run(setup_and_stats)
    assert sent < 300_000, "the server kept reading calls it could not answer"
    assert rss_after - rss_before < 100 * 2**20, (rss_before, rss_after)
    assert open_connections == 2
    # after the write timeout the server drops the stuck connection and keeps serving
    deadline = time.monotonic() + 20
    while trio.run(setup_and_stats)[1] != 1:
        assert time.monotonic() < deadline, "the stuck connection was never closed"
        time.sleep(0.2)
    sock.close()
    assert any("read nothing for 8s" in line for line in proc.log)


async def test_an_answer_too_large_for_the_client_is_an_error_not_a_broken_connection(server, client):
    await client.call(api.UpsertProfile(identity="crm:big", attributes={"blob": "x" * 10_000}))
    async with open_client(server.addresses[0], max_frame=4096) as small:
        with pytest.raises(CallError) as info:
            await small.call(api.GetProfile(identity="crm:big"))
        assert info.value.status is Status.RESOURCE_EXHAUSTED and "4096" in info.value.message
        assert (await small.call(api.GetHealth())).status == "serving"


async def test_a_slow_stream_consumer_does_not_hold_up_other_calls_on_the_trio_client(client, server):
    events = [api.Event(identity="crm:5", type="t", data={"n": i}) for i in range(1000)]
    assert (await client.call(api.IngestEvents(events=events))).accepted == 1000
    seen = 0
    async with client.stream(api.ListEvents(identity="crm:5", limit=1000)) as items:
        async for item in items:
            assert item.data["n"] == seen
            seen += 1
            if seen % 100 == 0:
                with trio.fail_after(5):
                    assert (await client.call(api.GetHealth())).status == "serving"
    assert seen == 1000
    # the server kept to the window: never more than 64 items ahead of the consumer
    connection = next(iter(server.listener.connections))
    assert connection.windows == {}


async def test_stream_without_a_window_is_not_flow_controlled(address, connect):
    raw = await connect(address)
    await raw.call(1, "profiles.upsert", {"identity": "crm:1"})
    await raw.receive()
    await raw.call(2, "events.ingest", {"events": [{"identity": "crm:1", "type": "t"}] * 200})
    assert (await raw.receive()).id == 2
    await raw.call(3, "events.list", {"identity": "crm:1", "limit": 500})
    frames = [await raw.receive() for _ in range(201)]
    assert sum(1 for f in frames if f.id == 3 and f.__struct_config__.tag == "item") == 200
    assert frames[-1].__struct_config__.tag == "end"


async def test_stream_with_a_window_waits_for_credit(address, connect):
    from protocols.frames import Credit

    raw = await connect(address)
    await raw.call(1, "events.ingest", {"events": [{"identity": "crm:1", "type": "t"}] * 50})
    await raw.receive()
    await raw.send(Call(id=2, method="events.list", body=_encoder.body({"identity": "crm:1", "limit": 50}), window=10))
    first = [await raw.receive() for _ in range(10)]
    assert all(f.__struct_config__.tag == "item" for f in first)
    with trio.move_on_after(0.3):
        extra = await raw.receive()
        raise AssertionError(f"the server sent beyond the window: {extra}")
    await raw.send(Credit(id=2, items=40))
    rest = [await raw.receive() for _ in range(41)]
    assert [f.__struct_config__.tag for f in rest] == ["item"] * 40 + ["end"]


async def test_cancelling_a_stream_blocked_on_a_slow_reader_keeps_the_framing_intact(tmp_path):
    srv = Server(make_config(tmp_path / "d"))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            events = [api.Event(identity="crm:1", type="t", data={"blob": "x" * 2000, "n": i}) for i in range(2000)]
            for start in range(0, 2000, 500):
                await c.call(api.IngestEvents(events=events[start : start + 500]))
        host, port = srv.addresses[0].rsplit(":", 1)
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect((host, int(port)))
        raw = Raw(trio.SocketStream(sock))
        await raw.send(Hello(version=PROTOCOL_VERSION))
        # a stream without a window: the server writes until the socket is full, then blocks
        await raw.call(1, "events.list", {"identity": "crm:1", "limit": 2000})
        await trio.sleep(0.3)
        await raw.send(Cancel(id=1))
        await raw.call(2, "server.health", {})
        await trio.sleep(0.2)
        frames = []

        def terminal(call_id: int) -> Any:
            return next((f for f in frames if getattr(f, "id", None) == call_id and not isinstance(f, Item)), None)

        with trio.fail_after(10):
            while terminal(1) is None or terminal(2) is None:
                frame = await raw.receive()  # raises if a frame were cut in half
                assert frame is not None
                frames.append(frame)
        assert isinstance(frames[0], Welcome)
        assert isinstance(terminal(2), Reply)
        # the stream ended cancelled (or, had it finished first, with its end marker)
        assert (isinstance(terminal(1), Error) and terminal(1).code == Status.CANCELLED) or isinstance(terminal(1), End)
        items = [f for f in frames if isinstance(f, Item)]
        assert 0 < len(items) < 2000 or isinstance(terminal(1), End)
        await raw.aclose()
        srv.request_stop()


async def test_made_up_method_names_share_one_stats_entry(address, connect, server):
    raw = await connect(address)
    for i in range(50):
        await raw.call(i + 1, f"nothing.{i}", {})
    for _ in range(50):
        assert (await raw.receive()).code == Status.UNIMPLEMENTED
    names = set(server.listener.method_stats)
    assert "(unknown method)" in names and not any(n.startswith("nothing.") for n in names)
    assert server.listener.method_stats["(unknown method)"].calls == 50


async def test_a_fatal_goaway_still_answers_the_calls_already_received(server, address, connect):
    gate = _add_slow_route(server)
    raw = await connect(address)
    await raw.call(1, "test.slow", {})
    await trio.sleep(0.05)
    await raw.send((1 << 30).to_bytes(4, "big"))
    goaway = await raw.receive()
    assert isinstance(goaway, GoAway) and goaway.last_id == 1
    gate.set()
    reply = await raw.receive()
    assert isinstance(reply, Reply) and reply.id == 1
    assert await raw.receive() is None


async def test_a_connection_that_never_says_hello_is_closed(tmp_path, caplog):
    srv = Server(make_config(tmp_path / "d", handshake_timeout_s=0.3))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        raw = await Raw.connect(srv.addresses[0], hello=False)
        with trio.fail_after(5):
            assert await raw.receive() is None
        assert "no hello" in caplog.text
        await raw.aclose()
        srv.request_stop()


async def test_calls_beyond_max_calls_are_refused_and_credit_still_flows(tmp_path):
    from protocols.frames import Credit

    srv = Server(make_config(tmp_path / "d", max_calls=2))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        raw = await Raw.connect(srv.addresses[0])
        await raw.call(1, "events.ingest", {"events": [{"identity": "crm:1", "type": "t"}] * 10})
        assert (await raw.receive()).id == 1
        for call_id in (2, 3):  # two windowed streams that will wait for credit: both slots taken
            await raw.send(Call(id=call_id, method="events.list", body=_encoder.body({"identity": "crm:1"}), window=1))
        firsts = [await raw.receive(), await raw.receive()]
        assert sorted(f.id for f in firsts) == [2, 3]
        await raw.call(4, "server.health", {})
        refused = await raw.receive()
        assert refused.id == 4 and refused.code == Status.RESOURCE_EXHAUSTED and "2 calls" in refused.message
        # the reader still reads: credit reaches the waiting stream
        await raw.send(Credit(id=2, items=20))
        items = [await raw.receive() for _ in range(10)]
        assert [f.__struct_config__.tag for f in items] == ["item"] * 9 + ["end"] and all(f.id == 2 for f in items)
        await raw.call(5, "server.health", {})  # a slot is free again
        assert isinstance(await raw.receive(), Reply)
        await raw.aclose()
        srv.request_stop()


async def test_clients_keep_to_max_calls(tmp_path):
    srv = Server(make_config(tmp_path / "d", max_calls=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            assert c.welcome.max_calls == 3
            async with trio.open_nursery() as calls:
                for i in range(50):
                    calls.start_soon(c.call, api.UpsertProfile(identity=f"crm:{i}"))
            assert (await c.call(api.GetStats())).store.profiles == 50
        srv.request_stop()


async def test_events_list_with_an_empty_range(client):
    from datetime import UTC, datetime

    await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t")]))
    async with client.stream(api.ListEvents(identity="crm:1", until=datetime(1960, 1, 1, tzinfo=UTC))) as items:
        assert [e async for e in items] == []


def test_a_slow_but_steady_reader_is_served_past_the_write_timeout(spawn_server):
    proc = spawn_server(env={"PIGEON_WRITE_TIMEOUT_S": "1"})
    host, port = proc.address.rsplit(":", 1)

    async def setup() -> None:
        async with open_client(proc.address) as c:
            events = [api.Event(identity="crm:1", type="t", data={"blob": "x" * 3000, "n": i}) for i in range(400)]
            await c.call(api.IngestEvents(events=events))

    trio.run(setup)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION)))
    # no window: the server queues ~1.2 MB at once; this reader takes ~3 s to drain it
    sock.sendall(_encoder.frame(Call(id=1, method="events.list", body=_encoder.body({"identity": "crm:1", "limit": 400}))))
    decoder = FrameDecoder(1 << 24)
    frames = []
    deadline = time.monotonic() + 30
    sock.settimeout(5)
    while not frames or frames[-1].__struct_config__.tag not in ("end", "error"):
        assert time.monotonic() < deadline
        chunk = sock.recv(16384)
        assert chunk, "the server dropped a client that was reading"
        frames.extend(_decoder.decode(p) for p in decoder.feed(chunk))
        time.sleep(0.04)  # ~400 KB/s
    sock.close()
    assert frames[-1].__struct_config__.tag == "end"
    assert sum(1 for f in frames if isinstance(f, Item)) == 400


async def test_a_cancel_read_with_its_call_is_not_lost_and_frees_the_slot(tmp_path):
    srv = Server(make_config(tmp_path / "d", max_calls=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        async with open_client(srv.addresses[0]) as c:
            await c.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t")] * 100))
        raw = await Raw.connect(srv.addresses[0])
        for call_id in range(1, 6):
            # a windowed stream and its cancel in one write: the server reads them together
            call = Call(id=call_id, method="events.list", body=_encoder.body({"identity": "crm:1"}), window=2)
            await raw.send(_encoder.frame(call) + _encoder.frame(Cancel(id=call_id)))
            frames = []
            while not frames or isinstance(frames[-1], Item):
                frames.append(await raw.receive())
            assert frames[-1].id == call_id and frames[-1].code == Status.CANCELLED
        await raw.call(9, "server.health", {})  # the only slot is free again
        assert isinstance(await raw.receive(), Reply)
        await raw.aclose()
        srv.request_stop()


async def test_a_trio_call_cancelled_while_it_is_being_sent_leaves_the_connection_usable(client):
    events = [api.Event(identity="crm:1", type="t", data={"blob": "x" * 1000})] * 3000  # ~3 MB
    for _ in range(3):
        with trio.move_on_after(0.001):
            await client.call(api.IngestEvents(events=events))
    with trio.fail_after(10):
        assert (await client.call(api.GetHealth())).status == "serving"


def test_a_unix_socket_in_use_is_not_taken_over(spawn_server, tmp_path):
    path = tmp_path / "p.sock"
    first = spawn_server("--listen", f"unix:{path}")
    second = spawn_server("--listen", f"unix:{path}", data=tmp_path / "other", start=False)
    with pytest.raises(RuntimeError, match="a running server is listening there"):
        second.start()
    assert first.stop() == 0
    # a socket file left behind by a stopped server is reused
    spawn_server("--listen", f"unix:{path}", data=tmp_path / "third")


async def test_listening_beyond_loopback_in_plaintext_takes_a_loudly_named_setting(tmp_path, caplog):
    """Beyond loopback the server wants keys and TLS (tests/test_access.py has the whole rule);
    insecure_plaintext_network lets it listen in the clear, with a warning at each start."""
    srv = Server(make_config(tmp_path / "d", listen=["0.0.0.0:0"], auth="keys", insecure_plaintext_network=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        srv.request_stop()
    assert "insecure_plaintext_network = true: listening on 0.0.0.0:0 without TLS" in caplog.text


def _nested(depth: int) -> bytes:
    """MessagePack of ``depth`` one-element arrays inside each other around a 1."""
    return b"\x91" * depth + b"\x01"


def _map(**items: Any) -> bytes:
    """A MessagePack map whose values may be raw MessagePack (bytes) or plain values."""
    out = bytearray([0x80 | len(items)])
    for key, value in items.items():
        out += msgspec.msgpack.encode(key) + (value if isinstance(value, bytes) else msgspec.msgpack.encode(value))
    return bytes(out)


def _framed(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


async def test_a_deeply_nested_frame_costs_only_its_own_connection(server, address, connect):
    """A frame nested ~1,000 levels (1 KB) made the decoder raise RecursionError, which crashed
    the listener: every connection dropped, and six such frames in 10 s stopped the process."""
    bystander = await connect(address)
    for depth in (1_000, 5_000, 100_000):
        # in a hello: the connection is refused, with a goaway that says why
        raw = await connect(address, hello=False)
        await raw.send(_framed(_map(t="hello", version=PROTOCOL_VERSION, x=_nested(depth))))
        goaway = await raw.receive()
        assert isinstance(goaway, GoAway) and goaway.code == Status.INVALID_ARGUMENT
        assert "nested too deeply" in goaway.message
        assert await raw.receive() is None
        # in an open connection's call envelope, or in a call's body (the envelope cannot be
        # decoded either, nor its call id: the error is the connection's, id 0): the
        # connection goes on
        raw = await connect(address)
        await raw.send(_framed(_map(t="call", id=1, method="server.health", x=_nested(depth))))
        error = await raw.receive()
        assert isinstance(error, Error) and error.code == Status.INVALID_ARGUMENT and "nested too deeply" in error.message
        await raw.send(_framed(_map(t="call", id=2, method="profiles.upsert",
                                    body=_map(identity="crm:1", attributes=_map(a=_nested(depth))))))
        error = await raw.receive()
        assert isinstance(error, Error) and error.id == 0 and error.code == Status.INVALID_ARGUMENT
        assert "nested too deeply" in error.message
        await raw.call(3, "server.health", {})
        assert isinstance(await raw.receive(), Reply)
        # the bystander's connection was never dropped
        await bystander.call(depth, "server.health", {})
        assert isinstance(await bystander.receive(), Reply)
    assert server.listener.protocol_errors == 3
    assert all(actor.restarts == 0 for actor in (await _stats(address)).actors)


async def _stats(address: str) -> api.Stats:
    async with open_client(address) as c:
        return await c.call(api.GetStats())


async def test_a_failure_inside_one_connection_closes_that_connection_only(server, address, connect, monkeypatch, caplog):
    """Whatever goes wrong while serving a connection (here a bug injected into the protocol
    layer) ends that connection, never the listener and the other clients."""
    from protocols.connection import ServerConnection

    receive_call = ServerConnection._receive_call

    def failing(self, call):
        if call.method == "test.fail":
            raise ValueError("a bug in the protocol layer")
        return receive_call(self, call)

    monkeypatch.setattr(ServerConnection, "_receive_call", failing)
    bystander = await connect(address)
    raw = await connect(address)
    await raw.call(1, "test.fail", {})
    assert await raw.receive() is None  # closed
    await bystander.call(1, "server.health", {})
    assert isinstance(await bystander.receive(), Reply)
    assert server.listener.connection_failures == 1 and "a bug in the protocol layer" in caplog.text
    assert all(actor.restarts == 0 for actor in (await _stats(address)).actors)


async def _health(address: str) -> bool:
    """Connect, say hello, call server.health: whether it answered."""
    try:
        with trio.fail_after(5):
            async with open_client(address) as c:
                return (await c.call(api.GetHealth())).status == "serving"
    except (ConnectionClosed, CallError, OSError, trio.TooSlowError):
        return False


async def test_connections_that_never_say_hello_cannot_lock_honest_clients_out(tmp_path):
    """2,000 sockets that never said hello took all 1,024 places for the whole handshake
    timeout: honest clients were refused (2.8% availability). Now the oldest connection still
    waiting for its hello makes room for a new one, and they have a shorter time to say it
    while many wait."""
    srv = Server(make_config(tmp_path / "d", max_connections=64, handshake_timeout_s=30))
    host, port = "127.0.0.1", 0
    idle: list[trio.SocketStream] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        address = srv.addresses[0]
        host, port = address.rsplit(":", 1)

        async def open_idle(count: int, pause: float) -> None:
            for _ in range(count):  # held open, never a byte sent
                try:
                    idle.append(await trio.open_tcp_stream(host, int(port)))
                except OSError:
                    pass
                await trio.sleep(pause)

        await open_idle(200, 0)  # more than max_connections
        async with trio.open_nursery() as flood:
            flood.start_soon(open_idle, 300, 0.005)  # and more while the honest clients call
            answered = [await _health(address) for _ in range(100)]
            flood.cancel_scope.cancel()
        assert all(answered), f"{answered.count(False)} of 100 health checks failed"
        assert srv.listener.evicted > 0
        for stream in idle:
            await stream.aclose()
        srv.request_stop()


async def test_connections_per_peer_are_limited_and_the_oldest_without_hello_makes_room(tmp_path, connect):
    srv = Server(make_config(tmp_path / "d", max_connections_per_peer=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        address = srv.addresses[0]
        silent = await connect(address, hello=False)
        a, b = await connect(address), await connect(address)
        c = await connect(address)  # takes the place of the silent one, which is told why
        goaway = await silent.receive()
        assert isinstance(goaway, GoAway) and goaway.code == Status.RESOURCE_EXHAUSTED and "no hello" in goaway.message
        assert await silent.receive() is None
        refused = await connect(address, hello=False)  # all three said hello: nothing to close
        goaway = await refused.receive()
        assert isinstance(goaway, GoAway) and goaway.code == Status.RESOURCE_EXHAUSTED
        assert "max_connections_per_peer" in goaway.message
        for raw in (a, b, c):
            await raw.call(1, "server.health", {})
            assert isinstance(await raw.receive(), Reply)
        srv.request_stop()


async def test_while_many_connections_wait_for_their_hello_each_has_the_short_budget(tmp_path, connect, caplog):
    srv = Server(make_config(tmp_path / "d", max_handshakes=4, handshake_timeout_s=30, busy_handshake_timeout_s=0.3))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        address = srv.addresses[0]
        first = await connect(address, hello=False)  # alone: the full 30 s
        await trio.sleep(0.5)
        assert len(srv.listener.handshaking) == 1
        others = [await connect(address, hello=False) for _ in range(2)]  # 3 > 4 // 2: busy
        with trio.fail_after(5):
            for raw in (first, *others):
                assert await raw.receive() is None
        assert "no hello from" in caplog.text
        honest = await connect(address)  # says hello at once
        await honest.call(1, "server.health", {})
        assert isinstance(await honest.receive(), Reply)
        srv.request_stop()


def _pipeline_and_never_read(address: str, calls: bytes) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION)) + calls)
    return sock


def test_clients_that_pipeline_large_answers_and_never_read_hold_bounded_memory(spawn_server):
    """10 connections each pipelining 256 profiles.get of a 255 KB profile (13 KB of requests)
    and reading nothing grew the server by 648 MB; 200 connections x 24 calls by 1.14 GB. A
    connection's answers now stay around 1 MiB (plus one), all connections' around
    reply_buffer_mb (plus one answer each)."""
    proc = spawn_server(env={"PIGEON_WRITE_TIMEOUT_S": "60", "PIGEON_REPLY_BUFFER_MB": "16"})

    async def setup() -> None:
        async with open_client(proc.address) as c:
            await c.call(api.UpsertProfile(identity="crm:big", attributes={"blob": "x" * 255_000}))

    async def stats() -> api.Stats:
        async with open_client(proc.address) as c:
            return await c.call(api.GetStats())

    def settled_rss() -> tuple[int, int]:
        """RSS and buffered bytes once the server has stopped answering the silent clients."""
        last = -1
        for _ in range(50):
            time.sleep(0.2)
            s = trio.run(stats)
            if s.methods["profiles.get"].calls == last:
                break
            last = s.methods["profiles.get"].calls
        return s.process.rss_bytes, s.connections.buffered_bytes

    trio.run(setup)
    call = _encoder.body(api.GetProfile(identity="crm:big"))
    frames = lambda n: b"".join(_encoder.frame(Call(id=i + 1, method="profiles.get", body=call)) for i in range(n))
    rss_before = trio.run(stats).process.rss_bytes
    socks = [_pipeline_and_never_read(proc.address, frames(256)) for _ in range(10)]
    rss, buffered = settled_rss()
    # 10 connections x (1 MiB + one 255 KB answer) is ~13 MB
    assert buffered < 16 * 2**20 and rss - rss_before < 60 * 2**20, (buffered, rss - rss_before)
    for sock in socks:
        sock.close()

    rss_before = trio.run(stats).process.rss_bytes
    socks = [_pipeline_and_never_read(proc.address, frames(24)) for _ in range(100)]
    rss, buffered = settled_rss()
    # 16 MiB in all, plus one answer for each connection: ~42 MB
    assert buffered < 48 * 2**20 and rss - rss_before < 100 * 2**20, (buffered, rss - rss_before)
    assert trio.run(stats).connections.open == 101
    for sock in socks:
        sock.close()


def _deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "method, body, field",
    [
        ("profiles.upsert", {"identity": "crm:1", "attributes": {"a": _deep(40)}}, "$.attributes.a"),
        ("profiles.patch", {"identity": "crm:1", "patch": {"a": _deep(40)}}, "$.patch.a"),
        ("messages.preview", {"id": "m", "event": {"e": _deep(40)}}, "$.event.e"),
        ("messages.send", {"id": "m", "event": {"e": _deep(40)}}, "$.event.e"),
        ("push.send", {"app": "a", "identity": "crm:1", "raw": {"aps": _deep(40)}}, "$.raw.aps"),
        ("push.send", {"app": "a", "identity": "crm:1", "fcm_raw": {"data": _deep(40)}}, "$.fcm_raw.data"),
        ("apps.register_android", {"app": "a", "service_account": {"x": _deep(40)}}, "$.service_account.x"),
    ],
)
async def test_every_free_form_map_of_a_request_is_bounded_in_depth(address, connect, method, body, field):
    """Payloads and preview data nested 40 levels went on to be rendered, encoded or stored
    (an APNs raw payload deep enough raised RecursionError while being built)."""
    raw = await connect(address)
    await raw.call(1, method, body)
    error = await raw.receive()
    assert isinstance(error, Error) and error.code == Status.INVALID_ARGUMENT, error
    assert error.field.startswith(field + "[0]") and "nest deeper than 32 levels" in error.message


def test_streams_on_a_connection_that_reads_nothing_hold_bounded_memory(spawn_server):
    """A stream reserved nothing, and events.list holds a page of up to 256 events while it
    waits (for credit, here): 256 such streams on one silent connection, over events of 60 KB,
    took the server from 70 MiB to 3.8 GiB. Streams now reserve room as calls do, and a page
    holds at most 16 KiB of events and one more."""
    proc = spawn_server(env={"PIGEON_WRITE_TIMEOUT_S": "60"})

    async def setup() -> None:
        async with open_client(proc.address) as c:
            await c.call(api.IngestEvents(events=[api.Event(identity="crm:big", type="app.open")]))
            for _ in range(4):
                await c.call(api.IngestEvents(events=[
                    api.Event(identity="crm:big", type="app.open", data={"p": "x" * 60_000}) for _ in range(64)]))

    async def stats() -> api.Stats:
        async with open_client(proc.address) as c:
            return await c.call(api.GetStats())

    trio.run(setup)
    before = trio.run(stats).process.rss_bytes
    body = _encoder.body(api.ListEvents(identity="crm:big", limit=1000))
    frames = b"".join(_encoder.frame(Call(id=i + 1, method="events.list", body=body, window=1)) for i in range(64))
    sock = _pipeline_and_never_read(proc.address, frames)
    time.sleep(2)
    after = trio.run(stats)
    sock.close()
    assert after.methods["events.list"].calls == 0  # all of them still streaming
    assert after.process.rss_bytes - before < 64 * 2**20, (after.process.rss_bytes - before) / 2**20


def test_the_requests_of_calls_in_flight_are_bounded_in_bytes(spawn_server):
    """A request stopped counting against its connection once decoded, while its call (and
    the decoded request) waited in the store: 2 connections x 250 profiles.patch of 3.8 MB
    took the server's peak memory from 52 MB to 1.79 GB. They count until the call ends."""
    proc = spawn_server()

    async def stats() -> api.Stats:
        async with open_client(proc.address) as c:
            return await c.call(api.GetStats())

    before = trio.run(stats).process.max_rss_bytes
    body = _encoder.body(api.PatchProfile(identity="crm:1", patch={"blob": "x" * 3_800_000}, create=True))
    frame = lambda i: _encoder.frame(Call(id=i + 1, method="profiles.patch", body=body))
    host, port = proc.address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.sendall(_encoder.frame(Hello(version=PROTOCOL_VERSION)))
    sock.settimeout(0.5)
    sent = 0
    try:
        while sent < 60:
            sock.sendall(frame(sent))
            sent += 1
    except TimeoutError:
        pass  # the server stopped reading: it holds its 4 MiB of requests
    deadline = time.monotonic() + 30
    while trio.run(stats).methods.get("profiles.patch", api.MethodStats()).calls < sent:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    peak = trio.run(stats).process.max_rss_bytes
    sock.close()
    assert peak - before < 100 * 2**20, (peak - before) / 2**20


async def test_an_answer_that_cannot_be_encoded_is_an_internal_error_not_silence(server, address, connect):
    async def unencodable(ctx, request):
        return {"n": 2**70}

    server.listener.router.routes["server.health"] = _Route(api.METHODS["server.health"], unencodable, None)
    raw = await connect(address)
    await raw.call(1, "server.health", {})
    error = await raw.receive()
    assert isinstance(error, Error) and error.id == 1 and error.code == Status.INTERNAL


async def test_a_flood_of_silent_connections_from_one_address_closes_its_own_not_others(tmp_path):
    """Past max_handshakes the oldest connection waiting for its hello was closed, whoever
    opened it: a flood from one address closed honest clients whose hello was on its way."""
    srv = Server(make_config(tmp_path / "d", max_handshakes=4, handshake_timeout_s=30, busy_handshake_timeout_s=30))
    async with trio.open_nursery() as nursery:
        await nursery.start(srv.run)
        host, port = srv.addresses[0].rsplit(":", 1)
        honest = await trio.open_tcp_stream(host, int(port))  # from 127.0.0.1, hello not sent yet
        flood = [await trio.open_tcp_stream(host, int(port), local_address="127.0.0.2") for _ in range(12)]
        with trio.fail_after(5):
            while srv.listener.evicted < 9:
                await trio.sleep(0.01)
        await honest.send_all(_encoder.frame(Hello(version=PROTOCOL_VERSION)))
        raw = Raw(honest)
        assert isinstance(await raw.receive(), Welcome)
        for stream in [honest, *flood]:
            await stream.aclose()
        srv.request_stop()


async def test_a_methods_reservation_halves_every_ten_seconds_after_its_largest_answer(autojump_clock):
    from server.api.listener import _FIRST_ESTIMATE, Listener
    from server.api.registry import Router

    listener = Listener(Router(), listen=[], server_name="t", max_frame=1024, max_calls=1, max_connections=1,
                        write_timeout=1)
    assert listener.reservation("events.ingest") == _FIRST_ESTIMATE
    listener.answered("events.ingest", 50)
    assert listener.reservation("events.ingest") == 50
    listener.answered("events.ingest", 1_200_000)  # one large answer (a batch of rejections)
    await trio.sleep(25)
    assert listener.reservation("events.ingest") == 300_000
    listener.answered("events.ingest", 50)  # smaller than what it reserves now: kept
    await trio.sleep(60)
    assert listener.reservation("events.ingest") < 50_000
