"""Hosts as Linux network namespaces: several "machines" on one, with faults at the network layer.

:class:`HostNet` creates ``n`` network namespaces (the hosts), each with one veth link to a
bridge in the caller's namespace, and a /24 of private addresses chosen free: host ``i`` is
``10.A.B.(i + 1)``, the bridge (the *gateway*, where a launcher, a router or a test process
listens) is ``10.A.B.254``. Each host has its own loopback, its own sockets and its own
nftables, so a process placed on a host reaches the others only over its link, and the faults
act where a real network would:

* :meth:`HostNet.link_down` / :meth:`HostNet.link_up`: the host's link (``ip link set ... down``):
  its packets vanish and connections go silent, as when a cable or a switch port dies;
* :meth:`HostNet.drop`: an nftables rule on the host's link, ``numgen random mod 10000 < P drop``, on what
  it receives (``direction="in"``), sends (``"out"``) or both, optionally only to or from one
  peer address: loss (``percent=5``) or an asymmetric partition (``percent=100``, one direction);
* :meth:`HostNet.rate_limit`: a token bucket on the host's link (``tc qdisc ... tbf``); a queue
  that fills adds delay;
* :meth:`HostNet.delay`: this kernel has no ``netem``, so a fixed added latency comes from a
  relay on the host that nftables ``redirect`` rules send its TCP connections through, holding
  each byte ``delay_ms`` each way (:mod:`elasticep.testing.delay`; new connections only);
* :meth:`HostNet.kill_host`: SIGKILL every process in the namespace at once (its ranks, its
  etcd member): a whole machine dying.

Processes are placed with :meth:`HostNet.popen` (``ip netns exec``), by passing
:attr:`Host.exec_prefix` to another launcher (:class:`~elasticep.testing.etcd.EtcdCluster`'s
``exec_prefix``), or by a forked child calling :func:`enter_netns` first (:class:`HostCluster`
does this for membership workers). Everything stays on addresses inside the namespaces and the
bridge; :meth:`HostNet.close` (or leaving ``with``) kills what runs in the namespaces and deletes
them, the bridge and the links, also when the test body raised, and at interpreter exit for a
``HostNet`` never closed. Namespaces left by a process that was SIGKILLed are removed by the
next ``HostNet``.

Needs root (``CAP_NET_ADMIN``), ``ip`` (iproute2) and ``nft`` (nftables);
:func:`netns_available` says why not where they are missing.

Example::

    with HostNet(3) as net:
        server = net.popen(net.hosts[1], ["python", "-m", "http.server", "--bind", net.hosts[1].addr, "8000"])
        net.link_down(net.hosts[1])          # host 1 is cut off
        net.drop(net.hosts[2], percent=5)    # 5 % loss both ways on host 2
        net.kill_host(net.hosts[1])          # everything on host 1 dies at once
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ControlPlane", "Host", "HostNet", "HostCluster", "NetnsError", "enter_netns", "host_launcher_class",
           "netns_available", "placement_profile", "run_rank_on_host"]

log = logging.getLogger(__name__)

_STATE_DIR = "/run/elasticep-hosts"
_DELAY_MARK = 0x2A  # firewall mark of the delaying relay's own connections
_CLONE_NEWNET = 0x40000000
_probe_result: list[str | None] = []
_probe_lock = threading.Lock()


class NetnsError(RuntimeError):
    """A namespace, link or nftables command failed; the message holds the command and its stderr."""


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise NetnsError(f"{' '.join(argv)!r} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


def netns_available() -> str | None:
    """None when network namespaces can be made here, else the reason (with the exact error).

    Tries once per process: root, ``ip`` and ``nft`` on the path, then adds and deletes a probe
    namespace with a veth pair and an nftables table in it.
    """
    with _probe_lock:
        if not _probe_result:
            _probe_result.append(_probe())
        return _probe_result[0]


def _probe() -> str | None:
    if os.geteuid() != 0:
        return f"network namespaces need root (CAP_NET_ADMIN); running as uid {os.geteuid()}"
    missing = [b for b in ("ip", "nft") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install iproute2 nftables)"
    name = f"epprobe{os.getpid() % 100000}"
    try:
        _run(["ip", "netns", "add", name])
        try:
            _run(["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b"])
            _run(["ip", "link", "set", f"{name}b", "netns", name])
            _run(["ip", "netns", "exec", name, "nft", "add", "table", "inet", "probe"])
        finally:
            _run(["ip", "link", "del", f"{name}a"], check=False)
            _run(["ip", "netns", "del", name], check=False)
    except (NetnsError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces do not work here: {exc}"
    return None


def enter_netns(path: str) -> None:
    """Move the calling thread (in a fresh, single-threaded child: the process) into the network
    namespace at ``path`` (``/run/netns/NAME``). Sockets made afterwards live on that host."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Host:
    """One namespace: ``name`` (``ip netns`` name), ``addr`` (its IPv4 address on the bridge),
    ``veth`` (the bridge-side end of its link, in the caller's namespace)."""

    index: int
    name: str
    addr: str
    veth: str

    @property
    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command on this host."""
        return ["ip", "netns", "exec", self.name]

    @property
    def netns_path(self) -> str:
        return f"/run/netns/{self.name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale() -> None:
    """Delete namespaces and bridges recorded by HostNets whose process is gone."""
    try:
        names = os.listdir(_STATE_DIR)
    except FileNotFoundError:
        return
    for fname in names:
        path = os.path.join(_STATE_DIR, fname)
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue
        if _pid_alive(int(state.get("pid", 0))):
            continue
        _teardown(state.get("netns", []), state.get("bridge"), state.get("veths", []))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _kill_netns_pids(name: str) -> list[int]:
    out = _run(["ip", "netns", "pids", name], check=False)
    pids = [int(p) for p in out.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def _teardown(netns: Sequence[str], bridge: str | None, veths: Sequence[str] = ()) -> None:
    for name in netns:
        _kill_netns_pids(name)
    # Deleting a namespace frees its links only when the kernel's cleanup runs, later: delete
    # the veth pairs now so that the names are free when this returns.
    for veth in veths:
        _run(["ip", "link", "del", veth], check=False)
    for name in netns:
        _run(["ip", "netns", "del", name], check=False)
    if bridge:
        _run(["ip", "link", "del", bridge], check=False)


def _used_subnets() -> set[tuple[int, int]]:
    out = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
    out += _run(["ip", "-4", "route", "show"], check=False).stdout
    used: set[tuple[int, int]] = set()
    for word in out.split():
        parts = word.split("/")[0].split(".")
        if len(parts) == 4 and parts[0] == "10" and all(p.isdigit() for p in parts):
            used.add((int(parts[1]), int(parts[2])))
    return used


class HostNet:
    """``n_hosts`` network namespaces on one bridge; see the module docstring.

    Args:
        n_hosts: hosts to create (1 to 250).
        tag: a short name for this set (interface names are ``ep{tag}...``, at most 15
            characters); default random.

    Attributes: :attr:`hosts` (:class:`Host` list), :attr:`gateway` (the bridge's address, in
    the caller's namespace), :attr:`bridge`.
    """

    def __init__(self, n_hosts: int = 3, *, tag: str | None = None) -> None:
        reason = netns_available()
        if reason is not None:
            raise NetnsError(reason)
        if not 1 <= n_hosts <= 250:
            raise ValueError(f"n_hosts must be 1..250, not {n_hosts}")
        _remove_stale()
        self.tag = tag or f"{random.randrange(16 ** 4):04x}"
        if len(f"ep{self.tag}br") > 15:
            raise ValueError(f"tag {self.tag!r} is too long for interface names")
        used = _used_subnets()
        free = [(a, b) for a in range(200, 250) for b in range(256) if (a, b) not in used]
        a, b = random.choice(free)
        self.subnet = f"10.{a}.{b}"
        self.gateway = f"{self.subnet}.254"
        self.bridge = f"ep{self.tag}br"
        self.hosts: list[Host] = []
        self._closed = False
        self._lock = threading.Lock()
        self._procs: list[subprocess.Popen] = []
        self._rate_limited: set[str] = set()
        self._delays: dict[str, subprocess.Popen] = {}
        self._state_path = os.path.join(_STATE_DIR, f"{self.tag}.json")
        names = self._names = [f"ep{self.tag}h{i}" for i in range(n_hosts)]
        self._record(names)
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"{self.gateway}/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for i, name in enumerate(names):
                host = Host(i, name, f"{self.subnet}.{i + 1}", f"ep{self.tag}v{i}")
                self._add_host(host)
                self.hosts.append(host)
        except BaseException:
            self.close()
            raise
        _open_nets.add(self)

    def _record(self, names: list[str]) -> None:
        os.makedirs(_STATE_DIR, exist_ok=True)
        with open(self._state_path, "w") as f:
            json.dump({"pid": os.getpid(), "netns": names, "bridge": self.bridge,
                       "veths": [f"ep{self.tag}v{i}" for i in range(len(names))]}, f)

    def _add_host(self, host: Host) -> None:
        inner = f"ep{self.tag}i{host.index}"
        _run(["ip", "netns", "add", host.name])
        _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", inner])
        _run(["ip", "link", "set", inner, "netns", host.name])
        _run(["ip", "link", "set", host.veth, "master", self.bridge])
        _run(["ip", "link", "set", host.veth, "up"])
        ns = host.exec_prefix
        _run(ns + ["ip", "link", "set", inner, "name", "eth0"])
        _run(ns + ["ip", "addr", "add", f"{host.addr}/24", "dev", "eth0"])
        _run(ns + ["ip", "link", "set", "eth0", "up"])
        _run(ns + ["ip", "link", "set", "lo", "up"])
        # One table per host for the injected faults, a chain on each direction of its link,
        # empty until drop() adds a rule. They hook the device (netdev ingress and egress), not
        # the IP stack's input and output: a packet dropped there is lost on the wire, and a
        # sender sees no error (an output-hook drop would fail its sendto with EPERM).
        script = (
            "table netdev elasticep {\n"
            '  chain faults_in { type filter hook ingress device "eth0" priority 0; policy accept; }\n'
            '  chain faults_out { type filter hook egress device "eth0" priority 0; policy accept; }\n'
            "}\n"
        )
        out = subprocess.run(ns + ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            raise NetnsError(f"nft table on {host.name} failed: {out.stderr.strip()}")

    # --- placing processes ------------------------------------------------------------------

    def host(self, index: int) -> Host:
        return self.hosts[index]

    def run(self, host: Host, argv: Sequence[str], *, check: bool = True,
            timeout: float = 10.0) -> subprocess.CompletedProcess:
        """Run ``argv`` on ``host`` to completion (text output captured)."""
        return _run(host.exec_prefix + list(argv), check=check, timeout=timeout)

    def popen(self, host: Host, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on ``host`` (``subprocess.Popen`` arguments pass through); killed by
        :meth:`kill_host` and :meth:`close`."""
        proc = subprocess.Popen(host.exec_prefix + list(argv), **kwargs)
        with self._lock:
            self._procs.append(proc)
        return proc

    def pids(self, host: Host) -> list[int]:
        """Every process whose network namespace is ``host``'s."""
        out = _run(["ip", "netns", "pids", host.name], check=False)
        return [int(p) for p in out.stdout.split() if p.isdigit()]

    # --- faults -----------------------------------------------------------------------------

    def kill_host(self, host: Host) -> int:
        """SIGKILL every process on ``host`` at once; returns the wall-clock ns just before."""
        t = time.time_ns()
        _kill_netns_pids(host.name)
        return t

    def link_down(self, host: Host) -> int:
        """Take ``host``'s link down (its bridge port): it can neither send nor receive.
        Returns the wall-clock ns just before."""
        t = time.time_ns()
        _run(["ip", "link", "set", host.veth, "down"])
        return t

    def link_up(self, host: Host) -> None:
        _run(["ip", "link", "set", host.veth, "up"])

    def drop(self, host: Host, *, percent: float = 100.0, direction: str = "both",
             peer: str | Host | None = None) -> None:
        """Drop ``percent`` % of the packets ``host`` receives (``"in"``), sends (``"out"``) or
        both, at random per packet (nftables ``numgen random``); only those from or to ``peer``
        (an address or a :class:`Host`) when given. Rules add up until :meth:`clear`."""
        if direction not in ("in", "out", "both"):
            raise ValueError(f"direction must be 'in', 'out' or 'both', not {direction!r}")
        if not 0 < percent <= 100:
            raise ValueError(f"percent must be in (0, 100], not {percent}")
        addr = peer.addr if isinstance(peer, Host) else peer
        # numgen draws from 0..9999, so fractions of a percent work too
        match = "" if percent >= 100 else f"numgen random mod 10000 < {int(round(percent * 100))} "
        for chain, field in (("faults_in", "saddr"), ("faults_out", "daddr")):
            if direction != "both" and not chain.endswith(direction):
                continue
            who = f"ip {field} {addr} " if addr else ""
            self.run(host, ["nft", "add", "rule", "netdev", "elasticep", chain, *f"{who}{match}counter drop".split()])

    def dropped(self, host: Host) -> int:
        """Packets the :meth:`drop` rules on ``host`` dropped since they were added."""
        total = 0
        for chain in ("faults_in", "faults_out"):
            words = self.run(host, ["nft", "list", "chain", "netdev", "elasticep", chain]).stdout.split()
            total += sum(int(words[i + 2]) for i, w in enumerate(words[:-2]) if w == "counter" and words[i + 1] == "packets")
        return total

    def rate_limit(self, host: Host, *, rate: str = "1mbit", burst: str = "32kbit", latency_ms: int = 400) -> None:
        """A token bucket on what ``host`` sends (``tc qdisc ... tbf``): traffic past ``rate``
        queues (up to ``latency_ms``) and then drops."""
        self.run(host, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", rate,
                        "burst", burst, "latency", f"{latency_ms}ms"])
        self._rate_limited.add(host.name)

    def delay(self, host: Host, delay_ms: float, *, port: int = 15001) -> None:
        """Hold every byte of ``host``'s TCP connections with its subnet ``delay_ms`` in each
        direction, by a relay on the host (:mod:`elasticep.testing.delay`) that nftables
        ``redirect`` rules send them through. Applies to connections opened after the call
        (established ones keep their path: start the processes after it). Traffic between
        processes on the same host is not delayed."""
        if not 0 < delay_ms <= 10_000:
            raise ValueError(f"delay_ms must be in (0, 10000], not {delay_ms}")
        if host.name in self._delays:
            raise ValueError(f"{host.name} is delayed already; clear() it first")
        import sys

        relay = self.popen(host, [sys.executable, "-m", "elasticep.testing.delay", "--port", str(port),
                                  "--delay-ms", str(delay_ms), "--mark", str(_DELAY_MARK)],
                           stdout=subprocess.PIPE, text=True)
        if relay.stdout.readline().strip() != "ready":
            relay.kill()
            raise NetnsError(f"the delaying relay on {host.name} did not start")
        self._delays[host.name] = relay
        script = (
            "table ip elasticep_delay {\n"
            "  chain out { type nat hook output priority -100; policy accept;\n"
            f"    meta mark {_DELAY_MARK} return\n"
            f"    ip daddr {self.subnet}.0/24 ip daddr != {host.addr} meta l4proto tcp redirect to :{port}\n"
            "  }\n"
            "  chain pre { type nat hook prerouting priority -100; policy accept;\n"
            f'    iifname "eth0" meta l4proto tcp tcp dport != {port} redirect to :{port}\n'
            "  }\n"
            "}\n"
        )
        out = subprocess.run(host.exec_prefix + ["nft", "-f", "-"], input=script, capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0:
            raise NetnsError(f"nft delay rules on {host.name} failed: {out.stderr.strip()}")

    def clear(self, host: Host) -> None:
        """Remove every drop rule, rate limit and delay on ``host`` and bring its link up."""
        for chain in ("faults_in", "faults_out"):
            self.run(host, ["nft", "flush", "chain", "netdev", "elasticep", chain])
        relay = self._delays.pop(host.name, None)
        if relay is not None:
            self.run(host, ["nft", "delete", "table", "ip", "elasticep_delay"], check=False)
            relay.kill()
            relay.wait(timeout=10)
            relay.stdout.close()
        if host.name in self._rate_limited:
            self.run(host, ["tc", "qdisc", "del", "dev", "eth0", "root"], check=False)
            self._rate_limited.discard(host.name)
        self.link_up(host)

    # --- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Kill every process on the hosts, delete the namespaces, links and bridge. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            procs, self._procs = self._procs, []
        _teardown(self._names, self.bridge, [f"ep{self.tag}v{i}" for i in range(len(self._names))])
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=5)  # reaped: no zombie, and poll() says it ended
                except subprocess.TimeoutExpired:
                    log.warning("process %d on a torn-down host did not end after SIGKILL", proc.pid)
        for relay in self._delays.values():
            if relay.stdout is not None:
                relay.stdout.close()
        self._delays.clear()
        try:
            os.unlink(self._state_path)
        except FileNotFoundError:
            pass
        _open_nets.discard(self)

    def __enter__(self) -> "HostNet":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_open_nets: "weakref.WeakSet[HostNet]" = weakref.WeakSet()


