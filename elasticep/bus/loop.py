"""The event loop a rank runs its bus on: uvloop where it is installed, asyncio's otherwise.

Every event that reaches a subscriber crosses the event loop twice: the loop wakes on the ZeroMQ
socket's file descriptor and runs the reader callback, then resumes the task waiting in
``async for env in sub``. On asyncio's own loop the second step alone costs about 10 us on
these 2-core machines; on uvloop (libuv) about 1 us, and the wake-up itself is cheaper too.
That is most of the bus's latency above raw pyzmq (``docs/benchmarks.md``), so rank processes
elasticep starts run on uvloop, as SGLang's and vLLM's servers do.

Which loop, first match wins:

1. the ``kind`` argument;
2. the environment variable ``ELASTICEP_EVENT_LOOP`` (``auto``, ``uvloop`` or ``asyncio``);
3. ``auto``: uvloop if it imports, asyncio's loop if not (uvloop has no Windows build).

``uvloop`` asked for explicitly but not installed raises :class:`ImportError`; an unknown kind
raises :class:`ValueError`. Code that must run on any loop (the bus, the membership service)
uses only the ``asyncio`` API, so both kinds run the same code and the test suite runs both.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Coroutine, Literal, TypeVar

from elasticep.errors import InvalidArgument

__all__ = ["EVENT_LOOP_ENV", "EVENT_LOOP_KINDS", "LoopKind", "event_loop_kind", "new_event_loop", "run"]

T = TypeVar("T")
LoopKind = Literal["auto", "uvloop", "asyncio"]
EVENT_LOOP_KINDS: tuple[str, ...] = ("auto", "uvloop", "asyncio")
EVENT_LOOP_ENV = "ELASTICEP_EVENT_LOOP"
"""Environment variable that picks the loop when no ``kind`` is passed."""


def _uvloop() -> Any | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop


def event_loop_kind(kind: str | None = None) -> Literal["uvloop", "asyncio"]:
    """The loop :func:`new_event_loop` would make for ``kind`` here: ``"uvloop"`` or ``"asyncio"``."""
    wanted = kind or os.environ.get(EVENT_LOOP_ENV) or "auto"
    if wanted not in EVENT_LOOP_KINDS:
        raise InvalidArgument(f"event loop must be one of {EVENT_LOOP_KINDS}, not {wanted!r}")
    if wanted == "asyncio":
        return "asyncio"
    if _uvloop() is not None:
        return "uvloop"
    if wanted == "uvloop":
        raise ImportError("the uvloop event loop was asked for but uvloop is not installed (pip install uvloop)")
    return "asyncio"


def new_event_loop(kind: str | None = None) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind :func:`event_loop_kind` picks; not set as the thread's loop."""
    if event_loop_kind(kind) == "uvloop":
        uvloop = _uvloop()
        assert uvloop is not None
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T], *, kind: str | None = None, debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new loop of the chosen kind, like :func:`asyncio.run`."""
    with asyncio.Runner(debug=debug, loop_factory=lambda: new_event_loop(kind)) as runner:
        return runner.run(main)
