"""``EtcdCluster``: start and stop a real etcd cluster (the ``etcd`` binary) for tests and benchmarks.

Each member runs as its own process with its own data directory (on ``/dev/shm`` where there is
one, so that fsync costs nothing on a test machine), its own client and peer ports, and tuned
raft timing (``heartbeat_ms``, ``election_ms``) so that a dead leader is replaced in about
``election_ms`` rather than etcd's default second. Members listen on loopback by default, on
ports chosen free; to place each member on its own "host" of the network-namespace harness
(:class:`elasticep.testing.hosts.HostNet`), pass ``hosts=[h.addr ...]`` and
``exec_prefix=[h.exec_prefix ...]``.

Example::

    with EtcdCluster(3) as etcd:
        etcd.wait_healthy(10)
        leader = etcd.leader()          # index of the member that leads now
        etcd.kill(leader)               # SIGKILL; a new leader follows within ~election_ms
        store = EtcdViewStore(etcd.endpoints)

Needs the ``etcd`` and ``etcdctl`` binaries (Debian: ``apt-get install etcd-server etcd-client``;
``scripts/setup.sh`` installs them). :func:`etcd_available` says whether they are there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Sequence

__all__ = ["EtcdCluster", "EtcdMember", "etcd_available"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def etcd_available() -> str | None:
    """None when ``etcd`` and ``etcdctl`` are installed, else a sentence saying what is missing."""
    missing = [b for b in ("etcd", "etcdctl") if shutil.which(b) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (apt-get install etcd-server etcd-client, "
                "or run scripts/setup.sh as root)")
    return None


class EtcdMember:
    """One member: its name, addresses, process and data directory."""

    def __init__(self, index: int, host: str, client_port: int, peer_port: int, data_dir: str,
                 exec_prefix: Sequence[str]) -> None:
        self.index = index
        self.name = f"m{index}"
        self.host = host
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.exec_prefix = list(exec_prefix)
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(os.path.dirname(data_dir), f"{self.name}.log")

    @property
    def endpoint(self) -> str:
        """``HOST:PORT`` of the client URL (what :class:`~elasticep.membership.EtcdViewStore` takes)."""
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class EtcdCluster:
    """``size`` etcd members started at construction; :meth:`close` (or ``with``) stops them all.

    Args:
        size: members (3 tolerates one failure, 5 two).
        hosts: one address per member to listen on (default: ``127.0.0.1`` for all).
        exec_prefix: per member, an argv prefix the etcd command is run under (the namespace
            harness passes ``["ip", "netns", "exec", NAME]``); default none.
        heartbeat_ms: raft heartbeat interval, ms (etcd's default is 100).
        election_ms: raft election timeout, ms (etcd's default is 1000): a dead leader is
            replaced after about this long.
        base_dir: where data directories and logs go (default: a fresh directory under
            ``/dev/shm`` or the temp directory, removed by :meth:`close`).
    """

    def __init__(
        self,
        size: int = 3,
        *,
        hosts: Sequence[str] | None = None,
        exec_prefix: Sequence[Sequence[str]] | None = None,
        heartbeat_ms: int = 50,
        election_ms: int = 500,
        base_dir: str | None = None,
    ) -> None:
        reason = etcd_available()
        if reason is not None:
            raise RuntimeError(reason)
        if size < 1:
            raise ValueError("an etcd cluster needs at least one member")
        hosts = list(hosts) if hosts is not None else ["127.0.0.1"] * size
        prefixes = [list(p) for p in exec_prefix] if exec_prefix is not None else [[] for _ in range(size)]
        if len(hosts) != size or len(prefixes) != size:
            raise ValueError("hosts and exec_prefix need one entry per member")
        self.heartbeat_ms, self.election_ms = heartbeat_ms, election_ms
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._own_dir = base_dir is None
        self.base_dir = base_dir or tempfile.mkdtemp(prefix="elasticep-etcd-", dir=shm)
        self.token = f"elasticep-{os.getpid()}-{time.time_ns()}"
        used: set[int] = set()

        def port() -> int:
            while True:
                p = free_port()
                if p not in used:
                    used.add(p)
                    return p

        self.members = [
            EtcdMember(i, hosts[i], port(), port(), os.path.join(self.base_dir, f"m{i}.etcd"), prefixes[i])
            for i in range(size)
        ]
        self._closed = False
        try:
            for m in self.members:
                self.start(m.index)
        except BaseException:
            self.close()
            raise

    # --- addresses --------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """Every member's ``HOST:PORT`` client endpoint, in member order."""
        return [m.endpoint for m in self.members]

    def endpoints_csv(self) -> str:
        """The endpoints as ``Config.etcd_endpoints`` takes them (comma-separated)."""
        return ",".join(self.endpoints)

    # --- processes --------------------------------------------------------------------------

    def _command(self, m: EtcdMember) -> list[str]:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        client_url = f"http://{m.endpoint}"
        return m.exec_prefix + [
            "etcd", "--name", m.name, "--data-dir", m.data_dir,
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
            "--heartbeat-interval", str(self.heartbeat_ms), "--election-timeout", str(self.election_ms),
            "--pre-vote=true", "--snapshot-count", "10000",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]

    def start(self, index: int) -> None:
        """Start member ``index`` (again, after :meth:`kill`: it rejoins with its data directory)."""
        m = self.members[index]
        if m.alive:
            return
        os.makedirs(os.path.dirname(m.data_dir), exist_ok=True)
        log = open(m.log_path, "ab")
        try:
            m.process = subprocess.Popen(self._command(m), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()

    def kill(self, index: int) -> int:
        """SIGKILL member ``index``; returns the wall-clock ns just before the signal."""
        m = self.members[index]
        t = time.time_ns()
        if m.process is not None and m.process.poll() is None:
            m.process.send_signal(signal.SIGKILL)
            m.process.wait(timeout=10)
        return t

    def stop(self, index: int) -> None:
        """SIGSTOP member ``index`` (a hung member: its sockets stay open, it answers nothing)."""
        m = self.members[index]
        if m.alive:
            m.process.send_signal(signal.SIGSTOP)

    def cont(self, index: int) -> None:
        m = self.members[index]
        if m.alive:
            m.process.send_signal(signal.SIGCONT)

    # --- cluster state ----------------------------------------------------------------------

    def _etcdctl(self, args: list[str], endpoints: list[str], timeout: float) -> subprocess.CompletedProcess:
        env = dict(os.environ, ETCDCTL_API="3")
        return subprocess.run(
            ["etcdctl", "--endpoints", ",".join(endpoints), "--command-timeout", f"{max(timeout, 0.2):.1f}s",
             "--dial-timeout", "1s", *args],
            env=env, capture_output=True, text=True, timeout=timeout + 3,
        )

    def status(self, timeout: float = 2.0) -> dict[int, dict]:
        """``etcdctl endpoint status`` of each live member: ``{index: {"member_id", "leader", "raft_term"}}``."""
        live = [m for m in self.members if m.alive]
        if not live:
            return {}
        out = self._etcdctl(["endpoint", "status", "-w", "json"], [m.endpoint for m in live], timeout)
        by_endpoint = {m.endpoint: m.index for m in live}
        result: dict[int, dict] = {}
        try:
            rows = json.loads(out.stdout or "[]")
        except json.JSONDecodeError:
            return {}
        for row in rows:
            endpoint = row.get("Endpoint", "").removeprefix("http://")
            st = row.get("Status", {})
            if endpoint in by_endpoint:
                result[by_endpoint[endpoint]] = {
                    "member_id": st.get("header", {}).get("member_id"),
                    "leader": st.get("leader"),
                    "raft_term": st.get("header", {}).get("raft_term"),
                }
        return result

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the member that leads now, once the live members agree on one."""
        deadline = time.monotonic() + timeout
        last: dict[int, dict] = {}
        while time.monotonic() < deadline:
            last = self.status(timeout=1.0)
            leaders = {s["leader"] for s in last.values()}
            if len(leaders) == 1 and 0 not in leaders and None not in leaders:
                (leader_id,) = leaders
                for index, s in last.items():
                    if s["member_id"] == leader_id:
                        return index
            time.sleep(0.05)
        raise TimeoutError(f"no agreed etcd leader within {timeout:g} s; status: {last}")

    def wait_healthy(self, timeout: float = 20.0) -> None:
        """Wait until every live member answers and they agree on a leader."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(timeout=1.0)
            live = [m.index for m in self.members if m.alive]
            if set(st) == set(live) and live:
                try:
                    self.leader(timeout=max(0.1, deadline - time.monotonic()))
                    return
                except TimeoutError:
                    pass
            dead = [m for m in self.members if m.process is not None and m.process.poll() is not None
                    and not self._closed and m.process.returncode not in (-signal.SIGKILL,)]
            if dead:
                raise RuntimeError(f"etcd member {dead[0].name} exited: {self.log_tail(dead[0].index)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"etcd cluster not healthy within {timeout:g} s; status {st}; "
                                   f"logs: {[self.log_tail(m.index) for m in self.members]}")
            time.sleep(0.1)

    def log_tail(self, index: int, lines: int = 5) -> str:
        try:
            with open(self.members[index].log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """SIGKILL every member and remove the data directories. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for m in self.members:
            if m.process is not None and m.process.poll() is None:
                try:
                    os.killpg(m.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    m.process.kill()
                m.process.wait(timeout=10)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> "EtcdCluster":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; tests use ``with`` or the fixture
        try:
            if not self._closed:
                self.close()
        except Exception:
            pass
