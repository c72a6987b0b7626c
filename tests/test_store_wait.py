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
async def test_the_tcpstore_view_store_pushes_a_commit_to_a_waiting_rank() -> None:
    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, use_libuv=True)
    writer, reader = TCPStoreViewStore("127.0.0.1", server.port), TCPStoreViewStore("127.0.0.1", server.port)
    try:
        assert reader.pushes
        pending = asyncio.ensure_future(reader.wait_committed(1))
        await asyncio.sleep(0.1)
        assert not pending.done()
        await writer.compare_and_set(View.of(1, [0, 1], reason="bootstrap"))
        assert await asyncio.wait_for(pending, 5.0) is True
        assert (await reader.read(1)).members == (0, 1)
    finally:
        await writer.close()
        await reader.close()
