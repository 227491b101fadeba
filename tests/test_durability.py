"""Acknowledged writes survive ``kill -9`` of the server at any moment."""

from __future__ import annotations

import random
import signal
import zlib
from collections import defaultdict

import trio

from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import open_client

IDENTITIES = [f"crm:{i}" for i in range(7)]
BATCH = 100


def _checksum(batch: int, i: int) -> int:
    return zlib.crc32(f"{batch}/{i}".encode())


def _batch_events(batch: int) -> list[api.Event]:
    return [
        api.Event(
            identity=IDENTITIES[(batch + i) % len(IDENTITIES)],
            type="test.durable",
            data={"batch": batch, "i": i, "check": _checksum(batch, i), "pad": "p" * 50},
        )
        for i in range(BATCH)
    ]


async def _ingest_until_killed(address: str, proc, first_batch: int, kill_after: int) -> set[int]:
    """Ingest batches from 4 concurrent writers; SIGKILL the server after ``kill_after`` acks."""
    acked: set[int] = set()
    next_batch = [first_batch]
    killed = trio.Event()

    async with open_client(address) as client:

        async def writer() -> None:
            while not killed.is_set():
                batch = next_batch[0]
                next_batch[0] += 1
                try:
                    result = await client.call(api.IngestEvents(events=_batch_events(batch)))
                except PigeonProtocolError:
                    return
                assert result.accepted == BATCH
                acked.add(batch)
                if len(acked) >= kill_after and not killed.is_set():
                    proc.signal(signal.SIGKILL)
                    killed.set()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(writer)
    return acked


async def _read_all(address: str) -> dict[int, list[dict]]:
    found: dict[int, list[dict]] = defaultdict(list)
    async with open_client(address) as client:
        for identity in IDENTITIES:
            async with client.stream(api.ListEvents(identity=identity, limit=1_000_000)) as events:
                async for event in events:
                    found[event.data["batch"]].append(event.data)
    return found


def test_acknowledged_events_survive_kill_9_at_any_moment(spawn_server):
    rng = random.Random(7)
    proc = spawn_server()
    acked_total: set[int] = set()
    first = 0
    for _ in range(3):
        acked = trio.run(_ingest_until_killed, proc.address, proc, first, rng.randint(5, 60))
        assert proc.wait(10) == -signal.SIGKILL
        acked_total |= acked
        first += 10_000
        proc.start()  # same data folder
        found = trio.run(_read_all, proc.address)

        missing = acked_total - found.keys()
        assert not missing, f"acknowledged batches lost: {sorted(missing)[:10]}"
        for batch, events in found.items():
            # a batch is one transaction: all of it or none of it, each event intact, no duplicates
            assert sorted(e["i"] for e in events) == list(range(BATCH)), f"batch {batch} is partial"
            assert all(e["check"] == _checksum(batch, e["i"]) for e in events)
    assert len(acked_total) >= 15
    assert proc.stop() == 0
