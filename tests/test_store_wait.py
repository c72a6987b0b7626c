"""KeyWaiter: the TCPStore's WAIT spoken on an asyncio connection (both torch servers)."""

from __future__ import annotations

import asyncio
import time

import pytest
from torch.distributed import TCPStore

from elasticep.bus.store_wait import KeyWaiter, StoreWaitFailed
from elasticep.membership import TCPStoreViewStore, View
from elasticep.testing.fixtures import free_port


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("libuv", [True, False])
async def test_a_wait_ends_when_the_key_is_set_and_a_cancelled_one_leaves_the_store_usable(libuv: bool) -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=libuv)
    waiter = KeyWaiter.for_store(server)
    assert waiter is not None
    try:
        pending = asyncio.ensure_future(waiter.wait("a/key"))
        await asyncio.sleep(0.2)
        assert not pending.done()  # nothing written yet: it waits, without polling
        t0 = time.monotonic()
        server.set("a/key", b"1")
        assert await asyncio.wait_for(pending, 5.0) is True
        assert time.monotonic() - t0 < 1.0
        assert await waiter.wait("a/key") is True  # already set: at once
        cancelled = asyncio.ensure_future(waiter.wait("never"))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        late = asyncio.ensure_future(waiter.wait("later"))
        await asyncio.sleep(0.05)
        server.set("later", b"2")
        assert await asyncio.wait_for(late, 5.0) is True
        assert server.get("later") == b"2" and not server.check(["never"])
    finally:
        waiter.close()
    assert await waiter.wait("a/key") is False  # closed


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_wait_past_its_bound_returns_false_and_an_absent_server_is_a_typed_error() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    waiter = KeyWaiter(server.host, server.port, bound_s=0.1)
    assert await waiter.wait("nobody-writes-this") is False
    waiter.close()
    nowhere = KeyWaiter("127.0.0.1", free_port(), connect_timeout_s=1.0)
    with pytest.raises(StoreWaitFailed):
        await nowhere.wait("x")
    assert KeyWaiter.for_store(object()) is None  # not a TCPStore: the caller polls instead


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_the_tcpstore_view_store_pushes_a_commit_and_only_a_commit_to_a_waiting_rank() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    writer, reader = TCPStoreViewStore("127.0.0.1", server.port), TCPStoreViewStore("127.0.0.1", server.port)
    try:
        assert reader.pushes
        pending = asyncio.ensure_future(reader.wait_committed(1))
        await asyncio.sleep(0.1)
        # The server answers every WAIT on a key a compare_set names, even one that writes
        # nothing: a read must not name a missing key that way, or each rank's poll of the next
        # epoch wakes every other rank's wait for it (and each woken rank's read the rest again).
        for _ in range(3):
            assert await writer.read(1) is None
        await asyncio.sleep(0.3)
        assert not pending.done()  # nothing was committed: nothing to wake for
        await writer.compare_and_set(View.of(1, [0, 1], reason="bootstrap"))
        assert await asyncio.wait_for(pending, 5.0) is True
        assert (await reader.read(1)).members == (0, 1)
    finally:
        await writer.close()
        await reader.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_hub_makes_one_request_per_key_for_many_waiters_on_a_fixed_few_connections() -> None:
    from elasticep.bus.store_wait import WaitHub

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    hub = WaitHub.for_store(server, connections=2)
    assert hub is not None and WaitHub.for_store(object()) is None
    try:
        many = [asyncio.ensure_future(hub.wait("epoch/2")) for _ in range(50)]
        other = asyncio.ensure_future(hub.wait("log/7"))
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in many + [other]) and hub.requests == 2
        # a third key waits for a connection (both are held by unset keys), then is answered
        third = asyncio.ensure_future(hub.wait("log/6"))
        await asyncio.sleep(0.1)
        assert hub.requests == 2
        server.set("epoch/2", b"v")
        assert await asyncio.wait_for(asyncio.gather(*many), 5.0) == [True] * 50
        server.set("log/6", b"1")
        assert await asyncio.wait_for(third, 5.0) is True and hub.requests == 3
        # one waiter cancelled leaves the others of its key waiting; the last one ends the request
        a, b = asyncio.ensure_future(hub.wait("log/7")), asyncio.ensure_future(hub.wait("log/7"))
        await asyncio.sleep(0.05)
        a.cancel()
        with pytest.raises(asyncio.CancelledError):
            await a
        server.set("log/7", b"2")
        assert await asyncio.wait_for(asyncio.gather(b, other), 5.0) == [True, True]
        assert hub.requests == 3  # log/7 was one request for all three of its waiters
        late = asyncio.ensure_future(hub.wait("never"))
        await asyncio.sleep(0.05)
    finally:
        hub.close()
    assert await asyncio.wait_for(late, 5.0) is False  # closed under the wait: False, not an error
    assert await hub.wait("epoch/2") is False
    with pytest.raises(ValueError):
        WaitHub("127.0.0.1", 1, connections=1)


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_view_stores_and_transports_sharing_a_hub_leave_it_open_when_they_close() -> None:
    from elasticep.bus.store_wait import WaitHub

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    hub = WaitHub.for_store(server)
    stores = [TCPStoreViewStore(store=server, waits=hub) for _ in range(3)]
    waits = [asyncio.ensure_future(s.wait_committed(1)) for s in stores]
    await asyncio.sleep(0.1)
    await stores[0].compare_and_set(View(epoch=1, members=(0, 1), leader=0, proposer=0, reason="bootstrap"))
    assert await asyncio.wait_for(asyncio.gather(*waits), 5.0) == [True, True, True]
    assert hub.requests == 1
    for s in stores:
        s.end_waits()
        await s.close()
    assert await asyncio.wait_for(hub.wait(stores[0]._key(1)), 5.0) is True  # still open
    hub.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_shared_views_read_each_committed_epoch_once_for_every_store_of_a_process() -> None:
    from elasticep.membership.store import SharedViews

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    shared = SharedViews(keep=2, absent_s=1.0)  # (long enough that no step below outlasts it)
    stores = [TCPStoreViewStore(store=server, shared=shared) for _ in range(20)]
    assert await asyncio.gather(*(s.read(1) for s in stores)) == [None] * 20  # not committed: not kept
    assert shared.reads == 1  # the twenty reads joined one
    view = View(epoch=1, members=(0, 1), leader=0, proposer=0, reason="bootstrap")
    other = TCPStoreViewStore(store=server)  # another process's store commits it
    assert await other.compare_and_set(view) == view
    # for absent_s, "not committed" is answered from the last read (as if that read were slower)
    assert await stores[5].read(1) is None and shared.reads == 1 and shared.absent_answers == 1
    # the store's push of the commit to any rank's wait ends that at once
    assert await asyncio.wait_for(stores[9].wait_committed(1), 5.0)
    before = shared.reads
    asked = []
    reader = stores[0]._reader()  # the first to ask reads for all
    read = reader.read
    reader.read = lambda key, known_set=False: (asked.append(known_set), read(key, known_set=known_set))[1]
    try:
        got = await asyncio.gather(*(s.read(1) for s in stores))
    finally:
        del reader.read
    assert got == [view] * 20 and shared.reads == before + 1  # one read for twenty ranks
    assert asked == [True]  # known committed: fetched without asking first whether it is there
    v2 = View(epoch=2, members=(0,), leader=0, proposer=0, reason="-1")
    assert await stores[3].compare_and_set(v2) == v2 and shared.reads == before + 1  # a CAS's answer is kept
    assert await stores[7].read(2) == v2 and shared.reads == before + 1
    await stores[0].compare_and_set(View(epoch=3, members=(0, 2), leader=0, proposer=0, reason="+2"))
    assert sorted(shared.views) == [2, 3]  # the newest `keep`
    # a not-committed answer is shared for absent_s only, then the store is asked again
    assert await stores[1].read(4) is None and await stores[2].read(4) is None
    reads = shared.reads
    await asyncio.sleep(shared.absent_s * 1.5)
    assert await stores[1].read(4) is None and shared.reads == reads + 1
    for s in stores + [other]:
        await s.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_view_read_runs_on_the_event_loop_beside_a_wait() -> None:
    # CHECK then GET on an asyncio connection: no worker thread, one round trip for a missing
    # epoch, and a wait in progress on the same store (its own connection) does not hold it up.
    from elasticep.membership.store import StoreUnavailable

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    store = TCPStoreViewStore("127.0.0.1", server.port, timeout_s=2.0)
    pending = asyncio.ensure_future(store.wait_committed(2))
    assert await store.read(1) is None
    view = View(epoch=1, members=(0, 3), leader=0, proposer=0, reason="bootstrap", incarnations=(0, 7))
    writer = TCPStoreViewStore(store=server)
    assert await writer.compare_and_set(view) == view
    assert await store.read(1) == view and await store.read(1) == view
    assert not pending.done()
    assert store._thread is None  # reads started no worker thread
    assert store.read_nowait(1) == view and store.read_nowait(5) is None  # the blocking twin agrees
    pending.cancel()
    await store.close()
    await writer.close()
    del writer, server  # the store goes away: a read fails with the typed error, it does not hang
    gone = TCPStoreViewStore("127.0.0.1", free_port(), timeout_s=1.0, connect_timeout_s=1.0)
    with pytest.raises(StoreUnavailable):
        await gone.read(1)
    await gone.close()


@pytest.mark.asyncio
@pytest.mark.timeout(30)
async def test_a_waiter_closed_while_it_connects_ends_its_wait() -> None:
    # close() while the connection is being opened: the wait must end, not go on to wait on a
    # connection nobody will close (a lost cancellation left a transport's close() waiting).
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    waiter = KeyWaiter(server.host, server.port)
    pending = asyncio.ensure_future(waiter.wait("never"))
    await asyncio.sleep(0)  # it is connecting now
    waiter.close()
    assert await asyncio.wait_for(pending, 5.0) is False


@pytest.mark.asyncio
@pytest.mark.timeout(30)
@pytest.mark.parametrize("libuv", [True, False])
async def test_a_key_is_read_on_the_waiters_connection_on_both_servers(libuv: bool) -> None:
    from elasticep.bus.store_wait import WaitHub

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=libuv)
    server.set("k/bin", b"\x00\xffvalue\x00")
    waiter = KeyWaiter.for_store(server)
    hub = WaitHub.for_store(server)
    assert await waiter.read("k/bin") == b"\x00\xffvalue\x00"
    assert await waiter.read("k/missing") is None  # answered at once: a GET would wait for it
    assert await hub.read("k/bin") == b"\x00\xffvalue\x00" and await hub.read("k/none") is None
    # a key known to be set (a wait returned) is fetched in one round trip, without CHECK
    checks = []
    write = asyncio.StreamWriter.write

    def counted(self, data):
        checks.append(data[0] == 5)  # CHECK's query type
        return write(self, data)

    asyncio.StreamWriter.write = counted
    try:
        assert await waiter.read("k/bin", known_set=True) == b"\x00\xffvalue\x00" and checks == [False]
        assert await hub.read("k/bin", known_set=True) == b"\x00\xffvalue\x00" and checks == [False, False]
    finally:
        asyncio.StreamWriter.write = write
    # wrongly "known": the libuv server answers an empty value (read as absent), the other one
    # drops the connection (a failed read; the next one connects again)
    if libuv:
        assert await waiter.read("k/gone", known_set=True) is None
    else:
        with pytest.raises(StoreWaitFailed):
            await waiter.read("k/gone", known_set=True)
    assert await waiter.read("k/bin") == b"\x00\xffvalue\x00"
    # compare-and-set in one round trip: the first writer of a new key wins, the second is told
    assert await waiter.compare_set("k/cas", b"", b"first") == b"first"
    assert await hub.compare_set("k/cas", b"", b"second") == b"first" and server.get("k/cas") == b"first"
    assert await hub.compare_set("k/cas", b"first", b"third") == b"third" and server.get("k/cas") == b"third"
    # on one waiter, reads and compare-and-sets started together take turns on its connection
    got = await asyncio.gather(*(waiter.compare_set(f"k/c{i}", b"", b"v%d" % i) if i % 2 else waiter.read("k/bin")
                                 for i in range(12)))
    assert got == [b"v%d" % i if i % 2 else b"\x00\xffvalue\x00" for i in range(12)]
    later = asyncio.ensure_future(waiter.wait("k/later"))  # the same connection then waits
    await asyncio.sleep(0.05)
    server.set("k/later", "1")
    assert await asyncio.wait_for(later, 5.0) is True
    waiter.close()
    hub.close()
    with pytest.raises(StoreWaitFailed):
        await waiter.read("k/bin")
