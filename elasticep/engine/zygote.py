"""A warm parent that forks rank processes in milliseconds.

Importing torch and transformers' DeepSeek-V3 code costs several seconds of CPU per fresh
interpreter; on a 2-core host, starting 8 ranks that way takes most of a minute, and a
restarted rank would rejoin seconds late. The zygote pays the import once: it is a process
(started by :class:`Zygote`) that imports :mod:`elasticep.engine._preload` and then
forks one child per request. Each child runs :func:`elasticep.engine.rank.run_rank` and is a real,
separate process (its own pid, killable and stoppable on its own).

Unlike ``multiprocessing``'s forkserver, nothing of the caller's ``__main__`` is re-imported in
the child, so scripts need no ``if __name__ == "__main__"`` guard.

Protocol over one ``socketpair`` (length-prefixed msgpack): the client sends
``{"op": "fork", "id", "args"}``; the zygote answers ``{"id", "pid"}``; whenever a child exits the
zygote (its parent) reaps it and sends ``{"exit": pid, "code": c}`` (``c < 0``: killed by
signal ``-c``). When the client's end closes, the zygote SIGKILLs its children and exits.

Who uses it: the :class:`~elasticep.engine.launcher.Launcher` (one zygote per client process,
shared by every launcher in it, via :meth:`Zygote.shared`).
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Callable

import msgspec

__all__ = ["Zygote", "ZygoteError"]

_LEN = struct.Struct("!I")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(dict)


class ZygoteError(RuntimeError):
    """The zygote process is gone or did not answer."""


def _send(sock: socket.socket, obj: dict) -> None:
    data = _enc.encode(obj)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> dict | None:
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    body = _recv_exact(sock, _LEN.unpack(head)[0])
    return None if body is None else _dec.decode(body)


class Zygote:
    """Client of one zygote process. Thread-safe.

    ``on_exit(pid, code)`` callbacks run on the client's reader thread, in exit order.
    """

    _shared: "Zygote | None" = None
    _shared_lock = threading.Lock()

    @classmethod
    def shared(cls) -> "Zygote":
        """The zygote of this process, started on first use (and again if it died)."""
        with cls._shared_lock:
            if cls._shared is None or not cls._shared.alive:
                cls._shared = cls()
            return cls._shared

    def __init__(self, timeout_s: float = 120.0):
        parent, child = socket.socketpair()
        self._sock = parent
        self._proc = subprocess.Popen(
            # -c rather than -m: the package __init__ imports this module, and runpy would warn
            [sys.executable, "-c", f"from elasticep.engine.zygote import _serve; _serve({child.fileno()})"],
            pass_fds=(child.fileno(),),
            close_fds=True,
        )
        child.close()
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._pids: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._listeners: list[Callable[[int, int], None]] = []
        self._next = 0
        self.alive = True
        self._timeout_s = timeout_s
        self._reader = threading.Thread(target=self._read, name="elasticep-zygote", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def add_exit_listener(self, fn: Callable[[int, int], None]) -> Callable[[], None]:
        """Call ``fn(pid, code)`` for each child exit from now on; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(fn)

        def remove() -> None:
            with self._lock:
                if fn in self._listeners:
                    self._listeners.remove(fn)

        return remove

    def fork(self, target: str, args: list) -> int:
        """Fork a child that runs ``target`` (``"module:function"``) with ``args``; returns its pid.

        The first call waits for the zygote's imports (seconds); later ones take milliseconds.
        """
        with self._cond:
            if not self.alive:
                raise ZygoteError("zygote is gone")
            self._next += 1
            rid = self._next
            _send(self._sock, {"op": "fork", "id": rid, "target": target, "args": args})
            if not self._cond.wait_for(lambda: rid in self._pids or not self.alive, self._timeout_s):
                raise ZygoteError(f"zygote did not fork within {self._timeout_s} s")
            if rid not in self._pids:
                raise ZygoteError("zygote died while forking")
            return self._pids.pop(rid)

    def exit_code(self, pid: int) -> int | None:
        """The exit code the zygote reported for child ``pid`` (None while it runs)."""
        with self._lock:
            return self._exits.get(pid)

    def close(self) -> None:
        """Close the channel; the zygote kills its children and exits."""
        with self._lock:
            self.alive = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        try:
            self._proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = _recv(self._sock)
                except OSError:
                    msg = None
                if msg is None:
                    break
                if "exit" in msg:
                    pid, code = int(msg["exit"]), int(msg["code"])
                    with self._lock:
                        self._exits[pid] = code
                        listeners = list(self._listeners)
                    for fn in listeners:
                        try:
                            fn(pid, code)
                        except Exception as exc:
                            print(f"elasticep zygote: exit listener raised {exc!r}", file=sys.stderr)
                else:
                    with self._cond:
                        self._pids[int(msg["id"])] = int(msg["pid"])
                        self._cond.notify_all()
        finally:
            with self._cond:
                self.alive = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# the zygote process


def _child(sock: socket.socket, wake_r: int, wake_w: int, target: str, args: list) -> None:
    """In the forked child: drop the zygote's plumbing, then run ``target``; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock.close()
        os.close(wake_r)
        os.close(wake_w)
        module, _, func = target.partition(":")
        import importlib

        code = int(importlib.import_module(module).__dict__[func](*args) or 0)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _serve(fd: int) -> None:
    import elasticep.engine._preload  # noqa: F401  (the point of the zygote)

    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C belongs to the launcher
    children: set[int] = set()
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ, "sock")
    sel.register(wake_r, selectors.EVENT_READ, "wake")

    def reap() -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            _send(sock, {"exit": pid, "code": code})

    try:
        while True:
            for key, _ in sel.select():
                if key.data == "wake":
                    try:
                        os.read(wake_r, 4096)
                    except BlockingIOError:
                        pass
                    reap()
                    continue
                msg = _recv(sock)
                if msg is None:
                    return
                if msg.get("op") == "fork":
                    pid = os.fork()
                    if pid == 0:
                        _child(sock, wake_r, wake_w, msg["target"], list(msg["args"]))
                    children.add(pid)
                    _send(sock, {"id": msg["id"], "pid": pid})
            reap()  # a SIGCHLD between select and the handler is not lost
    except (BrokenPipeError, ConnectionResetError):
        return
    finally:
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in list(children):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass

