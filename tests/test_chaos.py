"""Chaos, short: SIGKILL the server during a mixed load (event writers and a campaign per
round, and a journey its events enter), three times (twice during a delivery, once at a random
moment), then the books (`bench.chaos`; ``python -m bench.chaos`` runs the long schedule):
every acknowledged event stored, each started send whole with one outcome per notification,
duplicates within what was counted as replayed and the in-flight bound, the data folder
consistent; one journey instance per entered profile, ended or in its wait, its push staged
once and reaching the provider once or more."""

from __future__ import annotations

from bench.chaos import chaos


async def test_three_random_kills_under_mixed_load_keep_the_books(tmp_path):
    result = await chaos(tmp_path, kills=3, profiles=300, seed=12, max_delay=1.5, latency_ms=300, in_delivery=2)
    print({k: v for k, v in result.items() if k != "sends"})
    assert result["problems"] == []
    assert result["events_acknowledged"] > 0, "no batch was acknowledged: nothing tested"
    assert any(s["targeted"] for s in result["sends"].values()), "no send started: nothing tested"
    assert result["replays_at_restarts"], "no kill left notifications in the outbox: nothing tested"
    assert result["journey"]["instances"] > 0, "no profile entered the journey: nothing tested"
