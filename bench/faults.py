"""Provider fault storms, end to end: a campaign to a failing provider beside a healthy app.

    .venv/bin/python -m bench.faults                   # writes bench/results/faults.json
    .venv/bin/python -m bench.faults --storm fcm       # the failing provider is the mock FCM
    .venv/bin/python -m bench.faults --phases storm    # one of: calm, storm, breaker (comma-separated)
    .venv/bin/python -m bench.faults --storm fcm --storm-fault goaway_after_streams=7   # another storm

The server under test runs as its own process (``pigeon serve`` on a fresh data folder). Two
apps: ``storm`` (APNs sandbox, or FCM with ``--storm fcm``) whose provider misbehaves, and
``calm`` (APNs production) whose provider, another mock process, is healthy. Each mock runs
in its own process over TLS and HTTP/2 and accepts every token. Phases:

- ``calm``: the calm app's campaign alone (``--calm`` profiles): its sends/s;
- ``storm``: the storm app's campaign (``--notifications`` profiles) with ``ratio_503`` 0.5
  (half the requests answered 503; or the faults given with ``--storm-fault NAME=VALUE``, which
  both mocks name alike: ``goaway_after_streams``, ``reset_after_streams``, ``latency_ms``...),
  and at the same time the calm app's campaign: the storm
  campaign's wall time, its deliveries over time (from the mock's acceptance timestamps:
  when 50%, 90%, 99% and all of the delivered were accepted), its outcomes, the requests the
  mock got; the calm campaign's sends/s during the storm;
- ``breaker``: the storm provider answers every request 503 (``ratio_503`` 1.0): a campaign
  of ``--breaker-notifications`` profiles; its wall time, outcomes and the requests the mock
  got (the hammering); then the provider heals and, once the breaker's cool-down has passed,
  the same campaign again: its outcomes and wall time (recovery), and the sender's breaker
  as ``server.stats`` shows it.

Every campaign is a ``messages.send`` to a list of identities; the call returns once every
notification is settled.
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

import msgspec

from ._harness import ServerUnderTest, machine, write_results
from plugins.apns.mock import MockApnsProcess, SigningKey
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.asyncio_client import Client, open_client, run

STORM, CALM = "com.example.storm", "com.example.calm"
PROJECT = "storm-push"


def _message(channel: str) -> api.MessageSpec:
    return api.MessageSpec(id=f"{channel}-msg", channel=channel, content=api.MessageContent(
        title="Hi {{ profile.person.firstName }}", body="Your order shipped"))


async def load(client: Client, prefix: str, count: int, app: str, platform: str) -> list[str]:
    """``count`` profiles with one token each for ``app``; their identities."""
    queue = iter(range(count))

    async def worker() -> None:
        for i in queue:
            token = f"{prefix}-{i:08d}" if platform == "fcm" else f"{hash((prefix, i)) & (2**256 - 1):064x}"
            await client.call(api.UpsertProfile(identity=f"{prefix}:{i}", attributes={"person": {"firstName": "Ana"}}))
            await client.call(api.RegisterToken(identity=f"{prefix}:{i}", app=app, platform=platform, token=token))

    await asyncio.gather(*(worker() for _ in range(32)))
    return [f"{prefix}:{i}" for i in range(count)]


async def campaign(client: Client, message: str, identities: list[str]) -> tuple[api.SendResult, float, int]:
    """Send ``message`` to ``identities`` (in calls of at most 10,000); the merged result, the
    wall time and the start (ns since the epoch)."""
    t0_ns = time.time_ns()
    started = time.perf_counter()
    results = await asyncio.gather(*(client.call(api.SendMessage(id=message, identities=identities[i:i + 10_000]),
                                                 timeout=3600) for i in range(0, len(identities), 10_000)))
    wall = time.perf_counter() - started
    merged = results[0]
    for other in results[1:]:
        merged.sent += other.sent
        merged.delivered += other.delivered
        merged.failed = {k: merged.failed.get(k, 0) + other.failed.get(k, 0) for k in {*merged.failed, *other.failed}}
    return merged, wall, t0_ns


def timeline(accepted_ns: list[int], t0_ns: int) -> dict[str, float | None]:
    """Seconds from the start to the acceptance of 50%, 90%, 99% and all of the accepted."""
    times = sorted((t - t0_ns) / 1e9 for t in accepted_ns)
    if not times:
        return {"p50_s": None, "p90_s": None, "p99_s": None, "all_s": None}
    pick = lambda q: round(times[min(len(times) - 1, int(q * len(times)))], 2)  # noqa: E731
    return {"p50_s": pick(0.5), "p90_s": pick(0.9), "p99_s": pick(0.99), "all_s": round(times[-1], 2)}


def outcome(result: api.SendResult, wall: float) -> dict[str, Any]:
    return {"sent": result.sent, "delivered": result.delivered, "failed": result.failed, "wall_s": round(wall, 2),
            "delivered_per_s": round(result.delivered / wall, 1)}


async def phases(args: argparse.Namespace, client: Client, storm: Any, calm: MockApnsProcess,
                 storm_ids: list[str], calm_ids: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "calm" in args.phases:
        result, wall, _ = await campaign(client, "calm-push-msg", calm_ids)
        out["calm_alone"] = outcome(result, wall)
        print(f"calm alone: {out['calm_alone']}", file=sys.stderr)
    if "storm" in args.phases:
        storm.admin.set_faults(**args.storm_faults, record_accepted=True)
        storm.admin.clear_accepted(), storm.admin.clear_stats(), calm.admin.clear_accepted()
        calm_task = asyncio.create_task(campaign(client, "calm-push-msg", calm_ids))
        result, wall, t0 = await campaign(client, "storm-push-msg", storm_ids)
        calm_result, calm_wall, calm_t0 = await calm_task
        accepted = [a["received_at_ns"] for a in storm.admin.accepted()]
        calm_accepted = sorted(a["received_at_ns"] for a in calm.admin.accepted())
        during = [t for t in calm_accepted if t <= t0 + wall * 1e9]
        span = (min(calm_t0 + calm_wall * 1e9, t0 + wall * 1e9) - calm_t0) / 1e9
        out["storm"] = {**outcome(result, wall), "provider_requests": storm.admin.stats()["requests"],
                        "delivered_over_time": timeline(accepted, t0),
                        "calm_during": {**outcome(calm_result, calm_wall),
                                        "accepted_per_s_while_both_ran": round(len(during) / max(span, 1e-9), 1)}}
        print(f"storm: {out['storm']}", file=sys.stderr)
    if "breaker" in args.phases:
        ids = storm_ids[: args.breaker_notifications]
        storm.admin.reset_faults()
        storm.admin.set_faults(accept_any_token=True, ratio_503=1.0)
        storm.admin.clear_stats()
        result, wall, _ = await campaign(client, "storm-push-msg", ids)
        hammered = storm.admin.stats()["requests"]
        out["breaker_wave"] = {**outcome(result, wall), "provider_requests": hammered}
        print(f"breaker, 100% 503: {out['breaker_wave']}", file=sys.stderr)
        result, wall, _ = await campaign(client, "storm-push-msg", ids)
        out["breaker_second_campaign"] = {**outcome(result, wall), "provider_requests": storm.admin.stats()["requests"] - hammered}
        print(f"breaker, a second campaign during the wave: {out['breaker_second_campaign']}", file=sys.stderr)
        storm.admin.set_faults(ratio_503=0.0)
        healed = time.perf_counter()
        recovered = None
        for _ in range(int(args.recover_limit_s / 0.5)):
            result, wall, _ = await campaign(client, "storm-push-msg", ids[:1])
            if result.delivered:
                recovered = time.perf_counter() - healed
                break
            await asyncio.sleep(0.5)
        result, wall, _ = await campaign(client, "storm-push-msg", ids)
        out["breaker_recovered"] = {**outcome(result, wall), "first_delivery_after_healing_s":
                                    None if recovered is None else round(recovered, 2)}
        print(f"breaker, healed: {out['breaker_recovered']}", file=sys.stderr)
    return out


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    key = SigningKey.generate(key_id="BENCHKEY01", team_id="BENCHTEAM1")
    account = ServiceAccount.generate(PROJECT)
    state = Path(tempfile.mkdtemp(prefix="pigeon-bench-faults-"))
    apns_config = {"keys": [key.spec()], "accept_any_token": True}
    fcm_config = {"projects": {PROJECT: {"service_accounts": [account.spec()]}}, "faults": {"accept_any_token": True}}
    with MockApnsProcess(state / "calm", environment="production", config=apns_config) as calm, \
            (MockFcmProcess(state / "storm", config=fcm_config) if args.storm == "fcm"
             else MockApnsProcess(state / "storm", environment="sandbox", config=apns_config)) as storm:
        env = {"PIGEON_APNS__PRODUCTION__ADDRESS": calm.address, "PIGEON_APNS__PRODUCTION__CA_FILE": str(calm.ca_file),
               "PIGEON_STORE__SYNC": "false", **dict(kv.split("=", 1) for kv in args.env)}
        if args.storm == "fcm":
            env |= {"PIGEON_FCM__URL": storm.url, "PIGEON_FCM__TOKEN_URI": storm.token_uri,
                    "PIGEON_FCM__CA_FILE": str(storm.ca_file)}
        else:
            env |= {"PIGEON_APNS__SANDBOX__ADDRESS": storm.address, "PIGEON_APNS__SANDBOX__CA_FILE": str(storm.ca_file)}
        with ServerUnderTest(env=env, address=args.address) as server:
            async with open_client(server.address) as client:
                auth = api.ApnsTokenAuth(key_pem=key.private_key_pem, key_id=key.key_id, team_id=key.team_id)
                await client.call(api.RegisterIosApp(app=CALM, environment="production", auth=auth))
                if args.storm == "fcm":
                    await client.call(api.RegisterAndroidApp(app=STORM, service_account=account.info(storm.token_uri)))
                else:
                    await client.call(api.RegisterIosApp(app=STORM, environment="sandbox", auth=auth))
                for name, app in (("storm-push", STORM), ("calm-push", CALM)):
                    await client.call(api.PublishConfig(config=api.ChannelConfig(name=name, apps=[app])))
                    await client.call(api.PublishMessage(message=_message(name)))
                storm_ids = await load(client, "storm", args.notifications, STORM,
                                       "fcm" if args.storm == "fcm" else "apns-sandbox")
                calm_ids = await load(client, "calm", args.calm, CALM, "apns")
                out = await phases(args, client, storm, calm, storm_ids, calm_ids)
                stats = await client.call(api.GetStats())
                out["delivery_stats"] = [msgspec.to_builtins(a) for a in stats.actors if a.name == "delivery"]
    return {"machine": machine(), "storm_provider": args.storm, "storm_faults": args.storm_faults,
            "notifications": args.notifications, "calm": args.calm, "env": args.env, **out}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--storm", choices=["apns", "fcm"], default="apns")
    parser.add_argument("--notifications", type=int, default=2000)
    parser.add_argument("--calm", type=int, default=10_000)
    parser.add_argument("--breaker-notifications", type=int, default=500)
    parser.add_argument("--recover-limit-s", type=float, default=120.0)
    parser.add_argument("--phases", default="calm,storm,breaker")
    parser.add_argument("--storm-fault", action="append", default=[],
                        help="NAME=VALUE (a JSON value) set on the storm provider in the storm phase; "
                             "default ratio_503=0.5")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server (settings)")
    parser.add_argument("--address", help="a server already running there")
    parser.add_argument("--out", help="results file (default bench/results/faults[-fcm].json)")
    args = parser.parse_args(argv)
    args.phases = set(args.phases.split(","))
    args.storm_faults = {name: msgspec.json.decode(value) for name, value in
                         (kv.split("=", 1) for kv in args.storm_fault)} or {"ratio_503": 0.5}
    results = run(bench(args))
    path = write_results("faults" if args.storm == "apns" else "faults-fcm", results, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
