"""The simulated toolstack writes and waits exactly as libxl does."""

from __future__ import annotations

import pytest
import trio

from vdtest.fixtures import XenstoredHandle
from virtio_diskd.ioreq.sim.toolstack import (
    DiskSpec,
    GuestSpec,
    Toolstack,
    ToolstackError,
    vdev_to_devid,
)
from virtio_diskd.ioreq.xenstore.client import XenstoreClient

# xenstore during `xl create` of a DomU with one virtio disk, Xen 4.17 arm64
# (shared/reference/xen-qemu-arm64.md §4 [B]), domid 2, target /dev/loop0.
DUMP_BACKEND = {
    "frontend": "/local/domain/2/device/virtio_disk/51712",
    "params": "/dev/loop0",
    "frontend-id": "2",
    "online": "1",
    "removable": "0",
    "bootable": "1",
    "state": "1",
    "dev": "xvda",
    "type": "standalone",
    "mode": "w",
    "device-type": "disk",
    "discard-enable": "1",
    "specification": "virtio",
    "transport": "mmio",
    "base": "33554432",
    "irq": "33",
}
DUMP_FRONTEND = {
    "backend": "/local/domain/0/backend/virtio_disk/2/51712",
    "backend-id": "0",
    "state": "1",
    "virtual-device": "51712",
    "device-type": "disk",
    "trusted": "1",
}


async def read_dir(xs: XenstoreClient, path: str) -> dict[str, str]:
    return {name: await xs.read(f"{path}/{name}") for name in await xs.directory(path)}


async def scripted_backend(xs: XenstoreClient, *, answer_init: bool = True) -> None:
    """A minimal backend: InitWait for every new device, Closed on Closing."""
    root = "/local/domain/0/backend/virtio_disk"
    async with xs.watch(root) as events:
        async for _ in events:
            for fe in await _ls(xs, root):
                for devid in await _ls(xs, f"{root}/{fe}"):
                    state = await xs.read_or_none(f"{root}/{fe}/{devid}/state")
                    if state == "1" and answer_init:
                        await xs.write(f"{root}/{fe}/{devid}/state", "2")
                    elif state == "5":
                        await xs.write(f"{root}/{fe}/{devid}/state", "6")


