"""Benchmark: FCM messages through Pigeon's FCM channel to the mock FCM, side by side with
firebase-admin (Google's Python SDK) sending the same messages to the same mock.

    python -m bench.fcm                   # 100,000 messages per sender, 3 rounds
    python -m bench.fcm --quick           # 10,000 per sender, 1 round (a smoke run)
    python -m bench.fcm --senders pigeon --count 200000
    python -m bench.fcm --admin-count 20000   # fewer for the (slow) firebase-admin senders

One mock FCM process (``plugins.fcm.mock``, one service account, every token accepted,
nothing recorded) serves every run. The senders run one after another, each in its own
process, in the same order every round:

- ``pigeon``: Pigeon's FCM channel (`plugins.fcm.FcmChannel`) as the delivery actor drives
  it: batches of 1,000 `DeliveryJob` built from content fields (the message is built for each
  job), 8 batches in flight, one project (4 HTTP/2 connections of at most 100 streams), on
  Trio, with the garbage collector tuned as ``pigeon serve`` does (`server.runtime.app.tune_gc`).
  Its rate limit is raised to 6,000,000 a minute so that it does not set the pace (the
  default, 600,000, is FCM's default quota: 10,000/s);
- ``firebase-admin``: ``messaging.send_each`` with chunks of 500 messages (its limit; each
  call sends them from 500 threads over ``requests``, HTTP/1.1), one chunk after another. The
  SDK mounts a 100-connection pool for ``https://fcm.googleapis.com`` only; the same pool is
  mounted for the mock's URL, as it would be in production;
- ``firebase-admin-async``: ``messaging.send_each_async`` with chunks of 500 (httpx over
  HTTP/2, ``asyncio.gather``), on asyncio's default loop.

firebase-admin gets the service account's key file (its token URI is the mock's), sends to
``_MessagingService.FCM_URL`` pointed at the mock and trusts the mock's CA through
``REQUESTS_CA_BUNDLE`` and ``SSL_CERT_FILE``. Its messages use ``Message.token`` (the wire
field Pigeon sends; firebase-admin 7.7 warns that it is deprecated, the warning is ignored).

Each sends ``--count`` messages (a notification with a title and a body, Android priority
high, to 1,000 distinct tokens) after a warm-up of 1,000 (which fetches the access token and
opens the connections), and reports messages/s (wall time from the first send to the last
answer), its own CPU time per message (``getrusage``) and its resident memory at each tenth
of the run. The mock's CPU is read from ``/proc`` over the same interval: when it is near one
core per mock worker (``--mock-workers``), the mock, not the sender, set the pace, and the
output says so. When the sender and the mock together are near every core of the machine,
the output says that too.

``--admin-count`` sends fewer messages through the firebase-admin senders (they are slow);
compare the per-message figures then (the output and the JSON say so).

Figures are printed and written as JSON (``bench/results/fcm.json`` by default).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from plugins.fcm.mock import MockFcmProcess, ServiceAccount

from ._harness import BODY, Progress, machine, own_cpu, title, tree_cpu, write_results

PROJECT = "pigeon-bench"
APP = "com.example.bench"
TOKENS = 1_000
WARMUP = 1_000
BATCH = 1_000  # Pigeon: jobs per channel.send, as the delivery actor hands them over
BATCHES_IN_FLIGHT = 8
ADMIN_CHUNK = 500  # firebase-admin: send_each's limit
RATE_PER_MINUTE = 6_000_000
SENDERS = ("pigeon", "firebase-admin", "firebase-admin-async")
ADMIN_SENDERS = ("firebase-admin", "firebase-admin-async")


def _token() -> str:
    """A token shaped like FCM's (an instance id, ``:APA91b``, about 150 URL-safe characters)."""
    return secrets.token_urlsafe(8)[:11] + ":APA91b" + secrets.token_urlsafe(110)[:134]


# -- the senders, each in its own process ----------------------------------------------------


