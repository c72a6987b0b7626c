"""``HostBoard``: heartbeats between the ranks of one host through shared memory.

Ranks on the same host need not send each other heartbeats over the bus. Each rank's agent
writes a *beat* (a monotonic time stamp, with its incarnation and installed epoch) into its own
slot of a small file in ``/dev/shm`` at every heartbeat, and reads its local peers' slots at
every tick of its membership service. A slot whose beat moved is a heartbeat from that peer,
with no message, no system call and no wake-up of either process. A rank whose every watcher
reads its slot sends no heartbeat on the bus at all; the bus still carries every event
(suspicions, views, joins), and its sockets' disconnects still report a process that exits at
once.

Which ranks share a board: those that open the same file, named after the cluster (and its
store) and the host, where the host is the kernel's boot id and the network namespace. Ranks in
different network namespaces (the emulated hosts of :mod:`elasticep.testing.hosts`) never share
one: silence across a cut link must stay silence. Sharing is never assumed: a rank sends its
heartbeats on the bus until every rank that watches it has been seen beating on its board
within ``grace_ms``, so a peer that cannot open the file (another mount namespace, no
``/dev/shm``) is heard over the bus as before.

Layout (little-endian unsigned 64-bit words): a header of 8 words (magic, version, slots), then
4 words per rank: ``beat`` (``time.monotonic_ns()`` at the last heartbeat, 0 while the slot is
written), ``pid``, ``incarnation``, ``epoch``. A reader takes a slot only when ``beat`` is the
same non-zero value before and after it reads the other words (a seqlock on one word), so it
never pairs one process's incarnation with another's beat.

Trust: the file is created with mode 0600, so only processes of the ranks' user can write it,
which can already read the cluster's keys from the ranks' memory. A rank's slot is what the
rank wrote, not a signed statement: the board is for one host's ranks of one user, the bus (with
CURVE and signed registrations) for everything that crosses hosts.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import stat
import time
from pathlib import Path
from typing import Iterable, NamedTuple

from elasticep.errors import InvalidArgument

log = logging.getLogger(__name__)

__all__ = ["BOARD_SLOTS", "BoardBeat", "HostBoard", "host_identity", "open_board", "sweep_stale_boards"]

BOARD_SLOTS = 4096
"""Ranks one board holds (ranks 0 to 4095); a rank beyond it heartbeats over the bus only."""
_MAGIC = 0x45_50_42_4F_41_52_44_31  # "EPBOARD1"
_VERSION = 1
_HEADER_WORDS = 8
_SLOT_WORDS = 4
_BEAT, _PID, _INC, _EPOCH = range(_SLOT_WORDS)


def host_identity() -> str:
    """What makes two processes one host for the board: the kernel's boot id and the network
    namespace (processes in different network namespaces are different hosts to the bus)."""
    parts = []
    for path in ("/proc/sys/kernel/random/boot_id",):
        try:
            parts.append(Path(path).read_text().strip())
        except OSError:
            parts.append("")
    try:
        parts.append(str(os.stat("/proc/self/ns/net").st_ino))
    except OSError:
        parts.append("")
    parts.append(os.uname().nodename)
    return "/".join(parts)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


class BoardBeat(NamedTuple):
    """One peer's slot as last read: ``beat`` (ns), ``pid``, ``incarnation``, ``epoch``."""

    beat: int
    pid: int
    incarnation: int
    epoch: int


def _held(words) -> bool:
    """Whether a live process holds a slot of the board ``words`` (its 64-bit words)."""
    return any(_alive(pid) for pid in words[_HEADER_WORDS + _PID::_SLOT_WORDS] if pid)


