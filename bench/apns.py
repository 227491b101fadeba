"""Benchmark: APNs notifications through one pool to the mock APNs, side by side with aioapns
and @parse/node-apn sending the same notifications to the same mock.

    python -m bench.apns                  # 100,000 notifications per sender, 3 rounds
    python -m bench.apns --quick          # 10,000 per sender, 1 round (a smoke run)
    python -m bench.apns --senders pigeon --count 200000

One mock APNs process (``plugins.apns.mock``, token auth, every well-formed token accepted,
nothing recorded) serves every run. The senders run one after another, each in its own
process, in the same order every round:

- ``pigeon``: Pigeon's APNs channel (`plugins.apns.ApnsChannel`) as the delivery actor drives
  it: batches of 1,000 `DeliveryJob` built from content fields (the payload is built for each
  notification), 8 batches in flight, one pool (one app, one environment: 4 connections of at
  most 100 streams), on Trio;
- ``aioapns``: ``aioapns.APNs`` with the same key (4 connections), on asyncio's default loop,
  1,000 sends in flight (``aioapns-uvloop``: the same on uvloop, which changes little);
- ``node-apn``: ``@parse/node-apn``'s ``Provider`` with the same key (Node's C HTTP/2 stack),
  1,000 sends in flight.

Each sends ``--count`` notifications (an alert with a title and a body, to 1,000 distinct
tokens) after a warm-up of 1,000, and reports notifications/s (wall time from the first send
to the last answer), its own CPU time per notification (``getrusage`` for the Python senders,
``process.cpuUsage()`` for Node) and its resident memory at each tenth of the run. The mock's
CPU is read from ``/proc`` over the same interval: when it is near one core per mock worker,
the mock, not the sender, set the pace, and the output says so (then try ``--mock-workers 2``).

Figures are printed and written as JSON (``bench/results/apns.json`` by default). Node.js
and npm are needed for ``node-apn``; its package is installed into ``tests/node`` with
``npm ci`` when missing.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from plugins.apns.mock import MockApnsProcess, SigningKey

from ._harness import BODY, Progress, machine, own_cpu, title, tree_cpu, write_results

TOPIC = "com.example.bench"
TOKENS = 1_000
WARMUP = 1_000
IN_FLIGHT = 1_000
NODE_DIR = Path(__file__).resolve().parents[1] / "tests" / "node"
SENDERS = ("pigeon", "aioapns", "aioapns-uvloop", "node-apn")


# -- the senders, each in its own process ----------------------------------------------------


def run_pigeon(job: dict[str, Any]) -> dict[str, Any]:
    import trio

    from plugins.apns import ApnsChannel
    from server.runtime.app import tune_gc
    from plugins.apns._credentials import check_ios
    from protocols import api
    from server.runtime.config import ApnsEndpoint, ApnsSettings
    from server.channels import AppRecord, DeliveryJob

    settings = ApnsSettings(sandbox=ApnsEndpoint(address=job["address"], ca_file=job["ca_file"]),
                            max_connections=4, streams_per_connection=100)
    request = api.RegisterIosApp(
        app=TOPIC, environment="sandbox",
        auth=api.ApnsTokenAuth(key_pem=job["key_pem"], key_id=job["key_id"], team_id=job["team_id"]),
    )
    app = AppRecord(app=TOPIC, ios=check_ios(request))
    tokens = job["tokens"]
    batch_size = 1_000

    def jobs(start: int, n: int) -> list[DeliveryJob]:
        return [
            DeliveryJob(app=app, token=tokens[i % len(tokens)], platform="apns-sandbox",
                        content=api.PushContent(title=title(i), body=BODY))
            for i in range(start, start + n)
        ]

    async def main() -> dict[str, Any]:
        channel = ApnsChannel(settings)
        tune_gc()  # as `pigeon serve` does
        async with trio.open_nursery() as nursery:
            await nursery.start(channel.run)
            await channel.send(jobs(0, WARMUP))
            progress = Progress(job["count"])
            sent = failed = 0
            limiter = trio.Semaphore(IN_FLIGHT // batch_size * 8)

            async def batch(start: int) -> None:
                nonlocal sent, failed
                try:
                    results = await channel.send(jobs(start, batch_size))
                finally:
                    limiter.release()
                ok = sum(r.status == "sent" for r in results)
                sent += ok
                failed += len(results) - ok
                progress.add(len(results))

            cpu0, t0 = own_cpu(), time.perf_counter()
            async with trio.open_nursery() as batches:
                for start in range(0, job["count"], batch_size):
                    await limiter.acquire()
                    batches.start_soon(batch, WARMUP + start)
            wall, cpu = time.perf_counter() - t0, own_cpu() - cpu0
            nursery.cancel_scope.cancel()
        return {"sent": sent, "failed": failed, "wall_s": wall, "cpu_s": cpu, "rss": progress.rss}

    return trio.run(main)


def run_aioapns(job: dict[str, Any]) -> dict[str, Any]:
    import asyncio
    import ssl

    import uvloop
    from aioapns import APNs, NotificationRequest, PushType
    from aioapns.connection import APNsDevelopmentClientProtocol

    host, _, port = job["address"].rpartition(":")

    class ToMock(APNsDevelopmentClientProtocol):
        APNS_SERVER = host
        APNS_PORT = int(port)

    tokens = job["tokens"]

    def request(i: int) -> Any:
        return NotificationRequest(
            device_token=tokens[i % len(tokens)],
            message={"aps": {"alert": {"title": title(i), "body": BODY}}},
            push_type=PushType.ALERT,
        )

    async def main() -> dict[str, Any]:
        context = ssl.create_default_context(cafile=job["ca_file"])
        client = APNs(key=job["key_pem"], key_id=job["key_id"], team_id=job["team_id"], topic=TOPIC,
                      use_sandbox=True, ssl_context=context, max_connections=4)
        client.pool.protocol_class = ToMock
        try:
            await asyncio.gather(*(client.send_notification(request(i)) for i in range(WARMUP)))
            progress = Progress(job["count"])
            sent = failed = 0
            cpu0, t0 = own_cpu(), time.perf_counter()
            for start in range(WARMUP, WARMUP + job["count"], IN_FLIGHT):
                stop = min(start + IN_FLIGHT, WARMUP + job["count"])
                results = await asyncio.gather(*(client.send_notification(request(i)) for i in range(start, stop)))
                ok = sum(r.is_successful for r in results)
                sent += ok
                failed += len(results) - ok
                progress.add(len(results))
            wall, cpu = time.perf_counter() - t0, own_cpu() - cpu0
        finally:
            client.pool.close()
            await asyncio.sleep(0.1)
        return {"sent": sent, "failed": failed, "wall_s": wall, "cpu_s": cpu, "rss": progress.rss}

    if job.get("loop") == "asyncio":
        return asyncio.run(main())
    return uvloop.run(main())


def run_node(job: dict[str, Any]) -> dict[str, Any]:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed")
    done = subprocess.run(
        [node, str(Path(__file__).with_name("apns_node.js"))],
        input=json.dumps({**job, "topic": TOPIC, "warmup": WARMUP, "in_flight": IN_FLIGHT, "body": BODY}),
        capture_output=True, text=True, timeout=1800, check=False,
        env={**os.environ, "NODE_PATH": str(NODE_DIR / "node_modules")},
    )
    if done.returncode != 0:
        raise RuntimeError(f"node-apn sender failed:\n{done.stderr}")
    return json.loads(done.stdout)


# -- the driver ---------------------------------------------------------------------------


def _ensure_node_apn() -> str | None:
    """Why node-apn cannot run, or None."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return "node and npm are not installed"
    if not (NODE_DIR / "node_modules" / "@parse" / "node-apn").is_dir():
        done = subprocess.run([npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
                              capture_output=True, text=True, timeout=600, check=False)
        if done.returncode != 0:
            return f"npm ci failed: {done.stderr.strip()[-300:]}"
    return None


def run_sender(name: str, job: dict[str, Any], mock: MockApnsProcess) -> dict[str, Any]:
    mock.admin.clear_stats()
    assert mock.pid is not None
    mock_cpu0 = sum(tree_cpu(mock.pid).values())
    done = subprocess.run(
        [sys.executable, "-m", "bench.apns", "--run", name],
        input=json.dumps(job), capture_output=True, text=True, timeout=3600, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    mock_cpu = sum(tree_cpu(mock.pid).values()) - mock_cpu0
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    count = result["sent"] + result["failed"]
    stats = mock.admin.stats()
    rss = result["rss"]
    # The mock's CPU per answered notification (warm-up included) at the sender's rate: the
    # share of a core the mock used while the sender ran.
    mock_per_notification = mock_cpu / max(1, stats["accepted"])
    mock_share = mock_per_notification * count / result["wall_s"]
    return {
        "sender": name,
        "notifications": count,
        "sent": result["sent"],
        "failed": result["failed"],
        "per_second": round(count / result["wall_s"]),
        "cpu_us_per_notification": round(result["cpu_s"] / count * 1e6, 1),
        "sender_cpu_share": round(result["cpu_s"] / result["wall_s"], 2),
        "rss_mb_by_tenth": [round(r / 2**20, 1) for r in rss],
        "mock_accepted": stats["accepted"],
        "mock_cpu_us_per_notification": round(mock_per_notification * 1e6, 1),
        "mock_cpu_share": round(mock_share, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.apns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="notifications per sender per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", default="pigeon,aioapns,node-apn", help="comma-separated: " + ", ".join(SENDERS))
    parser.add_argument("--mock-workers", type=int, default=1)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="the mock delays each answer this long (APNs is a network away)")
    parser.add_argument("--quick", action="store_true", help="10,000 notifications, one round")
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--run", choices=SENDERS, help=argparse.SUPPRESS)  # a sender's own process
    args = parser.parse_args(argv)

    if args.run:
        job = json.loads(sys.stdin.read())
        if args.run == "aioapns":
            job["loop"] = "asyncio"
        runner = {"pigeon": run_pigeon, "aioapns": run_aioapns, "aioapns-uvloop": run_aioapns, "node-apn": run_node}[args.run]
        print(json.dumps(runner(job)))
        return 0

    if args.quick:
        args.count, args.rounds = 10_000, 1
    senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    unknown = set(senders) - set(SENDERS)
    if unknown:
        parser.error(f"unknown senders: {', '.join(sorted(unknown))}")
    skipped = {}
    if "node-apn" in senders:
        why = _ensure_node_apn()
        if why:
            skipped["node-apn"] = why
            senders.remove("node-apn")
            print(f"skipping node-apn: {why}", file=sys.stderr)

    key = SigningKey.generate("BENCHKEY01", "BENCHTEAM1")
    tokens = [secrets.token_hex(32) for _ in range(TOKENS)]
    config = {"keys": [key.spec()], "accept_any_token": True,
              "faults": {"record_accepted": False, "latency_ms": args.latency_ms}}
    runs: list[dict[str, Any]] = []
    with MockApnsProcess(environment="sandbox", config=config, workers=args.mock_workers) as mock:
        job = {"address": mock.address, "ca_file": str(mock.ca_file), "key_pem": key.private_key_pem,
               "key_id": key.key_id, "team_id": key.team_id, "tokens": tokens, "count": args.count}
        for round_number in range(1, args.rounds + 1):
            for name in senders:
                run = run_sender(name, job, mock)
                run["round"] = round_number
                runs.append(run)
                saturated = " (the mock was near a full core: it may have set the pace)" if run["mock_cpu_share"] >= 0.85 * args.mock_workers else ""
                print(
                    f"round {round_number} {name:9} {run['per_second']:>7,}/s  {run['cpu_us_per_notification']:>6.1f} µs CPU/notification"
                    f"  (sender {run['sender_cpu_share']:.2f} of a core, mock {run['mock_cpu_share']:.2f})"
                    f"  RSS {run['rss_mb_by_tenth'][0] if run['rss_mb_by_tenth'] else 0}→{run['rss_mb_by_tenth'][-1] if run['rss_mb_by_tenth'] else 0} MB"
                    f"  failed {run['failed']}{saturated}",
                    flush=True,
                )

    summary: dict[str, Any] = {}
    for name in senders:
        mine = [r for r in runs if r["sender"] == name]
        summary[name] = {
            "per_second_median": statistics.median(r["per_second"] for r in mine),
            "cpu_us_per_notification_median": statistics.median(r["cpu_us_per_notification"] for r in mine),
            "mock_cpu_share_median": statistics.median(r["mock_cpu_share"] for r in mine),
            "failed": sum(r["failed"] for r in mine),
        }
    ratios = {}
    if "pigeon" in summary:
        ours = summary["pigeon"]
        for other in summary:
            if other != "pigeon":
                ratios[f"pigeon_vs_{other}"] = {
                    "throughput": round(ours["per_second_median"] / summary[other]["per_second_median"], 2),
                    "cpu_per_notification": round(summary[other]["cpu_us_per_notification_median"] / ours["cpu_us_per_notification_median"], 2),
                }
    print()
    for name, s in summary.items():
        print(f"median {name:9} {s['per_second_median']:>9,.0f}/s  {s['cpu_us_per_notification_median']:>6.1f} µs CPU/notification")
    for name, r in ratios.items():
        print(f"{name}: {r['throughput']}× the throughput, {r['cpu_per_notification']}× less CPU per notification")
    results = {
        "machine": machine(),
        "command": "python -m bench.apns " + " ".join(argv if argv is not None else sys.argv[1:]),
        "count": args.count,
        "rounds": args.rounds,
        "mock_workers": args.mock_workers,
        "latency_ms": args.latency_ms,
        "skipped": skipped,
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
    }
    path = write_results("apns", results, args.out)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