def run_pigeon(job: dict[str, Any]) -> dict[str, Any]:
    import trio

    from plugins.fcm import FcmChannel
    from plugins.fcm._credentials import check_android
    from protocols import api
    from server.runtime.app import tune_gc
    from server.runtime.config import FcmSettings
    from server.channels import AppRecord, DeliveryJob

    settings = FcmSettings(url=job["url"], ca_file=job["ca_file"], token_uri=job["token_uri"], max_connections=4,
                           streams_per_connection=100, max_queue=10_000, rate_per_minute=RATE_PER_MINUTE,
                           retry_min_s=10.0)
    request = api.RegisterAndroidApp(app=APP, service_account=job["service_account"])
    app = AppRecord(app=APP, android=check_android(request, token_uri_setting=job["token_uri"]))
    tokens = job["tokens"]

    def jobs(start: int, n: int) -> list[DeliveryJob]:
        return [
            DeliveryJob(app=app, token=tokens[i % len(tokens)], platform="fcm",
                        content=api.PushContent(title=title(i), body=BODY))
            for i in range(start, start + n)
        ]

    async def main() -> dict[str, Any]:
        channel = FcmChannel(settings)
        tune_gc()  # as `pigeon serve` does
        async with trio.open_nursery() as nursery:
            await nursery.start(channel.run)
            warm = await channel.send(jobs(0, WARMUP))
            if not all(r.status == "sent" for r in warm):
                raise RuntimeError(f"warm-up failed: {next(r for r in warm if r.status != 'sent')}")
            progress = Progress(job["count"])
            sent = failed = 0
            reasons: dict[str, int] = {}
            limiter = trio.Semaphore(BATCHES_IN_FLIGHT)

            async def batch(start: int, n: int) -> None:
                nonlocal sent, failed
                try:
                    results = await channel.send(jobs(start, n))
                finally:
                    limiter.release()
                for r in results:
                    if r.status == "sent":
                        sent += 1
                    else:
                        failed += 1
                        reasons[str(r.reason)] = reasons.get(str(r.reason), 0) + 1
                progress.add(len(results))

            cpu0, t0 = own_cpu(), time.perf_counter()
            async with trio.open_nursery() as batches:
                for start in range(0, job["count"], BATCH):
                    await limiter.acquire()
                    batches.start_soon(batch, WARMUP + start, min(BATCH, job["count"] - start))
            wall, cpu = time.perf_counter() - t0, own_cpu() - cpu0
            nursery.cancel_scope.cancel()
        return {"sent": sent, "failed": failed, "reasons": reasons, "wall_s": wall, "cpu_s": cpu, "rss": progress.rss}

    return trio.run(main)


def _admin_app(job: dict[str, Any]) -> Any:
    """A firebase-admin app sending to the mock (see the module docstring)."""
    import warnings

    os.environ["REQUESTS_CA_BUNDLE"] = job["ca_file"]  # requests: token exchange and sync sends
    os.environ["SSL_CERT_FILE"] = job["ca_file"]  # httpx: async sends
    warnings.filterwarnings("ignore", "Message.token is deprecated", DeprecationWarning)

    import firebase_admin
    import requests
    from firebase_admin import _http_client, credentials, messaging

    messaging._MessagingService.FCM_URL = job["url"] + "/v1/projects/{0}/messages:send"
    app = firebase_admin.initialize_app(credentials.Certificate(job["service_account"]), name="bench")
    service = messaging._get_messaging_service(app)
    # What _MessagingService mounts for https://fcm.googleapis.com, for the mock's URL.
    service._client.session.mount(job["url"], requests.adapters.HTTPAdapter(
        pool_connections=100, pool_maxsize=100, max_retries=_http_client.DEFAULT_RETRY_CONFIG))
    return app


def _admin_messages(job: dict[str, Any], start: int, stop: int) -> list[Any]:
    from firebase_admin import messaging

    tokens = job["tokens"]
    return [
        messaging.Message(token=tokens[i % len(tokens)], notification=messaging.Notification(title=title(i), body=BODY),
                          android=messaging.AndroidConfig(priority="high"))
        for i in range(start, stop)
    ]


def _tally(batch: Any, reasons: dict[str, int]) -> None:
    for r in batch.responses:
        if not r.success:
            name = type(r.exception).__name__
            reasons[name] = reasons.get(name, 0) + 1


