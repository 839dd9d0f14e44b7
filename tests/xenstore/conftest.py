"""Two xenstore clients behind one test interface, so both pass the same tests.

``trio``: the daemon's client (virtio_diskd.ioreq.xenstore.client).
``pyxs``: pyxs 0.4.1's own blocking Client, driven from worker threads.
"""

from __future__ import annotations

import copy
import errno
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import pytest
import pyxs
import trio

from virtio_diskd.ioreq.xenstore.client import XenstoreClient
from virtio_diskd.ioreq.xenstore.wire import XenstoreError


class WatchStream(Protocol):
    async def next(self, timeout: float = 5.0) -> tuple[str, str]: ...
    async def none_within(self, seconds: float) -> bool: ...


class Driver(Protocol):
    name: str

    def connect(self, path: str) -> AbstractAsyncContextManager[Any]: ...


def _pyxs_errno(exc: BaseException) -> int:
    if isinstance(exc, pyxs.PyXSError) and exc.args and isinstance(exc.args[0], int):
        return exc.args[0]
    if isinstance(exc, ValueError):
        return errno.EINVAL
    raise exc


class PyxsConnection:
    """Adapts pyxs.Client (bytes, blocking, errors as PyXSError) to the test interface."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        def run() -> Any:
            try:
                return fn(*args)
            except (pyxs.PyXSError, ValueError) as exc:
                raise XenstoreError(_pyxs_errno(exc)) from exc
        return await trio.to_thread.run_sync(run)

    async def read(self, path: str) -> bytes:
        value: bytes = await self._call(self.client.read, path.encode())
        return value

    async def write(self, path: str, value: bytes) -> None:
        await self._call(self.client.write, path.encode(), value)

    async def mkdir(self, path: str) -> None:
        await self._call(self.client.mkdir, path.encode())

    async def rm(self, path: str) -> None:
        await self._call(self.client.delete, path.encode())

    async def ls(self, path: str) -> list[str]:
        names = await self._call(self.client.list, path.encode())
        return [n.decode() for n in names]

    async def get_perms(self, path: str) -> list[str]:
        perms = await self._call(self.client.get_perms, path.encode())
        return [p.decode() for p in perms]

    async def set_perms(self, path: str, perms: list[str]) -> None:
        await self._call(self.client.set_perms, path.encode(), [p.encode() for p in perms])

    async def domain_path(self, domid: int) -> str:
        value: bytes = await self._call(self.client.get_domain_path, domid)
        return value.decode()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[PyxsConnection]:
        tx_client = copy.copy(self.client)
        await self._call(tx_client.transaction)
        yield PyxsConnection(tx_client)
        committed = await self._call(tx_client.commit)
        if not committed:
            raise XenstoreError(errno.EAGAIN)

    @asynccontextmanager
    async def watch(self, path: str, token: str) -> AsyncIterator[WatchStream]:
        monitor = self.client.monitor()
        await self._call(monitor.watch, path.encode(), token.encode())
        events = monitor.wait()
        send, receive = trio.open_memory_channel[tuple[str, str]](1000)
        token_holder = trio.lowlevel.current_trio_token()

        def pump() -> None:
            for event in events:
                item = (event.path.decode(), event.token.decode())
                try:
                    trio.from_thread.run_sync(send.send_nowait, item, trio_token=token_holder)
                except (trio.RunFinishedError, trio.ClosedResourceError):
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.to_thread.run_sync(pump, abandon_on_cancel=True))
            yield _ChannelStream(receive)
            nursery.cancel_scope.cancel()
        send.close()


class _ChannelStream:
    def __init__(self, channel: trio.MemoryReceiveChannel[Any]) -> None:
        self.channel = channel

    async def next(self, timeout: float = 5.0) -> tuple[str, str]:
        with trio.fail_after(timeout):
            item = await self.channel.receive()
        if hasattr(item, "path"):
            return (item.path, item.token)
        return tuple(item)  # type: ignore[return-value]

    async def none_within(self, seconds: float) -> bool:
        with trio.move_on_after(seconds):
            await self.channel.receive()
            return False
        return True


class TrioConnection:
    def __init__(self, client: XenstoreClient, ops: Any = None) -> None:
        self.client = client
        self.ops = ops if ops is not None else client

    async def read(self, path: str) -> bytes:
        value: bytes = await self.ops.read_bytes(path)
        return value

    async def write(self, path: str, value: bytes) -> None:
        await self.ops.write(path, value)

    async def mkdir(self, path: str) -> None:
        await self.ops.mkdir(path)

    async def rm(self, path: str) -> None:
        await self.ops.rm(path)

    async def ls(self, path: str) -> list[str]:
        names: list[str] = await self.ops.directory(path)
        return names

    async def get_perms(self, path: str) -> list[str]:
        perms: list[str] = await self.ops.get_perms(path)
        return perms

    async def set_perms(self, path: str, perms: list[str]) -> None:
        await self.ops.set_perms(path, perms)

    async def domain_path(self, domid: int) -> str:
        return await self.client.get_domain_path(domid)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[TrioConnection]:
        async with self.client.transaction() as tx:
            yield TrioConnection(self.client, tx)

    @asynccontextmanager
    async def watch(self, path: str, token: str) -> AsyncIterator[WatchStream]:
        async with self.client.watch(path, token) as events:
            yield _ChannelStream(events)


class TrioDriver:
    name = "trio"

    @asynccontextmanager
    async def connect(self, path: str) -> AsyncIterator[TrioConnection]:
        async with XenstoreClient.open(path) as client:
            yield TrioConnection(client)


class PyxsDriver:
    name = "pyxs"

    @asynccontextmanager
    async def connect(self, path: str) -> AsyncIterator[PyxsConnection]:
        client = pyxs.Client(unix_socket_path=path)
        await trio.to_thread.run_sync(client.connect)
        try:
            yield PyxsConnection(client)
        finally:
            await trio.to_thread.run_sync(client.close)


@pytest.fixture(params=["trio", "pyxs"])
def driver(request: pytest.FixtureRequest) -> Driver:
    return TrioDriver() if request.param == "trio" else PyxsDriver()