@atexit.register
def _close_open_nets() -> None:
    for net in list(_open_nets):
        try:
            net.close()
        except Exception:
            pass


def placement_profile(placement: Sequence[int], profile: str = "auto") -> str:
    """The :class:`~elasticep.config.Config` profile of ranks placed on hosts (``placement[rank]``
    the index of a rank's host): ``profile`` when it names one, and for ``"auto"`` the
    deployment's default, ``"cluster"`` when the ranks span more than one host, ``"local"`` when
    they share one (:meth:`~elasticep.config.Config.for_hosts` says why)."""
    from elasticep.config import resolve_profile

    return resolve_profile(profile, len(set(placement)))


def _host_child_main(netns_path: str, argv: list[str], env: dict[str, str], channel) -> None:
    """Entry of a membership worker placed on a host: join its namespace, then run as usual."""
    from elasticep.membership.local_cluster import _child_main

    enter_netns(netns_path)
    _child_main(argv, env, channel)


_cluster_class: list[type] = []


def __getattr__(name: str):
    # HostCluster is built on first use: its base (LocalCluster) pulls in pytest and torch, which
    # the demo's and the benchmarks' use of this module does not need.
    if name == "HostCluster":
        return _host_cluster_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _host_cluster_class() -> type:
    if not _cluster_class:
        from elasticep.membership.local_cluster import LocalCluster, RankProcess, _Child, _forkserver

        _cluster_class.append(_define_host_cluster(LocalCluster, RankProcess, _Child, _forkserver))
    return _cluster_class[0]


