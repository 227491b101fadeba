"""Journeys under crashes, short: 600 profiles wait in a journey (signup -> push -> wait 4 s ->
push -> end); the server is killed with SIGKILL twice while their waits fall due and started
again each time; then the books (`bench.journey_crash`; ``python -m bench.journey_crash``
runs 10,000 profiles and five kills): every instance continued exactly once and ended with
reason end, every token got both pushes, duplicates at most what the starts delivered again
(what the outbox held at the kills), the reports per journey and node add up, the data folder
is consistent."""

from __future__ import annotations

from bench.journey_crash import journey_crash


async def test_two_kills_while_the_waits_fall_due_keep_the_journey_books(tmp_path):
    result = await journey_crash(tmp_path, profiles=600, kills=2, seed=3, wait_s=4.0, spread_s=3.0, max_delay=0.5,
                                 latency_ms=300)
    print({k: v for k, v in result.items() if k != "report"})
    assert result["problems"] == []
    timers = [kill["timers"] for kill in result["at_kills"]]
    assert any(0 < left < 600 for left in timers), f"no kill fell while the waits fell due: {timers}"
    assert sum(result["delivered_again_at_starts"]) > 0, "no kill left pushes in the outbox: nothing tested"
