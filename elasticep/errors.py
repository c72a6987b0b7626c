"""The errors elasticep raises on purpose, as one family.

Every error below derives from :class:`ElasticEPError`, so ``except ElasticEPError`` catches
whatever elasticep raises deliberately, and from the built-in exception a caller would expect
(``RuntimeError``, ``TimeoutError``, ``ValueError``), so older ``except`` clauses keep working.
The subsystem errors keep their own names and homes and subclass the family members here:

====================================  ==============================================================
family member                         raised as (among others)
====================================  ==============================================================
:class:`NotStarted`                   ``BusNotStarted`` (bus), ``ServiceNotStarted`` (membership)
:class:`Closed`                       ``BusClosed`` (bus), ``ServiceClosed`` (membership)
:class:`WaitTimeout`                  membership's ``wait_member``/``wait_view``/``leave``, the bus's
                                      ``wait_heard_from``
:class:`EventTooLarge`                ``EventBus.publish`` of an event whose frame exceeds the limit
:class:`RedundancyExhausted`          the planner, ``Placement.dispatch_table``
:class:`UnsupportedEngineVersion`     ``UnsupportedSGLangVersion`` (the SGLang adapter)
:class:`InvalidArgument`              bad arguments to a public entry point (a ``ValueError``)
:class:`StaleEpoch`                   the epoch fence, the transfer executor, the bus
:class:`ElasticEPError` itself        ``FrameRefused`` (the codec: malformed, oversize, ...),
                                      ``NotAnEventType`` (the bus: an unregistered event type)
====================================  ==============================================================

This module imports nothing heavy (no torch, no msgspec), so any module can use it.
"""

from __future__ import annotations

from typing import Sequence

__all__ = [
    "Closed",
    "ElasticEPError",
    "EventTooLarge",
    "InvalidArgument",
    "NotStarted",
    "RedundancyExhausted",
    "StaleEpoch",
    "UnsupportedEngineVersion",
    "WaitTimeout",
]


class ElasticEPError(Exception):
    """Base of every error elasticep raises on purpose."""


def _rebuild(cls: type, state: dict, args: tuple) -> BaseException:
    """Unpickle an error whose ``__init__`` takes other arguments than its message (errors cross
    process boundaries in the engine's reports): restore its message and fields as they were."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class InvalidArgument(ElasticEPError, ValueError):
    """An argument to a public entry point is out of its domain; the message names it."""


class NotStarted(ElasticEPError, RuntimeError):
    """An object was used before ``start()``; ``what`` names it (``"bus"``, ``"membership"``)."""

    def __init__(self, what: str, message: str | None = None) -> None:
        super().__init__(message or f"{what} is not started yet: call (and await) start() first")
        self.what = what

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class Closed(ElasticEPError, RuntimeError):
    """An object was used after ``close()``; ``what`` names it."""

    def __init__(self, what: str, message: str | None = None) -> None:
        super().__init__(message or f"{what} is closed")
        self.what = what

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class WaitTimeout(ElasticEPError, TimeoutError):
    """A bounded wait ran out. ``waiting_for`` says what for, ``timeout_s`` how long it waited.

    A ``TimeoutError``, so ``asyncio.wait_for``-style callers need no change.
    """

    def __init__(self, waiting_for: str, timeout_s: float, detail: str = "") -> None:
        msg = f"timed out after {timeout_s:g} s waiting for {waiting_for}"
        super().__init__(f"{msg}: {detail}" if detail else msg)
        self.waiting_for = waiting_for
        self.timeout_s = float(timeout_s)
        self.detail = detail

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class EventTooLarge(ElasticEPError, ValueError):
    """An event's encoded frame (``size`` bytes) exceeds what every receiver accepts (``limit``).

    Raised at publish, before anything is sent: peers would refuse such a frame as ``oversize``
    while local subscribers got it, so the ranks would disagree about what was published.
    """

    reason = "oversize"

    def __init__(self, event_type: str, size: int, limit: int) -> None:
        super().__init__(
            f"a {event_type} event encodes to {size} bytes, over the {limit}-byte frame limit: "
            "peers would refuse it; send bulk data another way (the transfer engine) and publish a reference"
        )
        self.event_type = event_type
        self.size = int(size)
        self.limit = int(limit)

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class RedundancyExhausted(ElasticEPError, RuntimeError):
    """Some logical expert cannot have a replica on a live rank.

    Raised by the planner when the live slots are fewer than the logical experts (coverage is
    impossible whatever moves), and by :meth:`Placement.dispatch_table` when a placement leaves an
    expert without a live replica. Serving on would route tokens to a dead rank and return wrong
    outputs, so callers must stop serving (or add ranks) instead.

    Attributes:
        needed: slots needed per layer (the number of logical experts).
        live: slots available per layer on live ranks (for the dispatch-table case: the number of
            logical experts that still have a live replica on the worst layer).
        missing: ``(layer, expert)`` pairs without a live replica, when known (at most the first
            16 are kept, to keep the error small).
    """

    def __init__(self, needed: int, live: int, missing: Sequence[tuple[int, int]] = (), detail: str = ""):
        self.needed = int(needed)
        self.live = int(live)
        self.missing = tuple((int(a), int(b)) for a, b in list(missing)[:16])
        self.detail = detail
        msg = f"redundancy exhausted: {self.needed} slots needed per layer, {self.live} live"
        if self.missing:
            msg += f"; no live replica for (layer, expert) {list(self.missing)}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)

    def __reduce__(self):  # keep the fields when pickled across processes
        return (type(self), (self.needed, self.live, self.missing, self.detail))


class UnsupportedEngineVersion(ElasticEPError, RuntimeError):
    """The installed serving engine is a version the adapter was not built for.

    ``engine`` names it (``"sglang"``, ``"vllm"``), ``found`` is the installed version and
    ``supported`` the range the adapter accepts.
    """

    def __init__(self, engine: str, found: str, supported: str, message: str | None = None) -> None:
        super().__init__(message or f"{engine} {found} is not supported: this adapter needs {engine} {supported}")
        self.engine = engine
        self.found = found
        self.supported = supported

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))


class StaleEpoch(ElasticEPError, RuntimeError):
    """Something tagged with epoch ``got`` was refused: epoch ``current`` is installed (invariant 3).

    ``channel`` names where it came from (``"fence"``, ``"dispatch"``, ``"transfer"``,
    ``"collective"``, ``"bus"``); every refusal is also counted in
    ``elasticep_stale_epoch_refused_total{channel}`` by whoever refuses it.
    """

    def __init__(self, channel: str, got: int, current: int, message: str | None = None) -> None:
        super().__init__(message or f"{channel}: epoch {got} is older than the installed epoch {current}; refused")
        self.channel = channel
        self.got = got
        self.current = current

    def __reduce__(self):
        return (_rebuild, (type(self), self.__dict__, self.args))
