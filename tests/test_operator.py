"""The operator's door over real parts: agents on a real TCPStore and CURVE bus, the door's
aiohttp server on a real socket, a real aiohttp client; drain and admit change real views."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from datetime import timedelta

import aiohttp
import pytest
import torch

from elasticep import metrics
from elasticep.agent import Agent, EngineHooks
from elasticep.agent.operator import OperatorDoor, door_key, start_operator
from elasticep.bus import ClusterKeys
from elasticep.config import Config
from elasticep.eplb import initial

pytestmark = [pytest.mark.timeout(120)]

TOKEN = secrets.token_urlsafe(24)


class ToyHooks(EngineHooks):
    def __init__(self, ranks: int) -> None:
        self._placement = initial(torch.ones(2, 6), num_ranks=ranks, slots_per_rank=4)
        self.commits: list[tuple[int, tuple[int, ...]]] = []

    def placement(self):
        return self._placement

    def commit(self, change) -> None:
        self._placement = change.placement
        self.commits.append((change.epoch, tuple(change.view.members)))


class Cluster:
    """``n`` agents on one TCPStore, each with its operator door; engine loops on threads."""

    def __init__(self, n: int, admit=None) -> None:
        from torch.distributed import TCPStore

        self.server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
        self.store = f"127.0.0.1:{self.server.port}"
        self.keys = ClusterKeys.generate(8)
        self.name = uuid.uuid4().hex[:8]
        # store_timeout_s 10 s as in Config.cluster(): on a shared 2-core machine a joiner's store
        # operations took past the local profile's 2 s and it fenced itself (not the door's doing)
        self.config = Config.local(operator_port=0, operator_token=TOKEN, store_timeout_s=10.0)
        self._admit = admit
        self.hooks = [ToyHooks(n) for _ in range(n)]
        self.agents = [self.agent(r, self.hooks[r], members=range(n)) for r in range(n)]
        self.doors: list[OperatorDoor] = []
        self._serving = threading.Event()
        self._loops: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        starts = [threading.Thread(target=a.start, kwargs={"timeout": 60}) for a in self.agents]
        for t in starts:
            t.start()
        for t in starts:
            t.join(90)
        assert all(a.state == "running" for a in self.agents)
        # Config.operator_port opens each agent's door in start()
        self.doors = [a.operator for a in self.agents]
        assert all(isinstance(d, OperatorDoor) for d in self.doors)

    def agent(self, rank: int, hooks: EngineHooks, members=None, incarnation: int = 0) -> Agent:
        return Agent(rank, hooks, store=self.store, cluster=self.name, members=members, keys=self.keys,
                     config=self.config, incarnation=incarnation, admit=self._admit)

    def serve(self, agents) -> None:
        """Each agent's engine loop: boundary() until :meth:`close` (or the agent is out)."""
        self._serving.set()

        def loop(a: Agent) -> None:
            while self._serving.is_set():
                try:
                    a.boundary()
                except BaseException as exc:  # a drained rank leaves the views: its loop ends
                    self.errors.append(exc)
                    return
                time.sleep(0.005)

        for a in agents:
            t = threading.Thread(target=loop, args=(a,), daemon=True)
            t.start()
            self._loops.append(t)

    def close(self) -> None:
        self._serving.clear()
        for t in self._loops:
            t.join(10)
        for d in self.doors:
            d.close()
        for a in self.agents:
            a.stop()


def _wait(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


async def _call(method: str, url: str, *, token: str | None = TOKEN, body=None, data=None):
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, headers=headers, json=body, data=data) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else None), dict(r.headers)


def call(*args, **kw):
    return asyncio.run(_call(*args, **kw))


def refused(reason: str) -> float:
    return metrics.sample("elasticep_operator_refused_total", {"reason": reason})


@pytest.fixture(scope="module")
def three():
    cluster = Cluster(3)
    yield cluster
    cluster.close()


def test_status_reports_view_members_and_door(three) -> None:
    url = three.doors[1].url
    before = metrics.sample("elasticep_operator_requests_total", {"endpoint": "status", "code": "200"})
    code, body, _ = call("GET", f"{url}/status")
    assert code == 200
    assert body["rank"] == 1 and body["state"] == "running" and body["epoch"] == 1
    assert body["members"] == [0, 1, 2] and body["view"]["members"] == [0, 1, 2]
    assert body["suspicions"] == [] and body["incarnation"] == 0
    assert body["operator"] == {"url": url, "draining": None, "admit": False}
    assert metrics.sample("elasticep_operator_requests_total", {"endpoint": "status", "code": "200"}) == before + 1
    # every door recorded where it listens, for forwarding
    record = json.loads(three.agents[0].store.get(door_key(three.name, 2)))
    assert record["url"] == three.doors[2].url


