"""The push log frequency caps count (`server.profiles.pushlog`), on a real store: a push counts
once per profile however many of its devices it reached and in however many commits they were
settled; two pushes of one journey cycle (one execution) count twice; a month-old entry goes."""

from __future__ import annotations

from pathlib import Path

import trio

from server.profiles import pushlog
from server.profiles.store import ProfileStore, Writer
from server.profiles.writes import upsert_profile

DAY = 86_400_000_000


async def test_a_push_counts_once_per_profile_and_two_pushes_of_a_cycle_twice(tmp_path: Path) -> None:
    now = [100 * DAY]
    store = ProfileStore(tmp_path / "data", clock=lambda: now[0])
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.write(upsert_profile, "crm:a", {})
        pid, _ = store.default.find_profile("crm:a")
        hello = pushlog.push_of("ab12", {"j": "welcome", "n": "hello"})
        offer = pushlog.push_of("ab12", {"j": "welcome", "n": "offer"})
        assert (hello, pushlog.push_of("cd34", {"m": "cart"})) == ("ab12/welcome/hello", "cd34")

        def log(w: Writer, push: str, at_us: int) -> None:
            pushlog.log(w, pid, at_us, push)

        await store.write(log, hello, now[0])  # one device
        await store.write(log, hello, now[0] + 5)  # its other device, settled in another commit
        await store.write(log, offer, now[0] + 5)  # the cycle's other push
        assert pushlog.count_since(store.default, pid, now[0] - DAY) == 2
        await store.write(log, "cd34", now[0] + pushlog.KEPT_US + 10)  # a month on: the old entries go
        assert pushlog.count_since(store.default, pid, 0) == 1
        nursery.cancel_scope.cancel()


async def test_the_devices_of_a_push_settled_among_other_pushes_count_once(tmp_path: Path) -> None:
    """A delivery is compared with the profile's latest `RECENT` entries only (each delivery
    read all of a month of them), newest first, with another profile's entries around."""
    store = ProfileStore(tmp_path / "data", clock=lambda: DAY)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for identity in ("crm:a", "crm:b"):
            await store.write(upsert_profile, identity, {})
        a, b = (store.default.find_profile(i)[0] for i in ("crm:a", "crm:b"))

        def log(w: Writer, pid: bytes, push: str, at_us: int) -> None:
            pushlog.log(w, pid, at_us, push)

        for n in range(40):
            await store.write(log, a, f"x{n}", DAY + n)
            await store.write(log, b, f"x{n}", DAY + n)
        await store.write(log, a, "x39", DAY + 100)  # a second device of the latest push: once
        await store.write(log, b, f"x{39 - pushlog.RECENT}", DAY + 100)  # just beyond the latest RECENT: logged
        assert pushlog.count_since(store.default, a, 0) == 40
        assert pushlog.count_since(store.default, b, 0) == 41
        nursery.cancel_scope.cancel()
