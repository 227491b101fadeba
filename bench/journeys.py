"""Journeys at scale (issue 14): a read audience of N profiles entered, N instances waiting,
their timers falling due at once, and an event-triggered journey under open-loop load.

    .venv/bin/python -m bench.journeys           # 1,000,000 profiles; 3 x 30 s at 5,000 events/s
    .venv/bin/python -m bench.journeys --quick   # 20,000 profiles; 2 x 5 s (under a minute)
    .venv/bin/python -m bench.journeys --only audience --profiles 300000

Each phase runs a real ``pigeon serve`` process on a fresh data folder (fsync on every commit,
the default), over loopback; this process is the client. CPU figures are the server process's
own accounting (``server.stats``: getrusage), memory its ``/proc/<pid>/status`` (RssAnon: the
heap; RssFile: LMDB's file pages mapped in).

**audience** (targets 1, 2, 4). N profiles (``profiles.upsert``, attributes ``points``,
``tier``, ``city``), then the journey ``audience``: entry ``read: true``, ``rate: 100000``,
condition ``profile.points >= 0`` (tested for each profile; all match), a wait ``until`` one
fixed moment T, an end. Measured: the seconds from ``journeys.publish`` to N entered (the
journeys actor's ``entered`` in ``server.stats``), the server's CPU per profile entered, its
memory when 1 %, 10 % and all of them wait; the bytes per instance of the ``instances`` and
``timers`` databases (LMDB's own page counts, the server stopped); the server started again
on that folder, its memory with the N waiting and idle; then, at T, the rate at which the
engine fires the N timers (``timers_fired``, polled every 0.1 s, from T to the last one) and
its CPU per timer.

**events** (target 3). A mock provider (``--provider``: the mock APNs, sandbox, by default, or
the mock FCM; its own ``--mock-workers`` processes, TLS + HTTP/2, any token accepted) and
``--event-profiles`` profiles with a token; the journey ``purchase``: entry event
``purchase`` (re-entrance allowed), a push whose data carries the event's ``t``, an end.
Batches of ``rate / 100`` events go every 10 ms on a fixed schedule (open loop: a late batch
is not made up by a later one), each event stamped with its scheduled send time; the latency
of an event is the mock's receive time of its push minus that stamp. The first 2 s are a
warm-up, not counted. Rounds repeat on the same server; medians are reported; then one round
at each of ``--also-rates``. Beside the latencies, each round samples every 0.5 s the engine's
lag (events after its position) and the pushes entered but not yet received by the mock, and
reports the writer's milliseconds per commit (apply, fsync) and the 1-minute load average:
the machine is shared, and the server needs its CPU on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lmdb
import msgspec

from ._harness import Latencies, machine, own_cpu, tree_cpu, write_results
from plugins.apns.mock import MockApnsProcess, SigningKey
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.asyncio_client import Client, open_client, run
from server.testing import ServerProcess

APP = "com.example.journeys"
PROJECT = "bench-journeys"
TIERS = ["basic", "silver", "gold"]
CITIES = ["Lyon", "Oslo", "Porto", "Kyiv", "Lima", "Kobe"]
WARMUP_S = 2.0
TICK_S = 0.01


# -- the server, its stats and memory --------------------------------------------------------

def _memory(pid: int) -> dict[str, float]:
    """The process's resident memory, MB: all, anonymous (heap), file-backed (LMDB's pages)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields["VmRSS"], "anon_mb": fields["RssAnon"], "file_mb": fields["RssFile"]}


async def _stats(client: Client) -> tuple[float, dict[str, Any]]:
    """The server's CPU seconds so far and the journeys actor's details."""
    stats = await client.call(api.GetStats())
    details = next(a.details for a in stats.actors if a.name == "journeys")
    return stats.process.cpu_user_s + stats.process.cpu_system_s, details


#: ``--baseline DIR``: the server modules of the checkout in DIR (git archive REV | tar -x -C DIR).
BASELINE: dict[str, str] = {}