class HostBoard:
    """One rank's handle on its host's board.

    Args:
        name: what the board is for (the cluster and its store's address): ranks of one cluster
            on one host pass the same name.
        rank: the slot this rank writes.
        incarnation: this process's incarnation, written with every beat.
        directory: where the file lives (``/dev/shm``, a RAM file system, by default).
        slots: ranks the board holds.

    Raises :class:`InvalidArgument` for a rank outside ``[0, slots)`` and :class:`OSError` if the
    file cannot be made or has another layout (callers fall back to the bus).
    """

    def __init__(self, name: str, rank: int, incarnation: int = 0, *, directory: str | os.PathLike = "/dev/shm",
                 slots: int = BOARD_SLOTS) -> None:
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < slots:
            raise InvalidArgument(f"rank must be an int in [0, {slots}) to have a board slot, not {rank!r}")
        digest = hashlib.sha256(f"{name}\0{host_identity()}".encode()).hexdigest()[:20]
        self.path = Path(directory) / f"elasticep-board-{digest}"
        self.rank = rank
        self.incarnation = incarnation
        self.slots = slots
        size = 8 * (_HEADER_WORDS + _SLOT_WORDS * slots)
        # never through a link someone planted at the name, never into anything but a plain file
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise OSError(f"{self.path} is not a regular file")
            if st.st_size < size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        words = self._words
        if words[0] == 0:  # a new file (or one being made beside us: both write the same header)
            words[2] = slots
            words[1] = _VERSION
            words[0] = _MAGIC
        if words[0] != _MAGIC or words[1] != _VERSION or words[2] != slots:
            found = (words[0], words[1], words[2])
            self.close(clear=False)
            raise OSError(f"{self.path} is not a board of this layout (magic, version, slots = {found})")
        self._base = _HEADER_WORDS + _SLOT_WORDS * rank
        self._last_beat = 0
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (beat, when this rank saw it change)
        b = self._base
        words[b + _BEAT] = 0  # the slot is being written: readers skip it
        words[b + _PID] = os.getpid()
        words[b + _INC] = incarnation
        words[b + _EPOCH] = 0
        self.closed = False

    # --- writing ---------------------------------------------------------------------------

    def beat(self, epoch: int) -> None:
        """Publish a heartbeat: this rank's installed ``epoch`` and a new beat."""
        if self.closed:
            return
        words = self._words
        words[self._base + _EPOCH] = epoch
        beat = max(time.monotonic_ns(), self._last_beat + 1)
        self._last_beat = beat
        words[self._base + _BEAT] = beat

    # --- reading ---------------------------------------------------------------------------

    def read(self, peer: int) -> BoardBeat | None:
        """``peer``'s slot, or None while it is empty or being written (or ``peer`` has none)."""
        if self.closed or not 0 <= peer < self.slots:
            return None
        words = self._words
        b = _HEADER_WORDS + _SLOT_WORDS * peer
        beat = words[b]
        if not beat:
            return None
        pid, inc, epoch = words[b + _PID], words[b + _INC], words[b + _EPOCH]
        if words[b] != beat:
            return None  # rewritten while we read: next time
        return BoardBeat(beat, pid, inc, epoch)

    def changed(self, peers: Iterable[int], now: float) -> list[tuple[int, BoardBeat]]:
        """The peers whose beat moved since this handle last looked (each with its slot).

        ``now`` (this rank's monotonic seconds) is recorded as when each change was seen, for
        :meth:`fresh`. The first look at a slot records it without reporting it: a beat written
        before this rank looked (perhaps by a process long gone) is no heartbeat.
        """
        out: list[tuple[int, BoardBeat]] = []
        if self.closed:
            return out
        seen, words, slots = self._seen, self._words, self.slots
        for peer in peers:  # (every tick of every rank: read() inlined, a slot left unread unless it moved)
            if peer == self.rank or not 0 <= peer < slots:
                continue
            b = _HEADER_WORDS + _SLOT_WORDS * peer
            beat = words[b]
            if not beat:
                continue
            last = seen.get(peer)
            if last is not None and beat == last[0]:
                continue
            pid, inc, epoch = words[b + _PID], words[b + _INC], words[b + _EPOCH]
            if words[b] != beat:
                continue  # rewritten while we read: next time
            if last is None:
                seen[peer] = (beat, -1e18)
            else:
                seen[peer] = (beat, now)
                out.append((peer, BoardBeat(beat, pid, inc, epoch)))
        return out

    def fresh(self, peer: int, now: float, within_s: float) -> bool:
        """Whether ``peer``'s beat was seen to move within ``within_s`` before ``now`` (by
        :meth:`changed`): the proof that ``peer`` reads this board as this rank does."""
        last = self._seen.get(peer)
        return last is not None and now - last[1] <= within_s

    def stale(self, peers: Iterable[int], now: float, within_s: float) -> set[int]:
        """The peers of ``peers`` that are not :meth:`fresh` (one call for a rank's watch list,
        every tick)."""
        seen = self._seen
        out: set[int] = set()
        for peer in peers:
            last = seen.get(peer)
            if last is None or now - last[1] > within_s:
                out.add(peer)
        return out

    # --- end -------------------------------------------------------------------------------

    def close(self, *, clear: bool = True) -> None:
        """Empty this rank's slot (readers stop seeing beats at once) and unmap; the last rank
        to leave removes the file. Idempotent."""
        if getattr(self, "closed", True) and clear:
            return
        self.closed = True
        words = getattr(self, "_words", None)
        empty = False
        try:
            if words is not None and clear and words[self._base + _PID] == os.getpid():
                words[self._base + _BEAT] = 0
                words[self._base + _PID] = 0
                empty = not _held(words)
        finally:
            if words is not None:
                words.release()
            self._map.close()
        if empty:
            # a rank opening the file just now keeps an unlinked copy to itself: it then hears
            # and is heard over the bus, as a rank without a board is
            try:
                self.path.unlink()
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"HostBoard({str(self.path)!r}, rank={self.rank})"


def sweep_stale_boards(directory: str | os.PathLike = "/dev/shm") -> int:
    """Remove the board files in ``directory`` that no live process holds a slot in (their last
    ranks were killed, so nobody removed them); returns how many. Best effort: a file that
    cannot be read is left alone, and a rank that opened a file just as it was removed keeps an
    unlinked copy to itself and heartbeats over the bus."""
    removed = 0
    for path in Path(directory).glob("elasticep-board-*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size < 8 * _HEADER_WORDS:
                continue
            data = os.pread(fd, st.st_size, 0)
        except OSError:
            continue
        finally:
            os.close(fd)
        words = memoryview(data[: len(data) // 8 * 8]).cast("Q")
        if words[0] != _MAGIC or _held(words):
            continue
        try:
            path.unlink()
            removed += 1
        except OSError:
            pass
    return removed


def open_board(name: str, rank: int, incarnation: int = 0, **kwargs) -> HostBoard | None:
    """:class:`HostBoard` for ``rank`` (after :func:`sweep_stale_boards`), or None (logged and
    counted) where none can be had: a rank beyond the board's slots, no ``/dev/shm``, a file of
    another layout. Such a rank heartbeats over the bus, and its peers see no beat of its on
    their boards, so they keep heartbeating to it over the bus too."""
    from elasticep import metrics

    sweep_stale_boards(kwargs.get("directory", "/dev/shm"))  # never raises: best effort per file
    try:
        return HostBoard(name, rank, incarnation, **kwargs)
    except (OSError, InvalidArgument) as exc:
        metrics.HOST_BOARD_UNAVAILABLE.inc()
        log.info("rank %s: no host board (%s); heartbeats go over the bus", rank, exc)
        return None
