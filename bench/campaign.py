"""A personalized campaign to a 100,000-profile audience, end to end, to both mock providers.

    .venv/bin/python -m bench.campaign          # writes bench/results/campaign.json
    .venv/bin/python -m bench.campaign --quick  # 10,000 profiles, one round

The server under test runs as its own process (``pigeon serve`` on a fresh data folder),
pointed at a mock APNs and a mock FCM (each its own process, TLS + HTTP/2, every token
accepted). This process loads the audience through the protocol: ``--profiles`` profiles,
each with a first name, a city and loyalty points, half with an iOS (APNs sandbox) token,
half with an Android (FCM) token, every one consenting. It publishes a channel configuration
for the app's two platforms and a message with three personalized fields::

    title: "{{ profile.person.firstName }}, your points are waiting"
    body:  "{{ profile.loyalty.points | number }} points to spend in {{ profile.city }}"
    data.offer: "{{ profile.loyalty.tier | default('basic') }}"

and then, per round, calls ``messages.send`` with the audience ``profile.loyalty.points >= 0``
(every profile: the condition is evaluated for each). The call returns once every
notification is settled. Measured per round:

- sends/s end to end: notifications the providers accepted / wall time of the call;
- CPU µs per send: the server process's own CPU (``server.stats``, getrusage) over the call,
  per notification; the mocks' CPU is reported beside it (they share the machine's 2 cores);
- p99 (and p50) from the send call to the provider's acceptance of each of the first 1,000
  notifications the providers accepted (the mocks' receive timestamps, same clock);
- the server's RSS before the round and its highest reading during it (sampled every 0.25 s).

Rounds run one after the other on the same data; medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._harness import Latencies, ServerUnderTest, machine, server_cpu, tree_cpu, write_results
from plugins.apns.mock import MockApnsProcess, SigningKey
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.asyncio_client import Client, open_client, run

APP = "com.example.bench"
PROJECT = "bench-push"
NAMES = ["Ana", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu"]
CITIES = ["Lyon", "Oslo", "Porto", "Kyiv", "Lima", "Kobe"]
MESSAGE = api.MessageSpec(
    id="points-waiting",
    channel="bench-push",
    content=api.MessageContent(
        title="{{ profile.person.firstName }}, your points are waiting",
        body="{{ profile.loyalty.points | number }} points to spend in {{ profile.city }}",
        data={"offer": "{{ profile.loyalty.tier | default('basic') }}"},
    ),
)
AUDIENCE = "profile.loyalty.points >= 0"


def _token(i: int) -> tuple[str, str]:
    if i % 2:
        return "fcm", f"fcm-bench-{i:08d}"
    return "apns-sandbox", f"{i:064x}"


async def load(client: Client, profiles: int, concurrency: int = 64) -> float:
    """Create the audience; returns the seconds it took."""
    started = time.perf_counter()
    next_index = iter(range(profiles))

    async def worker() -> None:
        for i in next_index:
            attributes = {"person": {"firstName": NAMES[i % len(NAMES)]}, "city": CITIES[i % len(CITIES)],
                          "loyalty": {"points": (i * 37) % 2000}}
            if i % 3 == 0:
                attributes["loyalty"]["tier"] = "gold"
            platform, token = _token(i)
            await client.call(api.UpsertProfile(identity=f"crm:{i}", attributes=attributes))
            await client.call(api.RegisterToken(identity=f"crm:{i}", app=APP, platform=platform, token=token))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def server_rss(client: Client) -> int:
    stats = await client.call(api.GetStats())
    return stats.process.rss_bytes


async def one_round(client: Client, monitor: Client, apns: MockApnsProcess, fcm: MockFcmProcess) -> dict[str, Any]:
    apns.admin.clear_accepted()
    fcm.admin.clear_accepted()
    mocks_cpu0 = _cpu(apns.pid) + _cpu(fcm.pid)
    rss0 = await server_rss(monitor)
    peak = rss0
    cpu0 = await server_cpu(monitor)
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, await server_rss(monitor))
            try:
                await asyncio.wait_for(done.wait(), 0.25)
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    t0_ns = time.time_ns()
    started = time.perf_counter()
    result = await client.call(api.SendMessage(id=MESSAGE.id, audience=AUDIENCE), timeout=3600)
    wall = time.perf_counter() - started
    done.set()
    await sampler
    cpu = await server_cpu(monitor) - cpu0
    mocks_cpu = _cpu(apns.pid) + _cpu(fcm.pid) - mocks_cpu0
    accepted = [a["received_at_ns"] for a in apns.admin.accepted()] + [a["received_at_ns"] for a in fcm.admin.accepted()]
    first = sorted(accepted)[:1000]
    latencies = Latencies()
    for t in first:
        latencies.record((t - t0_ns) / 1e9)
    quantiles = latencies.summary()
    sends = result.sent
    return {
        "targeted": result.targeted,
        "sent": result.sent,
        "delivered": result.delivered,
        "failed": result.failed,
        "excluded": result.excluded,
        "provider_accepted": len(accepted),
        "wall_s": round(wall, 3),
        "sends_per_second": round(len(accepted) / wall),
        "server_cpu_us_per_send": round(cpu / max(1, sends) * 1e6, 1),
        "server_cpu_share": round(cpu / wall, 2),
        "mocks_cpu_us_per_send": round(mocks_cpu / max(1, sends) * 1e6, 1),
        "first_accepted_ms": round((first[0] - t0_ns) / 1e6, 1) if first else None,
        "first_1000_p50_ms": round(quantiles["p50_ms"], 1) if first else None,
        "first_1000_p99_ms": round(quantiles["p99_ms"], 1) if first else None,
        "rss_mb_before": round(rss0 / 2**20, 1),
        "rss_mb_peak": round(peak / 2**20, 1),
    }


def _cpu(pid: int | None) -> float:
    """CPU seconds of a process and its children (the mocks' workers)."""
    if pid is None:
        return 0.0
    return sum(tree_cpu(pid).values())


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    key = SigningKey.generate(key_id="BENCHKEY01", team_id="BENCHTEAM1")
    account = ServiceAccount.generate(PROJECT)
    state = Path(tempfile.mkdtemp(prefix="pigeon-bench-campaign-"))
    faults = {"accept_any_token": True, "record_accepted": True}
    with MockApnsProcess(state / "apns", environment="sandbox", config={"keys": [key.spec()], "accept_any_token": True,
                                                                          "faults": {"record_accepted": True}}) as apns, \
            MockFcmProcess(state / "fcm", config={"projects": {PROJECT: {"service_accounts": [account.spec()]}},
                                                  "faults": faults}) as fcm:
        env = {
            "PIGEON_APNS__SANDBOX__ADDRESS": apns.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(apns.ca_file),
            "PIGEON_FCM__URL": fcm.url, "PIGEON_FCM__TOKEN_URI": fcm.token_uri, "PIGEON_FCM__CA_FILE": str(fcm.ca_file),
            "PIGEON_STORE__SYNC": "true" if args.sync else "false",
        }
        with ServerUnderTest(env=env, address=args.address) as server:
            async with open_client(server.address) as client, open_client(server.address) as monitor:
                await client.call(api.RegisterIosApp(app=APP, environment="sandbox", auth=api.ApnsTokenAuth(
                    key_pem=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)))
                await client.call(api.RegisterAndroidApp(app=APP, service_account=account.info(fcm.token_uri)))
                await client.call(api.PublishConfig(config=api.ChannelConfig(name="bench-push", apps=[APP])))
                await client.call(api.PublishMessage(message=MESSAGE))
                print(f"loading {args.profiles:,} profiles with tokens ...", file=sys.stderr)
                load_s = await load(client, args.profiles)
                print(f"loaded in {load_s:.1f} s", file=sys.stderr)
                rounds = []
                for n in range(args.rounds):
                    round_ = await one_round(client, monitor, apns, fcm)
                    rounds.append(round_)
                    print(f"round {n + 1}: {round_['sends_per_second']:,} sends/s, "
                          f"{round_['server_cpu_us_per_send']} µs server CPU per send "
                          f"(mocks {round_['mocks_cpu_us_per_send']} µs), first 1,000 p99 "
                          f"{round_['first_1000_p99_ms']} ms, RSS {round_['rss_mb_before']}→{round_['rss_mb_peak']} MB",
                          file=sys.stderr)
    median = {k: statistics.median(r[k] for r in rounds) for k in (
        "sends_per_second", "server_cpu_us_per_send", "mocks_cpu_us_per_send", "first_1000_p50_ms", "first_1000_p99_ms",
        "rss_mb_peak")}
    return {"machine": machine(), "profiles": args.profiles, "store_sync": args.sync, "load_s": round(load_s, 1),
            "audience": AUDIENCE, "message": {
                "title": MESSAGE.content.title, "body": MESSAGE.content.body, "data": MESSAGE.content.data},
            "median": median, "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.campaign", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="10,000 profiles, one round")
    parser.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                        help="fsync every commit (the server's default)")
    parser.add_argument("--address", help="use a server already running there (under a profiler, say)")
    parser.add_argument("--out", help="where to write the JSON results")
    args = parser.parse_args(argv)
    if args.quick:
        args.profiles, args.rounds = 10_000, 1
    results = run(bench(args))
    path = write_results("campaign", results, args.out if not args.quick or args.out else "/tmp/campaign-quick.json")
    m = results["median"]
    print(f"{results['profiles']:,} profiles: {m['sends_per_second']:,.0f} sends/s, {m['server_cpu_us_per_send']} µs "
          f"server CPU per send, first 1,000 p99 {m['first_1000_p99_ms']} ms, RSS peak {m['rss_mb_peak']} MB -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