def _store(stats: api.Stats) -> dict[str, float]:
    """The writer's seconds so far: applying ops, committing (fsync)."""
    details = next(a.details for a in stats.actors if a.name == "store")
    return {"apply": details["apply_seconds"], "fsync": details["commit_seconds"]}


def _server(folder: Path, env: dict[str, str] | None = None) -> ServerProcess:
    return ServerProcess(folder, env={"PIGEON_STORE__SYNC": "true", **BASELINE, **(env or {})})


def _db_bytes(folder: Path, names: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Entries and bytes (LMDB pages) of the named databases of a stopped server's folder."""
    env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=64)
    try:
        out = {}
        with env.begin() as txn:
            for name in names:
                st = txn.stat(env.open_db(name.encode(), txn=txn, create=False))
                pages = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
                out[name] = {"entries": st["entries"], "bytes": pages * st["psize"]}
        return out
    finally:
        env.close()


# -- audience: entry, waiting, timers ----------------------------------------------------------

async def load_profiles(address: str, count: int, connections: int = 2, concurrency: int = 64) -> float:
    """``count`` profiles by ``profiles.upsert``; the seconds it took."""
    started = time.perf_counter()
    indexes = iter(range(count))

    async def worker(client: Client) -> None:
        for i in indexes:
            await client.call(api.UpsertProfile(identity=f"crm:{i}", attributes={
                "points": (i * 37) % 2000, "tier": TIERS[i % 3], "city": CITIES[i % len(CITIES)]}))

    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(open_client(address)) for _ in range(connections)]
        await asyncio.gather(*(worker(c) for c in clients for _ in range(concurrency)))
    return time.perf_counter() - started


def audience_journey(due_s: int) -> dict[str, Any]:
    return {
        "id": "audience",
        "entry": {"read": True, "rate": 100_000, "condition": "profile.points >= 0"},
        "nodes": [
            {"type": "wait", "id": "wait", "until": str(due_s), "next": "done"},
            {"type": "end", "id": "done"},
        ],
    }