def _define_host_cluster(LocalCluster, RankProcess, _Child, _forkserver) -> type:  # noqa: N803
    class HostCluster(LocalCluster):
        """:class:`~elasticep.membership.local_cluster.LocalCluster` with each rank on a host of a
        :class:`HostNet`: the worker joins its host's namespace before it opens a socket, binds its
        bus there (``tcp://ADDR:*``) and reaches the launcher's ``TCPStore`` (bus rendezvous; views
        too unless ``config`` names etcd) at the bridge, :attr:`HostNet.gateway`.

        Args:
            net: the hosts.
            placement: ``placement[rank]`` is the index of the host rank ``rank`` runs on.
            config, report_exits, log_level: as for ``LocalCluster`` (``config`` overrides the
                profile's values).
            profile: the workers' :class:`~elasticep.config.Config` profile: ``"auto"`` (the
                default) is the deployment's, ``"cluster"`` when ``placement`` spans more than
                one host and ``"local"`` when every rank shares one (:func:`placement_profile`);
                ``"local"`` or ``"cluster"`` names it. The resolved name is :attr:`profile`.

        :meth:`kill_host` kills a host and everything on it (with the etcd member you placed there)
        and, as when a machine dies with its local launcher, nobody reports those exits: the
        survivors learn of them by silence alone.
        """

        def __init__(self, net: HostNet, placement: Sequence[int], *, config: dict[str, object] | None = None,
                     report_exits: bool = True, log_level: str = "WARNING", profile: str = "auto") -> None:
            if any(not 0 <= h < len(net.hosts) for h in placement):
                raise ValueError(f"placement {list(placement)} names a host outside 0..{len(net.hosts) - 1}")
            self.profile = placement_profile(placement, profile)
            self.net = net
            self.placement = list(placement)
            self._silent: set[int] = set()
            super().__init__(len(self.placement), config=config, report_exits=report_exits, log_level=log_level)

        def host_of(self, rank: int) -> Host:
            return self.net.hosts[self.placement[rank]]

        def ranks_on(self, host: Host) -> list[int]:
            return [r for r, h in enumerate(self.placement) if h == host.index]

        def spawn(self, rank: int, *, join: bool = False):
            self._silent.discard(rank)
            return super().spawn(rank, join=join)

        def _argv(self, rank: int) -> list[str]:
            host = self.host_of(rank)
            return ["--rank", str(rank), "--world", str(self.world), "--store", f"{self.net.gateway}:{self.port}",
                    "--bind", f"tcp://{host.addr}:*", "--incarnation", str(time.time_ns()),
                    "--log-level", self.log_level, "--profile", self.profile]

        def _process(self, rank: int, argv: list[str], env: dict[str, str], sock: socket.socket):
            host = self.host_of(rank)
            return _forkserver().Process(target=_host_child_main, args=(host.netns_path, argv, env, sock),
                                         name=f"elasticep-rank{rank}-h{host.index}")

        def send(self, rank: int, line: str) -> None:
            if line.startswith("exit "):
                dead = int(line.split()[1])
                if dead in self._silent:
                    return
            super().send(rank, line)

        def kill_host(self, host: Host) -> int:
            """SIGKILL everything on ``host``; its ranks' exits are not reported. Returns wall-clock ns."""
            self._silent.update(self.ranks_on(host))
            return self.net.kill_host(host)

    HostCluster.__module__ = __name__
    HostCluster.__qualname__ = "HostCluster"
    return HostCluster

