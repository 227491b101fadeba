"""Tests for `protocols.asyncio_client`.

Most tests talk to a real ``pigeon serve`` child process (the ``server_process`` and
``spawn_server`` fixtures). What a real server cannot show deterministically (replies out of
order, the ``timeout_ms`` and Cancel frames the client sends, a goaway while calls are open)
is checked against `FakeServer`, a scripted server built on the sans-IO `ServerConnection`.

pytest runs in Trio mode, so these tests are synchronous functions that run their own asyncio
loop through `go`; every test's body is bounded by ``asyncio.timeout``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import importlib.util
import signal
import ssl
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest

from protocols import api
from protocols import asyncio_client
from protocols.asyncio_client import BatchFailed, open_client
from protocols.connection import CallCancelled, CallReceived, Closed, ServerConnection
from protocols.errors import CallError, ConnectionClosed, FrameTooLarge, ProtocolError, Status
from protocols.frames import Call

from .conftest import self_signed_certificate

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
HAVE_UVLOOP = importlib.util.find_spec("uvloop") is not None


def go(fn: Callable[[], Awaitable[Any]], *, timeout: float = 30.0, runner: Callable[[Any], Any] = asyncio_client.run) -> Any:
    """Run ``fn()`` on a fresh loop, bounded by ``timeout``; fail on anything asyncio reports
    as lost (a task exception never retrieved, a callback that raised)."""
    reported: list[dict[str, Any]] = []

    async def main() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: reported.append(context))
        async with asyncio.timeout(timeout):
            result = await fn()
        gc.collect()
        await asyncio.sleep(0)
        return result

    result = runner(main())
    assert reported == []
    return result


# ---------------------------------------------------------------------------------------------
# round trips on a real server


@pytest.mark.parametrize("runner", [asyncio_client.run, asyncio.run], ids=["run", "asyncio.run"])
def test_health_profile_round_trip_and_ping(server_process, runner):
    async def main():
        async with open_client(server_process.address) as client:
            assert client.welcome.server.startswith("pigeon/")
            health = await client.call(api.GetHealth())
            assert isinstance(health, api.Health)
            assert health.status == "serving" and health.protocol == 1
            created = await client.call(api.UpsertProfile(identity="crm:42", attributes={"name": "Ana", "age": 31}))
            assert created.identities == ["crm:42"]
            fetched = await client.call(api.GetProfile(identity="crm:42"), timeout=5)
            assert fetched.attributes == {"name": "Ana", "age": 31}
            assert fetched.created == created.created
            rtt = await client.ping()
            assert 0 < rtt < 5

    go(main, runner=runner)


def test_many_concurrent_calls_are_pipelined_on_one_connection(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            upserts = await asyncio.gather(
                *(client.call(api.UpsertProfile(identity=f"crm:{i}", attributes={"i": i})) for i in range(200))
            )
            assert [p.identities for p in upserts] == [[f"crm:{i}"] for i in range(200)]
            # Reads and writes interleaved: each answer must belong to its own call.
            mixed = await asyncio.gather(
                *(
                    client.call(api.GetProfile(identity=f"crm:{i}"))
                    if i % 2
                    else client.call(api.UpsertProfile(identity=f"crm:{i}", attributes={"i": i, "even": True}))
                    for i in range(200)
                )
            )
            for i, profile in enumerate(mixed):
                assert profile.identities == [f"crm:{i}"]
                assert profile.attributes == ({"i": i} if i % 2 else {"i": i, "even": True})
            stats = await client.call(api.GetStats())
            assert stats.connections.accepted == 1 and stats.connections.open == 1
            assert stats.methods["profiles.upsert"].calls == 300
            assert stats.methods["profiles.get"].calls == 100

    go(main)


def test_stream_lists_events_in_order_and_early_exit_keeps_the_connection_usable(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            base = dt.datetime.now(dt.timezone.utc).replace(microsecond=0) - dt.timedelta(hours=1)
            events = [
                api.Event(identity="crm:7", type="page.view", ts=base + dt.timedelta(seconds=i), data={"n": i})
                for i in range(300)
            ]
            result = await client.call(api.IngestEvents(events=events))
            assert result.accepted == 300 and result.rejected == []

            async with client.stream(api.ListEvents(identity="crm:7", limit=1000)) as items:
                listed = [item async for item in items]
            assert [e.data["n"] for e in listed] == list(range(300))
            assert [e.ts for e in listed] == [e.ts for e in events]
            assert all(isinstance(e, api.StoredEvent) and e.type == "page.view" for e in listed)
            assert [e.seq for e in listed] == sorted(e.seq for e in listed)

            async with client.stream(api.ListEvents(identity="crm:7", limit=5, reverse=True)) as items:
                newest = [item.data["n"] async for item in items]
            assert newest == [299, 298, 297, 296, 295]

            first = []
            async with client.stream(api.ListEvents(identity="crm:7", limit=1000)) as items:
                async for item in items:
                    first.append(item.data["n"])
                    if len(first) == 3:
                        break
            assert first == [0, 1, 2]
            # the abandoned stream keeps its slot, as a stand-in, until the server confirms the
            # cancel; its late items are dropped
            assert [type(s).__name__ for s in client._pending.values()] == ["Abandoned"]
            assert (await client.call(api.GetProfile(identity="crm:7"))).identities == ["crm:7"]
            async with asyncio.timeout(5):
                while client._pending:
                    await asyncio.sleep(0.01)
            async with client.stream(api.ListEvents(identity="crm:7", limit=1000)) as items:
                assert len([item async for item in items]) == 300

    go(main)


def test_server_errors_surface_as_call_errors(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            with pytest.raises(CallError) as missing:
                await client.call(api.GetProfile(identity="crm:missing"))
            assert missing.value.status is Status.NOT_FOUND
            assert missing.value.field == "$.identity"
            assert "crm:missing" in missing.value.message

            # Requests are encoded without validation, so the server is the one to refuse these.
            with pytest.raises(CallError) as invalid:
                await client.call(api.UpsertProfile(identity="nope"))
            assert invalid.value.status is Status.INVALID_ARGUMENT
            assert invalid.value.field == "$.identity"

            async with client.stream(api.ListEvents(identity="NOPE")) as items:
                with pytest.raises(CallError) as bad_stream:
                    await anext(items)
                with pytest.raises(StopAsyncIteration):
                    await anext(items)
            assert bad_stream.value.status is Status.INVALID_ARGUMENT
            assert bad_stream.value.field == "$.identity"

            assert (await client.call(api.GetHealth())).status == "serving"

    go(main)


def test_timeout_raises_timeout_error_and_the_connection_survives(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            server_process.signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(TimeoutError):
                    await client.call(api.GetHealth(), timeout=0.3)
                assert 0.25 < time.monotonic() - started < 5
                with pytest.raises(TimeoutError):
                    await client.call(api.GetHealth(), timeout=0)
                # abandoned calls keep their slots until the (stopped) server answers the cancel
                assert {type(s).__name__ for s in client._pending.values()} == {"Abandoned"}
            finally:
                server_process.signal(signal.SIGCONT)
            assert (await client.call(api.GetHealth(), timeout=10)).status == "serving"
            async with asyncio.timeout(5):
                while client._pending:
                    await asyncio.sleep(0.01)

    go(main)


def test_cancelled_call_is_forgotten_and_connection_survives(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            server_process.signal(signal.SIGSTOP)
            try:
                task = asyncio.create_task(client.call(api.GetHealth()))
                await asyncio.sleep(0.05)
                assert not task.done() and len(client._pending) == 1
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                assert [type(s).__name__ for s in client._pending.values()] == ["Abandoned"]
            finally:
                server_process.signal(signal.SIGCONT)
            assert (await client.call(api.GetHealth())).status == "serving"
            async with asyncio.timeout(5):
                while client._pending:  # the server's CANCELLED answer freed the slot
                    await asyncio.sleep(0.01)

    go(main)


# ---------------------------------------------------------------------------------------------
# event batcher


def test_event_batcher_ingests_and_reports_rejections(server_process):
    bad = {17: "nope", 1234: "bad type!", 2500: "nope", 4999: "x y"}

    async def main():
        async with open_client(server_process.address) as client:
            sent = []
            async with client.event_batcher(batch_size=500, max_in_flight=4) as batcher:
                for i in range(5000):
                    if bad.get(i) == "nope":
                        event = api.Event(identity="nope", type="app.open", data={"i": i})
                    elif i in bad:
                        event = api.Event(identity=f"crm:{i % 50}", type=bad[i], data={"i": i})
                    else:
                        event = api.Event(identity=f"crm:{i % 50}", type="app.open", data={"i": i})
                    sent.append(event)
                    await batcher.add(event)
            assert batcher.accepted == 5000 - len(bad)
            assert batcher.failed == []
            assert sorted(event.data["i"] for event, _ in batcher.rejected) == sorted(bad)
            for event, rejection in batcher.rejected:
                # the event as sent: the one added, with the id the batcher gave it
                assert event.id and event == msgspec.structs.replace(sent[event.data["i"]], id=event.id)
                assert rejection.code == "INVALID_ARGUMENT"
                assert rejection.field is not None
                assert rejection.field.endswith(".identity" if bad[event.data["i"]] == "nope" else ".type")
            stats = await client.call(api.GetStats())
            assert stats.store.events == 5000 - len(bad)

            # A partial batch goes out after `linger`, without leaving the block.
            async with client.event_batcher(batch_size=100, linger=0.01) as batcher:
                await batcher.add(api.Event(identity="crm:1", type="late"))
                for _ in range(200):
                    if batcher.accepted:
                        break
                    await asyncio.sleep(0.01)
                assert batcher.accepted == 1

    go(main)


def test_event_batcher_reports_failed_batches_when_the_server_dies(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            events = [api.Event(identity="crm:1", type="a", data={"i": i}) for i in range(30)]
            with pytest.raises(BatchFailed) as failed:
                async with client.event_batcher(batch_size=10) as batcher:
                    await batcher.add(events[0])
                    await batcher.flush()
                    assert batcher.accepted == 1
                    server_process.signal(signal.SIGSTOP)
                    for event in events[1:]:
                        await batcher.add(event)
                    await asyncio.sleep(0.05)
                    await asyncio.to_thread(server_process.kill)
            assert isinstance(failed.value.error, ConnectionClosed)
            assert batcher.accepted == 1
            lost = sorted(e.data["i"] for f in batcher.failed for e in f.events)
            assert lost == list(range(1, 30))
            assert failed.value is batcher.failed[0]

    go(main)


# ---------------------------------------------------------------------------------------------
# limits and failures


def test_frame_too_large_is_raised_locally(spawn_server):
    server = spawn_server(env={"PIGEON_MAX_FRAME": "2048"})

    async def main():
        async with open_client(server.address) as client:
            assert client.welcome.max_frame == 2048
            with pytest.raises(FrameTooLarge) as too_large:
                await client.call(api.UpsertProfile(identity="crm:1", attributes={"blob": "x" * 4000}))
            assert too_large.value.limit == 2048 and too_large.value.size > 2048
            assert client._pending == {}
            small = await client.call(api.UpsertProfile(identity="crm:1", attributes={"blob": "x" * 100}))
            assert small.attributes == {"blob": "x" * 100}
            stats = await client.call(api.GetStats())
            assert stats.methods["profiles.upsert"].calls == 1  # the big one never reached the server
            assert stats.connections.closed_by_protocol_error == 0

    go(main)


def test_answers_over_the_clients_max_frame_fail_the_call_only(server_process):
    async def main():
        async with open_client(server_process.address, max_frame=2048) as client:
            with pytest.raises(CallError) as too_big:
                await client.call(api.UpsertProfile(identity="crm:1", attributes={"blob": "x" * 3000}))
            assert too_big.value.status is Status.RESOURCE_EXHAUSTED
            assert (await client.call(api.GetHealth())).status == "serving"

    go(main)


def test_connection_loss_fails_pending_and_later_calls(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            server_process.signal(signal.SIGSTOP)
            call = asyncio.create_task(client.call(api.GetHealth()))
            ping = asyncio.create_task(client.ping())
            await asyncio.sleep(0.05)
            assert not call.done() and not ping.done()
            await asyncio.to_thread(server_process.kill)
            with pytest.raises(ConnectionClosed) as lost:
                await call
            assert lost.value.status is Status.UNAVAILABLE
            with pytest.raises(ConnectionClosed):
                await ping
            with pytest.raises(ConnectionClosed):
                await client.call(api.GetHealth())
            with pytest.raises(ConnectionClosed):
                async with client.stream(api.ListEvents(identity="crm:1")):
                    pass
            with pytest.raises(ConnectionClosed):
                await client.ping()

    go(main)


def test_connection_loss_during_a_stream_and_before_a_call(server_process):
    async def stream_then_die():
        async with open_client(server_process.address) as client:
            await client.call(
                api.IngestEvents(events=[api.Event(identity="crm:1", type="a", data={"i": i}) for i in range(100)])
            )
            server_process.signal(signal.SIGSTOP)
            async with client.stream(api.ListEvents(identity="crm:1")) as items:
                await asyncio.to_thread(server_process.kill)
                with pytest.raises(ConnectionClosed):
                    async for _ in items:
                        pass
        with pytest.raises(ConnectionRefusedError):
            async with open_client(server_process.address):
                pass

    go(stream_then_die)

    server_process.start()

    async def call_after_death():
        async with open_client(server_process.address) as client:
            await asyncio.to_thread(server_process.kill)
            with pytest.raises(ConnectionClosed):
                await client.call(api.GetHealth())

    go(call_after_death)


def test_goaway_on_shutdown_refuses_new_calls(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            assert (await client.call(api.GetHealth())).status == "serving"
            server_process.signal(signal.SIGTERM)
            for _ in range(500):
                try:
                    await client.call(api.GetHealth())
                except ConnectionClosed as exc:
                    assert exc.status is Status.UNAVAILABLE
                    assert "shutting down" in exc.message
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the client never saw the goaway")

    go(main)
    assert server_process.wait() == 0


def test_unix_socket_target(spawn_server, tmp_path):
    path = tmp_path / "p.sock"
    spawn_server("--listen", f"unix:{path}")

    async def main():
        async with open_client(f"unix:{path}") as client:
            assert (await client.call(api.GetHealth())).status == "serving"
            profile = await client.call(api.UpsertProfile(identity="crm:unix", attributes={"via": "unix"}))
            assert profile.attributes == {"via": "unix"}

    go(main)


def test_tls(spawn_server, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    server = spawn_server(env={"PIGEON_TLS_CERT": str(cert), "PIGEON_TLS_KEY": str(key)})
    trusted = ssl.create_default_context(cafile=str(cert))

    async def main():
        async with open_client(server.address, ssl_context=trusted) as client:
            assert (await client.call(api.GetHealth())).status == "serving"
        async with open_client(server.address, ssl_context=trusted, server_hostname="localhost") as client:
            assert await client.ping() > 0
        with pytest.raises(ssl.SSLCertVerificationError):
            async with open_client(server.address, ssl_context=ssl.create_default_context()):
                pass
        with pytest.raises(ssl.SSLCertVerificationError):
            async with open_client(server.address, ssl_context=trusted, server_hostname="elsewhere.example"):
                pass

    go(main)


# ---------------------------------------------------------------------------------------------
# run() and uvloop


def test_run_uses_uvloop_when_installed():
    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    module = asyncio_client.run(loop_module())
    if HAVE_UVLOOP:
        assert module.split(".")[0] == "uvloop"
    else:
        assert module.split(".")[0] == "asyncio"


def test_run_falls_back_to_asyncio_without_uvloop(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # makes `import uvloop` raise ImportError

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert asyncio_client.run(loop_module()).split(".")[0] == "asyncio"


# ---------------------------------------------------------------------------------------------
# against a scripted server


class FakeServer:
    """One-connection scripted server: records calls and cancels; the test decides the answers."""

    def __init__(self) -> None:
        self.calls: asyncio.Queue[Call] = asyncio.Queue()
        self.cancelled: asyncio.Queue[int] = asyncio.Queue()
        self.conn: ServerConnection | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> FakeServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        conn = self.conn = ServerConnection(server="fake/1")
        while True:
            try:
                data = await reader.read(65536)
            except OSError:
                return
            for event in conn.receive_data(data):
                if isinstance(event, CallReceived):
                    self.calls.put_nowait(event.call)
                elif isinstance(event, CallCancelled):
                    conn.send_error(event.id, Status.CANCELLED, "cancelled by the client")
                    self.cancelled.put_nowait(event.id)
                elif isinstance(event, Closed):
                    return
            self.flush()

    def flush(self) -> None:
        assert self.conn is not None
        data = self.conn.data_to_send()
        if data and not self._writers[-1].is_closing():
            self._writers[-1].write(data)

    async def next_call(self) -> tuple[Call, Any]:
        call = await self.calls.get()
        return call, msgspec.msgpack.decode(call.body, type=api.METHODS[call.method].request)


def _profile(identity: str) -> api.Profile:
    return api.Profile(identities=[identity], attributes={}, registrations=[], consent={}, created=NOW, updated=NOW)


def test_replies_out_of_order_reach_their_callers():
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            tasks = [asyncio.create_task(client.call(api.GetProfile(identity=f"crm:{i}"))) for i in range(10)]
            received = [await fake.next_call() for _ in range(10)]  # all in flight at once
            assert not any(t.done() for t in tasks)
            for call, request in reversed(received):
                fake.conn.send_reply(call.id, _profile(request.identity))
                fake.flush()
                await asyncio.sleep(0)
            results = await asyncio.gather(*tasks)
            assert [p.identities for p in results] == [[f"crm:{i}"] for i in range(10)]

    go(main)


def test_timeout_is_sent_to_the_server_and_expiry_sends_cancel():
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            with pytest.raises(TimeoutError):
                await client.call(api.GetHealth(), timeout=0.25)
            call, _ = await fake.next_call()
            assert 0 < call.timeout_ms <= 250  # what was left of the 0.25 s when the call was written
            assert await fake.cancelled.get() == call.id

            waiting = asyncio.create_task(client.call(api.GetHealth()))
            call, _ = await fake.next_call()
            assert call.timeout_ms is None
            waiting.cancel()
            assert await fake.cancelled.get() == call.id

            # A server-side deadline that expires first is reported as a timeout too.
            answer = asyncio.create_task(client.call(api.GetHealth(), timeout=5))
            call, _ = await fake.next_call()
            fake.conn.send_error(call.id, Status.DEADLINE_EXCEEDED, "deadline of 5000 ms exceeded")
            fake.flush()
            with pytest.raises(TimeoutError) as expired:
                await answer
            assert isinstance(expired.value.__cause__, CallError)

    go(main)


def test_leaving_a_stream_early_sends_cancel():
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            async with client.stream(api.ListEvents(identity="crm:1")) as items:
                call, request = await fake.next_call()
                assert request == api.ListEvents(identity="crm:1")
                for seq in range(1, 4):
                    fake.conn.send_item(call.id, api.StoredEvent(seq=seq, type="a", ts=NOW))
                fake.flush()
                assert (await anext(items)).seq == 1
                left_early = items
            assert await fake.cancelled.get() == call.id

            # A stream that ends normally sends no Cancel.
            async with client.stream(api.ListEvents(identity="crm:2")) as items:
                call, _ = await fake.next_call()
                fake.conn.send_item(call.id, api.StoredEvent(seq=9, type="b", ts=NOW))
                fake.conn.send_end(call.id)
                fake.flush()
                assert [e.seq async for e in items] == [9]
            await client.ping()  # a full round trip after the stream ended
            assert fake.cancelled.empty()
            with pytest.raises(StopAsyncIteration):
                await anext(items)
            with pytest.raises(RuntimeError):  # a stream left early, used after its block: no hang
                await anext(left_early)

    go(main)


def test_a_server_that_ignores_the_stream_window_is_a_protocol_error():
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            async with client.stream(api.ListEvents(identity="crm:1", limit=1000)) as items:
                call, _ = await fake.next_call()
                assert call.window == 64
                for seq in range(1, 201):  # no credit was granted beyond the first 64
                    fake.conn.send_item(call.id, api.StoredEvent(seq=seq, type="a", ts=NOW))
                fake.flush()
                seqs = []
                with pytest.raises(ProtocolError, match="more than the 64 stream items"):
                    async for item in items:
                        seqs.append(item.seq)
            assert seqs == list(range(1, 65))  # what the window allowed was delivered first
            with pytest.raises(ProtocolError):  # the connection is closed for the violation
                await client.call(api.GetHealth())

    go(main)


def test_an_answer_read_with_a_protocol_violation_still_reaches_its_caller():
    """BUG (found by tests/fuzz/fuzz_frames.py): a reply and a malformed frame in one read
    failed the replied call with the violation; read apart, the reply was delivered."""
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            answered = asyncio.create_task(client.call(api.GetProfile(identity="crm:1")))
            other = asyncio.create_task(client.call(api.GetProfile(identity="crm:2")))
            (first, request), _ = await fake.next_call(), await fake.next_call()
            fake.conn.send_reply(first.id, _profile(request.identity))
            fake._writers[-1].write(fake.conn.data_to_send() + b"\x00\x00\x00\x01\xc1")  # one write, one read
            assert (await answered).identities == ["crm:1"]
            with pytest.raises(ProtocolError, match="malformed frame from server"):
                await other

    go(main)


def test_a_slow_stream_consumer_does_not_hold_up_other_calls(server_process):
    async def main():
        async with open_client(server_process.address) as client:
            events = [api.Event(identity="crm:5", type="t", data={"n": i}) for i in range(1000)]
            assert (await client.call(api.IngestEvents(events=events))).accepted == 1000
            seen = 0
            async with client.stream(api.ListEvents(identity="crm:5", limit=1000)) as items:
                async for item in items:
                    assert item.data["n"] == seen
                    seen += 1
                    if seen % 100 == 0:
                        # a call on the same client while the stream has far more than a
                        # window of items still to come: it must be answered promptly
                        async with asyncio.timeout(5):
                            assert (await client.call(api.GetHealth())).status == "serving"
                    assert len(items._sink.items) <= 64
            assert seen == 1000

    go(main)


def test_goaway_fails_new_calls_and_lets_open_ones_finish():
    async def main():
        async with FakeServer() as fake, open_client(fake.address) as client:
            first = asyncio.create_task(client.call(api.GetProfile(identity="crm:1")))
            call, _ = await fake.next_call()
            fake.conn.send_goaway(Status.UNAVAILABLE, "maintenance")
            fake.flush()
            for _ in range(200):
                if client._conn.goaway is not None:
                    break
                await asyncio.sleep(0.005)
            with pytest.raises(ConnectionClosed) as refused:
                await client.call(api.GetHealth())
            assert refused.value.message == "maintenance"
            assert refused.value.status is Status.UNAVAILABLE
            fake.conn.send_reply(call.id, _profile("crm:1"))
            fake.flush()
            assert (await first).identities == ["crm:1"]

    go(main)


def test_leaving_a_stream_block_at_once_frees_its_slot(spawn_server):
    server = spawn_server(env={"PIGEON_MAX_CALLS": "3"})

    async def main() -> None:
        async with asyncio.timeout(20), open_client(server.address) as client:
            await client.call(api.IngestEvents(events=[api.Event(identity="crm:1", type="t")] * 300))
            for _ in range(10):  # the call and its cancel go out in one write
                async with client.stream(api.ListEvents(identity="crm:1", limit=300)):
                    pass
            assert (await client.call(api.GetHealth())).status == "serving"
            while client._pending:
                await asyncio.sleep(0.01)

    go(main)
