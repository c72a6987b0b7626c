"""Prometheus metrics for every elasticep component, in one registry of elasticep's own.

The registry is separate from ``prometheus_client.REGISTRY`` so that several elasticep runtimes in
one process (tests, the launcher) never clash with an application's own metrics. Serve it with
:func:`serve` (an optional HTTP port) or read it with :func:`sample` in tests.

Every metric is listed on the docs page ``docs/metrics.md``; a test keeps the two in step.
"""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)


class ScrapedCounter:
    """A counter by one label whose owners keep plain ``dict`` counts, summed when scraped.

    For the bus's per-event counts: a ``Counter.inc`` takes a lock and several calls, and on the
    path every event's latency takes that is worth avoiding. An owner registers with
    :meth:`track` and a function of the owner returning its ``{label value: count}`` (a copy
    taken at scrape time; the function must not hold the owner, which is tracked weakly); :meth:`retire` folds a closing owner's counts into the total, so the
    counter never goes down.
    """

    def __init__(self, name: str, documentation: str, label: str, registry: CollectorRegistry) -> None:
        self.name = name[: -len("_total")] if name.endswith("_total") else name
        self.documentation = documentation
        self.label = label
        self._live: "weakref.WeakKeyDictionary[object, Callable[[object], dict[str, int]]]" = weakref.WeakKeyDictionary()
        self._retired: dict[str, int] = {}
        self._lock = threading.Lock()
        registry.register(self)

    def track(self, owner: object, counts: Callable[[object], dict[str, int]]) -> None:
        with self._lock:
            self._live[owner] = counts

    def retire(self, owner: object) -> None:
        with self._lock:
            counts = self._live.pop(owner, None)
            for key, n in (counts(owner) if counts else {}).items():
                self._retired[key] = self._retired.get(key, 0) + n

    def describe(self) -> list[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            totals = dict(self._retired)
            for owner, counts in list(self._live.items()):
                for key, n in counts(owner).items():
                    totals[key] = totals.get(key, 0) + n
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for key in sorted(totals):
            family.add_metric([key], totals[key])
        yield family


# bus
FRAMES_REFUSED = Counter(
    "elasticep_frames_refused_total",
    "Frames the bus refused, by reason (malformed, unknown_type, schema_too_new, oversize, "
    "sender_mismatch, stale_epoch, duplicate, stale_incarnation, unregistered_incarnation, "
    "seq_out_of_bounds).",
    ["reason"],
    registry=REGISTRY,
)
EVENTS_PUBLISHED = ScrapedCounter(
    "elasticep_events_published_total", "Events published, by type.", "type", REGISTRY
)
EVENTS_RECEIVED = ScrapedCounter(
    "elasticep_events_received_total", "Events accepted from the transport, by type.", "type", REGISTRY
)
SEQUENCE_GAPS = Counter(
    "elasticep_bus_gaps_total", "Events lost in sequence gaps, by sender.", ["sender"], registry=REGISTRY
)
SUBSCRIBER_DROPPED = Counter(
    "elasticep_subscriber_dropped_total",
    "Events a subscriber's full buffer dropped (overflow policy), by subscription name.",
    ["subscription"],
    registry=REGISTRY,
)
BUS_HANDSHAKE_FAILURES = Counter(
    "elasticep_bus_handshake_failures_total",
    "CURVE handshakes that failed, by side: publisher (a subscriber without a cluster key was "
    "refused) or subscriber (a peer's endpoint did not hold the pinned rank key).",
    ["side"],
    registry=REGISTRY,
)
RENDEZVOUS_REFUSED = Counter(
    "elasticep_rendezvous_refused_total",
    "Records in the bus rendezvous store that were skipped, by reason: malformed, unsigned, "
    "bad_signature (not signed by the rank whose key holds it), unknown_rank, oversize.",
    ["reason"],
    registry=REGISTRY,
)
RENDEZVOUS_REREGISTERED = Counter(
    "elasticep_rendezvous_reregistered_total",
    "Times this process found its own rendezvous record overwritten or gone and wrote it again.",
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "elasticep_subscriber_queue_depth",
    "Events waiting in a subscriber's buffer.",
    ["subscription"],
    registry=REGISTRY,
)

# detection and membership
SUSPICIONS = Counter(
    "elasticep_suspicions_total", "Suspicions raised, by signal source.", ["source"], registry=REGISTRY
)
HOST_BOARD_HEARTBEATS = Counter(
    "elasticep_host_board_heartbeats_total",
    "Heartbeats read from the host board (shared memory) instead of the bus.",
    registry=REGISTRY,
)
HOST_BOARD_UNAVAILABLE = Counter(
    "elasticep_host_board_unavailable_total",
    "Ranks that could not open their host board and heartbeat over the bus only.",
    registry=REGISTRY,
)
EVICTIONS = Counter(
    "elasticep_evictions_total", "Ranks removed from the view, by cause.", ["cause"], registry=REGISTRY
)
VIEW_EPOCH = Gauge("elasticep_view_epoch", "Epoch of the view installed on each rank.", ["rank"], registry=REGISTRY)
VIEW_MEMBERS = Gauge("elasticep_view_members", "Members of the view installed on each rank.", ["rank"],
                     registry=REGISTRY)
API_REFUSED = Counter(
    "elasticep_api_refused_total",
    "Calls to a public entry point refused as bad input (InvalidArgument, NotAnEventType), by area "
    "(planner, placement, view, membership, bus).",
    ["area"],
    registry=REGISTRY,
)


def counts_refusals(area: str) -> Callable[[Callable], Callable]:
    """Decorator for a public entry point: each :class:`~elasticep.errors.InvalidArgument` (or
    other input refusal: a ``TypeError`` of the family) it raises is counted once in
    ``elasticep_api_refused_total{area}`` (by the innermost counted call), then re-raised
    unchanged."""
    import functools

    from elasticep.errors import ElasticEPError, InvalidArgument

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (InvalidArgument, TypeError) as exc:
                if isinstance(exc, ElasticEPError):
                    count_refusal(area, exc)
                raise

        return counted

    return wrap


def count_refusal(area: str, exc: BaseException) -> None:
    """Count ``exc`` (an input refusal) in ``elasticep_api_refused_total{area}`` unless an inner
    call counted it already."""
    if not getattr(exc, "_elasticep_counted", False):
        exc._elasticep_counted = True  # type: ignore[attr-defined]
        API_REFUSED.labels(area).inc()
VIEWS_CORRUPT = Counter(
    "elasticep_view_store_corrupt_total",
    "Values under a view key of the view store that did not decode as a view (refused, never applied).",
    registry=REGISTRY,
)
STORE_CONFLICTS = Counter(
    "elasticep_view_store_conflicts_total",
    "Proposals that lost the compare-and-set to a rival for the same epoch.",
    registry=REGISTRY,
)
VIEW_STORE_FAILOVERS = Counter(
    "elasticep_view_store_failovers_total",
    "Times a replicated view store client (etcd) moved to another endpoint after a failed attempt.",
    registry=REGISTRY,
)
FENCED = Counter(
    "elasticep_fenced_total", "Times this rank fenced itself, by reason.", ["reason"], registry=REGISTRY
)

# reconfiguration and data plane
RECONFIG_PHASE_SECONDS = Histogram(
    "elasticep_reconfig_phase_seconds",
    "Duration of each reconfiguration phase.",
    ["phase"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
STALE_EPOCH_REFUSED = Counter(
    "elasticep_stale_epoch_refused_total",
    "Messages, transfers or collectives refused for carrying an old epoch, by channel.",
    ["channel"],
    registry=REGISTRY,
)
KERNEL_PEER_TIMEOUTS = Counter(
    "elasticep_kernel_peer_timeouts_total",
    "Peers the dispatch/combine kernel gave up waiting on and marked inactive, by op.",
    ["op"],
    registry=REGISTRY,
)
EXPERTS_MOVED = Counter(
    "elasticep_experts_moved_total", "Expert slots whose weights were moved, by source kind.", ["source"],
    registry=REGISTRY,
)
COLLECTIVE_FAILURES = Counter(
    "elasticep_collective_failures_total",
    "Collectives on a healthy-rank group that failed or timed out, by op.",
    ["op"],
    registry=REGISTRY,
)
TRANSFER_FAILURES = Counter(
    "elasticep_transfer_failures_total",
    "Expert weight transfers from one source that failed (the next source is tried), by source kind "
    "and reason.",
    ["source", "reason"],
    registry=REGISTRY,
)
TRANSFER_BYTES = Counter(
    "elasticep_transfer_bytes_total", "Expert weight bytes moved into this rank, by source kind.", ["source"],
    registry=REGISTRY,
)
TRANSFER_STALE_REGISTRATIONS = Counter(
    "elasticep_transfer_stale_registrations_total",
    "Transfer-engine memory registrations dropped because their memory was freed without being "
    "unregistered (a new region overlapped them).",
    registry=REGISTRY,
)
REDUNDANCY_EXHAUSTED = Counter(
    "elasticep_redundancy_exhausted_total",
    "Views after which some logical expert had no live replica.",
    registry=REGISTRY,
)
BACKUP_ERRORS = Counter(
    "elasticep_backup_errors_total",
    "Host-memory backup requests refused or failed, by kind (invalid_argument, over_budget: a plan "
    "larger than the store's slots, load_failed: no source could fill a backup).",
    ["kind"],
    registry=REGISTRY,
)
BACKUP_EXPERTS = Gauge(
    "elasticep_backup_experts",
    "Experts this rank keeps in its host-memory backup store.",
    registry=REGISTRY,
)


def serve(port: int, addr: str = "127.0.0.1"):
    """Serve ``/metrics`` over HTTP on ``addr:port`` from a daemon thread; returns the server
    (``server.server_port`` is the bound port, ``server.shutdown()`` stops it)."""
    result = start_http_server(port, addr=addr, registry=REGISTRY)
    return result[0] if isinstance(result, tuple) else result


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of one sample (0.0 if it was never set); for tests and the CLI."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value

# reference engine
ENGINE_REQUESTS = Counter(
    "elasticep_engine_requests_total",
    "Requests through the engine's front router, by outcome (submitted, completed, rejected, "
    "duplicate_mismatch: two attempts of one greedy request disagreed).",
    ["outcome"],
    registry=REGISTRY,
)
ENGINE_RETRIES = Counter(
    "elasticep_engine_retries_total",
    "Request attempts abandoned and routed again, by cause (rank_exit, evicted, timeout, unroutable).",
    ["cause"],
    registry=REGISTRY,
)
ENGINE_FRAMES_REFUSED = Counter(
    "elasticep_engine_frames_refused_total",
    "Frames on the engine's request channel that could not be decoded.",
    registry=REGISTRY,
)
ENGINE_PROCESS_EXITS = Counter(
    "elasticep_engine_process_exits_total",
    "Rank processes the launcher saw exit, by kind (clean, error, signal).",
    ["kind"],
    registry=REGISTRY,
)
DEMO_OPTIONS_REFUSED = Counter(
    "elasticep_demo_options_refused_total",
    "elasticep demo options and fault schedules refused before set-up, by option (--ranks, --fail-at, "
    "--schedule, ..., usage: a malformed command line).",
    ["option"],
    registry=REGISTRY,
)

# SGLang adapter
SGLANG_REBALANCES = Counter(
    "elasticep_sglang_rebalances_total",
    "SGLang EPLB rebalances served through the adapter's hook, by planner (elasticep: a rank was "
    "dead and elasticep's planner moved only what it must; sglang: handed to SGLang's algorithm).",
    ["planner"],
    registry=REGISTRY,
)
SGLANG_VIEWS = Counter(
    "elasticep_sglang_views_total",
    "Membership views offered to SGLang's active-ranks state, by outcome (applied, duplicate, "
    "stale: an epoch at or below the last applied one, never written twice; invalid: names a rank "
    "beyond the mask; join_deferred: ranks the view admits are left to SGLang's own recovery path).",
    ["outcome"],
    registry=REGISTRY,
)
SGLANG_COMMITS = Counter(
    "elasticep_sglang_commits_total",
    "Agent commits applied to an SGLang scheduler's ExpertLocationMetadata and ElasticEPState, by "
    "outcome (applied; duplicate, stale: an epoch at or below the last applied one, refused; mismatch: "
    "a placement that does not fit SGLang's slots; no_weight_path: experts would move without EPLB).",
    ["outcome"],
    registry=REGISTRY,
)
SGLANG_EXPERT_LOADS = Counter(
    "elasticep_sglang_expert_loads_total",
    "Expert slots an SGLang rank refilled at a commit, by source (local: a slot of the same rank; "
    "peer: a live rank through SGLang's expert location updater; missing: no live replica, loaded "
    "from SGLang's DRAM backup or the checkpoint).",
    ["source"],
    registry=REGISTRY,
)

# engine-neutral agent
AGENT_ERRORS = Counter(
    "elasticep_agent_errors_total",
    "Calls the agent refused or could not honour, by kind (started_twice, not_started, "
    "report_not_running, stopped_during_reconfiguration, signal_failed).",
    ["kind"],
    registry=REGISTRY,
)
HOOK_FAILURES = Counter(
    "elasticep_hook_failures_total",
    "Engine hook calls that raised (kind=error) or overran the agent's hook_timeout_s "
    "(kind=timeout), by hook.",
    ["hook", "kind"],
    registry=REGISTRY,
)
OPERATOR_REQUESTS = Counter(
    "elasticep_operator_requests_total",
    "Requests to the operator's HTTP door, by endpoint (status, drain, admit, other) and HTTP status code.",
    ["endpoint", "code"],
    registry=REGISTRY,
)
OPERATOR_REFUSED = Counter(
    "elasticep_operator_refused_total",
    "Requests the operator's door refused, by reason (no_token, bad_token, bad_request, too_large, "
    "not_found, conflict: the rank is not a member or already draining, unavailable: no admit "
    "callable or the agent is not running, forward_failed: the drained rank's door did not answer).",
    ["reason"],
    registry=REGISTRY,
)
