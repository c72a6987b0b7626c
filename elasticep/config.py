"""One frozen configuration type with named profiles.

Precedence, highest first: an explicit keyword argument to :meth:`Config.local` /
:meth:`Config.cluster` / :meth:`Config.for_hosts` (or :meth:`Config.replace`), then an
environment variable ``ELASTICEP_<FIELD NAME IN CAPITALS>``, then the profile's default.

``local()`` is for ranks sharing one host (the reference engine, the demo, most tests): loopback
latencies of tens of microseconds let it detect in tens of milliseconds. ``cluster()`` is for
ranks spread over hosts and switches, where pauses of a few hundred milliseconds (GC, page
faults, a busy NIC) are normal and must not evict anyone.

Which profile is the default: :meth:`Config.for_hosts` (and the profile name ``"auto"``, see
:data:`PROFILES`) picks ``local()`` for ranks on one host and ``cluster()`` for ranks on more
than one, and every launcher that places ranks on several hosts follows it unless told
otherwise. Loopback never loses a packet, but a real link does, and one lost TCP segment
stalls the stream it belongs to for at least Linux's minimum retransmission timeout, 200 ms:
as long as the local profile's ``grace_ms``, so under a few per cent of loss the local profile
evicts healthy ranks on another host. The cluster profile's 1.5 s grace outlasts several
retransmissions.

What each profile trades: a shorter ``heartbeat_interval_ms`` and lower ``phi_threshold`` detect
a hang sooner but evict a merely slow rank more often. With heartbeats every ``I`` ms and a
threshold ``phi``, a silent rank is suspected after about ``I * (1 + phi * ln 10 * cv)``
(``cv`` the observed jitter ratio) and never before ``min_suspect_ms``; ``grace_ms`` is the
shortest silence that can ever evict without a certain signal, so pauses below it are safe.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
import math
from typing import Any

from elasticep.errors import InvalidArgument


PROFILES = ("auto", "local", "cluster")
"""Profile names accepted where a profile is named by string (:meth:`Config.named`, the
``--profile`` options): ``"auto"`` is the default for the deployment, :func:`resolve_profile`."""


def resolve_profile(profile: str, hosts: int) -> str:
    """The profile to use, ``"local"`` or ``"cluster"``, for ranks spread over ``hosts`` hosts:
    ``profile`` itself when it names one, and for ``"auto"`` the default, ``"local"`` for one
    host (or 0: every rank on the caller's host) and ``"cluster"`` for more (see
    :meth:`Config.for_hosts` for why)."""
    if profile not in PROFILES:
        raise InvalidArgument(f"profile must be one of {', '.join(PROFILES)}, not {profile!r}")
    if isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 0:
        raise InvalidArgument(f"hosts must be an int >= 0, not {hosts!r}")
    if profile != "auto":
        return profile
    return "local" if hosts <= 1 else "cluster"


class UnknownConfigField(InvalidArgument, TypeError):
    """A ``Config`` field name that does not exist (an ``InvalidArgument`` and, as before, a ``TypeError``)."""


@dataclass(frozen=True)
class Config:
    # --- detection ---
    heartbeat_interval_ms: float = 40.0
    """Period of each rank's heartbeat on the bus, ms. Every rank hears every other, so the bus
    carries ``N * (N - 1) * 1000 / heartbeat_interval_ms`` heartbeats per second."""
    phi_threshold: float = 8.0
    """Phi-accrual level above which heartbeat silence becomes a suspicion (phi 8 ~ 1e-8 odds)."""
    min_suspect_ms: float = 100.0
    """Silence shorter than this is never suspected, whatever phi says, ms."""
    grace_ms: float = 200.0
    """Silence shorter than this never evicts without a certain signal (process exit), ms."""
    corroboration_window_ms: float = 500.0
    """Uncertain suspicions (silence, kernel timeout) need a second observer or signal within
    this window to evict, ms."""
    single_observer_evict_ms: float = 300.0
    """A lone observer's suspicion still evicts once the silence it sees reaches this, ms
    (covers the case where only one peer can observe, e.g. a two-rank cluster)."""
    gray_slowness: float = 3.0
    """A rank whose heartbeat lateness stays above this multiple of the median is reported gray."""
    history_size: int = 100
    """Heartbeat inter-arrival samples kept per peer for the phi estimate."""
    detection_topology: str = "all"
    """Who watches whom (:mod:`elasticep.membership.topology`): ``"all"``, every rank hears every
    other (``N - 1`` subscriptions per rank; best up to a few dozen ranks), or ``"ring"``, each
    rank hears and watches its ``monitors_per_rank`` nearest members in the rank-sorted ring
    (per-rank cost independent of ``N``)."""
    monitors_per_rank: int = 4
    """Ring topology: how many ranks watch each rank (even, >= 4: ``monitors_per_rank / 2`` on
    each side); each rank receives ``monitors_per_rank * 1000 / heartbeat_interval_ms``
    heartbeats a second."""
    startup_grace_s: float = 60.0
    """A bootstrap member never heard since the first view is *joining* (still starting): it is
    suspected only after this much silence, s, never by the steady-state timers (a process exit
    still evicts it at once)."""
    host_board: bool = True
    """Ranks on one host heartbeat each other through a shared-memory board
    (:mod:`elasticep.detect.board`) instead of the bus: no message, no wake-up. A rank still
    heartbeats on the bus while any rank that watches it is not seen on its board; events
    (suspicions, views, joins) always travel on the bus. Used by the :class:`~elasticep.Agent`."""

    # --- membership and store ---
    store_timeout_s: float = 2.0
    """Bound on one view-store operation; past it the rank fences itself, s."""
    store_poll_ms: float = 50.0
    """How often the membership service polls the store for a newer committed view, ms. A backup
    only: a rank that installs a view announces it on the bus and peers read it at once; the poll
    also proves the store is reachable (see ``store_timeout_s``)."""
    store_idle_poll_ms: float = 500.0
    """The poll's period while nothing is in flight (a member serving its view, every peer
    heard, no join, leave, suspicion or failed store operation), ms; ``store_poll_ms`` applies
    otherwise. The period used is this clamped to ``[store_poll_ms, store_timeout_s / 2]``, so a
    store that stops answering is still found within the timeout. Only with ``detection_topology="all"``, where every rank hears
    every view's announcement and sees its epoch on every peer's envelope (with ``"ring"`` the
    poll is how views reach ranks beyond the installers' neighbours, so ``store_poll_ms`` always
    applies)."""
    join_timeout_s: float = 30.0
    """How long a joining rank waits to be admitted before it gives up, s."""
    view_store: str = "tcpstore"
    """Where views are committed: ``"tcpstore"`` (the launcher-hosted ``TCPStore``, zero set-up,
    lost with its host) or ``"etcd"`` (an etcd cluster at ``etcd_endpoints``, which outlives any
    minority of its members); see :func:`elasticep.membership.open_view_store`."""
    etcd_endpoints: str = ""
    """The etcd members' client endpoints, ``"HOST:PORT,HOST:PORT,..."``; needed when
    ``view_store="etcd"``."""

    # --- data plane ---
    kernel_timeout_us: int = 1_000_000
    """Hard bound on each wait for a peer inside dispatch/combine, us (SGLang+Mooncake EP use
    10 s). Past it the peer is marked 0 and the step fails and is replayed, so it must outlast
    the longest pause of a healthy peer's step, and it is never below ``grace_ms`` (checked):
    a bound the membership cannot act on within only fails steps of a peer that stays a member.
    Detection does not wait for it: a wait is reported as kernel evidence once it reaches
    ``min_suspect_ms`` (:class:`~elasticep.kernel.KernelWaitWatch`), so a peer that stops taking
    part is evicted after about ``max(grace_ms, min_suspect_ms) + heartbeat_interval_ms`` plus
    one step, whatever this bound."""

    # --- bus ---
    bus_hwm: int = 100_000
    """ZeroMQ high-water mark per socket, messages; past it ZeroMQ drops and the bus reports a gap."""
    subscriber_buffer: int = 10_000
    """Default bounded buffer of one subscription, events."""

    # --- reconfiguration ---
    max_moves_factor: float = 4.0
    """Move budget after a failure, as a multiple of the coverage-repair lower bound."""
    transfer_timeout_s: float = 10.0
    """Bound on one weight transfer before the next source is tried, s."""
    backup_budget_mb: float = 0.0
    """Host memory each rank may hold for backups of experts it does not serve, MiB (0: none).
    A rank keeps ``floor(budget / (moe_layers * expert_bytes))`` experts per layer
    (:func:`elasticep.transfer.backup_slots`); two copies of every expert need about
    ``2 * experts / ranks`` per layer."""
    backup_copies: int = 2
    """Host-memory backups planned per expert (:func:`elasticep.transfer.plan_backups`), each on
    a host other than those serving the expert and than the other copy's."""

    # --- operator's door (elasticep.agent.operator) ---
    operator_port: int = -1
    """Port of the operator's HTTP door (status, drain, admit) beside the metrics page; ``-1``
    serves none, ``0`` picks a free port."""
    operator_addr: str = "127.0.0.1"
    """Address the operator's door binds."""
    operator_token: str = dataclasses.field(default="", repr=False)
    """Bearer token every request to the operator's door must carry (``Authorization: Bearer
    TOKEN``), at least 16 characters, e.g. ``secrets.token_urlsafe()``; needed when
    ``operator_port >= 0``. Kept out of ``repr()``."""

    def idle_poll_s(self) -> float:
        """The store poll's period while nothing is in flight, s: ``store_idle_poll_ms`` clamped
        to ``[store_poll_ms, store_timeout_s / 2]``."""
        return max(self.store_poll_ms, min(self.store_idle_poll_ms, self.store_timeout_s * 500.0)) / 1e3

    @classmethod
    def local(cls, **overrides: Any) -> "Config":
        """Ranks on one host: detect in tens of milliseconds."""
        return cls._build({}, overrides)

    @classmethod
    def cluster(cls, **overrides: Any) -> "Config":
        """Ranks across hosts: detect in about a second, tolerate pauses of several hundred ms."""
        profile = dict(
            heartbeat_interval_ms=100.0,
            phi_threshold=10.0,
            min_suspect_ms=600.0,
            grace_ms=1500.0,
            corroboration_window_ms=3000.0,
            single_observer_evict_ms=3000.0,
            store_timeout_s=10.0,
            store_poll_ms=200.0,
            store_idle_poll_ms=2000.0,
            kernel_timeout_us=2_000_000,
            transfer_timeout_s=30.0,
        )
        return cls._build(profile, overrides)

    @classmethod
    def for_hosts(cls, hosts: int, **overrides: Any) -> "Config":
        """The default profile for ranks spread over ``hosts`` hosts: :meth:`local` for one (or
        0, every rank on the caller's host), :meth:`cluster` for more. ``overrides`` and
        ``ELASTICEP_*`` variables apply as to the profile itself.

        Why: between hosts packets get lost, and a lost TCP segment holds up its stream (the
        bus's heartbeats with it) for at least Linux's minimum retransmission timeout, 200 ms,
        doubling at each further loss. That is the local profile's whole ``grace_ms`` (200 ms),
        so a few per cent of loss on one host's link evicts its healthy ranks within seconds;
        the cluster profile's ``grace_ms`` of 1.5 s covers three back-to-back retransmissions
        (200 + 400 + 800 ms). Certain signals (a process exit, sockets closed by a dead rank's
        kernel) evict without waiting for the grace under either profile; only silence waits.
        On one host loopback loses nothing, and the local profile detects a hang in about
        200 ms."""
        return cls.named("auto", hosts=hosts, **overrides)

    @classmethod
    def named(cls, profile: str, *, hosts: int = 1, **overrides: Any) -> "Config":
        """The profile called ``profile``: ``"local"``, ``"cluster"``, or ``"auto"``, the default
        for ranks on ``hosts`` hosts (:meth:`for_hosts`)."""
        if resolve_profile(profile, hosts) == "cluster":
            return cls.cluster(**overrides)
        return cls.local(**overrides)

    @classmethod
    def _build(cls, profile: dict[str, Any], overrides: dict[str, Any]) -> "Config":
        known = {f.name: f for f in fields(cls)}
        unknown = set(overrides) - set(known)
        if unknown:
            raise UnknownConfigField(f"unknown Config fields: {sorted(unknown)}")
        values: dict[str, Any] = dict(profile)
        for name, f in known.items():
            env = os.environ.get(f"ELASTICEP_{name.upper()}")
            if env is not None:
                values[name] = _parse(env, type(cls.__dataclass_fields__[name].default), name)
        values.update(overrides)
        config = cls(**values)
        config.validate()
        return config

    def replace(self, **changes: Any) -> "Config":
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise UnknownConfigField(f"unknown Config fields: {sorted(unknown)}")
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise :class:`~elasticep.errors.InvalidArgument` (a ``ValueError``) for a field of the
        wrong type, a NaN, or values that cannot work together."""
        for f in fields(self):
            value, kind = getattr(self, f.name), type(f.default)
            if kind is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
            elif kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            else:
                ok = isinstance(value, kind)
            if not ok:
                article = "an" if kind is int else "a"
                raise InvalidArgument(f"Config.{f.name} must be {article} {kind.__name__}, not {value!r}")
        if self.heartbeat_interval_ms <= 0:
            raise InvalidArgument("heartbeat_interval_ms must be > 0")
        if self.min_suspect_ms < self.heartbeat_interval_ms:
            raise InvalidArgument("min_suspect_ms must be at least one heartbeat interval")
        if self.grace_ms < self.min_suspect_ms:
            raise InvalidArgument("grace_ms must be >= min_suspect_ms")
        if self.single_observer_evict_ms < self.grace_ms:
            raise InvalidArgument("single_observer_evict_ms must be >= grace_ms")
        if self.kernel_timeout_us < self.grace_ms * 1e3:
            raise InvalidArgument(f"kernel_timeout_us ({self.kernel_timeout_us}) must be >= grace_ms in us "
                                  f"({self.grace_ms * 1e3:g}): a shorter bound fails the steps of a peer "
                                  "the membership cannot evict yet")
        if self.store_poll_ms <= 0 or self.store_idle_poll_ms <= 0:
            raise InvalidArgument("store_poll_ms and store_idle_poll_ms must be > 0")
        if self.phi_threshold <= 0:
            raise InvalidArgument("phi_threshold must be > 0")
        if self.view_store not in ("tcpstore", "etcd"):
            raise InvalidArgument(f"view_store must be 'tcpstore' or 'etcd', not {self.view_store!r}")
        if self.view_store == "etcd" and not self.etcd_endpoints.strip():
            raise InvalidArgument("view_store='etcd' needs etcd_endpoints (HOST:PORT,...)")
        if self.detection_topology not in ("all", "ring"):
            raise InvalidArgument(f"detection_topology must be 'all' or 'ring', not {self.detection_topology!r}")
        if self.detection_topology == "ring" and (self.monitors_per_rank < 4 or self.monitors_per_rank % 2):
            raise InvalidArgument("monitors_per_rank must be an even number >= 4 with the ring topology")
        if self.backup_budget_mb < 0 or self.backup_copies < 1:
            raise InvalidArgument("backup_budget_mb must be >= 0 and backup_copies >= 1")
        if self.startup_grace_s * 1e3 < self.min_suspect_ms:
            raise InvalidArgument("startup_grace_s must be at least min_suspect_ms")
        if not -1 <= self.operator_port <= 65535:
            raise InvalidArgument(f"operator_port must be -1 (no door), 0 (a free port) or a port, not {self.operator_port}")
        if self.operator_port >= 0 and len(self.operator_token) < 16:
            raise InvalidArgument("the operator's door (operator_port >= 0) needs an operator_token of at least 16 "
                             "characters (e.g. secrets.token_urlsafe())")


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _parse(text: str, kind: type, name: str) -> Any:
    if kind is bool:
        word = text.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise InvalidArgument(f"ELASTICEP_{name.upper()}={text!r} is not a valid bool (one of {_TRUE + _FALSE})")
    try:
        return kind(text)
    except ValueError:
        raise InvalidArgument(f"ELASTICEP_{name.upper()}={text!r} is not a valid {kind.__name__}") from None
