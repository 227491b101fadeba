"""The HTTP/2 client pool: its HPACK encoder, and its bookkeeping against a real HTTP/2 server
(the mock APNs, which answers any request; provider-level behaviour is in test_apns.py)."""

from __future__ import annotations

import json

import hpack
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from plugins.apns.mock import MockApnsProcess
from server._http2 import H2Pool, H2Response, _StatelessHpack

names = st.sampled_from([b":method", b":path", b":authority", b"authorization", b"apns-topic", b"x-custom", b"accept"])
values = st.binary(min_size=0, max_size=300).filter(lambda v: b"\n" not in v)


@given(st.lists(st.lists(st.tuples(names, values, st.booleans()), max_size=12), min_size=1, max_size=5))
def test_stateless_hpack_decodes_to_the_same_fields(blocks):
    encoder, decoder = _StatelessHpack(), hpack.Decoder()
    for block in blocks:
        fields = [hpack.NeverIndexedHeaderTuple(n, v) if secret else (n, v) for n, v, secret in block]
        decoded = decoder.decode(encoder.encode(fields), raw=True)
        assert [tuple(f) for f in decoded] == [(n, v) for n, v, _ in block]
        assert [isinstance(f, hpack.NeverIndexedHeaderTuple) for f in decoded] == [secret for _, _, secret in block]
        assert len(decoder.header_table.dynamic_entries) == 0  # nothing was ever indexed
    assert decoder.header_table.maxsize == 0  # the first block set the table size to 0


def test_stateless_hpack_uses_the_static_table_and_caches_repeated_fields():
    encoder = _StatelessHpack()
    first = encoder.encode([(b":method", b"POST"), (b":scheme", b"https")])
    assert first == b"\x20\x83\x87"  # size update 0, then static entries 3 and 7
    assert encoder.encode([(b":method", b"POST")]) == b"\x83"
    encoder.encode([(b"apns-topic", b"com.acme.app"), (b":path", b"/3/device/" + b"a" * 64)])
    assert (b"apns-topic", b"com.acme.app", False) in encoder._cache
    assert not any(name == b":path" for name, _, _ in encoder._cache)  # device paths do not repeat


@pytest.fixture(scope="module")
def h2_server(tmp_path_factory):
    with MockApnsProcess(tmp_path_factory.mktemp("h2")) as mock:
        yield mock


def request(path: bytes, authority: bytes) -> list[tuple[bytes, bytes]]:
    return [(b":method", b"POST"), (b":scheme", b"https"), (b":path", path), (b":authority", authority)]


async def test_many_requests_each_answered_once_and_h2_forgets_finished_streams(h2_server):
    pool = H2Pool(h2_server.host, h2_server.port, ssl_context=h2_server.ssl_context(), max_connections=2,
                  streams_per_connection=20, stateless_hpack=True)
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
            # h2 keeps a record per stream until told it is done: bounded, not 500.
            assert len(connection.h2.streams) <= 64 + 20
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
