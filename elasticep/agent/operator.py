"""The operator's door: an authenticated HTTP endpoint on each rank, beside the metrics page.

=========================  ==================================================================
request                    answer
=========================  ==================================================================
``GET /status``            200: :meth:`Agent.status` (view, epoch, members, suspicions, the
                           last reconfiguration's phases) plus ``incarnation`` and ``operator``
                           (this door's URL, a drain in progress)
``POST /drain``            202: this rank begins a graceful leave. Body ``{"rank": R,
                           "reason": "..."}``, both optional (``rank`` defaults to this one);
                           for another member the request is forwarded to that rank's door
                           (found in the store) and its answer relayed
``POST /admit``            202 once the ``admit`` callable started rank ``R`` (a joining
                           process, which asks the members to admit it); with ``"wait_s": S``,
                           200 once this rank serves an epoch with ``R`` among its members
=========================  ==================================================================

Every request carries ``Authorization: Bearer TOKEN`` (``Config.operator_token``); without it,
or with another token, the answer is 401. Every refusal (401, 400 for a body that is not a JSON
object of the right fields, 404, 409, 413, 501) is counted in
``elasticep_operator_refused_total{reason}``, every request in
``elasticep_operator_requests_total{endpoint,code}``; errors are JSON ``{"error": ...,
"reason": ...}``.

Why drain of another rank is forwarded rather than sent on the bus: membership accepts a
``LeaveRequest`` only from the leaving rank itself (a forged one is refused), so the leave must
start in that rank's process. Each door records its URL in the store
(``elasticep/<cluster>/operator/<rank>``); any door can then drain any member.

Why admit calls a callable: membership admits a rank when that rank's own process asks (its
``JoinRequest`` is authenticated by its bus key); what an operator lacks is the process. The
``admit`` callable is what the deployment has for starting one (the launcher's ``spawn``, a
Kubernetes scale call); a door given none answers 501.

The door runs on its own thread and event loop (aiohttp), not on the agent's loop: parsing
whatever a client sends never delays heartbeats or a view install.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Protocol

from elasticep import metrics
from elasticep.agent.errors import AgentStateError
from elasticep.errors import ElasticEPError, InvalidArgument

__all__ = ["OperatorDoor", "OperatorRefused", "OperatorTarget", "door_key", "fetch_status", "format_status",
           "start_operator"]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
"""Largest request body the door reads; past it the answer is 413."""

FORWARD_TIMEOUT_S = 10.0
"""Bound on forwarding a drain to another rank's door, s."""

_STORE_TIMEOUT_S = 5.0  # the door's own store client: a gone store must not hold close() for long
_MAX_WAIT_S = 300.0
_MAX_RANK = 1 << 16
_FORWARDED = "X-Elasticep-Forwarded-By"


def door_key(cluster: str, rank: int) -> str:
    """Store key holding the URL of ``rank``'s operator door (JSON ``{"url", "incarnation"}``)."""
    return f"elasticep/{cluster}/operator/{rank}"


class OperatorTarget(Protocol):
    """What the door needs of an agent (:class:`~elasticep.agent.Agent` is one)."""

    rank: int
    cluster: str
    store_address: str

    def status(self) -> dict[str, Any]: ...

    def request_leave(self, reason: str = ...) -> cf.Future: ...


class OperatorRefused(ElasticEPError, RuntimeError):
    """An operator's door answered ``code`` (not 2xx); ``body`` is its JSON answer
    (``{"error": ..., "reason": ...}``)."""

    def __init__(self, url: str, code: int, body: Any) -> None:
        super().__init__(f"{url} answered {code}: {body}")
        self.url, self.code, self.body = url, code, body


