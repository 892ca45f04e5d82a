"""Counters of one running broker and their Prometheus text rendering (``GET /metrics``).

``BrokerService`` bumps the counters as it commits decisions; ``broker.http.admin.MetricsHandler``
calls ``render(service)``. Counters start at 0 when the broker starts (Prometheus handles resets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.service.service import BrokerService

WAIT_BUCKETS = (0.1, 1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
SLOT_STATES = ("free", "busy", "drained", "fencing", "unreachable")


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


def render(service: BrokerService) -> str:
    """Prometheus exposition format (text 0.0.4)."""
    m = service.metrics
    by_state = dict.fromkeys(SLOT_STATES, 0)
    for slot in service.scheduler.slots():
        state = service.slot_state(slot.id)
        by_state[state] = by_state.get(state, 0) + 1
    out = [
        "# HELP gpu_broker_slots GPU slots by state.",
        "# TYPE gpu_broker_slots gauge",
        *(f'gpu_broker_slots{{state="{s}"}} {n}' for s, n in by_state.items()),
        "# HELP gpu_broker_queue_length Lease requests waiting for a slot.",
        "# TYPE gpu_broker_queue_length gauge",
        f"gpu_broker_queue_length {service.scheduler.queue_length}",
        "# HELP gpu_broker_leases_live Granted leases.",
        "# TYPE gpu_broker_leases_live gauge",
        f"gpu_broker_leases_live {len(service.scheduler.leases()) - m_queue(service)}",
        "# HELP gpu_broker_queue_wait_seconds Time from request to grant.",
        "# TYPE gpu_broker_queue_wait_seconds histogram",
    ]
    for bound, count in zip(WAIT_BUCKETS, m.wait_counts, strict=True):
        out.append(f'gpu_broker_queue_wait_seconds_bucket{{le="{bound:g}"}} {count}')
    out += [
        f'gpu_broker_queue_wait_seconds_bucket{{le="+Inf"}} {m.wait_count}',
        f"gpu_broker_queue_wait_seconds_sum {m.wait_sum:.6f}",
        f"gpu_broker_queue_wait_seconds_count {m.wait_count}",
        "# HELP gpu_broker_leases_granted_total Leases granted since the broker started.",
        "# TYPE gpu_broker_leases_granted_total counter",
        f"gpu_broker_leases_granted_total {m.granted}",
        "# HELP gpu_broker_suspends_total Leases ended by a suspend (checkpoint kept).",
        "# TYPE gpu_broker_suspends_total counter",
        f"gpu_broker_suspends_total {m.suspends}",
        "# HELP gpu_broker_fencing_failures_total Fencing attempts that could not reach a host.",
        "# TYPE gpu_broker_fencing_failures_total counter",
        f"gpu_broker_fencing_failures_total {m.fence_failures}",
    ]
    return "\n".join(out) + "\n"


def m_queue(service: BrokerService) -> int:
    return service.scheduler.queue_length