# --- the reference engine on hosts ---------------------------------------------------------------


def run_rank_on_host(netns_path: str, store_host: str, store_port: int, cluster: str, rank: int,
                     incarnation: int) -> int:
    """Zygote entry of a reference-engine rank placed on a host: join the host's namespace
    (before any socket exists), then run :func:`elasticep.engine.rank.run_rank`."""
    enter_netns(netns_path)
    # gloo picks its interface from the machine's hostname, whose address is not on this host
    os.environ["GLOO_SOCKET_IFNAME"] = "eth0"
    from elasticep.engine.rank import run_rank

    return run_rank(store_host, store_port, cluster, rank, incarnation)


_launcher_class: list[type] = []


def host_launcher_class() -> type:
    """:class:`HostLauncher` (built on first use: the engine's imports are not cheap)."""
    if _launcher_class:
        return _launcher_class[0]
    from elasticep.engine.launcher import Launcher, _Proc

    class HostLauncher(Launcher):
        """A :class:`~elasticep.engine.launcher.Launcher` whose ranks run on the hosts of a
        :class:`HostNet`: rank ``r`` on host ``placement[r]`` (default ``r % len(hosts)``), a
        restarted rank on the same host. The launcher itself (its ``TCPStore``, router and
        exit-report socket) listens at the bridge, :attr:`HostNet.gateway`. Each rank's spec
        names the address it should bind its bus and weight-transfer engine to
        (``extra["bus_endpoint"]``, ``extra["host_addr"]``). Only the zygote start method.
        ``rank_profile`` defaults to ``"auto"``: the cluster profile when the ranks' hosts are
        more than one (:func:`placement_profile`)."""

        def __init__(self, net: HostNet, model_path, num_ranks: int, *, placement_hosts: Sequence[int] | None = None,
                      rank_extra=None, **kwargs) -> None:
            self.net = net
            self.rank_hosts = list(placement_hosts) if placement_hosts is not None else [
                r % len(net.hosts) for r in range(kwargs.get("max_ranks") or 2 * num_ranks)]
            kwargs["rank_profile"] = placement_profile(self.rank_hosts, kwargs.get("rank_profile", "auto"))
            user_extra = rank_extra

            def extra(rank: int, inc: int) -> dict[str, str]:
                out = dict(user_extra(rank, inc)) if user_extra is not None else {}
                addr = self.host_of(rank).addr
                out.update(bus_endpoint=f"tcp://{addr}:*", host_addr=addr)
                return out

            kwargs.setdefault("host", net.gateway)
            super().__init__(model_path, num_ranks, rank_extra=extra, **kwargs)

        def host_of(self, rank: int) -> Host:
            return self.net.hosts[self.rank_hosts[rank % len(self.rank_hosts)]]

        def ranks_on(self, host: Host) -> list[int]:
            return [r for r in self.alive_ranks() if self.host_of(r) is host]

        def kill_host(self, host: Host) -> int:
            """SIGKILL everything on ``host`` (its ranks, and an etcd member placed there)."""
            return self.net.kill_host(host)

        def _start_process(self, rank: int, inc: int) -> _Proc:
            if self.start_method != "zygote":
                raise ValueError("HostLauncher starts ranks from the zygote only")
            host, port = self.store_address
            zygote = self._zygote()
            pid = zygote.fork("elasticep.testing.hosts:run_rank_on_host",
                              [self.host_of(rank).netns_path, host, port, self.cluster, rank, inc])
            proc = _Proc(pid, "zygote")
            with self._lock:
                self._by_pid[pid] = proc
            code = zygote.exit_code(pid)
            if code is not None:
                proc.exited(code)
            return proc

    HostLauncher.__module__ = __name__
    HostLauncher.__qualname__ = "HostLauncher"
    _launcher_class.append(HostLauncher)
    return HostLauncher


