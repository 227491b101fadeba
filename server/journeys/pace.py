"""A journey's ``entry_rate``: profiles entered per second at most, whatever the entry.

A token bucket per journey, in the engine's memory: ``rate`` tokens a second, a second's worth
at most (so a burst after a quiet while is one second's entries). An entry over it is refused
(counted, reason ``entry_rate``); entries held while the journey was paused are taken at this
pace; a read audience reads at the lower of its own ``rate`` and this one. After a restart a
journey starts with a full bucket: at most one second's worth more than the rate.
"""

from __future__ import annotations

__all__ = ["Bucket"]


class Bucket:
    def __init__(self, rate: int, now_us: int) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self.at_us = now_us

    def _refill(self, now_us: int) -> None:
        if now_us > self.at_us:
            self.tokens = min(float(self.rate), self.tokens + self.rate * (now_us - self.at_us) / 1e6)
            self.at_us = now_us

    def available(self, now_us: int) -> int:
        """Entries the journey may take now."""
        self._refill(now_us)
        return int(self.tokens)

    def take(self, now_us: int) -> bool:
        """Whether one more entry may be taken now (if so, it is counted)."""
        self._refill(now_us)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
