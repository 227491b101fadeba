"""Chaos: SIGKILL a Pigeon server at random moments of a mixed load, many times; then the books.

    python -m bench.chaos                       # 20 kills; writes bench/results/chaos.json
    python -m bench.chaos --kills 5 --seed 7    # a shorter run, another schedule

A real ``pigeon serve`` process on a real data folder, the mock FCM in its own process (with
a delay on each answer, so that sends are in flight when the kills come). Each round starts
the server (it recovers what the last kill left: the outbox delivered again, sends resumed),
runs a mixed load — event writers ingesting batches, and a campaign (a new message each round,
sent to every profile) — and kills the server with SIGKILL after a random delay. After the
last round the server starts once more and runs until nothing moves, then stops, and the books
are checked:

- every event whose batch was acknowledged is stored (``events.list``);
- every message whose send was started durably reached each token at least once, and its
  report counts each targeted notification once with one outcome (``targeted`` = ``excluded``
  + ``sent``; ``sent`` = ``delivered`` + ``failed`` = the tokens);
- what the provider received twice is at most what was counted ``replayed``, and each restart
  delivered again at most what four batches of each send running at the kill hold (the
  in-flight bound);
- the data folder is consistent (`check_folder`): every identity and token names a stored
  profile that holds it, the outbox and the executions are empty once everything settled;
- the journey ``greet`` (an event entry on the load's own ``chaos`` events, when their ``r``,
  0-99 at random, is below `ENTER_BELOW`: a push, a wait of a second, an end) took every
  profile with an acknowledged event that passed its condition, once: one instance per
  profile, each ended with reason ``end`` or still in its wait with its timer, the push staged
  once per instance (``entered`` = ``targeted`` = the push log = the instances) and reaching
  the profile's token once or more, what reached it twice at most what was counted
  ``replayed``.

``tests/test_chaos.py`` runs a short schedule of this in the suite.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import trio

from plugins.fcm.mock import MockFcmProcess, ServiceAccount
from protocols import api
from protocols.errors import PigeonProtocolError
from protocols.trio_client import open_client
from bench import _crash
from bench._crash import fcm_and_server, register_tokens, sigkill, successes, wait_for_delivery
from bench._journey_books import read_journey_folder
from server.journeys import engine
from server.messages.pipeline import BATCH, IN_FLIGHT
from server.profiles import keys
from server.profiles.records import decode_profile
from server.testing import ServerProcess

__all__ = ["chaos", "check_folder", "main"]

APP = "com.acme.shop"
ACCOUNT = ServiceAccount.generate("acme-chaos")
#: Events per acknowledged batch, and writers ingesting at once.
_BATCH_EVENTS = 50
_WRITERS = 4
JOURNEY = "greet"
#: An event enters its profile in the journey when its ``r`` (0-99) is below this.
ENTER_BELOW = 2
GREET: dict[str, Any] = {
    "id": JOURNEY,
    "entry": {"event": "chaos", "condition": f"event.r < {ENTER_BELOW}"},
    "nodes": [
        {"type": "push", "id": "hello", "message": "greeting", "next": "wait"},
        {"type": "wait", "id": "wait", "duration": "1s", "next": "done"},
        {"type": "end", "id": "done"},
    ],
}


async def _setup(address: str, mock: MockFcmProcess, profiles: int) -> None:
    async with open_client(address) as client:
        await client.call(api.RegisterAndroidApp(app=APP, service_account=ACCOUNT.info(mock.token_uri)))
        await client.call(api.PublishConfig(config=api.ChannelConfig(name="all", apps=[APP], platforms=["android"])))
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id="greeting", channel="all", content=api.MessageContent(title="Welcome {{ profile.identities[0] }}"))))
        await client.call(api.PublishJourney(journey=msgspec.convert(GREET, api.JourneySpec)))
        await register_tokens(client, APP, profiles)


class _Books:
    """What the load was told was durable, and what it started."""

    def __init__(self) -> None:
        #: identity -> the "k" values of its events whose batch was acknowledged.
        self.events: dict[str, set[str]] = {}
        #: Identities with an acknowledged event that enters the journey.
        self.entering: set[str] = set()
        #: Messages whose messages.send call was made (it may have been killed first).
        self.sends: list[str] = []
        self.batches = 0


async def _writer(address: str, books: _Books, rng: random.Random, writer: int, profiles: int) -> None:
    """Ingest batches until the server is killed; remember each acknowledged one."""
    n = 0
    async with open_client(address) as client:
        while True:
            batch = []
            for _ in range(_BATCH_EVENTS):
                identity, k = f"crm:{rng.randrange(profiles)}", f"{writer}-{n}"
                n += 1
                batch.append((identity, k, rng.randrange(100)))
            result = await client.call(api.IngestEvents(events=[
                api.Event(identity=identity, type="chaos", data={"k": k, "r": r}) for identity, k, r in batch]))
            assert result.accepted == len(batch), result.rejected
            for identity, k, r in batch:
                books.events.setdefault(identity, set()).add(k)
                if r < ENTER_BELOW:
                    books.entering.add(identity)
            books.batches += 1


async def _campaign(address: str, books: _Books, message: str) -> None:
    async with open_client(address) as client:
        await client.call(api.PublishMessage(message=api.MessageSpec(
            id=message, channel="all", content=api.MessageContent(title="Hi {{ profile.identities[0] }}"))))
        books.sends.append(message)
        await client.call(api.SendMessage(id=message, audience="true"))


async def _round(server: ServerProcess, books: _Books, rng: random.Random, round_: int, profiles: int,
                 max_delay: float, delivering: MockFcmProcess | None) -> float:
    """Load the server, kill it after a random delay (with ``delivering``, the provider: a
    random delay once the round's first notification arrived, so that the kill falls in a
    delivery); the delay."""
    delay = rng.uniform(0.2, max_delay) if delivering is None else rng.uniform(0.0, 0.3)

    async def quietly(fn: Callable[..., Any], *args: Any) -> None:
        try:
            await fn(*args)
        except* (PigeonProtocolError, OSError):
            pass  # killed under it

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quietly, _campaign, server.address, books, f"m-{round_}")
        for w in range(_WRITERS):
            nursery.start_soon(quietly, _writer, server.address, books, random.Random(rng.random()), round_ * 100 + w,
                               profiles)
        if delivering is not None:
            await wait_for_delivery(delivering, await trio.to_thread.run_sync(successes, delivering), 30)
        await trio.sleep(delay)
        await sigkill(server)
        nursery.cancel_scope.cancel()
    return delay


async def _settle(address: str, mock: MockFcmProcess, messages: list[str], profiles: int,
                  timeout: float = 180.0) -> None:
    """Wait until every send is whole (none targeted, or every profile targeted and each
    notification sent) and nothing moved for two seconds (the provider's count, the reports)."""
    last = None
    with trio.fail_after(timeout):
        while True:
            await trio.sleep(1.0)
            reports = await _reports(address, messages)
            journey = reports.pop(f"journey:{JOURNEY}")
            whole = all(t.get("targeted", 0) in (0, profiles) and t.get("sent", 0) + t.get("excluded", 0)
                        == t.get("targeted", 0) for t in reports.values())
            whole = whole and journey.get("sent", 0) + journey.get("excluded", 0) == journey.get("targeted", 0)
            now = (await trio.to_thread.run_sync(successes, mock), reports, journey)
            if whole and now == last:
                return
            last = now if whole else None


async def _stored_events(address: str, identities: list[str]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    async with open_client(address) as client:
        for identity in identities:
            async with client.stream(api.ListEvents(identity=identity, type="chaos", limit=1_000_000)) as items:
                found[identity] = {str(event.data.get("k")) async for event in items}
    return found


async def _reports(address: str, messages: list[str]) -> dict[str, dict[str, int]]:
    """Each message's report totals, and the journey's (under ``journey:greet``)."""
    async with open_client(address) as client:
        out = {m: dict((await client.call(api.GetReport(message=m))).totals) for m in messages}
        report = await client.call(api.GetReport(journey=JOURNEY))
        out[f"journey:{JOURNEY}"] = {**report.totals, **{f"exited:{k}": v for k, v in
                                                         report.reasons.get("exited", {}).items()}}
        return out


def _accepted_by_message(mock: MockFcmProcess) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for item in mock.admin.accepted():
        message = item["message"]
        tracking = json.loads(message.get("data", {}).get("_p", "{}"))
        out.setdefault(tracking.get("m", ""), Counter())[message["token"]] += 1
    return out


def check_folder(folder: Path) -> list[str]:
    """What is inconsistent in a stopped server's data folder (nothing, normally)."""
    problems: list[str] = []
    env = lmdb.open(str(folder), readonly=True, lock=False, max_dbs=32)
    try:
        with env.begin() as txn:
            dbs = {name: env.open_db(name.encode(), txn=txn, create=False)
                   for name in ("identities", "profiles", "tokens", "outbox", "executions")}
            for key, pid in txn.cursor(db=dbs["identities"]):
                value = txn.get(pid, db=dbs["profiles"])
                if value is None or key.decode() not in decode_profile(value).identities:
                    problems.append(f"identity {key.decode()!r} names a profile that does not hold it")
            for key, pid in txn.cursor(db=dbs["tokens"]):
                value = txn.get(pid, db=dbs["profiles"])
                app, _, token = key.decode().partition("\x00")
                if value is None or not any(r.app == app and r.token == token for r in decode_profile(value).registrations):
                    problems.append(f"token {token!r} of {app} names a profile that does not hold it")
            for name in ("outbox", "executions"):
                left = txn.stat(dbs[name])["entries"]
                if left:
                    problems.append(f"{left} entries left in {name} after everything settled")
            for pid, value in txn.cursor(db=dbs["profiles"]):
                record = decode_profile(value)
                for identity in record.identities:
                    if txn.get(keys.identity_key(identity), db=dbs["identities"]) != pid:
                        problems.append(f"profile {pid.hex()} holds {identity!r}, which names another profile")
    finally:
        env.close()
    return problems


async def chaos(folder: Path, *, kills: int, profiles: int, seed: int, max_delay: float = 2.5,
                latency_ms: int = 20, in_delivery: int = 0) -> dict[str, Any]:
    """Run the schedule (see the module docstring); the books, with ``ok`` and ``problems``.

    The first ``in_delivery`` rounds are killed during a delivery (once the round's send has
    reached the provider), the others at a random moment."""
    rng = random.Random(seed)
    books = _Books()
    #: At each start: the notifications it delivered again, and the sends started before it.
    replays: list[tuple[int, int]] = []
    delays = []
    started = time.monotonic()
    async with fcm_and_server(folder, ACCOUNT, "acme-chaos", latency_ms) as (mock, server):
        await _setup(server.address, mock, profiles)
        for round_ in range(kills):
            if round_:
                server.start()
            delivering = mock if round_ < in_delivery else None
            delays.append(await _round(server, books, rng, round_, profiles, max_delay, delivering))
            replays.append((_crash.replays(server.log), len(books.sends)))  # what this start replayed; sends so far
        server.start()
        await _settle(server.address, mock, books.sends, profiles)
        found = await _stored_events(server.address, sorted(books.events))
        reports = await _reports(server.address, books.sends)
        replays.append((_crash.replays(server.log), len(books.sends)))
        server.stop()
        accepted = _accepted_by_message(mock)
    journey_problems, journey = _judge_journey(books, reports.pop(f"journey:{JOURNEY}"),
                                               read_journey_folder(folder / "data", JOURNEY),
                                               accepted.get("greeting", Counter()))
    return _judge(books, found, reports, accepted, replays, check_folder(folder / "data") + journey_problems, profiles, {
        "kills": kills, "killed_in_delivery": min(in_delivery, kills), "profiles": profiles, "seed": seed,
        "provider_latency_ms": latency_ms, "kill_delays_s": [round(d, 2) for d in delays],
        "seconds": round(time.monotonic() - started, 1), "journey": journey})


def _judge_journey(books: _Books, totals: dict[str, int], stored: dict[str, Any],
                   got: Counter[str]) -> tuple[list[str], dict[str, Any]]:
    """The journey's books (the module docstring): the problems, and its figures."""
    problems = []
    found = stored["instances"]
    entered = {ids[0] for ids, _ in found if ids}
    if len(entered) != len(found):
        problems.append(f"journey: {len(found) - len(entered)} instances of profiles that are gone")
    if missed := books.entering - entered:
        problems.append(f"journey: {len(missed)} profiles with an acknowledged entering event have no instance")
    ended = sum(1 for _, i in found if i.ended and (i.reason, i.node) == ("end", "done"))
    waiting = sum(1 for _, i in found if not i.ended and (i.waiting, i.node) == ("wait", "wait") and i.wake_us)
    if ended + waiting != len(found) or len(stored["timers"]) != waiting:
        problems.append(f"journey: {len(found)} instances, {ended} ended, {waiting} waiting, "
                        f"{len(stored['timers'])} timers")
    if any(set(i.pushes) != {"hello"} for _, i in found):
        problems.append("journey: instances whose push is not recorded")
    if not totals.get("entered", 0) == totals.get("targeted", 0) == len(found):
        problems.append(f"journey: entered {totals.get('entered', 0)}, targeted {totals.get('targeted', 0)}, "
                        f"for {len(found)} instances")
    if not totals.get("exited", 0) == totals.get("exited:end", 0) == ended:
        problems.append(f"journey: {ended} ended but the report says {totals}")
    tokens = {"tok-" + identity.split(":")[1] for identity in entered}
    if tokens - set(got) or set(got) - tokens:
        problems.append(f"journey: {len(tokens - set(got))} instances' pushes never reached the provider, "
                        f"{len(set(got) - tokens)} reached profiles with no instance")
    duplicates, replayed = sum(got.values()) - len(got), totals.get("replayed", 0)
    if not 0 <= duplicates <= replayed:
        problems.append(f"journey: {duplicates} duplicates but {replayed} counted as replayed")
    return problems, {"instances": len(found), "ended": ended, "waiting": waiting, "entered": totals.get("entered", 0),
                      "provider_received": sum(got.values()), "duplicates": duplicates, "replayed": replayed}


def _judge(books: _Books, found: dict[str, set[str]], reports: dict[str, dict[str, int]],
           accepted: dict[str, Counter[str]], replays: list[tuple[int, int]], folder_problems: list[str], profiles: int,
           run: dict[str, Any]) -> dict[str, Any]:
    problems = list(folder_problems)
    acknowledged = sum(len(ks) for ks in books.events.values())
    missing = sum(len(ks - found.get(identity, set())) for identity, ks in books.events.items())
    if missing:
        problems.append(f"{missing} acknowledged events are missing")
    tokens = {f"tok-{i}" for i in range(profiles)}
    sends = {}
    for message, totals in reports.items():
        got = accepted.get(message, Counter())
        targeted, replayed = totals.get("targeted", 0), totals.get("replayed", 0)
        duplicates = sum(got.values()) - len(got)
        sends[message] = {"targeted": targeted, "sent": totals.get("sent", 0), "delivered": totals.get("delivered", 0),
                          "replayed": replayed, "provider_received": sum(got.values()), "duplicates": duplicates}
        if targeted == 0:  # killed before the send was stored: nothing may have gone out
            if got:
                problems.append(f"{message}: not started, yet the provider received {sum(got.values())}")
            continue
        if not (targeted == profiles == totals.get("excluded", 0) + totals.get("sent", 0)
                and totals.get("sent", 0) == totals.get("delivered", 0) + totals.get("failed", 0) == len(tokens)):
            problems.append(f"{message}: the counts do not add up: {totals}")
        if set(got) != tokens:
            problems.append(f"{message}: {len(tokens - set(got))} tokens never reached")
        if not 0 <= duplicates <= replayed:
            problems.append(f"{message}: {duplicates} duplicates but {replayed} counted as replayed")
    # Each execution running at a kill has at most IN_FLIGHT batches staged and not settled;
    # the executions running are at most the sends started so far (earlier ones resume). The
    # journey engine has at most IN_DELIVERY cycles in delivery and one more staged, each of
    # BATCH events and BATCH timers at most (a push to one token each, here).
    journey_bound = (engine.IN_DELIVERY + 1) * 2 * engine.BATCH
    for n, (replayed, started) in enumerate(replays):
        if replayed > BATCH * IN_FLIGHT * started + journey_bound:
            problems.append(f"start {n} delivered again {replayed}, more than {IN_FLIGHT} batches of the {started} sends "
                            f"and {engine.IN_DELIVERY + 1} journey cycles")
    return {**run, "ok": not problems, "problems": problems, "events_acknowledged": acknowledged,
            "events_missing": missing, "event_batches": books.batches, "sends": sends,
            "replays_at_restarts": [replayed for replayed, _ in replays],
            "duplicates": sum(s["duplicates"] for s in sends.values()),
            "replayed": sum(s["replayed"] for s in sends.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="rounds, each ended by a SIGKILL (default 20)")
    parser.add_argument("--profiles", type=int, default=2_000, help="profiles with a token (default 2,000)")
    parser.add_argument("--seed", type=int, default=1, help="the schedule's random seed (default 1)")
    parser.add_argument("--in-delivery", type=int, default=5,
                        help="rounds (the first ones) killed during a delivery, not at a random moment (default 5)")
    parser.add_argument("--out", default="bench/results/chaos.json", help="results file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pigeon-chaos-") as tmp:
        result = trio.run(lambda: chaos(Path(tmp), kills=args.kills, profiles=args.profiles, seed=args.seed,
                                        in_delivery=args.in_delivery))
    Path(args.out).write_bytes(msgspec.json.format(msgspec.json.encode(result)) + b"\n")
    print(f"{result['kills']} kills in {result['seconds']} s: {result['events_acknowledged']:,} events acknowledged, "
          f"{result['events_missing']} missing; {len(result['sends'])} campaigns, {result['duplicates']} duplicates "
          f"<= {result['replayed']} replayed; replays at restarts {result['replays_at_restarts']}; journey {result['journey']}; "
          + ("books OK" if result["ok"] else "PROBLEMS: " + "; ".join(result["problems"])) + f" -> {args.out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
