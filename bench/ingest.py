"""Benchmark: sustained experience-event ingestion over the socket protocol.

    python -m bench.ingest                 # the full run (about four minutes)
    python -m bench.ingest --quick         # a smoke run
    python -m bench.ingest --baseline DIR  # this version and the one in DIR, side by side
    python -m bench.ingest --baseline DIR --ids  # ... and this version with event ids, beside them

Phases, against a fresh server in a child process (LMDB with fsync on every commit):

1. throughput: closed loop, ``--connections`` connections each keeping ``--in-flight``
   ``events.ingest`` calls outstanding, for each batch size; an event counts when the server
   acknowledges it, i.e. after its transaction is committed to disk;
2. latency at half rate: open loop at half the best measured rate, each batch sent on
   schedule whether or not earlier ones were answered; latency is measured from the scheduled
   time, so a stall cannot hide queued requests (no coordinated omission);
3. point reads: ``profiles.get`` of random profiles; the server's own per-method histogram
   gives the server-side time (decode, LMDB read, build and encode the reply);
4. memory: ``--memory-events`` more events over the same profiles; the server's resident
   memory per event from ``/proc/PID/status`` between the end of the first quarter and the
   end (steady growth), split into anonymous memory (the event index and the allocator's
   overhead around it), the event index's own measure (``event_index.memory_bytes``), and
   pages of the LMDB file mapped into the process (page cache the kernel may reclaim).

With ``--baseline DIR`` (another checkout of Pigeon, e.g. ``git worktree add DIR main~1``),
phases 1 and 4 run against a server of each version (phase 1 alternating run by run between
the two), so that both versions see the same machine in the same minutes; the report shows
them side by side (``bench/results/ingest-comparison.json``). A shared machine measures differently from one hour to the next:
compare versions this way, not with figures from another run.

With ``--ids`` every event of phase 1 carries a fresh random id (as the clients' batchers give
them; made before the clock starts), so the server checks and remembers each; with
``--baseline`` too, the comparison gets a third column: this version with ids, against the
same server as its column without.

Figures are printed and written as JSON (``bench/results/ingest.json`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from protocols import api
from protocols._client_core import new_event_id
from protocols.asyncio_client import Client, open_client, run

from ._harness import Latencies, ServerUnderTest, machine, server_cpu, write_results

PROFILES = 10_000


def _median_run(runs: list[dict[str, Any]], name: str, key: Any = None) -> dict[str, Any]:
    """The run with the median value of ``key`` (default: the field ``name``)."""
    key = key or (lambda r: r[name])
    return dict(sorted(runs, key=key)[len(runs) // 2])


def make_batches(count: int, size: int, seed: int) -> list[api.IngestEvents]:
    """``count`` distinct batches of realistic events over ``PROFILES`` identities."""
    rng = random.Random(seed)
    types = ["commerce.productView", "commerce.purchase", "app.launch", "push.opened", "web.pageView"]
    return [
        api.IngestEvents(
            events=[
                api.Event(
                    identity=f"crm:{rng.randrange(PROFILES)}",
                    type=rng.choice(types),
                    data={"sku": f"SKU-{rng.randrange(5000):05d}", "price": round(rng.uniform(1, 500), 2), "qty": rng.randint(1, 3)},
                )
                for _ in range(size)
            ]
        )
        for _ in range(count)
    ]


def with_ids(batch: api.IngestEvents) -> api.IngestEvents:
    """``batch``, each event with a fresh random id."""
    return api.IngestEvents(events=[msgspec.structs.replace(e, id=new_event_id()) for e in batch.events])


async def throughput(
    clients: list[Client], batches: list[api.IngestEvents], total_events: int, in_flight: int, ids: bool = False
) -> dict[str, Any]:
    size = len(batches[0].events)
    n_batches = total_events // size
    counter = iter(range(n_batches))
    if ids:  # every call its own ids, made before the clock starts
        batches = [with_ids(batches[i % len(batches)]) for i in range(n_batches)]
    latencies = Latencies()
    accepted = 0

    async def worker(client: Client) -> None:
        nonlocal accepted
        for i in counter:
            started = time.perf_counter()
            result = await client.call(batches[i % len(batches)])
            latencies.record(time.perf_counter() - started)
            accepted += result.accepted
            if result.rejected:
                raise RuntimeError(f"rejected: {result.rejected[:3]}")

    cpu0 = await server_cpu(clients[0])
    store0 = await store_details(clients[0])
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    cpu = await server_cpu(clients[0]) - cpu0
    store1 = await store_details(clients[0])
    commits = store1["commits"] - store0["commits"]
    return {
        "batch_size": size,
        "events": accepted,
        "seconds": round(elapsed, 3),
        "events_per_s": round(accepted / elapsed),
        "server_cpu_us_per_event": round(cpu / accepted * 1e6, 2),
        "server_cpu_share": round(cpu / elapsed, 2),
        "batch_latency": latencies.summary(),
        "commits": commits,
        "events_per_commit": round(accepted / max(commits, 1)),
        "store_apply_ms_per_commit": round((store1["apply_seconds"] - store0["apply_seconds"]) / max(commits, 1) * 1000, 2),
        "store_fsync_ms_per_commit": round((store1["commit_seconds"] - store0["commit_seconds"]) / max(commits, 1) * 1000, 2),
    }


async def store_details(client: Client) -> dict[str, Any]:
    stats = await client.call(api.GetStats())
    return next(a for a in stats.actors if a.name == "store").details


async def open_loop(clients: list[Client], batches: list[api.IngestEvents], rate: float, seconds: float) -> dict[str, Any]:
    size = len(batches[0].events)
    interval = size / rate
    n = int(seconds / interval)
    latencies = Latencies()
    outstanding: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(i: int, scheduled: float) -> None:
        await clients[i % len(clients)].call(batches[i % len(batches)])
        latencies.record(loop.time() - scheduled)

    cpu0 = await server_cpu(clients[0])
    stats0 = await clients[0].call(api.GetStats())
    store0 = await store_details(clients[0])
    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, scheduled))
        outstanding.add(task)
        task.add_done_callback(outstanding.discard)
        if len(outstanding) > 10_000:
            raise RuntimeError("the server fell too far behind the offered rate")
    await asyncio.gather(*outstanding)
    elapsed = loop.time() - start
    cpu = await server_cpu(clients[0]) - cpu0
    stats1 = await clients[0].call(api.GetStats())
    store1 = await store_details(clients[0])
    commits = max(store1["commits"] - store0["commits"], 1)
    return {
        "server_cpu_user_share": round((stats1.process.cpu_user_s - stats0.process.cpu_user_s) / elapsed, 2),
        "server_cpu_system_share": round((stats1.process.cpu_system_s - stats0.process.cpu_system_s) / elapsed, 2),
        "events_per_commit": round(n * size / commits),
        "store_apply_ms_per_commit": round((store1["apply_seconds"] - store0["apply_seconds"]) / commits * 1000, 2),
        "store_fsync_ms_per_commit": round((store1["commit_seconds"] - store0["commit_seconds"]) / commits * 1000, 2),
        "batch_size": size,
        "offered_events_per_s": round(rate),
        "achieved_events_per_s": round(n * size / elapsed),
        "seconds": round(elapsed, 2),
        "server_cpu_share": round(cpu / elapsed, 2),
        "ack_latency": latencies.summary(),
    }


def resident(pid: int) -> dict[str, int]:
    """Resident memory of a local process, bytes: all of it, anonymous, and file-backed."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