async def _enter(client: Client, pid: int, profiles: int, due_s: int) -> dict[str, Any]:
    """Publish the read-audience journey; poll until every profile entered."""
    marks = sorted({max(1, profiles // 100), max(1, profiles // 10), profiles})
    memory: dict[str, Any] = {}
    cpu0, details = await _stats(client)
    entered0 = details["entered"]
    started = time.perf_counter()
    await client.call(api.PublishJourney(journey=_spec(audience_journey(due_s))))
    limit = started + max(600.0, profiles / 1000)
    entered = 0
    while entered < profiles and time.perf_counter() < limit:
        await asyncio.sleep(0.1)
        cpu, details = await _stats(client)
        entered = details["entered"] - entered0
        while marks and entered >= marks[0]:
            memory[str(marks.pop(0))] = {"at_s": round(time.perf_counter() - started, 2), **_memory(pid)}
    seconds = time.perf_counter() - started
    return {"entered": entered, "seconds": round(seconds, 2), "per_second": round(entered / seconds),
            "server_cpu_us_per_profile": round((cpu - cpu0) / max(1, entered) * 1e6, 1),
            "server_cpu_share": round((cpu - cpu0) / seconds, 2), "memory_while_entering": memory,
            "before_due_s": round(due_s - time.time(), 1)}


def _spec(d: dict[str, Any]) -> api.JourneySpec:
    return msgspec.convert(d, api.JourneySpec)


async def _fire(client: Client, pid: int, profiles: int, due_s: int) -> dict[str, Any]:
    """Wait for the moment T; poll until the engine fired every timer."""
    await asyncio.sleep(max(0.0, due_s - time.time() - 0.5))
    cpu0, details = await _stats(client)
    fired0 = details["timers_fired"]
    series: list[tuple[float, int]] = []
    peak = _memory(pid)
    fired = 0
    limit = time.time() + max(300.0, profiles / 1000)
    while fired < profiles and time.time() < limit:
        await asyncio.sleep(0.1)
        cpu, details = await _stats(client)
        fired = details["timers_fired"] - fired0
        series.append((time.time() - due_s, fired))
        now = _memory(pid)
        if now["rss_mb"] > peak["rss_mb"]:
            peak = now
    seconds = series[-1][0]
    per_s = [b[1] - a[1] for a, b in zip(series, series[10:])]  # fired in each 1 s window
    return {"fired": fired, "seconds_after_due": round(seconds, 2), "per_second": round(fired / seconds),
            "best_1s_window": max(per_s, default=fired), "server_cpu_us_per_timer":
            round((cpu - cpu0) / max(1, fired) * 1e6, 1), "memory_peak": peak, "steps": details["steps"]}


async def audience(folder: Path, profiles: int, due_after: float) -> dict[str, Any]:
    server = _server(folder / "data")
    server.start(timeout=60)
    try:
        print(f"loading {profiles:,} profiles ...", file=sys.stderr)
        load_s = await load_profiles(server.address, profiles)
        print(f"loaded in {load_s:.1f} s", file=sys.stderr)
        async with open_client(server.address) as client:
            pid = (await client.call(api.GetStats())).process.pid
            idle_before = _memory(pid)
            due_s = int(time.time() + due_after)
            entry = await _enter(client, pid, profiles, due_s)
            print(f"entered {entry['entered']:,} in {entry['seconds']} s ({entry['per_second']:,}/s, "
                  f"{entry['server_cpu_us_per_profile']} µs CPU each)", file=sys.stderr)
            await asyncio.sleep(1.0)
            idle_after = _memory(pid)
        server.stop()
        disk = _db_bytes(folder / "data", ("instances", "timers", "profiles"))
        t0 = time.perf_counter()
        server.start(timeout=120)
        restart_s = time.perf_counter() - t0
        async with open_client(server.address) as client:
            pid = (await client.call(api.GetStats())).process.pid
            await asyncio.sleep(2.0)
            restarted = _memory(pid)
            fire = await _fire(client, pid, profiles, due_s)
            print(f"fired {fire['fired']:,} timers in {fire['seconds_after_due']} s after T "
                  f"({fire['per_second']:,}/s, {fire['server_cpu_us_per_timer']} µs CPU each)", file=sys.stderr)
    finally:
        server.stop()
        server.kill()
    waiting = disk["instances"]["entries"]
    return {
        "profiles": profiles, "load_s": round(load_s, 1), "loadavg_1min_at_end": round(os.getloadavg()[0], 2), "journey": audience_journey(due_s), "entry": entry,
        "waiting": {
            "instances": waiting, "timers": disk["timers"]["entries"],
            "disk_bytes_per_instance": round((disk["instances"]["bytes"] + disk["timers"]["bytes"]) / max(1, waiting), 1),
            "disk": disk,
            "memory_before_publish": idle_before, "memory_after_entry": idle_after,
            "memory_restarted_with_all_waiting": restarted, "restart_s": round(restart_s, 2),
        },
        "timers": fire,
    }


# -- events: an event-triggered journey, open loop -----------------------------------------------

def purchase_journey() -> dict[str, Any]:
    return {
        "id": "purchase",
        "entry": {"event": "purchase"},
        "reentrance": {"allowed": True},
        "nodes": [
            {"type": "push", "id": "thanks", "message": "thanks", "next": "done"},
            {"type": "end", "id": "done"},
        ],
    }


class _Provider:
    """The mock provider of the events phase: the mock APNs (sandbox) or the mock FCM, in its
    own process, every token accepted, every accepted push recorded."""

    def __init__(self, kind: str, folder: Path, workers: int) -> None:
        self.kind = kind
        if kind == "apns":
            self.key = SigningKey.generate(key_id="BENCHKEY01", team_id="BENCHTEAM1")
            self.mock: MockApnsProcess | MockFcmProcess = MockApnsProcess(
                folder / "apns", environment="sandbox", workers=workers, config={
                    "keys": [self.key.spec()], "accept_any_token": True, "faults": {"record_accepted": True}})
        else:
            self.account = ServiceAccount.generate(PROJECT)
            self.mock = MockFcmProcess(folder / "fcm", workers=workers, config={
                "projects": {PROJECT: {"service_accounts": [self.account.spec()]}},
                "faults": {"accept_any_token": True, "record_accepted": True}})

    def env(self) -> dict[str, str]:
        m = self.mock
        if isinstance(m, MockApnsProcess):
            return {"PIGEON_APNS__SANDBOX__ADDRESS": m.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(m.ca_file)}
        return {"PIGEON_FCM__URL": m.url, "PIGEON_FCM__TOKEN_URI": m.token_uri, "PIGEON_FCM__CA_FILE": str(m.ca_file)}

    async def register(self, client: Client) -> None:
        if isinstance(self.mock, MockApnsProcess):
            await client.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
                key_pem=self.key.private_key_pem, key_id=self.key.key_id, team_id=self.key.team_id)))
        else:
            await client.call(api.RegisterAndroidApp(app=APP, service_account=self.account.info(self.mock.token_uri)))

    def token(self, i: int) -> tuple[api.Platform, str]:
        return ("apns-sandbox", f"{i:064x}") if self.kind == "apns" else ("fcm", f"tok-{i:08d}")

    def received(self) -> int:
        stats = self.mock.admin.stats()
        return int(stats.get("accepted" if self.kind == "apns" else "successes", 0))

    def stamps(self) -> list[tuple[int, int]]:
        """(the event's ``t``, received at ns) of each accepted push."""
        if self.kind == "apns":
            return [(int(a["payload"]["t"]), a["received_at_ns"]) for a in self.mock.admin.accepted()]
        return [(int(a["message"]["data"]["t"]), a["received_at_ns"]) for a in self.mock.admin.accepted()]


