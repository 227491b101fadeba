"""Soak: a mixed load for a long time, watching the server for growth it should not have.

    python -m bench.soak                    # 30 minutes; writes bench/results/soak.json
    python -m bench.soak --minutes 2        # a quick look

A real ``pigeon serve`` process and the mock FCM (20 ms an answer). For the whole run, at a
steady rate: two event writers (a batch of 50 events for random profiles every 200 ms each), a
campaign to every profile each ``--campaign-every`` seconds, profile reads and
``events.list`` reads, ``reports.watch`` streams opened and left, and connections opened and
closed. Every 10 seconds the server's resident memory (``server.stats``), its open file
descriptors (``/proc/PID/fd``), the LMDB file and its used bytes, and the events stored are
sampled. The result compares the first and the last fifth of the run: resident memory and
descriptors should stay flat, and the LMDB's used bytes should grow only with the data (the
events added, about the bytes each takes), not with time.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from bench._harness import machine
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import Client, open_client
from server.testing import ServerProcess

__all__ = ["soak", "main"]

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-soak")
_SAMPLE_S = 10.0


async def _setup(client: Client, mock: MockFcmProcess, profiles: int) -> None:
    await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(mock.token_uri)))
    await client.call(api.PublishConfig(config=api.ChannelConfig(name="all", apps=[APP], platforms=["android"])))
    await client.call(api.PublishMessage(message=api.MessageSpec(
        id="soak", channel="all", content=api.MessageContent(title="Hi {{ profile.identities[0] }}"))))
    for i in range(profiles):
        await client.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform="fcm", token=f"tok-{i}"))


async def _writer(address: str, rng: random.Random, profiles: int, until: float, counts: dict[str, int]) -> None:
    async with open_client(address) as client:
        while time.monotonic() < until:
            events = [api.Event(identity=f"crm:{rng.randrange(profiles)}", type="soak", data={"n": rng.randrange(10**6)})
                      for _ in range(50)]
            counts["events"] += (await client.call(api.IngestEvents(events=events))).accepted
            await trio.sleep(0.2)


async def _campaigns(address: str, every: float, until: float, counts: dict[str, int]) -> None:
    async with open_client(address) as client:
        while time.monotonic() < until:
            result = await client.call(api.SendMessage(id="soak", audience="true"))
            counts["sent"] += result.sent
            await trio.sleep(every)


async def _readers(address: str, rng: random.Random, profiles: int, until: float, counts: dict[str, int]) -> None:
    """Reads, streams left open a while, and connections opened and closed."""
    while time.monotonic() < until:
        async with open_client(address) as client:
            for _ in range(20):
                identity = f"crm:{rng.randrange(profiles)}"
                await client.call(api.GetProfile(identity=identity))
                async with client.stream(api.ListEvents(identity=identity, limit=50)) as items:
                    async for _ in items:
                        pass
                counts["reads"] += 1
            with trio.move_on_after(0.5):
                async with client.stream(api.WatchReport(message="soak", interval_s=0.1)) as reports:
                    async for _ in reports:
                        counts["watched"] += 1
            counts["connections"] += 1
        await trio.sleep(0.05)


def _rss_kinds(pid: int) -> dict[str, float]:
    """Resident memory by kind (MB): anonymous (the heap), and file-backed (LMDB's mapped pages)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            out[name.lower().replace("rss", "rss_") + "_mb"] = round(int(value.split()[0]) / 1024, 1)
    return out


async def _sample(client: Client, server: ServerProcess, data: Path) -> dict[str, Any]:
    stats = await client.call(api.GetStats())
    assert server.proc is not None and stats.store is not None
    return {
        "t_s": round(time.monotonic(), 1),
        "rss_mb": round(stats.process.rss_bytes / 2**20, 1),
        **_rss_kinds(server.proc.pid),
        "fds": len(os.listdir(f"/proc/{server.proc.pid}/fd")),
        "lmdb_file_mb": round((data / "data.mdb").stat().st_size / 2**20, 1),
        "lmdb_used_mb": round(stats.store.used_bytes / 2**20, 1),
        "events": stats.store.events,
        "connections": stats.connections.open,
    }


def _fifths(samples: list[dict[str, Any]], key: str) -> tuple[float, float]:
    n = max(1, len(samples) // 5)
    return (round(statistics.median(s[key] for s in samples[:n]), 1),
            round(statistics.median(s[key] for s in samples[-n:]), 1))


async def soak(folder: Path, *, minutes: float, profiles: int, campaign_every: float, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    counts = {"events": 0, "sent": 0, "reads": 0, "watched": 0, "connections": 0}
    samples: list[dict[str, Any]] = []
    with MockFcmProcess(folder / "fcm", config={"projects": {"acme-soak": {"service_accounts": [ACCOUNT.spec()]}}}) as mock:
        mock.admin.set_faults(accept_any_token=True, latency_ms=20, record_accepted=False)
        env = {"PIGEON_FCM__URL": mock.url, "PIGEON_FCM__TOKEN_URI": mock.token_uri, "PIGEON_FCM__CA_FILE": str(mock.ca_file)}
        with ServerProcess(folder / "data", env=env) as server:
            async with open_client(server.address) as client:
                await _setup(client, mock, profiles)
                until = time.monotonic() + minutes * 60
                async with trio.open_nursery() as nursery:
                    for w in range(2):
                        nursery.start_soon(_writer, server.address, random.Random(rng.random()), profiles, until, counts)
                    nursery.start_soon(_campaigns, server.address, campaign_every, until, counts)
                    nursery.start_soon(_readers, server.address, random.Random(rng.random()), profiles, until, counts)
                    while time.monotonic() < until:
                        samples.append(await _sample(client, server, folder / "data"))
                        await trio.sleep(_SAMPLE_S)
                samples.append(await _sample(client, server, folder / "data"))
    return _summary(samples, counts, minutes, profiles)


def _summary(samples: list[dict[str, Any]], counts: dict[str, int], minutes: float, profiles: int) -> dict[str, Any]:
    rss, anon, fds, used, events = (_fifths(samples, k) for k in ("rss_mb", "rss_anon_mb", "fds", "lmdb_used_mb", "events"))
    added = samples[-1]["events"] - samples[0]["events"]
    grown_mb = samples[-1]["lmdb_used_mb"] - samples[0]["lmdb_used_mb"]
    return {
        "machine": machine(), "minutes": minutes, "profiles": profiles, "load": counts,
        "rss_mb_first_last_fifth": rss, "rss_anon_mb_first_last_fifth": anon, "fds_first_last_fifth": fds, "fds_max": max(s["fds"] for s in samples),
        "lmdb_used_mb_first_last_fifth": used, "events_first_last_fifth": events,
        "events_added": added, "lmdb_grown_mb": round(grown_mb, 1),
        "lmdb_bytes_per_event_added": round(grown_mb * 2**20 / added, 1) if added else None,
        "rss_bytes_per_event_added": round((rss[1] - rss[0]) * 2**20 / (events[1] - events[0]), 1)
        if events[1] > events[0] else None,
        "rss_anon_bytes_per_event_added": round((anon[1] - anon[0]) * 2**20 / (events[1] - events[0]), 1)
        if events[1] > events[0] else None,
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    parser.add_argument("--profiles", type=int, default=2_000, help="profiles with a token (default 2,000)")
    parser.add_argument("--campaign-every", type=float, default=30.0, help="seconds between campaigns (default 30)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/soak.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pigeon-soak-") as tmp:
        result = trio.run(lambda: soak(Path(tmp), minutes=args.minutes, profiles=args.profiles,
                                       campaign_every=args.campaign_every, seed=args.seed))
    Path(args.out).write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    load = result["load"]
    print(f"{args.minutes:g} min: {load['events']:,} events, {load['sent']:,} sent, {load['reads']:,} reads, "
          f"{load['connections']:,} connections; RSS {result['rss_mb_first_last_fifth'][0]} -> "
          f"{result['rss_mb_first_last_fifth'][1]} MB (first/last fifth medians), fds "
          f"{result['fds_first_last_fifth'][0]} -> {result['fds_first_last_fifth'][1]} (max {result['fds_max']}), "
          f"LMDB used +{result['lmdb_grown_mb']} MB for {result['events_added']:,} events "
          f"({result['lmdb_bytes_per_event_added']} B an event; RSS {result['rss_bytes_per_event_added']} B an event "
          f"between the fifths, of which the heap {result['rss_anon_bytes_per_event_added']} B) -> {args.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except* PigeonProtocolError as group:
        raise SystemExit(f"soak: the server failed: {group.exceptions[0]}") from None