async def memory(client: Client, events: int, batch: int = 1000, in_flight: int = 4) -> dict[str, Any]:
    """Ingest ``events`` more; resident memory per event over the last three quarters."""
    batches = make_batches(16, batch, seed=4)
    pid = (await client.call(api.GetStats())).process.pid
    sent = 0

    async def ingest_until(target: int) -> None:
        nonlocal sent
        while sent < target:
            sent += batch
            await client.call(batches[(sent // batch) % len(batches)])

    async def sample() -> dict[str, int]:
        index = (await store_details(client))["event_index"]
        return {**resident(pid), "index": index["memory_bytes"], "indexed": index["events"]}

    await asyncio.gather(*(ingest_until(events // 4) for _ in range(in_flight)))
    first = await sample()
    await asyncio.gather(*(ingest_until(events) for _ in range(in_flight)))
    last = await sample()
    n = last["indexed"] - first["indexed"]
    per_event = {key: round((last[key] - first[key]) / n, 1) for key in ("VmRSS", "RssAnon", "RssFile", "index")}
    return {
        "events": n,
        "events_indexed": last["indexed"],
        "bytes_per_event": {"rss": per_event["VmRSS"], "anonymous": per_event["RssAnon"],
                            "event_index": per_event["index"], "lmdb_file_pages": per_event["RssFile"]},
        "rss_mb": {"from": round(first["VmRSS"] / 2**20, 1), "to": round(last["VmRSS"] / 2**20, 1)},
    }


def show_memory(r: dict[str, Any], name: str = "") -> str:
    b = r["bytes_per_event"]
    return (f"  memory{name}: {b['rss']:.1f} bytes of RSS per event over {r['events']:,} events: {b['anonymous']:.1f} anonymous "
            f"(the event index counts {b['event_index']:.1f}), {b['lmdb_file_pages']:.1f} of LMDB file pages; "
            f"RSS {r['rss_mb']['from']} -> {r['rss_mb']['to']} MB")


async def populate_profiles(client: Client) -> None:
    """Give every profile realistic attributes, a push registration and consent."""
    names = iter(range(PROFILES))

    async def worker() -> None:
        for n in names:
            identity = f"crm:{n}"
            await client.call(
                api.UpsertProfile(
                    identity=identity,
                    attributes={
                        "person": {"firstName": f"Name{n}", "lastName": f"Surname{n}", "birthYear": 1950 + n % 50},
                        "loyalty": {"tier": ["bronze", "silver", "gold"][n % 3], "points": n * 7 % 10_000},
                        "preferredLanguage": "en-GB",
                    },
                )
            )
            await client.call(api.RegisterToken(identity=identity, app="com.acme.shop", platform="fcm", token=f"fcm-token-{n:08d}"))
            await client.call(api.SetConsent(identity=identity, app="com.acme.shop", push="in"))

    await asyncio.gather(*(worker() for _ in range(64)))


async def point_reads(client: Client, count: int, concurrency: int) -> dict[str, Any]:
    rng = random.Random(3)
    identities = [f"crm:{rng.randrange(PROFILES)}" for _ in range(count)]
    before = (await client.call(api.GetStats())).methods.get("profiles.get")
    assert before is None or before.calls == 0
    it = iter(identities)
    round_trips = Latencies()

    async def worker() -> None:
        for identity in it:
            started = time.perf_counter()
            await client.call(api.GetProfile(identity=identity))
            round_trips.record(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    server_side = (await client.call(api.GetStats())).methods["profiles.get"]
    return {
        "reads": count,
        "server_side_us": {"p50": server_side.p50_us, "p99": server_side.p99_us, "max": server_side.max_us},
        "round_trip": round_trips.summary(),
    }


@contextlib.asynccontextmanager
async def connections(address: str, count: int) -> Any:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(open_client(address, client_name="bench")) for _ in range(count)]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"scenario": "ingest", "machine": machine(), "settings": vars(args)}
    if args.baseline:
        results["comparison"] = await compare(args)
        return results
    with ServerUnderTest(address=args.server) as server:
        async with connections(server.address, args.connections) as conns:
            print(f"server on {server.address}; {args.connections} connections × {args.in_flight} calls in flight")

            warm = make_batches(4, 500, seed=0)
            await throughput(conns, warm, 20_000, 2)

            results["throughput"] = []
            for size in args.batch_sizes:
                batches = make_batches(16, size, seed=size)
                runs = [await throughput(conns, batches, args.events, args.in_flight, args.ids) for _ in range(args.repeat)]
                r = _median_run(runs, "events_per_s")
                r["runs_events_per_s"] = [x["events_per_s"] for x in runs]
                results["throughput"].append(r)
                print(
                    f"  batch {size:>5}: {r['events_per_s']:>9,} events/s acknowledged (median of {args.repeat}: "
                    f"{', '.join(f'{x:,}' for x in r['runs_events_per_s'])}), "
                    f"{r['server_cpu_us_per_event']:.2f} µs server CPU/event, "
                    f"batch p50 {r['batch_latency']['p50_ms']:.1f} ms p99 {r['batch_latency']['p99_ms']:.1f} ms; "
                    f"{r['events_per_commit']} events/commit, apply {r['store_apply_ms_per_commit']} ms + "
                    f"fsync {r['store_fsync_ms_per_commit']} ms per commit"
                )
            best = max(results["throughput"], key=lambda r: r["events_per_s"])
            half = best["events_per_s"] / 2
            batches = make_batches(16, args.latency_batch, seed=99)
            runs = [await open_loop(conns, batches, half, args.latency_seconds) for _ in range(args.repeat)]
            r = _median_run(runs, "p99", key=lambda x: x["ack_latency"]["p99_ms"])
            r["runs_p99_ms"] = [x["ack_latency"]["p99_ms"] for x in runs]
            results["latency_at_half_rate"] = r
            print(
                f"  open loop at {r['offered_events_per_s']:,} events/s (half the best), batch {args.latency_batch}: "
                f"ack p50 {r['ack_latency']['p50_ms']:.1f} ms, p99 {r['ack_latency']['p99_ms']:.1f} ms "
                f"(median of {args.repeat}: {', '.join(f'{x:.1f}' for x in r['runs_p99_ms'])}), "
                f"max {r['ack_latency']['max_ms']:.1f} ms"
            )
            await populate_profiles(conns[0])
            r = await point_reads(conns[0], args.reads, 8)
            results["point_reads"] = r
            print(
                f"  profiles.get: server-side p50 {r['server_side_us']['p50']:.0f} µs, p99 {r['server_side_us']['p99']:.0f} µs; "
                f"round trip p50 {r['round_trip']['p50_ms'] * 1000:.0f} µs"
            )
            results["memory"] = await memory(conns[0], args.memory_events)
            print(show_memory(results["memory"]))
            stats = await conns[0].call(api.GetStats())
            results["server"] = {
                "store": next(a for a in stats.actors if a.name == "store").details,
                "commits": stats.store.commits,
                "writes": stats.store.writes,
                "events_stored": stats.store.events,
                "profiles": stats.store.profiles,
                "rss_mb": round(stats.process.rss_bytes / 2**20, 1),
                "max_rss_mb": round(stats.process.max_rss_bytes / 2**20, 1),
            }
    results["targets"] = {
        "events_per_s >= 100000": best["events_per_s"] >= 100_000,
        "p99 ack < 50 ms at half rate": results["latency_at_half_rate"]["ack_latency"]["p99_ms"] < 50,
        "point read <= 20 us server-side (p50)": results["point_reads"]["server_side_us"]["p50"] <= 20,
    }
    return results


@contextlib.contextmanager
def baseline_server(folder: str) -> Any:
    """A server of the version checked out in ``folder``, started by that version's own
    `server.testing.ServerProcess` (its command line may differ from this one's)."""
    root = Path(folder).resolve()
    spec = importlib.util.spec_from_file_location("pigeon_baseline_testing", root / "server" / "testing.py")
    assert spec is not None and spec.loader is not None
    testing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(testing)
    # Its modules before this checkout's (which Python puts first as the working folder).
    env = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(root)}
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-") as data:
        with testing.ServerProcess(Path(data) / "data", env=env) as server:
            yield server


async def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Phases 1 and 4 against this version and the one in ``args.baseline``, alternating."""
    names: tuple[str, ...] = ("baseline", "this") + (("this_ids",) if args.ids else ())
    with baseline_server(args.baseline) as baseline, ServerUnderTest() as this:
        async with connections(baseline.address, args.connections) as old, connections(this.address, args.connections) as new:
            servers = dict(zip(names, (old, new, new)))
            print(f"baseline {args.baseline} on {baseline.address}, this checkout on {this.address}; "
                  f"{args.connections} connections × {args.in_flight} calls in flight, runs alternating")
            for conns in servers.values():
                await throughput(conns, make_batches(4, 500, seed=0), 20_000, 2)
            out: dict[str, Any] = {"throughput": []}
            for size in args.batch_sizes:
                batches = make_batches(16, size, seed=size)
                runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
                for _ in range(args.repeat):
                    for name in names:
                        runs[name].append(await throughput(servers[name], batches, args.events, args.in_flight,
                                                           ids=name == "this_ids"))
                row = {"batch_size": size}
                for name in names:
                    rates = [r["events_per_s"] for r in runs[name]]
                    cpu = [r["server_cpu_us_per_event"] for r in runs[name]]
                    row[name] = {"events_per_s": statistics.median(rates), "runs_events_per_s": rates,
                                 "server_cpu_us_per_event": statistics.median(cpu), "runs_server_cpu_us_per_event": cpu}
                out["throughput"].append(row)
                print(f"  batch {size:>5}: " + "; ".join(
                    f"{name} {row[name]['events_per_s']:>9,.0f} events/s (runs {', '.join(f'{x:,}' for x in row[name]['runs_events_per_s'])}), "
                    f"{row[name]['server_cpu_us_per_event']:.2f} µs CPU/event" for name in names))
            out["memory"] = {}
            for name in names[:2]:
                out["memory"][name] = await memory(servers[name][0], args.memory_events)
                print(show_memory(out["memory"][name], f" ({name})"))
    return out


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400_000, help="events per run in phase 1")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[100, 500, 1000])
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=4, help="calls outstanding per connection")
    parser.add_argument("--latency-batch", type=int, default=500)
    parser.add_argument("--latency-seconds", type=float, default=8.0)
    parser.add_argument("--reads", type=int, default=20_000)
    parser.add_argument("--memory-events", type=int, default=2_000_000, help="events ingested in phase 4")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is reported")
    parser.add_argument("--quick", action="store_true", help="a small run to check the harness")
    parser.add_argument("--ids", action="store_true", help="phase 1 with a random id on every event (beside, with --baseline)")
    parser.add_argument("--out", help="JSON output path (default bench/results/ingest.json)")
    parser.add_argument("--server", help="use a server already running at HOST:PORT (e.g. under a profiler)")
    parser.add_argument("--baseline", metavar="DIR", help="also measure the version checked out in DIR, side by side")
    args = parser.parse_args(argv)
    if args.quick:
        args.events, args.latency_seconds, args.reads, args.repeat, args.memory_events = 30_000, 2.0, 2_000, 1, 200_000
    results = run(main(args))
    path = write_results("ingest-comparison" if args.baseline else "ingest", results, args.out)
    if "targets" in results:
        print("targets: " + ", ".join(f"{k}: {'met' if v else 'MISSED'}" for k, v in results["targets"].items()))
    print(f"results written to {path}")
    sys.exit(0)


if __name__ == "__main__":
    cli()
