"""``GET /metrics``: the broker's counters and gauges as Prometheus text (format 0.0.4).

``broker.http.admin.MetricsHandler`` calls ``render(service)``; the counters are
``broker.service.metrics.Metrics``, the gauges are read off the scheduler.
"""

from __future__ import annotations

from broker.http.hub_identity import CacheStats
from broker.service.metrics import WAIT_BUCKETS
from broker.service.service import BrokerService

SLOT_STATES = ("free", "busy", "drained", "fencing", "unreachable")


def render(service: BrokerService, hub: CacheStats | None = None) -> str:
    """Prometheus exposition format (text 0.0.4). ``hub``: the hub identity cache's counters,
    when the config names a hub."""
    m = service.metrics
    live = len(service.scheduler.leases()) - service.scheduler.queue_length
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
        f"gpu_broker_leases_live {live}",
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
    if hub is not None:
        out += [
            "# HELP gpu_broker_hub_identity_lookups_total Hub tokens authenticated, answered "
            "from the cache (hit) or by asking the hub (miss).",
            "# TYPE gpu_broker_hub_identity_lookups_total counter",
            f'gpu_broker_hub_identity_lookups_total{{result="hit"}} {hub.hits}',
            f'gpu_broker_hub_identity_lookups_total{{result="miss"}} {hub.misses}',
            "# HELP gpu_broker_hub_calls_total Calls to the hub's REST API, by what they asked.",
            "# TYPE gpu_broker_hub_calls_total counter",
            f'gpu_broker_hub_calls_total{{call="user"}} {hub.hub_calls}',
            f'gpu_broker_hub_calls_total{{call="groups"}} {hub.group_fetches}',
            "# HELP gpu_broker_hub_failures_total Hub calls that failed (hub down or refusing).",
            "# TYPE gpu_broker_hub_failures_total counter",
            f"gpu_broker_hub_failures_total {hub.hub_failures}",
        ]
    return "\n".join(out) + "\n"
