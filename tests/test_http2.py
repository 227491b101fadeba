"""The HTTP/2 client pool's bookkeeping against a real HTTP/2 server (the mock APNs, which
answers any request; provider-level behaviour is in test_apns.py, the codec's in
test_h2client.py)."""

from __future__ import annotations

import json

import pytest
import trio

from plugins.apns.mock import MockApnsProcess
from server.delivery.http2 import H2Pool, H2Response


@pytest.fixture(scope="module")
def h2_server(tmp_path_factory):
    with MockApnsProcess(tmp_path_factory.mktemp("h2")) as mock:
        yield mock


def request(path: bytes, authority: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":path", path), (b":authority", authority)]


async def test_many_requests_each_answered_once_and_finished_streams_are_forgotten(h2_server):
    pool = H2Pool(h2_server.host, h2_server.port, ssl_context=h2_server.ssl_context(), max_connections=2,
                  streams_per_connection=20)
    answers: dict[int, list[object]] = {}
    authority = h2_server.address.encode()
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        for i in range(500):
            while not pool.try_submit(request(b"/3/device/" + b"%064x" % i, authority), b"{}",
                                      lambda outcome, i=i: answers.setdefault(i, []).append(outcome)):
                pool.flush()
                await pool.wait_capacity()
        pool.flush()
        with trio.fail_after(20):
            while len(answers) < 500:
                await trio.sleep(0.01)
        connections = list(pool._connections)
        assert 1 <= len(connections) <= 2
        for connection in connections:
            # The codec keeps a record per open stream only: bounded, not 500.
            assert len(connection.h2.streams) <= 20
        nursery.cancel_scope.cancel()
    assert all(len(a) == 1 and isinstance(a[0], H2Response) for a in answers.values())
    # Not a valid APNs request (no topic): APNs's answer, through the pool.
    assert {(a[0].status, json.loads(a[0].body)["reason"]) for a in answers.values()} == {(400, "MissingTopic")}
    stats = pool.statistics()
    assert (stats.submitted, stats.completed) == (500, 500)


async def test_a_server_that_is_not_listening_is_a_connection_error():
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import ssl

    pool = H2Pool("127.0.0.1", port, ssl_context=ssl.create_default_context())
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)
        with pytest.raises(Exception, match=f"cannot connect to 127.0.0.1:{port}"):
            await pool.wait_capacity()
        nursery.cancel_scope.cancel()
    assert pool.connect_failures == 1