@pytest.mark.parametrize(
    "token, reason",
    [(None, "no_token"), ("", "no_token"), ("not-the-token-but-long-enough", "bad_token"), (TOKEN[:-1], "bad_token")],
)
def test_a_request_without_the_token_is_refused_and_counted(three, token, reason) -> None:
    before = refused(reason)
    for method, path in (("GET", "/status"), ("POST", "/drain"), ("POST", "/admit"), ("GET", "/nowhere")):
        code, body, headers = call(method, three.doors[0].url + path, token=token)
        assert code == 401 and body["reason"] == reason, (method, path, body)
        assert headers["WWW-Authenticate"].startswith("Bearer")
    assert refused(reason) == before + 4
    assert three.doors[0].draining is None  # nothing was done


def test_basic_auth_is_not_a_bearer_token(three) -> None:
    import base64

    async def go():
        basic = "Basic " + base64.b64encode(f"op:{TOKEN}".encode()).decode()
        async with aiohttp.ClientSession() as s:
            async with s.get(three.doors[0].url + "/status", headers={"Authorization": basic}) as r:
                return r.status, await r.json()

    before = refused("no_token")
    assert asyncio.run(go()) == (401, {"error": "missing bearer token (Authorization: Bearer TOKEN)",
                                       "reason": "no_token"})
    assert refused("no_token") == before + 1


