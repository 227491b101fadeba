"""Shared by the crash scenarios (`bench.chaos`, `bench.journey_crash`, and the outbox tests):
what a start delivered again.

A start delivers again what the last stop or kill left in the outbox, and logs it (the pipeline's
"delivering N notifications again"); `redeliveries` reads those lines from a server's log.
"""

from __future__ import annotations

import re

__all__ = ["REPLAYING", "redeliveries", "replays"]

#: The line a start logs for what it delivers again.
REPLAYING = re.compile(r"delivering (\d+) notifications again")


def redeliveries(log: list[str]) -> list[int]:
    """The notifications each start in ``log`` delivered again, in order."""
    return [int(m.group(1)) for line in log if (m := REPLAYING.search(line))]


def replays(log: list[str]) -> int:
    """What the starts in ``log`` delivered again, in all."""
    return sum(redeliveries(log))
