"""Counters of one running broker: leases granted, suspends, fencing failures, queue waits.

``BrokerService`` bumps them as it commits decisions; ``broker.http.metrics.render`` shows them
as Prometheus text (``GET /metrics``). They start at 0 when the broker starts (Prometheus handles
resets).
"""

from __future__ import annotations

from dataclasses import dataclass, field

WAIT_BUCKETS = (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


@dataclass
class Metrics:
    """Monotonic counters and the queue-wait histogram."""

    granted: int = 0
    suspends: int = 0
    fence_failures: int = 0
    wait_counts: list[int] = field(default_factory=lambda: [0] * len(WAIT_BUCKETS))
    wait_sum: float = 0.0
    wait_count: int = 0

    def observe_wait(self, seconds: float) -> None:
        """One granted lease waited ``seconds`` in the queue (0 when granted at once)."""
        self.wait_sum += seconds
        self.wait_count += 1
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.wait_counts[i] += 1
