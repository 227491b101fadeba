"""Overload: ten times the sustainable ingest rate, and what it costs everyone else.

    python -m bench.overload                # about two minutes: 60 s of overload
    python -m bench.overload --quick        # about half a minute: 10 s of overload
    python -m bench.overload --baseline DIR # the server of another checkout (git archive REV | tar -x -C DIR)

Against a fresh ``pigeon serve`` in a child process (fsync on every commit), on loopback:

1. sustainable rate: closed loop, 4 connections with 4 ``events.ingest`` calls of 500 events
   in flight each, for a few seconds: the events acknowledged per second;
2. overload: ten times that rate, open loop, from 50 connections (another process, asyncio
   and uvloop): each batch is sent on its schedule, answered or not. A batch that finds its
   connection's ``max_calls`` taken is not sent (counted as ``not_sent``). Every call is
   waited for at the end, so each one has an outcome: accepted, shed (its code and retry hint
   are recorded) or another error;
3. meanwhile, on its own connection from this process, ``server.health`` and ``profiles.get``
   every 10 ms each, their latency measured from the time they were scheduled (a stall cannot
   hide the calls queued behind it); the server's resident memory from ``/proc/PID/status``
   every 250 ms;
4. recovery: from the moment the flood stops sending, an ordinary ingest (10 events) and a
   health call every 50 ms until both are answered, the ingest accepted: the time that took;
5. the books: the events the server stores (``server.stats``) against the events it
   acknowledged, exactly; and for one flooding connection's identities, each profile's stored
   events (``events.list``) against what was acknowledged for it.

Figures are printed and written as JSON (``bench/results/overload.json`` by default).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from protocols import api
from protocols.errors import CallError, PigeonProtocolError
from protocols.trio_client import Client as TrioClient, open_client as open_trio_client

from ._harness import Latencies, ServerUnderTest, machine, write_results

BATCH = 500
#: Identities per flooding connection; each batch has BATCH / PER_CONNECTION events for each.
PER_CONNECTION = 10


def batch_for(connection: int) -> api.IngestEvents:
    """The batch connection ``connection`` sends, again and again: 50 events to each of its
    10 identities, about 100 bytes of data each."""
    return api.IngestEvents(events=[
        api.Event(identity=f"load:{connection}:{i % PER_CONNECTION}", type="commerce.purchase",
                  data={"sku": f"SKU-{i:05d}", "price": 19.99 + i, "qty": 1 + i % 3})
        for i in range(BATCH)
    ])


# -- the load, in its own process (asyncio + uvloop) -------------------------------------------


async def _closed_loop(address: str, seconds: float, connections: int = 4, in_flight: int = 4) -> dict[str, Any]:
    from protocols.asyncio_client import open_client

    accepted = 0
    per_connection = [0] * connections
    stack = contextlib.AsyncExitStack()
    clients = [await stack.enter_async_context(open_client(address, client_name="overload")) for _ in range(connections)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds

    async def worker(c: int) -> None:
        nonlocal accepted
        batch = batch_for(1000 + c)
        while loop.time() < deadline:
            result = await clients[c].call(batch)
            accepted += result.accepted
            per_connection[c] += 1

    started = loop.time()
    await asyncio.gather(*(worker(c) for c in range(connections) for _ in range(in_flight)))
    elapsed = loop.time() - started
    await stack.aclose()
    return {"events": accepted, "seconds": round(elapsed, 3), "events_per_s": round(accepted / elapsed),
            "batches_per_connection": {str(1000 + c): n for c, n in enumerate(per_connection)}}


async def _open_loop(address: str, rate: float, seconds: float, connections: int) -> dict[str, Any]:
    from protocols.asyncio_client import open_client

    stack = contextlib.AsyncExitStack()
    clients = [await stack.enter_async_context(open_client(address, client_name="overload")) for _ in range(connections)]
    max_calls = clients[0].welcome.max_calls
    batches = [batch_for(c) for c in range(connections)]
    outstanding = [0] * connections
    accepted_batches = [0] * connections
    outcomes: dict[str, int] = {"accepted": 0, "not_sent": 0}
    hints: list[int] = []
    messages: dict[str, str] = {}
    ack = Latencies()
    shed_latency = Latencies()
    timeline: dict[int, dict[str, int]] = {}
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    interval = BATCH / rate
    start = loop.time() + 0.1
    n = int(seconds / interval)

    async def one(c: int, scheduled: float) -> None:
        outstanding[c] += 1
        try:
            await clients[c].call(batches[c])
        except CallError as exc:
            key = str(exc.status)
            outcomes[key] = outcomes.get(key, 0) + 1
            messages.setdefault(key, exc.message)
            hint = getattr(exc, "retry_after_ms", None)
            if hint is not None:
                hints.append(hint)
            shed_latency.record(loop.time() - scheduled)
            second = timeline.setdefault(int(scheduled - start), {"accepted": 0, "refused": 0})
            second["refused"] += 1
        except PigeonProtocolError as exc:
            key = type(exc).__name__
            outcomes[key] = outcomes.get(key, 0) + 1
            messages.setdefault(key, str(exc))
        else:
            accepted_batches[c] += 1
            outcomes["accepted"] += 1
            ack.record(loop.time() - scheduled)
            second = timeline.setdefault(int(scheduled - start), {"accepted": 0, "refused": 0})
            second["accepted"] += 1
        finally:
            outstanding[c] -= 1

    for i in range(n):
        scheduled = start + i * interval
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        c = i % connections
        if outstanding[c] >= max_calls:
            outcomes["not_sent"] += 1
            continue
        task = asyncio.create_task(one(c, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    sent_for = loop.time() - start
    print(json.dumps({"stopped_sending": True}), flush=True)
    waited = loop.time()
    await asyncio.gather(*tasks)
    drained = loop.time() - waited
    await stack.aclose()
    hints.sort()
    return {
        "offered_events_per_s": round(rate),
        "seconds": round(sent_for, 2),
        "scheduled_batches": n,
        "outcomes": outcomes,
        "messages": messages,
        "accepted_events": outcomes["accepted"] * BATCH,
        "accepted_events_per_s": round(outcomes["accepted"] * BATCH / sent_for),
        "accepted_batches_per_connection": {str(c): k for c, k in enumerate(accepted_batches)},
        "retry_after_ms": {"count": len(hints), "min": hints[0], "median": hints[len(hints) // 2], "max": hints[-1]}
        if hints else None,
        "ack_latency_of_accepted": ack.summary(),
        "latency_of_refused": shed_latency.summary(),
        "answers_after_sending_stopped_s": round(drained, 2),
        "timeline": {str(k): v for k, v in sorted(timeline.items())},
    }


def _load_main(args: argparse.Namespace) -> None:
    from protocols.asyncio_client import run

    if args.closed:
        out = run(_closed_loop(args.address, args.seconds))
    else:
        out = run(_open_loop(args.address, args.rate, args.seconds, args.connections))
    print(json.dumps(out), flush=True)


# -- this process: the server, the probe, memory, recovery, books ------------------------------


async def _load(address: str, *flags: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.overload", "--load", address, *flags], stdout=subprocess.PIPE)


async def _lines(proc: trio.Process) -> Any:
    """The JSON lines the load process prints, as they come."""
    assert proc.stdout is not None
    buffer = b""
    while chunk := await proc.stdout.receive_some():
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            yield json.loads(line)


def resident_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of a local process, MB: all of it (``VmRSS``), anonymous (``RssAnon``:
    the heap, where queues would grow) or file pages (``RssFile``: the LMDB file mapped in)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


class Probe:
    """``server.health`` and ``profiles.get`` every ``period`` each, on one connection, latency
    measured from each call's scheduled time, and counted in the phase its schedule falls in
    (`summary`)."""

    def __init__(self, client: TrioClient, period: float = 0.01) -> None:
        self.client = client
        self.period = period
        #: (kind, scheduled time, latency in seconds) of every call.
        self.calls: list[tuple[str, float, float]] = []
        self.failures: dict[str, int] = {}

    async def run(self, kind: str, request: Any, offset: float) -> None:
        """A call every ``period`` from ``offset``, each in its own task (open loop: a slow
        answer does not delay the calls after it)."""
        async with trio.open_nursery() as calls:
            next_at = trio.current_time() + offset
            while True:
                await trio.sleep_until(next_at)
                calls.start_soon(self._one, kind, request, next_at)
                next_at += self.period

    async def _one(self, kind: str, request: Any, scheduled: float) -> None:
        try:
            with trio.fail_after(30):
                await self.client.call(request)
        except (PigeonProtocolError, trio.TooSlowError):
            self.failures[kind] = self.failures.get(kind, 0) + 1
        self.calls.append((kind, scheduled, trio.current_time() - scheduled))

    def summary(self, phases: dict[str, tuple[float, float]]) -> dict[str, Any]:
        """Latencies of the calls scheduled in each phase (``name: (start, end)``)."""
        out: dict[str, Any] = {}
        for phase, (start, end) in phases.items():
            kinds: dict[str, Latencies] = {}
            for kind, scheduled, latency in self.calls:
                if start <= scheduled < end:
                    kinds.setdefault(kind, Latencies()).record(latency)
            out[phase] = {kind: lat.summary() for kind, lat in kinds.items()}
        return out

    def worst_by_second(self, start: float) -> dict[str, float]:
        """The slowest call scheduled in each second from ``start``, ms."""
        worst: dict[int, float] = {}
        for _, scheduled, latency in self.calls:
            second = int(scheduled - start)
            worst[second] = max(worst.get(second, 0.0), round(latency * 1000, 1))
        return {str(k): v for k, v in sorted(worst.items())}


async def _memory(pid: int, samples: list[tuple[float, float, float]], started: float) -> None:
    """(seconds, RSS, anonymous RSS) every 250 ms."""
    while True:
        samples.append((round(trio.current_time() - started, 2), round(resident_mb(pid), 1),
                        round(resident_mb(pid, "RssAnon"), 1)))
        await trio.sleep(0.25)


async def _recovery(address: str, stopped: float) -> dict[str, Any]:
    """From ``stopped``: an ordinary ingest and a health call every 50 ms until the ingest is
    accepted and health answered within 100 ms."""
    attempts = unknown = acknowledged = 0
    events = api.IngestEvents(events=[api.Event(identity="recovery:1", type="app.launch") for _ in range(10)])
    async with open_trio_client(address) as client:
        while True:
            attempts += 1
            try:
                began = trio.current_time()
                with trio.fail_after(10):
                    await client.call(api.GetHealth())
                healthy = trio.current_time() - began < 0.1
            except (CallError, trio.TooSlowError):
                await trio.sleep(0.05)
                continue
            try:
                with trio.fail_after(30):
                    result = await client.call(events)
            except CallError:
                pass
            except trio.TooSlowError:
                unknown += 10  # given up on: it may yet be stored
            else:
                acknowledged += result.accepted
                if healthy and result.accepted == 10:
                    return {"seconds": round(trio.current_time() - stopped, 3), "attempts": attempts,
                            "events": acknowledged, "events_of_unknown_outcome": unknown}
            await trio.sleep(0.05)


async def _books(client: TrioClient, acknowledged: int, unknown: int, per_connection: dict[str, int]) -> dict[str, Any]:
    """Stored events against acknowledged ones: every acknowledged one is there, and nothing
    else but events of calls given up on (``unknown``, their outcome unknown)."""
    stats = await client.call(api.GetStats())
    assert stats.store is not None
    stored_counts = {}
    expected_counts = {}
    for i in range(PER_CONNECTION):
        identity = f"load:0:{i}"
        count = 0
        async with client.stream(api.ListEvents(identity=identity, limit=1_000_000)) as items:
            async for _ in items:
                count += 1
        stored_counts[identity] = count
        expected_counts[identity] = per_connection.get("0", 0) * BATCH // PER_CONNECTION
    return {
        "acknowledged_events": acknowledged,
        "stored_events": stats.store.events,
        "events_of_unknown_outcome": unknown,
        "holds": acknowledged <= stats.store.events <= acknowledged + unknown and stored_counts == expected_counts,
        "connection_0_profiles": {"stored": sum(stored_counts.values()), "acknowledged": sum(expected_counts.values()),
                                  "each_as_acknowledged": stored_counts == expected_counts},
    }


async def main(address: str, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"scenario": "overload", "machine": machine(), "settings": vars(args)}
    async with open_trio_client(address) as client:
        stats = await client.call(api.GetStats())
        pid = stats.process.pid
        await client.call(api.UpsertProfile(identity="crm:reader", attributes={"name": "Ada", "tier": "gold"}))
        proc = await _load(address, "--closed", "--seconds", str(args.closed_seconds))
        sustainable = [line async for line in _lines(proc)][-1]
        await proc.wait()
        results["sustainable"] = sustainable
        rate = args.rate or sustainable["events_per_s"] * args.factor
        print(f"sustainable: {sustainable['events_per_s']:,} events/s closed loop; offering {rate:,.0f} events/s "
              f"from {args.connections} connections for {args.seconds:g} s", flush=True)
        probe = Probe(client)
        rss: list[tuple[float, float, float]] = []
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_memory, pid, rss, started)
            nursery.start_soon(probe.run, "health", api.GetHealth(), 0.0)
            nursery.start_soon(probe.run, "profile_read", api.GetProfile(identity="crm:reader"), 0.005)
            await trio.sleep(2)
            rss_before, anon_before = resident_mb(pid), resident_mb(pid, "RssAnon")
            flood_started = trio.current_time() - started
            proc = await _load(address, "--rate", str(rate), "--seconds", str(args.seconds),
                               "--connections", str(args.connections))
            flood: dict[str, Any] = {}
            async for line in _lines(proc):
                if line.get("stopped_sending"):
                    stopped = trio.current_time()
                    flood_stopped = stopped - started
                    recovery = await _recovery(address, stopped)
                    print(f"recovered {recovery['seconds']} s after the load stopped", flush=True)
                else:
                    flood = line
            await proc.wait()
            await trio.sleep(1)
            nursery.cancel_scope.cancel()
        after = await client.call(api.GetStats())
        acknowledged = flood["accepted_events"] + sustainable["events"] + recovery["events"]
        results["overload"] = flood
        phases = {"idle": (started, started + flood_started), "overload": (started + flood_started, stopped),
                  "after": (stopped, math.inf)}
        results["probe"] = {"every_ms": 10, "latency": probe.summary(phases), "failures": probe.failures,
                            "worst_ms_by_second_from_overload": probe.worst_by_second(started + flood_started)}
        during = [(mb, anon) for t, mb, anon in rss if flood_started <= t <= flood_stopped]
        results["rss_mb"] = {"before": round(rss_before, 1), "peak_during": max((mb for mb, _ in during), default=0.0),
                             "end": rss[-1][1], "samples": [(t, mb) for t, mb, _ in rss]}
        # Anonymous memory is the heap: queues, and the event index (about 17 bytes an event
        # stored); the rest of RSS is the LMDB file mapped in (the data).
        results["anonymous_mb"] = {"before": round(anon_before, 1), "peak_during": max((a for _, a in during), default=0.0),
                                   "end": rss[-1][2], "samples": [(t, a) for t, _, a in rss]}
        results["recovery"] = recovery
        results["server"] = {
            "ingestion": next(a for a in after.actors if a.name == "ingestion").details,
            "server_side": {name: msgspec_to_dict(after.methods.get(name))
                            for name in ("events.ingest", "server.health", "profiles.get")},
            "max_rss_mb": round(after.process.max_rss_bytes / 2**20, 1),
        }
        results["books"] = await _books(client, acknowledged, recovery["events_of_unknown_outcome"], flood["accepted_batches_per_connection"])
    return results


def msgspec_to_dict(value: Any) -> Any:
    import msgspec

    return msgspec.to_builtins(value)


def show(r: dict[str, Any]) -> None:
    o, p = r["overload"], r["probe"]["latency"].get("overload", {})
    print(f"offered {o['offered_events_per_s']:,} events/s for {o['seconds']} s: outcomes {o['outcomes']}; "
          f"{o['accepted_events_per_s']:,} events/s accepted; retry hints {o['retry_after_ms']}")
    for kind, lat in p.items():
        print(f"  {kind} during overload: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms "
              f"({lat['count']} calls)")
    print(f"  RSS {r['rss_mb']['before']} MB before, peak {r['rss_mb']['peak_during']} MB during, {r['rss_mb']['end']} MB at the end")
    a = r["anonymous_mb"]
    print(f"  anonymous {a['before']} MB before, peak {a['peak_during']} MB during, {a['end']} MB at the end")
    print(f"  recovery {r['recovery']['seconds']} s; books: {r['books']}")


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of overload")
    parser.add_argument("--closed-seconds", type=float, default=8.0, help="seconds of the sustainable-rate phase")
    parser.add_argument("--factor", type=float, default=10.0, help="offered load, times the sustainable rate")
    parser.add_argument("--rate", type=float, help="offer this many events/s instead")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="10 s of overload after 4 s of closed loop")
    parser.add_argument("--out", help="JSON output path (default bench/results/overload.json)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="server settings (PIGEON_*)")
    parser.add_argument("--baseline", metavar="DIR", help="run the server of the checkout in DIR instead (the load and "
                        "the probe are this checkout's)")
    parser.add_argument("--server", metavar="ADDRESS", help="use a server already running there (under a profiler)")
    parser.add_argument("--load", metavar="ADDRESS", help=argparse.SUPPRESS)  # the load's own process
    parser.add_argument("--closed", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.load:
        args.address = args.load
        _load_main(args)
        return 0
    if args.quick:
        args.seconds, args.closed_seconds = 10.0, 4.0
    env = dict(item.split("=", 1) for item in args.env)
    if args.baseline:  # that checkout's server modules before this one's
        env.update(PYTHONSAFEPATH="1", PYTHONPATH=str(Path(args.baseline).resolve()))
    with ServerUnderTest(env=env, address=args.server) as server:
        results = trio.run(main, server.address, args)
    show(results)
    path = write_results("overload", results, args.out)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