class _Refused(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class OperatorDoor:
    """The operator's HTTP door of one rank; see the module docs.

    Args:
        target: the rank's agent (or any :class:`OperatorTarget`).
        token: the bearer token (``Config.operator_token``), at least 16 characters.
        host, port: where to listen (``port=0`` picks a free one: :attr:`url`; a door on every
            address, ``0.0.0.0``, advertises this host's name).
        drain: called with the reason when this rank is to leave, on a worker thread; it must
            return promptly (start the leave, do not wait for it). Default: the agent's
            :meth:`~elasticep.agent.Agent.request_leave`, then :meth:`~elasticep.agent.Agent.finish_leave`
            on a thread of the door; the engine's next ``boundary()`` then raises
            ``AgentFenced`` (this rank is out of the view: stop serving). An engine with a
            graceful path of its own (finish its requests first) passes that instead.
        admit: called with a rank to start a joining process for it, on a worker thread,
            bounded by ``admit_timeout_s``; None answers 501 to ``POST /admit``.
        register: record :attr:`url` in the store so other doors can forward drains here.
    """

    def __init__(
        self,
        target: OperatorTarget,
        token: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        drain: Callable[[str], Any] | None = None,
        admit: Callable[[int], Any] | None = None,
        admit_timeout_s: float = 30.0,
        register: bool = True,
    ) -> None:
        if not isinstance(token, str) or len(token) < 16:
            raise InvalidArgument("the operator's door needs a token of at least 16 characters")
        if isinstance(port, bool) or not (isinstance(port, int) and 0 <= port < 65536):
            raise InvalidArgument(f"port must be a port number, not {port!r}")
        self.target = target
        self._token = token.encode()
        self._host, self._port = host, port
        self._drain = drain
        self._admit = admit
        self.admit_timeout_s = admit_timeout_s
        self._register = register
        self.url: str | None = None
        """``http://HOST:PORT`` while the door is open."""
        self.draining: dict[str, Any] | None = None
        """The drain this door started: ``{"reason", "requested_at"}``, or None."""
        self._leave: cf.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._session: Any = None
        self._store: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str | None:
        """``HOST:PORT`` while open, or None."""
        return None if self.url is None else self.url[len("http://"):]

    def start(self, timeout: float = 10.0) -> "OperatorDoor":
        """Open the door on a thread of its own; returns once it listens."""
        if self._thread is not None:
            raise AgentStateError("the operator's door starts once", "started")
        started: cf.Future = cf.Future()
        self._thread = threading.Thread(target=self._main, args=(started,), daemon=True,
                                        name=f"elasticep-operator-{self.target.rank}")
        self._thread.start()
        started.result(timeout)
        if self._register:
            from elasticep.agent.agent import connect_store

            self._store = connect_store(self.target.store_address, timeout_s=_STORE_TIMEOUT_S)
            self._store.set(door_key(self.target.cluster, self.target.rank),
                            json.dumps({"url": self.url, "incarnation": getattr(self.target, "incarnation", 0)}))
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Stop listening and drop this door's store record. Idempotent, from any thread."""
        if self._store is not None and self.url is not None:
            try:
                key = door_key(self.target.cluster, self.target.rank)
                if self._store.check([key]) and json.loads(self._store.get(key)).get("url") == self.url:
                    self._store.delete_key(key)
            except Exception as exc:  # the store may be gone with the cluster
                log.debug("rank %d: could not drop the operator door record: %r", self.target.rank, exc)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout)
            except (RuntimeError, cf.TimeoutError, cf.CancelledError):
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.url = None

    def __enter__(self) -> "OperatorDoor":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _main(self, started: cf.Future) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        self._stopped = asyncio.Event()
        try:
            loop.run_until_complete(self._serve(started))
        except BaseException as exc:
            if not started.done():
                started.set_exception(exc)
            else:
                log.error("rank %d: the operator's door failed: %r", self.target.rank, exc)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, started: cf.Future) -> None:
        from aiohttp import web

        @web.middleware
        async def guard(request: web.Request, handler: Callable) -> web.StreamResponse:
            return await self._guard(request, handler)

        app = web.Application(middlewares=[guard], client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/status", self._status)
        app.router.add_post("/drain", self._drain_handler)
        app.router.add_post("/admit", self._admit_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
            sockets = self._runner.addresses
            port = sockets[0][1]
            host = self._host
            if host in ("", "0.0.0.0", "::"):  # listening everywhere: advertise a name peers can reach
                host = socket.getfqdn()
            self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
            started.set_result(None)
            await self._stopped.wait()
        finally:
            if self._session is not None:
                await self._session.close()
            await self._runner.cleanup()

    async def _shutdown(self) -> None:
        self._stopped.set()

    # ------------------------------------------------------------------ every request

    async def _guard(self, request: Any, handler: Callable) -> Any:
        """Every request: authenticate, then turn refusals into counted JSON answers."""
        from aiohttp import web

        endpoint = request.path.strip("/") if request.path in ("/status", "/drain", "/admit") else "other"
        try:
            self._authenticate(request)
            response = await handler(request)
        except _Refused as refused:
            metrics.OPERATOR_REFUSED.labels(refused.reason).inc()
            response = _json({"error": refused.message, "reason": refused.reason}, refused.code)
            if refused.code == 401:
                response.headers["WWW-Authenticate"] = 'Bearer realm="elasticep"'
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
            reason = {404: "not_found", 405: "not_found", 413: "too_large"}.get(exc.status, "bad_request")
            if exc.status < 500:
                metrics.OPERATOR_REFUSED.labels(reason).inc()
            response = _json({"error": exc.reason, "reason": reason}, exc.status)
        except Exception as exc:
            log.exception("rank %d: operator request %s %s failed", self.target.rank, request.method, request.path)
            response = _json({"error": f"{type(exc).__name__}: {exc}", "reason": "internal"}, 500)
        metrics.OPERATOR_REQUESTS.labels(endpoint, str(response.status)).inc()
        return response

    def _authenticate(self, request: Any) -> None:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if not header or scheme.lower() != "bearer" or not given.strip():
            raise _Refused(401, "no_token", "missing bearer token (Authorization: Bearer TOKEN)")
        if not hmac.compare_digest(given.strip().encode(), self._token):
            raise _Refused(401, "bad_token", "wrong bearer token")

    async def _body(self, request: Any, allowed: set[str]) -> dict[str, Any]:
        from aiohttp import web

        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(413, "too_large", f"request body over {MAX_BODY_BYTES} bytes") from None
        if not raw.strip():
            return {}
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _Refused(400, "bad_request", f"body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _Refused(400, "bad_request", f"body must be a JSON object, not {type(body).__name__}")
        unknown = set(body) - allowed
        if unknown:
            raise _Refused(400, "bad_request", f"unknown fields {sorted(unknown)}; known: {sorted(allowed)}")
        return body

    # ------------------------------------------------------------------ endpoints

    async def _status(self, request: Any) -> Any:
        return _json(self.status())

    def _target_status(self) -> dict[str, Any]:
        # Agent.status() reads the membership core's dicts from this thread while the agent's
        # loop may change them: a "changed size during iteration" is retried, not answered 500.
        for attempt in range(5):
            try:
                return self.target.status()
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(0.001)
        raise AssertionError("unreachable")

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` answers."""
        status = dict(self._target_status())
        status["incarnation"] = getattr(self.target, "incarnation", None)
        draining = None
        if self.draining is not None:
            draining = dict(self.draining)
            if self._leave is not None:
                draining["done"] = self._leave.done()
        status["operator"] = {"url": self.url, "draining": draining, "admit": self._admit is not None}
        return status

    async def _drain_handler(self, request: Any) -> Any:
        body = await self._body(request, {"rank", "reason"})
        me = self.target.rank
        rank = _rank(body.get("rank", me))
        reason = body.get("reason", "operator drain")
        if not isinstance(reason, str) or len(reason) > 200:
            raise _Refused(400, "bad_request", "reason must be a string of at most 200 characters")
        status = self._target_status()
        if rank != me:
            if request.headers.get(_FORWARDED) is not None:
                raise _Refused(409, "conflict", f"forwarded a drain of rank {rank} but this door is rank {me}'s "
                                                f"(a stale door record)")
            if rank not in status["members"]:
                raise _Refused(404, "not_found", f"rank {rank} is not a member of epoch {status['epoch']} "
                                                 f"(members {status['members']})")
            return await self._forward(request, rank, {"rank": rank, "reason": reason})
        if status["state"] != "running":
            raise _Refused(503, "unavailable", f"rank {me}'s agent is {status['state']}")
        if me not in status["members"]:
            raise _Refused(409, "conflict", f"rank {me} is not a member of epoch {status['epoch']}")
        with self._lock:
            if self.draining is not None:
                raise _Refused(409, "conflict", f"rank {me} is already draining ({self.draining['reason']})")
            self.draining = {"reason": reason, "requested_at": time.time()}
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._begin_drain, reason)
        except Exception as exc:
            with self._lock:
                self.draining = None
            raise _Refused(409, "conflict", f"rank {me} cannot leave: {type(exc).__name__}: {exc}") from None
        return _json({"rank": me, "epoch": status["epoch"], "draining": True, "reason": reason}, 202)

    def _begin_drain(self, reason: str) -> None:
        if self._drain is not None:
            self._drain(reason)
            return
        future = self.target.request_leave(reason)
        self._leave = future
        finish = getattr(self.target, "finish_leave", None)
        if finish is not None:
            threading.Thread(target=finish, args=(future,), daemon=True,
                             name=f"elasticep-operator-leave-{self.target.rank}").start()

    async def _forward(self, request: Any, rank: int, body: dict[str, Any]) -> Any:
        """Hand the drain of ``rank`` to that rank's own door and relay its answer."""
        import aiohttp

        from elasticep.agent.agent import connect_store

        key = door_key(self.target.cluster, rank)

        def lookup() -> str | None:
            store = (self._store if self._store is not None
                     else connect_store(self.target.store_address, timeout_s=_STORE_TIMEOUT_S))
            with self._lock:  # one client, several request threads
                if not store.check([key]):
                    return None
                return json.loads(store.get(key))["url"]

        url = await asyncio.get_running_loop().run_in_executor(None, lookup)
        if url is None:
            raise _Refused(404, "not_found", f"rank {rank} has no operator door (no {key} in the store)")
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S))
        headers = {"Authorization": request.headers["Authorization"], _FORWARDED: str(self.target.rank)}
        try:
            async with self._session.post(f"{url}/drain", json=body, headers=headers) as answer:
                text = await answer.text()
                code = answer.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise _Refused(502, "forward_failed", f"rank {rank}'s door at {url} did not answer: "
                                                  f"{type(exc).__name__}: {exc}") from None
        try:
            relayed = json.loads(text)
        except ValueError:
            relayed = {"error": text[:200]}
        if isinstance(relayed, dict):
            relayed["via"] = self.target.rank
        return _json(relayed, code)

    async def _admit_handler(self, request: Any) -> Any:
        body = await self._body(request, {"rank", "wait_s"})
        if "rank" not in body:
            raise _Refused(400, "bad_request", "admit needs {\"rank\": R}")
        rank = _rank(body["rank"])
        wait_s = body.get("wait_s", 0)
        if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 0 <= wait_s <= _MAX_WAIT_S:
            raise _Refused(400, "bad_request", f"wait_s must be a number of seconds in [0, {_MAX_WAIT_S:g}]")
        if self._admit is None:
            raise _Refused(501, "unavailable", "this door cannot start a rank: it was opened without an admit "
                                               "callable (start the joining rank's process yourself; the members "
                                               "admit it when it asks)")
        status = self._target_status()
        if status["state"] != "running":
            raise _Refused(503, "unavailable", f"rank {self.target.rank}'s agent is {status['state']}")
        if rank in status["members"]:
            raise _Refused(409, "conflict", f"rank {rank} is already a member of epoch {status['epoch']}")
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.run_in_executor(None, self._admit, rank), self.admit_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            return _json({"error": f"admit({rank}) did not return within {self.admit_timeout_s:g} s",
                          "reason": "admit_timeout"}, 504)
        except Exception as exc:
            return _json({"error": f"admit({rank}) failed: {type(exc).__name__}: {exc}", "reason": "admit_failed"},
                         500)
        if not wait_s:
            return _json({"rank": rank, "started": True, "epoch": status["epoch"]}, 202)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            now = self._target_status()
            if rank in now["members"]:
                return _json({"rank": rank, "admitted": True, "epoch": now["epoch"], "members": now["members"]})
            await asyncio.sleep(0.02)
        return _json({"error": f"rank {rank} was started but this rank serves no epoch with it after {wait_s:g} s",
                      "reason": "admit_timeout", "epoch": self._target_status()["epoch"]}, 504)


def _rank(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MAX_RANK:
        raise _Refused(400, "bad_request", f"rank must be an integer in [0, {_MAX_RANK}), not {value!r}")
    return value


def _json(body: Any, status: int = 200) -> Any:
    from aiohttp import web

    return web.json_response(body, status=status)


def start_operator(
    agent: OperatorTarget,
    config: Any = None,
    *,
    drain: Callable[[str], Any] | None = None,
    admit: Callable[[int], Any] | None = None,
) -> OperatorDoor:
    """Open ``agent``'s operator door as ``config`` (default ``agent.config``) says:
    ``operator_port``, ``operator_addr``, ``operator_token``. Returns the open door
    (:attr:`OperatorDoor.url`; :meth:`OperatorDoor.close` to shut it).

    Raises:
        InvalidArgument: ``config.operator_port`` is -1 (no door configured) or the token is too short.
    """
    config = config if config is not None else agent.config  # type: ignore[attr-defined]
    if config.operator_port < 0:
        raise InvalidArgument("no operator door configured: set Config(operator_port=..., operator_token=...)")
    return OperatorDoor(agent, config.operator_token, host=config.operator_addr, port=config.operator_port,
                        drain=drain, admit=admit).start()


# ---------------------------------------------------------------------- the client side


async def fetch_status(url: str, token: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """``GET url/status`` with ``token``; raises :class:`OperatorRefused` unless the door answers 200."""
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        async with session.get(url.rstrip("/") + "/status", headers={"Authorization": f"Bearer {token}"}) as r:
            text = await r.text()
            if r.status != 200:
                try:
                    body: Any = json.loads(text)
                except ValueError:
                    body = text[:200]
                raise OperatorRefused(url, r.status, body)
            return json.loads(text)


def format_status(status: dict[str, Any]) -> str:
    """A few readable lines of one rank's ``GET /status`` answer."""
    lines = [f"rank {status['rank']} ({status.get('state')}, incarnation {status.get('incarnation')}) "
             f"serves epoch {status['epoch']} with members {status['members']}"]
    view = status.get("view")
    if view is not None:
        lines.append(f"  newest view: epoch {view['epoch']} members {view['members']} leader {view['leader']}"
                     + (f" ({view['reason']})" if view.get("reason") else ""))
    lines.append(f"  membership: {status.get('membership')}")
    for s in status.get("suspicions") or []:
        lines.append(f"  suspect rank {s['rank']}: {s['evidence']}")
    for key in ("exhausted", "fenced"):
        if status.get(key):
            lines.append(f"  {key}: {status[key]}")
    last = status.get("last_reconfiguration")
    if last is not None:
        phases = " ".join(f"{k}={v:.1f}" if isinstance(v, (int, float)) else f"{k}={v}"
                          for k, v in (last.get("phases_ms") or {}).items())
        lines.append(f"  last reconfiguration: epoch {last['epoch']} {last['status']}"
                     + (f" [{phases}] ms" if phases else "") + (f" error: {last['error']}" if last.get("error") else ""))
    door = status.get("operator") or {}
    if door.get("draining"):
        lines.append(f"  draining: {door['draining']}")
    return "\n".join(lines)