def run_firebase_admin(job: dict[str, Any]) -> dict[str, Any]:
    from firebase_admin import messaging

    app = _admin_app(job)
    for start in range(0, WARMUP, ADMIN_CHUNK):
        warm = messaging.send_each(_admin_messages(job, start, start + ADMIN_CHUNK), app=app)
        if warm.failure_count:
            raise RuntimeError(f"warm-up failed: {next(r.exception for r in warm.responses if not r.success)!r}")
    progress = Progress(job["count"])
    sent = failed = 0
    reasons: dict[str, int] = {}
    cpu0, t0 = own_cpu(), time.perf_counter()
    for start in range(WARMUP, WARMUP + job["count"], ADMIN_CHUNK):
        stop = min(start + ADMIN_CHUNK, WARMUP + job["count"])
        batch = messaging.send_each(_admin_messages(job, start, stop), app=app)
        sent += batch.success_count
        failed += batch.failure_count
        _tally(batch, reasons)
        progress.add(stop - start)
    wall, cpu = time.perf_counter() - t0, own_cpu() - cpu0
    return {"sent": sent, "failed": failed, "reasons": reasons, "wall_s": wall, "cpu_s": cpu, "rss": progress.rss}


def run_firebase_admin_async(job: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    from firebase_admin import messaging

    app = _admin_app(job)

    async def main() -> dict[str, Any]:
        try:
            for start in range(0, WARMUP, ADMIN_CHUNK):
                warm = await messaging.send_each_async(_admin_messages(job, start, start + ADMIN_CHUNK), app=app)
                if warm.failure_count:
                    raise RuntimeError(f"warm-up failed: {next(r.exception for r in warm.responses if not r.success)!r}")
            progress = Progress(job["count"])
            sent = failed = 0
            reasons: dict[str, int] = {}
            cpu0, t0 = own_cpu(), time.perf_counter()
            for start in range(WARMUP, WARMUP + job["count"], ADMIN_CHUNK):
                stop = min(start + ADMIN_CHUNK, WARMUP + job["count"])
                batch = await messaging.send_each_async(_admin_messages(job, start, stop), app=app)
                sent += batch.success_count
                failed += batch.failure_count
                _tally(batch, reasons)
                progress.add(stop - start)
            wall, cpu = time.perf_counter() - t0, own_cpu() - cpu0
        finally:
            # firebase-admin's delete_app would close this client in another event loop.
            await messaging._get_messaging_service(app)._async_client.aclose()
        return {"sent": sent, "failed": failed, "reasons": reasons, "wall_s": wall, "cpu_s": cpu, "rss": progress.rss}

    return asyncio.run(main())


# -- the driver ---------------------------------------------------------------------------


def run_sender(name: str, job: dict[str, Any], mock: MockFcmProcess, profile: str | None = None) -> dict[str, Any]:
    mock.admin.clear_stats()
    assert mock.pid is not None
    command = [sys.executable, "-m", "bench.fcm", "--run", name]
    if profile:  # py-spy records the sender process (warm-up included)
        command = [str(Path(sys.executable).with_name("py-spy")), "record", "--format", "raw", "--rate", "200",
                   "--nonblocking", "--output", profile, "--", *command]
    mock_cpu0 = tree_cpu(mock.pid)
    done = subprocess.run(
        command, input=json.dumps(job), capture_output=True, text=True, timeout=3600, check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    mock_cpu1 = tree_cpu(mock.pid)
    by_process = {p: t - mock_cpu0.get(p, 0.0) for p, t in mock_cpu1.items()}
    mock_cpu = sum(by_process.values())
    if done.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])  # py-spy writes lines too
    count = result["sent"] + result["failed"]
    stats = mock.admin.stats()
    rss = result["rss"]
    # The mock's CPU per answered send (warm-up included) at the sender's rate: the share of a
    # core the mock used while the sender ran.
    answered = max(1, stats["requests"])
    mock_per_message = mock_cpu / answered
    mock_share = mock_per_message * count / result["wall_s"]
    return {
        "sender": name,
        "messages": count,
        "sent": result["sent"],
        "failed": result["failed"],
        "failure_reasons": result["reasons"],
        "per_second": round(count / result["wall_s"]),
        "cpu_us_per_message": round(result["cpu_s"] / count * 1e6, 1),
        "sender_cpu_share": round(result["cpu_s"] / result["wall_s"], 2),
        "rss_mb_by_tenth": [round(r / 2**20, 1) for r in rss],
        "mock_requests": stats["requests"],
        "mock_successes": stats["successes"],
        "mock_connections_opened": stats["connections_opened"],
        "mock_protocols": stats.get("protocols", {}),
        "mock_cpu_us_per_message": round(mock_per_message * 1e6, 1),
        "mock_cpu_share": round(mock_share, 2),
        # The busiest mock process's share of a core at the sender's rate (as mock_cpu_share):
        # a worker near 1.0 set the pace, whatever the others did.
        "mock_busiest_process_share": round(max(by_process.values(), default=0.0) / answered * count / result["wall_s"], 2),
    }


