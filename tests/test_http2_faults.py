"""Servers that misbehave: the pool and the APNs sender settle every request anyway, without
hot loops (`tests.h2_fake.FakeH2Server`, a scripted HTTP/2 server on memory streams, plays
the faults the mock providers do not offer)."""

from __future__ import annotations

import ssl
import struct
import types
from datetime import UTC, datetime

import h2.errors
import pytest
import trio
import trio.testing

from plugins.apns import ApnsChannel
from plugins.apns._credentials import check_ios
from plugins.apns._payload import build_request
from plugins.apns._sender import ApnsSender
from plugins.apns.mock import SigningKey
from protocols import api
from server.delivery.http2 import ConnectionLost, H2Pool, H2Response
from server.channels import AppRecord, DeliveryJob

from .h2_fake import FakeH2Server
from .test_h2client import frame

KEY = SigningKey.generate()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TOKEN = "ab" * 32


def app_record(version: int = 1) -> AppRecord:
    ios = check_ios(api.RegisterIosApp(
        app="com.acme.app", environment="sandbox",
        auth=api.ApnsTokenAuth(key_pem=KEY.private_key_pem, key_id=KEY.key_id, team_id=KEY.team_id),
    ))
    return AppRecord(app="com.acme.app", ios=ios, version=version)


def request(**options):
    return build_request(bundle_id="com.acme.app", options=api.ApnsOptions(**options), content=api.PushContent(title="hi"))


def sender_for(fake: FakeH2Server, **kwargs) -> ApnsSender:
    sender = ApnsSender(app_record(), "sandbox", host="fake", port=443, **kwargs)
    fake.plug(sender.pool)
    return sender


def pool_for(fake: FakeH2Server, **kwargs) -> H2Pool:
    return fake.plug(H2Pool("fake", 443, ssl_context=ssl.create_default_context(), **kwargs))


