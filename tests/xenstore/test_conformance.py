"""xenstore conformance: the trio client and pyxs pass the same tests.

Both run against the simulated xenstored as a separate process, the way
the daemon meets a real one.
"""

from __future__ import annotations

import errno

import pytest
import trio

from vdtest.fixtures import XenstoredProcess
from virtio_diskd.ioreq.xenstore.wire import XenstoreError


async def test_write_read_list_remove(driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        await xs.write("/vm/a/b", b"hello")
        await xs.write("/vm/a/c", b"1")
        assert await xs.read("/vm/a/b") == b"hello"
        assert await xs.read("/vm/a") == b""  # implicitly created parent
        assert sorted(await xs.ls("/vm/a")) == ["b", "c"]
        await xs.rm("/vm/a")
        with pytest.raises(XenstoreError) as info:
            await xs.read("/vm/a/b")
        assert info.value.errno == errno.ENOENT
        assert "vm" in await xs.ls("/")
        assert await xs.ls("/vm") == []


async def test_errors_are_errno_names(driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        with pytest.raises(XenstoreError) as info:
            await xs.read("/no/such/node")
        assert info.value.errno == errno.ENOENT
        with pytest.raises(XenstoreError) as info:
            await xs.rm("/no/such/node")  # parent missing too
        assert info.value.errno == errno.ENOENT
        await xs.mkdir("/exists")
        await xs.rm("/exists/child")  # missing node, existing parent: fine
        with pytest.raises(XenstoreError) as info:
            await xs.rm("/")
        assert info.value.errno == errno.EINVAL
        assert await xs.domain_path(7) == "/local/domain/7"


async def test_watch_fires_at_once_then_on_every_change_in_order(
        driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs, \
            driver.connect(xenstored_process.path) as writer:
        await xs.mkdir("/w")
        async with xs.watch("/w/dev", "tok") as events:
            assert await events.next() == ("/w/dev", "tok")  # registration
            await writer.write("/w/dev/state", b"1")  # create below the watch
            assert await events.next() == ("/w/dev/state", "tok")
            await writer.write("/w/dev/state", b"2")  # change
            assert await events.next() == ("/w/dev/state", "tok")
            await writer.set_perms("/w/dev/state", ["n0", "r3"])  # permission change
            assert await events.next() == ("/w/dev/state", "tok")
            await writer.write("/w/other", b"x")  # outside the watch: nothing
            await writer.rm("/w")  # removal of an ancestor reports the watch path
            assert await events.next() == ("/w/dev", "tok")
            assert await events.none_within(0.2)


async def test_watch_on_descendant_fires_on_recursive_remove(
        driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        await xs.write("/r/a/b/c", b"v")
        async with xs.watch("/r/a/b/c", "deep") as events:
            assert await events.next() == ("/r/a/b/c", "deep")
            await xs.rm("/r/a")
            assert await events.next() == ("/r/a/b/c", "deep")


async def test_relative_watch_paths_are_relative(
        driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        await xs.mkdir("/local/domain/0")
        async with xs.watch("backend", "rel") as events:
            assert await events.next() == ("backend", "rel")
            await xs.write("/local/domain/0/backend/virtio_disk/1/51712/state", b"1")
            assert await events.next() == ("backend/virtio_disk/1/51712/state", "rel")


async def test_conflicting_transactions_give_one_eagain(
        driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        await xs.write("/counter", b"0")
        outcomes: list[str] = []

        async def increment(started: trio.Event, go: trio.Event) -> None:
            try:
                async with xs.transaction() as tx:
                    value = int(await tx.read("/counter"))
                    started.set()
                    await go.wait()
                    await tx.write("/counter", str(value + 1).encode())
            except XenstoreError as exc:
                assert exc.errno == errno.EAGAIN
                outcomes.append("EAGAIN")
            else:
                outcomes.append("committed")

        first, second, go = trio.Event(), trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(increment, first, go)
            nursery.start_soon(increment, second, go)
            await first.wait()
            await second.wait()
            go.set()
        assert sorted(outcomes) == ["EAGAIN", "committed"]
        assert await xs.read("/counter") == b"1"


async def test_aborted_or_conflicting_transaction_leaves_nothing(
        driver, xenstored_process: XenstoredProcess) -> None:
    async with driver.connect(xenstored_process.path) as xs:
        await xs.write("/t/x", b"0")
        with pytest.raises(XenstoreError):
            async with xs.transaction() as tx:
                await tx.write("/t/new", b"1")
                await tx.write("/t/x", b"changed")
                await xs.write("/t/x", b"outside")  # conflicting write outside
        assert await xs.read("/t/x") == b"outside"
        assert await xs.ls("/t") == ["x"]


async def test_permissions_refuse_what_they_should(
        driver, xenstored_process: XenstoredProcess) -> None:
    guest_socket = xenstored_process.domain_paths[5]
    async with driver.connect(xenstored_process.path) as dom0, \
            driver.connect(guest_socket) as guest:
        await dom0.write("/local/domain/5/device/vbd/1/state", b"1")
        await dom0.set_perms("/local/domain/5", ["n5"])  # the guest owns its home
        await dom0.write("/private/secret", b"s")
        await dom0.write("/shared/value", b"v")
        await dom0.set_perms("/shared/value", ["n0", "r5"])

        with pytest.raises(XenstoreError) as info:
            await guest.read("/private/secret")
        assert info.value.errno == errno.EACCES
        with pytest.raises(XenstoreError) as info:
            await guest.read("/private/missing")  # existence is not leaked
        assert info.value.errno == errno.EACCES
        assert await guest.read("/shared/value") == b"v"
        with pytest.raises(XenstoreError) as info:
            await guest.write("/shared/value", b"mine")
        assert info.value.errno == errno.EACCES
        with pytest.raises(XenstoreError) as info:
            await guest.set_perms("/shared/value", ["n5"])
        assert info.value.errno == errno.EACCES
        # Its own subtree is its own; new nodes there belong to it.
        await guest.write("/local/domain/5/data/x", b"1")
        assert (await guest.get_perms("/local/domain/5/data/x"))[0] == "n5"
        with pytest.raises(XenstoreError) as info:
            await guest.set_perms("/local/domain/5/data/x", ["n0"])  # cannot give it away
        assert info.value.errno == errno.EPERM
        assert await dom0.read("/shared/value") == b"v"


async def test_unreadable_changes_are_not_announced(
        driver, xenstored_process: XenstoredProcess) -> None:
    guest_socket = xenstored_process.domain_paths[5]
    async with driver.connect(xenstored_process.path) as dom0, \
            driver.connect(guest_socket) as guest:
        await dom0.write("/mixed/visible", b"0")
        await dom0.set_perms("/mixed", ["n0", "r5"])
        await dom0.set_perms("/mixed/visible", ["n0", "r5"])
        async with guest.watch("/mixed", "g") as events:
            assert await events.next() == ("/mixed", "g")
            await dom0.write("/mixed/hidden", b"1")
            await dom0.set_perms("/mixed/hidden", ["n0"])
            await dom0.write("/mixed/hidden", b"2")
            await dom0.write("/mixed/visible", b"1")
            # the create inherited r5 and is announced; the later hidden write is not
            assert await events.next() == ("/mixed/hidden", "g")
            assert await events.next() == ("/mixed/hidden", "g")  # perms change (readable before)
            assert await events.next() == ("/mixed/visible", "g")