class ControlPlane:
    """Where a reference-engine cluster keeps its views and runs its ranks, for the demo and
    benchmarks: ``store`` is ``"tcpstore"`` (the launcher's, the default) or ``"etcd"`` (a
    3-member :class:`~elasticep.testing.etcd.EtcdCluster`); ``hosts`` > 0 puts the ranks on that
    many network-namespace hosts (:class:`HostNet`) and each etcd member on a host of its own.

    :meth:`launcher` builds the launcher (with ``rank_config`` naming the store);
    :meth:`committed_head` reads the newest epoch committed in etcd, to check that the views
    really went there; :meth:`close` stops etcd and removes the hosts.
    """

    def __init__(self, *, store: str = "tcpstore", hosts: int = 0) -> None:
        if store not in ("tcpstore", "etcd"):
            raise ValueError(f"store must be 'tcpstore' or 'etcd', not {store!r}")
        if hosts and store == "etcd" and hosts < 3:
            raise ValueError(f"etcd on {hosts} hosts: one member per host needs 3 or more hosts")
        self.store = store
        self.net: HostNet | None = None
        self.etcd = None
        try:
            if hosts:
                self.net = HostNet(hosts)
            if store == "etcd":
                from elasticep.testing.etcd import EtcdCluster

                if self.net is not None:
                    on = self.net.hosts[:3]
                    self.etcd = EtcdCluster(3, hosts=[h.addr for h in on], exec_prefix=[h.exec_prefix for h in on])
                else:
                    self.etcd = EtcdCluster(3)
                self.etcd.wait_healthy(30)
        except BaseException:
            self.close()
            raise

    @property
    def rank_config(self) -> dict[str, object]:
        """:class:`~elasticep.config.Config` overrides that point the ranks at this store."""
        if self.etcd is None:
            return {}
        return {"view_store": "etcd", "etcd_endpoints": self.etcd.endpoints_csv()}

    def launcher(self, model_path, num_ranks: int, **kwargs):
        """A :class:`~elasticep.engine.launcher.Launcher` (a :class:`HostLauncher` on hosts),
        not started; ``rank_config`` is merged under the caller's."""
        kwargs["rank_config"] = {**self.rank_config, **(kwargs.get("rank_config") or {})}
        if self.net is None:
            from elasticep.engine.launcher import Launcher

            return Launcher(model_path, num_ranks, **kwargs)
        return host_launcher_class()(self.net, model_path, num_ranks, **kwargs)

    def committed_head(self, cluster: str) -> int:
        """The newest epoch committed in etcd under launch ``cluster``'s prefix (0: none)."""
        if self.etcd is None:
            raise ValueError("no etcd in this control plane")
        from elasticep.membership.etcd_store import EtcdViewStore

        async def head() -> int:
            store = EtcdViewStore(self.etcd.endpoints, timeout_s=5.0, prefix=f"elasticep/{cluster}")
            try:
                return await store.head()
            finally:
                await store.close()

        import asyncio

        return asyncio.run(head())

    def close(self) -> None:
        if self.etcd is not None:
            self.etcd.close()
        if self.net is not None:
            self.net.close()

    def __enter__(self) -> "ControlPlane":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
