"""Journeys under crashes: SIGKILL the server while the waits of N profiles fall due, several
times; then the books.

    python -m bench.journey_crash            # 10,000 profiles, 5 kills; writes bench/results/journey_crash.json
    python -m bench.journey_crash --quick    # 1,000 profiles, 2 kills (tests/test_journey_crash.py runs less)

A real ``pigeon serve`` process on a real data folder and the mock FCM in its own process,
accepting any token, with a delay on each answer. The journey ``crash``: an event entry
(``signup``), a push (``hello``), a wait of a few seconds, a push (``offer``), an end. N
profiles each get a token and a ``signup`` event, the events spread over ``spread_s`` so that
their waits fall due over as long. Once the offers reach the provider the server is killed
with SIGKILL after a random delay, started again on the same data folder (the outbox delivered
again, the waits resumed, the timers that fell due meanwhile fired), and killed again once it
delivers, ``kills`` times; after the last start it runs until nothing moves, then stops. Between
a kill and the next start the data folder is read: the timers left (so the kill fell while they
fired) and the outbox entries staged and not settled (what the start delivers again: it logs
"delivering N notifications again", and each of those may reach the provider twice).

The books (`judge`): every instance continued exactly once and ended with reason ``end`` at
node ``done`` (its record; each of its two pushes staged once: the reports' ``targeted`` is
2 N; the push log, which caps count, has each delivery, 2 N plus those delivered again), no
timer, outbox entry or execution left; every token got ``hello`` and
``offer`` at least once at the provider, and what it got twice is at most what the starts
delivered again (which is what the outbox held at the kills, and what the reports count
``replayed``); the reports per journey and node add up (``entered`` N at ``hello``, ``exited``
N with reason ``end`` at ``done``, ``targeted`` = ``sent`` = ``delivered`` = N at each push);
the data folder is consistent (`bench.chaos.check_folder`).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import trio

from bench._crash import fcm_and_server, register_tokens, replays, sigkill, successes, wait_for_delivery
from bench._journey_books import accepted_by_node, left_at_kill, read_journey_folder
from bench.chaos import check_folder
from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.trio_client import open_client
from server.journeys.machine import Instance
from server.testing import ServerProcess

__all__ = ["journey_crash", "judge", "main"]

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-jcrash")
JOURNEY = "crash"


def flow(wait_s: float) -> dict[str, Any]:
    return {
        "id": JOURNEY,
        "entry": {"event": "signup"},
        "nodes": [
            {"type": "push", "id": "hello", "message": "hello", "next": "wait"},
            {"type": "wait", "id": "wait", "duration": f"{wait_s:g}s", "next": "offer"},
            {"type": "push", "id": "offer", "message": "offer", "next": "done"},
            {"type": "end", "id": "done"},
        ],
    }


async def _setup(address: str, mock: MockFcmProcess, profiles: int, wait_s: float) -> None:
    async with open_client(address) as client:
        await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(mock.token_uri)))
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="push", apps=[APP], platforms=["android"])))
        for name, title in (("hello", "Hello {{ profile.identities[0] }}"), ("offer", "An offer, {{ event.n }}")):
            await client.call(api.PublishMessage(message=api.MessageSpec(
                id=name, channel="push", content=api.MessageContent(title=title))))
        await client.call(api.PublishJourney(journey=msgspec.convert(flow(wait_s), api.JourneySpec)))
        await register_tokens(client, APP, profiles)


async def _sign_up(address: str, profiles: int, spread_s: float) -> None:
    """A ``signup`` event for every profile, in batches of 100 spread over ``spread_s``."""
    batches = [range(i, min(i + 100, profiles)) for i in range(0, profiles, 100)]
    started = trio.current_time()
    async with open_client(address) as client:
        for n, batch in enumerate(batches):
            await trio.sleep_until(started + spread_s * n / len(batches))
            result = await client.call(api.IngestEvents(events=[
                api.Event(identity=f"crm:{i}", type="signup", data={"n": i}) for i in batch]))
            assert result.accepted == len(batch), result.rejected


async def _reports(address: str) -> dict[str, api.Report]:
    """The journey's report, and each node's ("" : the journey's)."""
    async with open_client(address) as client:
        out = {"": await client.call(api.GetReport(journey=JOURNEY))}
        for node in ("hello", "wait", "offer", "done"):
            out[node] = await client.call(api.GetReport(journey=JOURNEY, node=node))
    return out


async def _settle(address: str, mock: MockFcmProcess, profiles: int, timeout: float) -> float | None:
    """Wait until every instance exited, every push has its outcome and nothing moved between
    two looks half a second apart (the provider's count, the report); the seconds until every
    instance exited (None: not within ``timeout``, the books will say what is missing)."""
    started = time.monotonic()
    ended: float | None = None
    last = None
    with trio.move_on_after(timeout):
        while True:
            await trio.sleep(0.5)
            async with open_client(address) as client:
                totals = dict((await client.call(api.GetReport(journey=JOURNEY))).totals)
            if ended is None and totals.get("exited", 0) >= profiles:
                ended = time.monotonic() - started
            whole = ended is not None and totals.get("sent", 0) + totals.get("excluded", 0) == totals.get("targeted")
            now = (await trio.to_thread.run_sync(successes, mock), totals)
            if whole and now == last:
                break
            last = now if whole else None
    return ended


async def _kill_after_delivery(server: ServerProcess, mock: MockFcmProcess, rng: random.Random, beyond: int,
                               max_delay: float, timeout: float) -> dict[str, Any]:
    """Once the provider accepted more than ``beyond`` (or after ``timeout``), SIGKILL the
    server after a random delay; what it left (`left_at_kill`) and the provider's count then."""
    delivering = await wait_for_delivery(mock, beyond, timeout)
    delay = rng.uniform(0.0, max_delay)
    await trio.sleep(delay)
    await sigkill(server)
    return {"delay_s": round(delay, 2), "after_a_delivery": delivering,
            "provider_accepted": await trio.to_thread.run_sync(successes, mock), **left_at_kill(server.data)}


async def journey_crash(folder: Path, *, profiles: int, kills: int, seed: int, wait_s: float = 12.0,
                        spread_s: float = 10.0, max_delay: float = 1.0, latency_ms: int = 200) -> dict[str, Any]:
    """Run the schedule (see the module docstring); the books, with ``ok`` and ``problems``."""
    assert spread_s < wait_s, "the signups end before the first wait does (no kill falls in them)"
    rng = random.Random(seed)
    at_kills: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    started = time.monotonic()
    async with fcm_and_server(folder, ACCOUNT, "acme-jcrash", latency_ms) as (mock, server):
        await _setup(server.address, mock, profiles, wait_s)
        await _sign_up(server.address, profiles, spread_s)
        beyond = profiles  # the first kill once the offers reach the provider (the hellos came first)
        for kill in range(kills):
            timeout = wait_s + 60 if kill == 0 else 10
            at_kills.append(await _kill_after_delivery(server, mock, rng, beyond, max_delay, timeout))
            if kill:
                starts[-1]["replayed"] = replays(server.log)  # what the start before this kill delivered again
            beyond = await trio.to_thread.run_sync(successes, mock)
            starts.append(await _restart(server, mock, beyond))
        ended = await _settle(server.address, mock, profiles, timeout=120 + profiles / 100)
        reports = await _reports(server.address)
        server.stop()
        if kills:
            starts[-1]["replayed"] = replays(server.log)
        accepted = await trio.to_thread.run_sync(accepted_by_node, mock, JOURNEY)
    stored = read_journey_folder(folder / "data", JOURNEY)
    result = judge(profiles, stored, accepted, reports, at_kills, starts, check_folder(folder / "data"))
    return {"profiles": profiles, "kills": kills, "seed": seed, "wait_s": wait_s, "spread_s": spread_s,
            "provider_latency_ms": latency_ms, **result, "at_kills": at_kills, "starts": starts,
            "all_ended_after_last_start_s": None if ended is None else round(ended, 2),
            "seconds": round(time.monotonic() - started, 1)}


async def _restart(server: ServerProcess, mock: MockFcmProcess, before: int) -> dict[str, Any]:
    """Start the killed server again: seconds until it listens, and until its first delivery."""
    t0 = time.monotonic()
    await trio.to_thread.run_sync(server.start)
    ready = time.monotonic() - t0
    delivered = await wait_for_delivery(mock, before, 10)
    return {"ready_s": round(ready, 2),
            "first_delivery_s": round(time.monotonic() - t0, 2) if delivered else None}


def judge(profiles: int, stored: dict[str, Any], accepted: dict[str, Counter[str]], reports: dict[str, api.Report],
          at_kills: list[dict[str, Any]], starts: list[dict[str, Any]], folder_problems: list[str]) -> dict[str, Any]:
    """The books (see the module docstring): ``ok``, ``problems`` and the figures."""
    problems = list(folder_problems) + _instance_problems(profiles, stored)
    tokens = {f"tok-{i}" for i in range(profiles)}
    duplicates = {}
    for node in ("hello", "offer"):
        got = accepted.get(node, Counter())
        duplicates[node] = sum(got.values()) - len(got)
        if set(got) != tokens:
            problems.append(f"{node}: {len(tokens - set(got))} tokens never reached, {len(set(got) - tokens)} unknown")
    for node in set(accepted) - {"hello", "offer"}:
        problems.append(f"the provider received pushes of node {node!r}")
    delivered_again = [start.get("replayed", 0) for start in starts]
    for kill, (left, again) in enumerate(zip(at_kills, delivered_again)):
        if left["outbox"] != again:
            problems.append(f"kill {kill} left {left['outbox']} in the outbox; the next start delivered {again} again")
    replayed = reports[""].totals.get("replayed", 0)
    if not 0 <= sum(duplicates.values()) <= replayed <= sum(delivered_again):
        problems.append(f"duplicates {duplicates}, counted replayed {replayed}, delivered again {sum(delivered_again)}")
    # The push log (caps count it) has each delivery as it was settled, again for one delivered again.
    if not 2 * profiles <= stored["push_log"] <= 2 * profiles + replayed:
        problems.append(f"{stored['push_log']} deliveries in the push log, not {2 * profiles} "
                        f"(+ at most {replayed} delivered again)")
    problems += _report_problems(profiles, reports)
    return {"ok": not problems, "problems": problems, "duplicates": duplicates, "replayed": replayed,
            "delivered_again_at_starts": delivered_again, "instances": len(stored["instances"]),
            "report": {node or "journey": dict(r.totals) for node, r in reports.items()}}


def _instance_problems(profiles: int, stored: dict[str, Any]) -> list[str]:
    problems = []
    found: list[tuple[list[str], Instance]] = stored["instances"]
    identities = Counter(identity for ids, _ in found for identity in ids)
    if len(found) != profiles or set(identities) != {f"crm:{i}" for i in range(profiles)}:
        problems.append(f"{len(found)} instances of {len(identities)} profiles, not one of each of the {profiles}")
    ends = Counter((i.reason, i.node, i.ended) for _, i in found)
    if set(ends) != {("end", "done", True)}:
        problems.append(f"instances not ended at done with reason end: {dict(Counter((i.reason, i.node) for _, i in found))}")
    if any(set(i.pushes) != {"hello", "offer"} for _, i in found):
        problems.append("instances without both pushes recorded")
    for name in ("timers", "outbox", "executions"):
        if stored[name]:
            problems.append(f"{len(stored[name]) if name == 'timers' else stored[name]} {name} left")
    return problems


def _report_problems(profiles: int, reports: dict[str, api.Report]) -> list[str]:
    n = profiles
    want = {
        "": ({"entered": n, "exited": n, "targeted": 2 * n, "sent": 2 * n, "delivered": 2 * n}, {"end": n}),
        "hello": ({"entered": n, "targeted": n, "sent": n, "delivered": n}, None),
        "offer": ({"targeted": n, "sent": n, "delivered": n}, None),
        "done": ({"exited": n}, {"end": n}),
        "wait": ({}, None),
    }
    problems = []
    for node, (totals, exits) in want.items():
        got = reports[node].totals
        wrong = {k: got.get(k, 0) for k in ("entered", "exited", "targeted", "sent", "delivered")
                 if got.get(k, 0) != totals.get(k, 0)}
        if wrong or got.get("failed", 0) or got.get("excluded", 0):
            problems.append(f"report {node or 'journey'}: {dict(got)}, wanted {totals}")
        if exits is not None and reports[node].reasons.get("exited") != exits:
            problems.append(f"report {node or 'journey'}: exited {reports[node].reasons.get('exited')}, wanted {exits}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.journey_crash", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 profiles, 2 kills, shorter waits")
    parser.add_argument("--profiles", type=int, help="profiles in the journey (default 10,000)")
    parser.add_argument("--kills", type=int, help="SIGKILLs while the waits fall due (default 5)")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's random seed (default 1)")
    parser.add_argument("--out", default="bench/results/journey_crash.json", help="results file")
    args = parser.parse_args(argv)
    quick = {"profiles": 1_000, "kills": 2, "wait_s": 5.0, "spread_s": 3.0}
    full = {"profiles": 10_000, "kills": 5, "wait_s": 12.0, "spread_s": 10.0}
    options = {**(quick if args.quick else full), "seed": args.seed}
    options.update({k: v for k in ("profiles", "kills") if (v := getattr(args, k)) is not None})
    with tempfile.TemporaryDirectory(prefix="pigeon-jcrash-") as tmp:
        result = trio.run(lambda: journey_crash(Path(tmp), **options))
    Path(args.out).write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    print(f"{result['profiles']:,} profiles, {result['kills']} kills in {result['seconds']} s: timers left at the kills "
          f"{[k['timers'] for k in result['at_kills']]}, delivered again {result['delivered_again_at_starts']}, "
          f"duplicates {result['duplicates']} <= replayed {result['replayed']}; all ended "
          f"{result['all_ended_after_last_start_s']} s after the last start; "
          + ("books OK" if result["ok"] else "PROBLEMS: " + "; ".join(result["problems"])) + f" -> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