@pytest.mark.parametrize(
    "path, data, code, reason, says",
    [
        ("/drain", b"{not json", 400, "bad_request", "not JSON"),
        ("/drain", b"[2]", 400, "bad_request", "JSON object"),
        ("/drain", b'{"rank": "2"}', 400, "bad_request", "rank must be an integer"),
        ("/drain", b'{"rank": true}', 400, "bad_request", "rank must be an integer"),
        ("/drain", b'{"rank": -1}', 400, "bad_request", "rank must be an integer"),
        ("/drain", b'{"rank": 1, "force": 1}', 400, "bad_request", "unknown fields ['force']"),
        ("/drain", b'{"reason": 7}', 400, "bad_request", "reason must be a string"),
        ("/drain", b'{"rank": 7}', 404, "not_found", "rank 7 is not a member of epoch 1"),
        ("/admit", b"{}", 400, "bad_request", "admit needs"),
        ("/admit", b'{"rank": 5, "wait_s": -1}', 400, "bad_request", "wait_s"),
        ("/admit", b'{"rank": 5}', 501, "unavailable", "without an admit callable"),
        ("/drain", b"x" * 70_000, 413, "too_large", "over 65536 bytes"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason_and_counted(three, path, data, code, reason, says) -> None:
    before = refused(reason)
    got, body, _ = call("POST", three.doors[0].url + path, data=data)
    assert got == code and body["reason"] == reason and says in body["error"], body
    assert refused(reason) == before + 1
    assert three.doors[0].draining is None
    assert three.agents[0].status()["members"] == [0, 1, 2]


def test_unknown_paths_and_methods_are_refused(three) -> None:
    before = refused("not_found")
    assert call("GET", three.doors[0].url + "/nowhere")[0] == 404
    assert call("GET", three.doors[0].url + "/drain")[0] == 405
    assert refused("not_found") == before + 2


def test_monitor_prints_a_ranks_status_from_its_door(three, capsys, monkeypatch) -> None:
    from elasticep.cli import main

    assert main(["monitor", "--operator", three.doors[2].url, f"--token={TOKEN}"]) == 0
    out = capsys.readouterr().out
    assert "rank 2 (running, incarnation 0) serves epoch 1 with members [0, 1, 2]" in out
    assert "membership: member" in out
    monkeypatch.setenv("ELASTICEP_OPERATOR_TOKEN", TOKEN)
    assert main(["monitor", "--operator", three.doors[2].url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["members"] == [0, 1, 2]
    monkeypatch.setenv("ELASTICEP_OPERATOR_TOKEN", "wrong-token-of-some-length")
    assert main(["monitor", "--operator", three.doors[2].url]) == 1
    assert "401" in capsys.readouterr().err


def test_a_door_on_every_address_advertises_the_host_name(three) -> None:
    import socket

    with OperatorDoor(three.agents[0], TOKEN, host="0.0.0.0", register=False) as door:
        assert door.url.startswith(f"http://{socket.getfqdn()}:")
        code, body, _ = call("GET", f"http://127.0.0.1:{door.url.rsplit(':', 1)[1]}/status")
        assert code == 200 and body["rank"] == 0
    assert door.url is None
    # the rank's registered door is still the one the cluster opened
    assert json.loads(three.agents[1].store.get(door_key(three.name, 0)))["url"] == three.doors[0].url


def test_the_door_needs_a_port_and_a_long_token() -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Config.local(operator_port=0, operator_token="short")
    with pytest.raises(ValueError, match="operator_port"):
        Config.local(operator_port=70000, operator_token=TOKEN)
    assert TOKEN not in repr(Config.local(operator_port=0, operator_token=TOKEN))

    class Target:
        rank, cluster, store_address = 0, "x", "127.0.0.1:1"
        config = Config.local()

    with pytest.raises(ValueError, match="no operator door configured"):
        start_operator(Target())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 16"):
        OperatorDoor(Target(), "short")  # type: ignore[arg-type]


def test_drain_through_another_ranks_door_leaves_gracefully() -> None:
    cluster = Cluster(3)
    try:
        cluster.serve(cluster.agents)
        code, body, _ = call("POST", cluster.doors[0].url + "/drain", body={"rank": 2, "reason": "maintenance"})
        assert code == 202, body
        assert body == {"rank": 2, "epoch": 1, "draining": True, "reason": "maintenance", "via": 0}
        # the epoch moves at the commit; the reconfiguration's record lands after its resume phase
        assert _wait(lambda: all(a.epoch >= 2 and a.history for a in cluster.agents[:2]))
        for a in cluster.agents[:2]:
            status = a.status()
            assert status["members"] == [0, 1] and status["last_reconfiguration"]["status"] == "committed"
            assert "leave" in status["view"]["reason"]
        assert [c for c in cluster.hooks[0].commits] == [(2, (0, 1))]
        # rank 2's own door says it drained; a second drain is refused
        code, body, _ = call("GET", cluster.doors[2].url + "/status")
        assert body["operator"]["draining"]["reason"] == "maintenance"
        assert _wait(lambda: cluster.doors[2].status()["operator"]["draining"]["done"])
        before = refused("not_found")
        code, body, _ = call("POST", cluster.doors[0].url + "/drain", body={"rank": 2})
        assert (code, body["reason"]) == (404, "not_found") and "not a member of epoch 2" in body["error"]
        assert refused("not_found") == before + 1
        code, body, _ = call("POST", cluster.doors[2].url + "/drain")
        assert code in (409, 503) and body["reason"] in ("conflict", "unavailable"), body
    finally:
        cluster.close()


def test_a_drain_to_a_rank_whose_door_is_gone_is_refused() -> None:
    cluster = Cluster(3)
    try:
        cluster.doors[1].close()
        before = refused("not_found")
        code, body, _ = call("POST", cluster.doors[0].url + "/drain", body={"rank": 1})
        assert (code, body["reason"]) == (404, "not_found") and "has no operator door" in body["error"]
        assert refused("not_found") == before + 1
        # a record left behind by a door that died without closing: the forward fails, counted
        cluster.agents[0].store.set(door_key(cluster.name, 1), json.dumps({"url": "http://127.0.0.1:9"}))
        before = refused("forward_failed")
        code, body, _ = call("POST", cluster.doors[0].url + "/drain", body={"rank": 1})
        assert (code, body["reason"]) == (502, "forward_failed"), body
        assert refused("forward_failed") == before + 1
        # a stale record that points at another rank's door: that door refuses, never loops
        cluster.agents[0].store.set(door_key(cluster.name, 1), json.dumps({"url": cluster.doors[2].url}))
        before = refused("conflict")
        code, body, _ = call("POST", cluster.doors[0].url + "/drain", body={"rank": 1})
        assert (code, body["reason"], body["via"]) == (409, "conflict", 0) and "stale door record" in body["error"]
        assert refused("conflict") == before + 1
        assert cluster.doors[2].draining is None
        assert all(a.status()["members"] == [0, 1, 2] for a in cluster.agents)
    finally:
        cluster.close()


def test_admit_starts_a_joining_rank_and_answers_once_it_serves() -> None:
    joiners: list[Agent] = []
    join_errors: list[BaseException] = []
    started: list[threading.Thread] = []
    holder: dict[str, Cluster] = {}

    def admit(rank: int) -> None:
        if rank == 9:
            raise OSError("no capacity")
        cluster = holder["cluster"]
        hooks = ToyHooks(3)
        joiner = cluster.agent(rank, hooks, members=None, incarnation=1)
        joiners.append(joiner)

        def start() -> None:
            try:
                joiner.start(timeout=60)
            except BaseException as exc:  # reported by the assertions below
                join_errors.append(exc)

        t = threading.Thread(target=start, daemon=True)
        t.start()
        started.append(t)

    holder["cluster"] = cluster = Cluster(3, admit=admit)
    try:
        cluster.serve(cluster.agents)
        code, body, _ = call("POST", cluster.doors[1].url + "/admit", body={"rank": 3, "wait_s": 60})
        assert code == 200, (body, join_errors)
        assert body == {"rank": 3, "admitted": True, "epoch": 2, "members": [0, 1, 2, 3]}
        for t in started:
            t.join(30)
        assert not join_errors
        assert joiners[0].state == "running" and joiners[0].epoch == 2
        assert joiners[0].hooks.placement().num_ranks == 4
        assert _wait(lambda: all(a.epoch == 2 for a in cluster.agents))
        before = refused("conflict")
        code, body, _ = call("POST", cluster.doors[0].url + "/admit", body={"rank": 3})
        assert (code, body["reason"]) == (409, "conflict") and "already a member" in body["error"]
        assert refused("conflict") == before + 1
        code, body, _ = call("POST", cluster.doors[0].url + "/admit", body={"rank": 9})
        assert (code, body["reason"]) == (500, "admit_failed") and "no capacity" in body["error"]
        assert metrics.sample("elasticep_operator_requests_total", {"endpoint": "admit", "code": "500"}) >= 1
    finally:
        cluster.close()
        for j in joiners:
            j.stop()