async def _setup_events(address: str, provider: _Provider, profiles: int) -> None:
    async with open_client(address) as client:
        await provider.register(client)
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=[APP])))
        await client.call(api.PublishMessage(message=api.MessageSpec(id="thanks", channel="push", content=api.MessageContent(
            title="Thanks for your order of {{ event.sku }}", body="It ships today.", data={"t": "{{ event.t }}"}))))
        await client.call(api.PublishJourney(journey=_spec(purchase_journey())))
        indexes = iter(range(profiles))

        async def worker() -> None:
            for i in indexes:
                platform, token = provider.token(i)
                await client.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform=platform, token=token))

        await asyncio.gather(*(worker() for _ in range(64)))


async def _send(client: Client, rate: int, seconds: float, profiles: int) -> tuple[int, int, int, Latencies]:
    """Open loop: ``rate / 100`` events every 10 ms for ``seconds`` (+ the warm-up); events sent,
    rejected or failed, the measured window's start (ns), and the acks' latencies from schedule."""
    per_tick = max(1, round(rate * TICK_S))
    ticks = int((seconds + WARMUP_S) / TICK_S)
    acks = Latencies()
    tasks: set[asyncio.Task[None]] = set()
    problems = 0
    loop = asyncio.get_running_loop()
    start_loop = loop.time() + 0.05
    warmup_ticks = int(WARMUP_S / TICK_S)
    threshold = 0

    async def one(batch: list[api.Event], at: float) -> None:
        nonlocal problems
        try:
            result = await client.call(api.IngestEvents(events=batch), timeout=30)
            problems += len(batch) - result.accepted
        except Exception:
            problems += len(batch)
        acks.record(loop.time() - at)

    n = 0
    for tick in range(ticks):
        at = start_loop + tick * TICK_S
        await asyncio.sleep(max(0.0, at - loop.time()))
        # The scheduled send time on the wall clock the mock stamps with, read now: this VM's
        # wall clock drifts from the monotonic one (5 ms a second, and steps), so a stamp made
        # from the round's start would drift by as much.
        t = time.time_ns() - int((loop.time() - at) * 1e9)
        if tick == warmup_ticks:
            threshold = t  # the first measured event's stamp
        batch = [api.Event(identity=f"crm:{(n + k) % profiles}", type="purchase",
                           data={"t": t, "sku": f"sku-{(n + k) % 97}"}) for k in range(per_tick)]
        n += per_tick
        task = loop.create_task(one(batch, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return n, problems, threshold, acks


async def _round(address: str, provider: _Provider, rate: int, seconds: float, profiles: int) -> dict[str, Any]:
    fcm = provider.mock
    fcm.admin.clear_accepted()
    async with open_client(address) as client, open_client(address) as monitor:
        stats = await monitor.call(api.GetStats())
        pid = stats.process.pid
        cpu0, details0 = await _stats(monitor)
        commits0, own0, store0 = (stats.store.commits if stats.store else 0), own_cpu(), _store(stats)
        mock0 = sum(tree_cpu(fcm.pid).values()) if fcm.pid else 0.0
        successes0 = await asyncio.to_thread(provider.received)
        started = time.perf_counter()
        backlog: list[tuple[int, int]] = []  # each 0.5 s: events the engine has not read, pushes not received

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.5)
                _, d = await _stats(monitor)
                received = await asyncio.to_thread(provider.received) - successes0
                backlog.append((d["log_end"] - d["position"], d["entered"] - details0["entered"] - received))

        sampler = asyncio.get_running_loop().create_task(sample())
        sent, problems, measured_ns, acks = await _send(client, rate, seconds, profiles)
        wall = time.perf_counter() - started
        sampler.cancel()
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            if await asyncio.to_thread(provider.received) - successes0 >= sent - problems:
                break
            await asyncio.sleep(0.2)
        cpu, details = await _stats(monitor)
        stats = await monitor.call(api.GetStats())
        commits, own = (stats.store.commits if stats.store else 0) - commits0, own_cpu() - own0
        store = {k: v - store0[k] for k, v in _store(stats).items()}
        mock = (sum(tree_cpu(fcm.pid).values()) if fcm.pid else 0.0) - mock0
        memory = _memory(pid)
    accepted = await asyncio.to_thread(provider.stamps)
    latencies = Latencies()
    windows: dict[int, Latencies] = {}  # by 5 s of send time
    counted = 0
    for t, received_ns in accepted:
        if t >= measured_ns:
            latency = (received_ns - t) / 1e9
            latencies.record(latency)
            windows.setdefault((t - measured_ns) // 5_000_000_000, Latencies()).record(latency)
            counted += 1
    lat = latencies.summary()
    return {
        "events_sent": sent, "events_not_accepted": problems, "pushes_received": len(accepted),
        "entered": details["entered"] - details0["entered"], "send_wall_s": round(wall, 2),
        "events_per_second": round(sent / wall), "measured_pushes": counted,
        "event_to_provider_ms": {k: round(lat[k], 1) for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms")},
        "ingest_ack_ms": {k: round(v, 1) for k, v in acks.summary().items() if k != "count"},
        "p99_ms_by_5s": [round(windows[w].summary()["p99_ms"], 1) for w in sorted(windows)],
        "server_cpu_us_per_event": round((cpu - cpu0) / max(1, sent) * 1e6, 1),
        "server_cpu_share": round((cpu - cpu0) / wall, 2),
        "mock_cpu_us_per_push": round(mock / max(1, len(accepted)) * 1e6, 1), "server_memory": memory,
        "store_commits_per_second": round(commits / wall), "loadavg_1min_after": round(os.getloadavg()[0], 2),
        "engine_lag_events_max": max((b[0] for b in backlog), default=0),
        "entered_not_received_max": max((b[1] for b in backlog), default=0),
        "store_ms_per_commit": {k: round(v / max(1, commits) * 1000, 2) for k, v in store.items()},
        "store_writer_busy_share": round(sum(store.values()) / wall, 2), "client_cpu_share": round(own / wall, 2),
    }


def _say(what: str, r: dict[str, Any]) -> None:
    print(f"{what}: {r['events_per_second']:,} events/s, {r['pushes_received']:,} pushes of {r['events_sent']:,}, "
          f"event -> provider {r['event_to_provider_ms']}, {r['server_cpu_us_per_event']} µs server CPU an event, "
          f"load {r['loadavg_1min_after']}", file=sys.stderr)


async def events(folder: Path, profiles: int, rate: int, seconds: float, rounds: int, kind: str,
                 workers: int, also: list[int]) -> dict[str, Any]:
    provider = _Provider(kind, folder, workers)
    with provider.mock:
        server = _server(folder / "data", provider.env())
        server.start(timeout=60)
        try:
            await _setup_events(server.address, provider, profiles)
            out = []
            for n in range(rounds):
                r = await _round(server.address, provider, rate, seconds, profiles)
                out.append(r)
                _say(f"events round {n + 1}", r)
            lower = []
            for other in also:  # one round at each lower rate: where the latency stands below the target's
                lower.append({"rate": other, **await _round(server.address, provider, other, seconds, profiles)})
                _say(f"events at {other:,}/s", lower[-1])
        finally:
            server.stop()
            server.kill()
    median = {"events_per_second": statistics.median(r["events_per_second"] for r in out),
              "server_cpu_us_per_event": statistics.median(r["server_cpu_us_per_event"] for r in out)}
    for k in ("p50_ms", "p99_ms", "max_ms"):
        median[f"event_to_provider_{k}"] = statistics.median(r["event_to_provider_ms"][k] for r in out)
    return {"provider": f"mock {kind}", "mock_workers": workers, "profiles": profiles, "rate": rate, "seconds": seconds, "warmup_s": WARMUP_S,
            "rounds": out, "lower_rates": lower,
            "journey": purchase_journey(), "median": median}


# -- the run -----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journeys", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 profiles, 2 rounds of 5 s of events")
    parser.add_argument("--only", choices=("audience", "events"), help="one phase")
    parser.add_argument("--profiles", type=int, help="read audience size (default 1,000,000)")
    parser.add_argument("--due-after", type=float, help="seconds from the publish to the waits' moment T")
    parser.add_argument("--rate", type=int, default=5000, help="events/s of the events phase")
    parser.add_argument("--seconds", type=float, help="each events round (default 30)")
    parser.add_argument("--rounds", type=int, help="events rounds (default 3)")
    parser.add_argument("--provider", choices=("apns", "fcm"), default="apns", help="the mock of the events phase")
    parser.add_argument("--also-rates", default="1000,2500", help="one events round at each (default 1000,2500)")
    parser.add_argument("--mock-workers", type=int, default=2, help="the mock's processes (default 2)")
    parser.add_argument("--event-profiles", type=int, default=10_000, help="profiles with a token")
    parser.add_argument("--baseline", metavar="DIR", help="run the server of the checkout in DIR instead")
    parser.add_argument("--out", help="results file (default bench/results/journeys.json; --quick: /tmp)")
    args = parser.parse_args(argv)
    profiles = args.profiles or (20_000 if args.quick else 1_000_000)
    due_after = args.due_after or (12.0 if args.quick else 30 + profiles / 10_000)
    seconds = args.seconds or (5.0 if args.quick else 30.0)
    rounds = args.rounds or (2 if args.quick else 3)
    event_profiles = min(args.event_profiles, 2_000) if args.quick else args.event_profiles
    if args.baseline:  # that checkout's server modules before this one's
        BASELINE.update(PYTHONSAFEPATH="1", PYTHONPATH=str(Path(args.baseline).resolve()))
    results: dict[str, Any] = {"machine": machine(), "baseline": args.baseline, "loadavg_at_start": os.getloadavg()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-journeys-") as tmp:
        if args.only in (None, "audience"):
            results["audience"] = run(audience(Path(tmp) / "a", profiles, due_after))
        if args.only in (None, "events"):
            results["events"] = run(events(Path(tmp) / "e", event_profiles, args.rate, seconds, rounds, args.provider, args.mock_workers,
                                                [int(r) for r in args.also_rates.split(",") if r]))
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out if args.out or not args.quick else "/tmp/journeys-quick.json"
    path = write_results("journeys", results, out)
    print(f"done in {results['seconds']} s -> {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