def _rss_span(run: dict[str, Any]) -> str:
    rss = run["rss_mb_by_tenth"]
    return f"{rss[0]}→{rss[-1]}" if rss else "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fcm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="messages per sender per round")
    parser.add_argument("--admin-count", type=int,
                        help="messages per round for the firebase-admin senders (default: --count); compare per-message figures then")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--senders", default=",".join(SENDERS), help="comma-separated: " + ", ".join(SENDERS))
    parser.add_argument("--mock-workers", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=0.0,
                        help="the mock delays each answer this long (FCM is a network away)")
    parser.add_argument("--quick", action="store_true", help="10,000 messages, one round")
    parser.add_argument("--out", help="where to write the JSON results")
    parser.add_argument("--py-spy", metavar="PREFIX",
                        help="record each sender with py-spy (raw collapsed stacks) to PREFIX-SENDER-ROUND.txt")
    parser.add_argument("--run", choices=SENDERS, help=argparse.SUPPRESS)  # a sender's own process
    args = parser.parse_args(argv)

    if args.run:
        job = json.loads(sys.stdin.read())
        runner = {"pigeon": run_pigeon, "firebase-admin": run_firebase_admin,
                  "firebase-admin-async": run_firebase_admin_async}[args.run]
        print(json.dumps(runner(job)))
        return 0

    if args.quick:
        args.count, args.rounds = 10_000, 1
    admin_count = args.admin_count or args.count
    senders = [s.strip() for s in args.senders.split(",") if s.strip()]
    unknown = set(senders) - set(SENDERS)
    if unknown:
        parser.error(f"unknown senders: {', '.join(sorted(unknown))}")
    if admin_count != args.count and any(s in ADMIN_SENDERS for s in senders):
        print(f"note: the firebase-admin senders send {admin_count:,} messages a round, Pigeon {args.count:,}:"
              " compare per-message figures (messages/s, µs CPU/message)", flush=True)
    print(f"Pigeon's rate limit is raised to {RATE_PER_MINUTE:,}/minute for the benchmark"
          f" (the default, 600,000, is FCM's default quota); mock workers: {args.mock_workers},"
          f" latency {args.latency_ms} ms", flush=True)

    account = ServiceAccount.generate(PROJECT)
    tokens = [_token() for _ in range(TOKENS)]
    config = {"projects": {PROJECT: {"service_accounts": [account.spec()]}},
              "faults": {"accept_any_token": True, "record_accepted": False, "latency_ms": args.latency_ms}}
    runs: list[dict[str, Any]] = []
    cpus = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="pigeon-bench-fcm-") as state, \
            MockFcmProcess(state, config=config, workers=args.mock_workers) as mock:
        mock.admin.set_faults(record_accepted=False, accept_any_token=True)
        base = {"url": mock.url, "token_uri": mock.token_uri, "ca_file": str(mock.ca_file),
                "service_account": account.info(mock.token_uri), "tokens": tokens}
        for round_number in range(1, args.rounds + 1):
            for name in senders:
                job = {**base, "count": admin_count if name in ADMIN_SENDERS else args.count}
                profile = f"{args.py_spy}-{name}-{round_number}.txt" if args.py_spy else None
                run = run_sender(name, job, mock, profile)
                run["round"] = round_number
                runs.append(run)
                notes = ""
                if run["mock_cpu_share"] >= 0.85 * args.mock_workers or run["mock_busiest_process_share"] >= 0.85:
                    notes += " (the mock was near a full core per worker, or one worker near a core: it may have set the pace)"
                if run["mock_cpu_share"] + run["sender_cpu_share"] >= 0.9 * cpus:
                    notes += f" (sender + mock near all {cpus} cores)"
                print(
                    f"round {round_number} {name:20} {run['messages']:>7,} msgs {run['per_second']:>7,}/s"
                    f"  {run['cpu_us_per_message']:>7.1f} µs CPU/message"
                    f"  (sender {run['sender_cpu_share']:.2f} of a core, mock {run['mock_cpu_share']:.2f},"
                    f" busiest mock process {run['mock_busiest_process_share']:.2f})"
                    f"  RSS {_rss_span(run)} MB  failed {run['failed']}{notes}",
                    flush=True,
                )

    summary: dict[str, Any] = {}
    for name in senders:
        mine = [r for r in runs if r["sender"] == name]
        summary[name] = {
            "messages_per_round": mine[0]["messages"],
            "per_second_median": statistics.median(r["per_second"] for r in mine),
            "cpu_us_per_message_median": statistics.median(r["cpu_us_per_message"] for r in mine),
            "rss_mb_start_median": statistics.median(r["rss_mb_by_tenth"][0] for r in mine),
            "rss_mb_end_median": statistics.median(r["rss_mb_by_tenth"][-1] for r in mine),
            "mock_cpu_share_median": statistics.median(r["mock_cpu_share"] for r in mine),
            "mock_cpu_us_per_message_median": statistics.median(r["mock_cpu_us_per_message"] for r in mine),
            "failed": sum(r["failed"] for r in mine),
        }
    ratios = {}
    if "pigeon" in summary:
        ours = summary["pigeon"]
        for other in summary:
            if other != "pigeon":
                ratios[f"pigeon_vs_{other}"] = {
                    "throughput": round(ours["per_second_median"] / summary[other]["per_second_median"], 2),
                    "cpu_per_message": round(summary[other]["cpu_us_per_message_median"] / ours["cpu_us_per_message_median"], 2),
                }
    targets = {}
    if "pigeon" in summary:
        ours = summary["pigeon"]
        targets = {
            "cpu_us_per_message_max": 100,
            "per_second_min": 10_000,
            "vs_firebase_admin_min": 10,
            "cpu_met": ours["cpu_us_per_message_median"] <= 100,
            "throughput_met": ours["per_second_median"] >= 10_000,
        }
        if "pigeon_vs_firebase-admin" in ratios:
            r = ratios["pigeon_vs_firebase-admin"]
            targets["vs_firebase_admin_met"] = r["throughput"] >= 10 and r["cpu_per_message"] >= 10
    print()
    for name, s in summary.items():
        print(f"median {name:20} {s['messages_per_round']:>7,} msgs {s['per_second_median']:>9,.0f}/s"
              f"  {s['cpu_us_per_message_median']:>7.1f} µs CPU/message  RSS {s['rss_mb_start_median']}→{s['rss_mb_end_median']} MB"
              f"  mock {s['mock_cpu_share_median']:.2f} of a core ({s['mock_cpu_us_per_message_median']} µs/message)")
    for name, r in ratios.items():
        print(f"{name}: {r['throughput']}× the throughput, {r['cpu_per_message']}× less CPU per message")
    if targets:
        print(f"targets: ≤100 µs CPU/message {'met' if targets['cpu_met'] else 'MISSED'},"
              f" ≥10,000/s {'met' if targets['throughput_met'] else 'MISSED'}"
              + (f", ≥10× firebase-admin {'met' if targets['vs_firebase_admin_met'] else 'MISSED'}"
                 if "vs_firebase_admin_met" in targets else ""))
    results = {
        "machine": machine(),
        "command": "python -m bench.fcm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "count": args.count,
        "admin_count": admin_count,
        "admin_count_note": (None if admin_count == args.count else
                             f"the firebase-admin senders sent {admin_count} messages a round, Pigeon {args.count}: compare per-message figures"),
        "rounds": args.rounds,
        "mock_workers": args.mock_workers,
        "latency_ms": args.latency_ms,
        "pigeon_rate_per_minute": RATE_PER_MINUTE,
        "runs": runs,
        "summary": summary,
        "ratios": ratios,
        "targets": targets,
    }
    path = write_results("fcm", results, args.out)
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