async def _ls(xs: XenstoreClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except OSError:
        return []


def test_vdev_numbers_match_libxl() -> None:
    assert [vdev_to_devid(v) for v in ("xvda", "xvdb", "xvda1", "xvdp", "xvdq", "hda", "hdc",
                                       "sda", "d0p1", "51712")] == [
        51712, 51728, 51713, 51952, 268439552, 768, 5632, 2048, 51713, 51712]
    with pytest.raises(ToolstackError):
        vdev_to_devid("vda")


async def test_three_disk_guest_matches_libxl_node_for_node(xenstored: XenstoredHandle) -> None:
    guest = GuestSpec(2, "guest", [DiskSpec("/dev/loop0", "xvda"),
                                   DiskSpec("/dev/loop1", "xvdb", access="ro"),
                                   DiskSpec("/dev/loop2", "xvdc")])
    async with XenstoreClient.open(xenstored.path) as xs, trio.open_nursery() as nursery:
        nursery.start_soon(scripted_backend, xs)
        toolstack = Toolstack(xs, xen_version=(4, 17))
        await toolstack.create(guest)
        backend = "/local/domain/0/backend/virtio_disk/2"
        assert await xs.directory(backend) == ["51712", "51728", "51744"]
        first = await read_dir(xs, f"{backend}/51712")
        assert first == {**DUMP_BACKEND, "state": "2"}  # only the backend moved it to 2
        second = await read_dir(xs, f"{backend}/51728")
        assert second == {**DUMP_BACKEND, "state": "2", "params": "/dev/loop1", "dev": "xvdb",
                          "mode": "r", "discard-enable": "0", "base": str(0x2000200),
                          "irq": "34",
                          "frontend": "/local/domain/2/device/virtio_disk/51728"}
        third = await read_dir(xs, f"{backend}/51744")
        assert third["base"] == str(0x2000400) and third["irq"] == "35"
        assert await read_dir(xs, "/local/domain/2/device/virtio_disk/51712") == DUMP_FRONTEND
        libxl_copy = await read_dir(xs, "/libxl/2/device/virtio_disk/51712")
        assert libxl_copy == {**DUMP_BACKEND,
                              "backend": "/local/domain/0/backend/virtio_disk/2/51712"}
        # Permissions: backend dir owned by the backend, readable by the guest; and the reverse.
        assert await xs.get_perms(f"{backend}/51712") == ["n0", "r2"]
        assert await xs.get_perms("/local/domain/2/device/virtio_disk/51712") == ["n2", "r0"]
        assert await xs.get_perms("/local/domain/2/device/virtio_disk/51712/trusted") == [
            "n0", "r2"]
        assert await xs.get_perms("/libxl/2") == ["n0"]
        nursery.cancel_scope.cancel()


async def test_grant_usage_flavour_and_driver_domain_default(xenstored: XenstoredHandle) -> None:
    guest = GuestSpec(3, "g", [DiskSpec("/img", "xvda"), DiskSpec("/img2", "xvdb",
                                                                 grant_usage=True)])
    async with XenstoreClient.open(xenstored.path) as xs:
        plans = Toolstack(xs, xen_version=(4, 19)).plan(guest)
        toolstack = Toolstack(xs, xen_version=(4, 19))
        entries = [dict(toolstack.backend_entries(guest, d, p))
                   for d, p in zip(guest.disks, plans, strict=True)]
        assert entries[0]["grant_usage"] == "0" and entries[1]["grant_usage"] == "1"
        old = dict(Toolstack(xs, xen_version=(4, 18)).backend_entries(guest, guest.disks[0],
                                                                       plans[0]))
        assert "grant_usage" not in old
        dd = DiskSpec("/img", "xvda", backend_domid=7)
        dd_plan = Toolstack(xs).plan(GuestSpec(3, "g", [dd]))[0]
        assert dd_plan.backend == "/local/domain/7/backend/virtio_disk/3/51712"
        assert dict(toolstack.backend_entries(guest, dd, dd_plan))["grant_usage"] == "1"


async def test_at_most_eleven_virtio_devices(xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs:
        disks = [DiskSpec(f"/img{i}", f"xvd{chr(ord('a') + i)}") for i in range(12)]
        with pytest.raises(ToolstackError, match="Ran out of reserved range"):
            Toolstack(xs).plan(GuestSpec(4, "g", disks))


async def test_create_fails_after_libxl_timeout_without_backend(xenstored: XenstoredHandle) -> None:
    """libxl's LIBXL_INIT_TIMEOUT is 10 s: the create fails then, and the domain is cleaned up."""
    async with XenstoreClient.open(xenstored.path) as xs, trio.open_nursery() as nursery:
        nursery.start_soon(scripted_backend_closing_only, xs)
        toolstack = Toolstack(xs)
        started = trio.current_time()
        with pytest.raises(ToolstackError, match="unable to add device with path "
                                                "/local/domain/0/backend/virtio_disk/5/51712"):
            await toolstack.create(GuestSpec(5, "g", [DiskSpec("/img")]))
        elapsed = trio.current_time() - started
        assert elapsed >= 10.0
        assert not await xs.exists("/local/domain/5")
        assert not await xs.exists("/local/domain/0/backend/virtio_disk/5/51712")
        nursery.cancel_scope.cancel()


async def scripted_backend_closing_only(xs: XenstoreClient) -> None:
    await scripted_backend(xs, answer_init=False)


async def test_destroy_is_forced_removal_and_releases_the_domain(
        xenstored: XenstoredHandle) -> None:
    async with XenstoreClient.open(xenstored.path) as xs, trio.open_nursery() as nursery:
        nursery.start_soon(scripted_backend, xs)
        toolstack = Toolstack(xs)
        await toolstack.create(GuestSpec(6, "g", [DiskSpec("/img"), DiskSpec("/img2", "xvdb")]))
        seen: list[str] = []
        async with xs.watch("/local/domain/0/backend/virtio_disk/6/51712/online") as online, \
                xs.watch("@releaseDomain") as released:
            await online.receive()
            await released.receive()
            stuck = await toolstack.destroy(6)
            assert stuck == []
            with trio.fail_after(2):
                event = await released.receive()
            seen.append(event.path)
        assert seen == ["@releaseDomain"]
        for path in ("/local/domain/6", "/libxl/6", "/local/domain/0/backend/virtio_disk/6/51712"):
            assert not await xs.exists(path)
        nursery.cancel_scope.cancel()
