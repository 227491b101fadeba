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
            data={"batch": batch, "i": i, "check": _checksum(batch, i), "pad": "p" * 150},
        )
        for i in range(BATCH)
    ]


TOKENS = [f"tok-{i}" for i in range(20)]


async def _ingest_until_killed(address: str, proc, first_batch: int, kill_after: int, book: dict) -> set[int]:
    """Ingest batches from 4 concurrent writers while a fifth moves tokens between profiles
    and patches counters; SIGKILL the server after ``kill_after`` acknowledged batches."""
    acked: set[int] = set()
    next_batch = [first_batch]
    killed = trio.Event()

    async with open_client(address) as client:

        async def profile_writer() -> None:
            k = 0
            while not killed.is_set():
                k += 1
                identity = IDENTITIES[k % len(IDENTITIES)]
                token = TOKENS[k % len(TOKENS)]
                try:
                    await client.call(api.RegisterToken(identity=identity, app="com.acme.app", platform="fcm", token=token))
                    book["tokens"].add(token)
                    counter = book["counters"].get(identity, 0) + 1
                    await client.call(api.PatchProfile(identity=identity, patch={"counter": counter}))
                    book["counters"][identity] = counter
                except PigeonProtocolError:
                    return

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
                nursery.start_soon(profile_writer)
    return acked


async def _read_all(address: str) -> tuple[dict[int, list[dict]], dict[str, api.Profile]]:
    found: dict[int, list[dict]] = defaultdict(list)
    profiles = {}
    async with open_client(address) as client:
        for identity in IDENTITIES:
            profiles[identity] = await client.call(api.GetProfile(identity=identity))
            async with client.stream(api.ListEvents(identity=identity, limit=1_000_000)) as events:
                async for event in events:
                    found[event.data["batch"]].append(event.data)
    return found, profiles


def test_acknowledged_writes_survive_kill_9_at_any_moment(spawn_server):
    rng = random.Random(7)
    # a 1 MiB map: it grows while the server is being killed
    proc = spawn_server(env={"PIGEON_STORE__MAP_SIZE_MB": "1"})
    acked_total: set[int] = set()
    book: dict = {"tokens": set(), "counters": {}}
    first = 0
    for _ in range(3):
        acked = trio.run(_ingest_until_killed, proc.address, proc, first, rng.randint(5, 60), book)
        assert proc.wait(10) == -signal.SIGKILL
        acked_total |= acked
        first += 10_000
        proc.start()  # same data folder
        found, profiles = trio.run(_read_all, proc.address)

        # profiles: every acknowledged token is on exactly one profile; counters never go back
        owners: dict[str, list[str]] = defaultdict(list)
        for identity, profile in profiles.items():
            for registration in profile.registrations:
                owners[registration.token].append(identity)
            assert profile.attributes.get("counter", 0) >= book["counters"].get(identity, 0)
        assert book["tokens"] <= owners.keys()
        assert all(len(o) == 1 for o in owners.values()), owners

        missing = acked_total - found.keys()
        assert not missing, f"acknowledged batches lost: {sorted(missing)[:10]}"
        for batch, events in found.items():
            # a batch is one transaction: all of it or none of it, each event intact, no duplicates
            assert sorted(e["i"] for e in events) == list(range(BATCH)), f"batch {batch} is partial"
            assert all(e["check"] == _checksum(batch, e["i"]) for e in events)
    assert len(acked_total) >= 15 and len(book["tokens"]) >= 3

    async def map_size() -> int:
        async with open_client(proc.address) as client:
            return (await client.call(api.GetStats())).store.map_size

    assert trio.run(map_size) > 1024 * 1024  # the map grew during the runs
    assert proc.stop() == 0