HEADERS = [(b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/3/device/ab"), (b":authority", b"fake")]


async def test_a_goaway_before_any_answer_backs_off_instead_of_reconnecting_at_once():
    def goaway(conn):
        conn.close_connection(error_code=0, additional_data=b'{"reason":"BadCertificateEnvironment"}', last_stream_id=0)
        return "read-then-close"

    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_connect=goaway)
        sender = sender_for(fake, retry_window=1.5, backoff_min=0.05)
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [once] = await sender.send([(request(expiration=EPOCH), TOKEN)])  # one attempt only
            [result] = await sender.send([(request(), TOKEN)])  # retried for 1.5 s
        nursery.cancel_scope.cancel()
    assert (once.status, once.reason, once.attempts) == ("failed", "ConnectionFailed", 1)
    assert (result.status, result.reason) == ("failed", "ConnectionFailed")
    assert "GOAWAY before any answer" in result.detail and "BadCertificateEnvironment" in result.detail
    # Backing off from 0.1 s, doubling: a handful of connections, not thousands.
    assert 2 <= sender.pool.connect_failures == fake.connections <= 12


async def test_streams_refused_again_and_again_count_as_attempts():
    refuse = lambda server, conn, sid: conn.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)  # noqa: E731
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_request=refuse)
        sender = sender_for(fake, max_attempts=2, backoff_min=0.01)
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [result] = await sender.send([(request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert (result.status, result.reason) == ("failed", "StreamRefused")
    assert fake.requests <= 10  # three free refusals, then counted attempts with backoff


async def test_a_server_closing_right_after_its_settings_fails_the_connect_and_the_sender_lives_on():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_connect=lambda conn: "close")
        sender = sender_for(fake, retry_window=1.0, backoff_min=0.05)
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [result] = await sender.send([(request(), TOKEN)])
        assert result.status == "failed" and result.reason in ("ConnectionFailed", "ConnectionLost")
        fake.on_connect = None  # the server recovers: the same sender delivers once its backoff ends
        await trio.sleep_until(sender.pool.reconnect_at)
        with trio.fail_after(10):
            [again] = await sender.send([(request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert again.status == "sent"


async def test_a_connection_out_of_stream_ids_hands_over_to_a_new_one():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery)
        sender = sender_for(fake)
        await nursery.start(sender.run)
        assert (await sender.send([(request(), TOKEN)]))[0].status == "sent"
        [connection] = sender.pool._connections
        connection.h2.next_stream_id = 2**31 - 1  # as after 2**30 requests: the last id
        with trio.fail_after(10):
            results = await sender.send([(request(), TOKEN), (request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert [r.status for r in results] == ["sent", "sent"]
    assert fake.connections == 2


async def test_a_connection_that_failed_takes_no_submission():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery)
        pool = pool_for(fake)
        await nursery.start(pool.run)
        await pool.wait_capacity()
        [connection] = pool._connections
        await trio.testing.wait_all_tasks_blocked()
        await fake.last_stream.send_all(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # DATA on stream 0: PROTOCOL_ERROR
        with trio.fail_after(5):
            while not connection.h2.closed:
                await trio.lowlevel.checkpoint()
        # Between the codec closing and the connection's task ending, it must not take requests.
        assert pool.try_submit(HEADERS, b"{}", lambda outcome: None) is False
        nursery.cancel_scope.cancel()


async def test_a_request_never_answered_fails_after_the_request_timeout():
    outcomes = []
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_request=lambda server, conn, sid: None)
        pool = pool_for(fake, request_timeout=0.4)
        await nursery.start(pool.run)
        await pool.wait_capacity()
        assert pool.try_submit(HEADERS, b"{}", outcomes.append)
        pool.flush()
        with trio.fail_after(5):
            while not outcomes:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    [outcome] = outcomes
    assert isinstance(outcome, ConnectionLost) and "within 0.4s" in str(outcome)
    assert pool.timeouts == 1


async def test_a_sender_retired_while_a_send_waits_for_room_still_answers_it():
    held: list[tuple[object, int]] = []
    release = trio.Event()

    def hold_two(server, conn, sid):
        if len(held) < 2:
            held.append((conn, sid))
        else:
            server.ok(conn, sid)

    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_request=hold_two)
        sender = sender_for(fake, max_queue=2)
        stopped = trio.Event()

        async def run() -> None:
            await sender.run()
            stopped.set()

        nursery.start_soon(run)
        results = []

        async def call() -> None:
            results.extend(await sender.send([(request(), "ab" * 32), (request(), "cd" * 32), (request(), "ef" * 32)]))

        async def answer_when_released() -> None:
            await release.wait()
            for conn, sid in held:
                fake.ok(conn, sid)
            await fake.last_stream.send_all(held[0][0].data_to_send())  # both answers in one write

        nursery.start_soon(call)
        nursery.start_soon(answer_when_released)
        with trio.fail_after(5):
            while len(held) < 2:
                await trio.sleep(0.01)
        assert sender.held == 2 and sender._sending == 1  # the third waits for room
        sender.retire()  # apps.register_ios for this app
        release.set()
        with trio.fail_after(10):
            await stopped.wait()
        nursery.cancel_scope.cancel()
    assert [r.status for r in results] == ["sent"] * 3


async def test_a_stopped_sender_settles_what_it_held():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, on_request=lambda server, conn, sid: None)  # never answers
        sender = sender_for(fake)
        cancel = trio.CancelScope()

        async def run() -> None:
            with cancel:
                await sender.run()

        nursery.start_soon(run)
        results = []

        async def call() -> None:
            results.extend(await sender.send([(request(), TOKEN)] * 3))

        nursery.start_soon(call)
        await trio.sleep(0.2)
        cancel.cancel()  # the sender dies (a bug, a shutdown)
        with trio.fail_after(5):
            while not results:
                await trio.sleep(0.01)
        late = await sender.send([(request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert [r.reason for r in results] == ["SenderStopped"] * 3
    assert late[0].reason == "SenderStopped"


async def test_jobs_carrying_older_credentials_do_not_bring_them_back(monkeypatch):
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery)
        monkeypatch.setattr(H2Pool, "connect", lambda self: fake.connect())
        endpoint = types.SimpleNamespace(address="fake:443", ca_file=None)
        channel = ApnsChannel(types.SimpleNamespace(
            production=endpoint, sandbox=endpoint, max_connections=1, streams_per_connection=10, max_queue=100,
            request_timeout_s=30.0, breaker=False,
        ))
        await nursery.start(channel.run)
        v1, v2 = app_record(version=1), app_record(version=2)

        def job(app: AppRecord) -> DeliveryJob:
            return DeliveryJob(app=app, token=TOKEN, platform="apns-sandbox", content=api.PushContent(title="x"))

        assert (await channel.send([job(v1)]))[0].status == "sent"
        channel.forget_app("com.acme.app", 2)  # apps.register_ios stored version 2
        outcomes = [(await channel.send([job(app)]))[0] for app in (v2, v1, v2)]
        channel.forget_app("com.acme.app", None)  # apps.delete
        [deleted] = await channel.send([job(v2)])
        live = sorted(key[1] for key in channel._senders.running)
        nursery.cancel_scope.cancel()
    assert [o.status for o in outcomes] == ["sent", "failed", "sent"]
    assert outcomes[1].reason == "CredentialsReplaced"
    assert deleted.reason == "CredentialsReplaced" and live == []
    assert fake.connections == 2  # version 1's pool, then version 2's


def test_h2response_repr_shows_no_body():
    assert repr(H2Response(200, {}, b"secret")) == "<H2Response 200 6 bytes>"


async def test_queued_notifications_fail_when_the_server_allows_no_stream():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery, max_streams=0)
        sender = sender_for(fake, max_connections=1)
        sender.pool.request_timeout = 0.5
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [result] = await sender.send([(request(expiration=EPOCH), TOKEN)])
        nursery.cancel_scope.cancel()
    assert (result.status, result.reason, result.attempts) == ("failed", "NotSent", 0)
    assert "no stream to fake:443 was free" in result.detail


async def test_a_connect_slower_than_a_second_still_succeeds():
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery)
        sender = sender_for(fake)
        connect = fake.connect

        async def slow_connect():
            await trio.sleep(1.5)  # a lost SYN, a distant TLS handshake
            return await connect()

        sender.pool.connect = slow_connect  # type: ignore[method-assign]
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [result] = await sender.send([(request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert result.status == "sent" and fake.connections == 1


async def test_a_bug_reading_an_answer_fails_that_notification_instead_of_stranding_it(monkeypatch):
    async with trio.open_nursery() as nursery:
        fake = FakeH2Server(nursery)
        sender = sender_for(fake)

        def broken(job, outcome):
            raise ValueError("cannot read this")

        monkeypatch.setattr(sender, "_response", broken)
        await nursery.start(sender.run)
        with trio.fail_after(10):
            [result] = await sender.send([(request(), TOKEN)])
        nursery.cancel_scope.cancel()
    assert (result.status, result.reason, result.status_code) == ("failed", "InternalError", 200)
    assert "cannot read this" in result.detail and sender.held == 0


class _Scripted(trio.abc.Stream):
    """A server's side of a connection, scripted by a subclass's `receive_some` (and
    `send_all`): for what neither the mocks nor `FakeH2Server` do."""

    async def send_all(self, data) -> None:
        pass

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def receive_some(self, max_bytes=None) -> bytes:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def pool_on(stream: _Scripted, **kwargs) -> H2Pool:
    """A pool whose every connection is ``stream``."""
    pool = H2Pool("x", 443, ssl_context=ssl.create_default_context(), **kwargs)

    async def connect():
        return stream

    pool.connect = connect  # type: ignore[method-assign]
    return pool


class _SentAwayAtOnce(_Scripted):
    """SETTINGS and a GOAWAY(NO_ERROR, last stream 0) in one read; then silence, the TCP connection left open."""

    def __init__(self) -> None:
        self.reads = 0

    async def receive_some(self, max_bytes=None) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return frame(4, 0, 0, b"") + frame(7, 0, 0, struct.pack(">LL", 0, 0))
        await trio.sleep_forever()


# APNs answers a refused certificate with SETTINGS and a GOAWAY, often in one read.
async def test_a_connection_sent_away_during_its_handshake_fails_the_connect_and_holds_no_place():
    pool = pool_on(_SentAwayAtOnce(), max_connections=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with trio.fail_after(5):
            with pytest.raises(ConnectionLost, match="cannot connect to x:443: GOAWAY before any answer"):
                await pool.wait_capacity()
        assert pool._connections == [] and pool.connect_failures == 1 and pool.goaways == 1
        nursery.cancel_scope.cancel()


class _DeafPingFlooder(_Scripted):
    """SETTINGS, then PINGs as fast as it can; reads nothing after the handshake."""

    def __init__(self) -> None:
        self.writes = 0
        self.reads = 0

    async def send_all(self, data) -> None:
        self.writes += 1
        if self.writes > 2:  # the preface and the SETTINGS ack go; then the TCP window is full
            await trio.sleep_forever()

    async def receive_some(self, max_bytes=None) -> bytes:
        self.reads += 1
        await trio.sleep(0)
        if self.reads == 1:
            return frame(4, 0, 0, b"")
        if self.reads > 100:
            await trio.sleep_forever()
        return frame(6, 0, 0, b"12345678") * 3800  # ~64 KB of PINGs


async def test_a_server_that_floods_pings_and_reads_nothing_is_left():
    server = _DeafPingFlooder()
    pool = pool_on(server)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_capacity()
        [connection] = pool._connections
        with trio.fail_after(5):
            while pool._connections:
                assert connection._outbox_size <= (1 << 20) + 65536 * 2  # the bound, and one read's answers
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert server.reads < 100  # left after ~1 MiB of acknowledgements it would not read


class _Recorder(_Scripted):
    """SETTINGS, then a malformed GOAWAY; records what we write."""

    def __init__(self) -> None:
        self.written = b""
        self.reads = 0

    async def send_all(self, data) -> None:
        self.written += data

    async def receive_some(self, max_bytes=None) -> bytes:
        self.reads += 1
        if self.reads == 1:
            return frame(4, 0, 0, b"")
        if self.reads == 2:
            await trio.sleep(0.1)
            return frame(7, 0, 0, b"\x00")  # a malformed GOAWAY: our PROTOCOL_ERROR
        await trio.sleep_forever()


async def test_a_protocol_error_is_told_to_the_server():
    server = _Recorder()
    pool = pool_on(server)
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        await pool.wait_capacity()
        await trio.sleep(0.3)
        nursery.cancel_scope.cancel()
    wire = server.written[24:]  # after the preface's magic
    codes, pos = [], 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        if wire[pos + 3] == 7:  # GOAWAY
            codes.append(struct.unpack(">L", wire[pos + 13:pos + 17])[0])
        pos += 9 + length
    assert codes == [1]  # PROTOCOL_ERROR
