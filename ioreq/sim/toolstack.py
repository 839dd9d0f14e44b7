"""A toolstack with libxl's xenstore contract for ``specification=virtio`` disks.

libxl judges a virtio backend only through xenstore, so this module writes
exactly what libxl (4.17–4.22) writes and waits exactly as libxl waits
(``shared/reference/xen-interface.md`` §1–§2):

* the domain's home ``/local/domain/<d>`` and ``/libxl/<d>``;
* per disk, in one transaction: the backend dir (owner backend, frontend may
  read), the frontend dir (owner frontend, backend may read) and a private
  copy under ``/libxl/<d>/device/virtio_disk/<devid>``;
* ``base``/``irq`` allocated as on Arm: ``0x02000000 + i·0x200``, SPI
  ``33 + i``, at most 11 devices;
* create waits up to 10 s (``LIBXL_INIT_TIMEOUT``) for backend ``state`` to
  equal 2 exactly, and fails the create the way libxl does;
* destroy is libxl's forced removal: remove the frontend dir, write
  ``online=0`` and ``state=5`` in one transaction, wait 10 s for 6, then remove
  the dirs (or, for a driver-domain backend, wait for the backend to remove its
  own dir), and release the domain (``@releaseDomain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog
import trio

from virtio_diskd.ioreq.xenstore.client import XenstoreClient, XenstoreOps
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

log = structlog.get_logger("virtio_diskd.toolstack")

LIBXL_INIT_TIMEOUT = 10.0
LIBXL_DESTROY_TIMEOUT = 10.0
#: how late the toolstack reads a state node after its watch fired (see _wait_state)
REACTION_S = 0.02
GUEST_VIRTIO_MMIO_BASE = 0x02000000
VIRTIO_MMIO_DEV_SIZE = 0x200
GUEST_VIRTIO_MMIO_SPI_FIRST = 33
GUEST_VIRTIO_MMIO_SPI_LAST = 43
XENBUS_INIT_WAIT = 2
XENBUS_CLOSING = 5
XENBUS_CLOSED = 6


class ToolstackError(Exception):
    """What libxl would report as a failed operation."""


async def _path_cleanup(tx: XenstoreOps, path: str) -> None:
    """``libxl__xs_path_cleanup``: remove ``path`` and then every parent left empty."""
    await _rm_quietly(tx, path)
    parent = path.rsplit("/", 1)[0]
    while parent.count("/") > 1:
        try:
            if await tx.directory(parent):
                return
        except XenstoreError as exc:
            if exc.errno != errno.ENOENT:
                raise
        await _rm_quietly(tx, parent)
        parent = parent.rsplit("/", 1)[0]


async def _rm_quietly(tx: XenstoreOps, path: str) -> None:
    """libxl's ``xs_rm`` calls ignore their result (a missing parent is ENOENT)."""
    try:
        await tx.rm(path)
    except XenstoreError as exc:
        if exc.errno not in (errno.ENOENT,):
            raise


def vdev_to_devid(vdev: str) -> int:
    """``libxl__device_disk_dev_number``: the devid libxl derives from a vdev name."""
    if vdev.isdigit():
        return int(vdev)
    match = re.fullmatch(r"xvd([a-z]+)([0-9]*)|d([0-9]+)(?:p([0-9]+))?", vdev)
    if match:
        if match.group(1) is not None:
            disk = 0
            for ch in match.group(1):
                disk = disk * 26 + (ord(ch) - ord("a") + 1)
            disk -= 1
            part = int(match.group(2)) if match.group(2) else 0
        else:
            disk = int(match.group(3))
            part = int(match.group(4)) if match.group(4) else 0
        if disk <= 15 and part <= 15:
            return (202 << 8) | (disk << 4) | part
        if disk < (1 << 20) and part <= 255:
            return (1 << 28) | (disk << 8) | part
        raise ToolstackError(f"invalid vdev {vdev!r}")
    match = re.fullmatch(r"hd([a-d])([0-9]*)", vdev)
    if match:
        disk = ord(match.group(1)) - ord("a")
        part = int(match.group(2)) if match.group(2) else 0
        if part <= 63:
            return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part
    match = re.fullmatch(r"sd([a-p])([0-9]*)", vdev)
    if match:
        disk = ord(match.group(1)) - ord("a")
        part = int(match.group(2)) if match.group(2) else 0
        if part <= 15:
            return (8 << 8) | (disk << 4) | part
    raise ToolstackError(f"invalid vdev {vdev!r}")


@dataclass(frozen=True)
class DiskSpec:
    """One ``disk = [...]`` entry with ``specification=virtio``."""

    target: str
    vdev: str = "xvda"
    access: str = "rw"  # "rw" or "ro"
    backend_domid: int = 0
    grant_usage: bool | None = None  # None: libxl's default, backend_domid != 0
    discard_enable: bool | None = None  # None: libxl's default, read-write disks only
    direct_io_safe: bool = False
    device_type: str = "disk"

    @property
    def devid(self) -> int:
        return vdev_to_devid(self.vdev)


@dataclass
class GuestSpec:
    """What ``xl create`` reads from a guest config, as far as disks are concerned."""

    domid: int
    name: str
    disks: list[DiskSpec] = field(default_factory=list)
    vcpus: int = 1
    memory_mb: int = 256


@dataclass(frozen=True)
class DiskPaths:
    backend: str
    frontend: str
    libxl: str
    base: int
    irq: int
    devid: int
    backend_domid: int


class Toolstack:
    """libxl's side of the virtio disk contract, driven over xenstore.

    ``xen_version`` selects the flavour: before (4, 19) no ``grant_usage``
    node is written.  ``on_domain_built`` / ``on_domain_destroyed`` let the
    simulated hypervisor create and kill the domain at the points libxl does.
    """

    def __init__(self, xs: XenstoreClient, *, xen_version: tuple[int, int] = (4, 19),
                 init_timeout: float = LIBXL_INIT_TIMEOUT,
                 destroy_timeout: float = LIBXL_DESTROY_TIMEOUT,
                 devices: dict[int, list[DiskPaths]] | None = None) -> None:
        self.xs = xs
        self.xen_version = xen_version
        self.init_timeout = init_timeout
        self.destroy_timeout = destroy_timeout
        self.devices: dict[int, list[DiskPaths]] = {} if devices is None else devices

    # -- create ------------------------------------------------------------------

    def plan(self, guest: GuestSpec) -> list[DiskPaths]:
        """Allocate paths, MMIO windows and SPIs as libxl_arm.c does."""
        if len(guest.disks) > GUEST_VIRTIO_MMIO_SPI_LAST - GUEST_VIRTIO_MMIO_SPI_FIRST + 1:
            raise ToolstackError("Ran out of reserved range for Virtio MMIO IRQ")
        seen: set[int] = set()
        plans = []
        for index, disk in enumerate(guest.disks):
            devid = disk.devid
            if devid in seen:
                raise ToolstackError(f"duplicate vdev {disk.vdev}")
            seen.add(devid)
            be, fe = disk.backend_domid, guest.domid
            plans.append(DiskPaths(
                backend=f"/local/domain/{be}/backend/virtio_disk/{fe}/{devid}",
                frontend=f"/local/domain/{fe}/device/virtio_disk/{devid}",
                libxl=f"/libxl/{fe}/device/virtio_disk/{devid}",
                base=GUEST_VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_DEV_SIZE,
                irq=GUEST_VIRTIO_MMIO_SPI_FIRST + index,
                devid=devid,
                backend_domid=be,
            ))
        return plans

    def backend_entries(self, guest: GuestSpec, disk: DiskSpec, paths: DiskPaths,
                        ) -> list[tuple[str, str]]:
        """The backend nodes in libxl's order (``device_disk_add``)."""
        rw = disk.access == "rw"
        discard = disk.discard_enable if disk.discard_enable is not None else rw
        entries = [
            ("params", disk.target),
            ("frontend-id", str(guest.domid)),
            ("online", "1"),
            ("removable", "0"),
            ("bootable", "1"),
            ("state", "1"),
            ("dev", disk.vdev),
            ("type", "standalone"),
            ("mode", "w" if rw else "r"),
            ("device-type", disk.device_type),
        ]
        if disk.direct_io_safe:
            entries.append(("direct-io-safe", "1"))
        entries += [
            ("discard-enable", "1" if discard else "0"),
            ("specification", "virtio"),
            ("transport", "mmio"),
            ("base", str(paths.base)),
            ("irq", str(paths.irq)),
        ]
        if self.xen_version >= (4, 19):
            grants = disk.grant_usage if disk.grant_usage is not None else disk.backend_domid != 0
            entries.append(("grant_usage", "1" if grants else "0"))
        return entries

    async def create(self, guest: GuestSpec,
                     on_domain_built: Callable[[GuestSpec, list[DiskPaths]], Awaitable[None]]
                     | None = None) -> list[DiskPaths]:
        """``xl create``: build the domain, add its disks, wait for InitWait.

        On a timeout the domain is destroyed again and :class:`ToolstackError`
        is raised with libxl's message.
        """
        plans = self.plan(guest)
        await self._make_domain(guest)
        self.devices[guest.domid] = plans
        if on_domain_built is not None:
            await on_domain_built(guest, plans)
        for disk, paths in zip(guest.disks, plans, strict=True):
            await self._add_device(guest, disk, paths)
        failed: list[str] = []
        async with trio.open_nursery() as nursery:
            for paths in plans:
                nursery.start_soon(self._wait_init, paths, failed)
        if failed:
            log.error("toolstack.create_failed", domid=guest.domid, devices=failed)
            await self.destroy(guest.domid)
            raise ToolstackError(f"unable to add device with path {failed[0]}")
        log.info("toolstack.created", domid=guest.domid, name=guest.name, disks=len(plans))
        return plans

    async def attach(self, guest: GuestSpec, disk: DiskSpec) -> DiskPaths:
        """``xl block-attach``: one more disk for a running guest, in the next MMIO
        window and SPI; waits for InitWait like :meth:`create` (the device's nodes
        are left for the caller to clean up on a timeout)."""
        known = self.devices.setdefault(guest.domid, [])
        everything = [*guest.disks, disk]
        paths = self.plan(dataclasses.replace(guest, disks=everything))[-1]
        guest.disks.append(disk)
        known.append(paths)
        await self._add_device(guest, disk, paths)
        failed: list[str] = []
        await self._wait_init(paths, failed)
        if failed:
            raise ToolstackError(f"unable to add device with path {failed[0]}")
        log.info("toolstack.attached", domid=guest.domid, vdev=disk.vdev, devid=paths.devid)
        return paths

    async def _make_domain(self, guest: GuestSpec) -> None:
        d = guest.domid
        home = f"/local/domain/{d}"
        ro = ["n0", f"r{d}"]
        rw = [f"n{d}"]

        async def body(tx: XenstoreOps) -> None:
            await _rm_quietly(tx, home)
            for path, perms in ((home, ro), (f"{home}/device", ro), (f"{home}/control", ro),
                                (f"{home}/data", rw), (f"{home}/drivers", rw),
                                (f"{home}/feature", rw), (f"{home}/error", rw)):
                await tx.mkdir(path)
                await tx.set_perms(path, perms)
            await tx.write(f"{home}/name", guest.name)
            await tx.write(f"{home}/domid", str(d))
            await tx.write(f"{home}/memory/target", str(guest.memory_mb * 1024))
            await tx.write(f"{home}/cpu/availability", "online")
            await tx.mkdir(f"/libxl/{d}")
            await tx.set_perms(f"/libxl/{d}", ["n0"])

        await self.xs.transact(body)
        await self.xs.introduce_domain(d)

    async def _add_device(self, guest: GuestSpec, disk: DiskSpec, paths: DiskPaths) -> None:
        be, fe = paths.backend_domid, guest.domid
        back = self.backend_entries(guest, disk, paths)
        front = [("backend-id", str(be)), ("state", "1"), ("virtual-device", str(paths.devid)),
                 ("device-type", disk.device_type)]
        front_perms = [f"n{fe}", f"r{be}"]
        ro_front_perms = [f"n{be}", f"r{fe}"]
        backend_perms = [f"n{be}", f"r{fe}"]

        async def body(tx: XenstoreOps) -> None:
            await _rm_quietly(tx, paths.frontend)
            await tx.mkdir(paths.frontend)
            await tx.set_perms(paths.frontend, front_perms)
            await tx.write(f"{paths.frontend}/backend", paths.backend)
            for key, value in front:
                await tx.write(f"{paths.frontend}/{key}", value)
                await tx.set_perms(f"{paths.frontend}/{key}", front_perms)
            await tx.write(f"{paths.frontend}/trusted", "1")
            await tx.set_perms(f"{paths.frontend}/trusted", ro_front_perms)
            await _rm_quietly(tx, paths.backend)
            await tx.mkdir(paths.backend)
            await tx.set_perms(paths.backend, backend_perms)
            await tx.write(f"{paths.backend}/frontend", paths.frontend)
            for key, value in back:
                await tx.write(f"{paths.backend}/{key}", value)
            await _rm_quietly(tx, paths.libxl)
            await tx.mkdir(paths.libxl)
            await tx.write(f"{paths.libxl}/frontend", paths.frontend)
            await tx.write(f"{paths.libxl}/backend", paths.backend)
            for key, value in back:
                await tx.write(f"{paths.libxl}/{key}", value)

        await self.xs.transact(body)
        log.info("toolstack.device_added", domid=fe, devid=paths.devid, backend=paths.backend)

    async def _wait_state(self, path: str, wanted: int, timeout: float) -> bool:
        """libxl's devstate watch: True once ``path/state`` equals ``wanted`` exactly."""
        with trio.move_on_after(timeout):
            async with self.xs.watch(f"{path}/state") as events:
                async for _event in events:
                    # libxl reads the node when its event loop gets to the watch
                    # event, which on a busy Dom0 is later than the backend's next
                    # write: a backend must not count on being read at once
                    await trio.sleep(REACTION_S)
                    state = await self.xs.read_or_none(f"{path}/state")
                    if state is None:  # as libxl: "wanted state N but it was removed"
                        log.error("toolstack.state_removed", backend=path, wanted=wanted)
                        return False
                    if state.strip() == str(wanted):
                        return True
        return False

    async def _wait_init(self, paths: DiskPaths, failed: list[str]) -> None:
        if not await self._wait_state(paths.backend, XENBUS_INIT_WAIT, self.init_timeout):
            failed.append(paths.backend)

    # -- destroy ------------------------------------------------------------------

    async def destroy(self, domid: int,
                      on_domain_destroyed: Callable[[int], Awaitable[None]] | None = None,
                      ) -> list[str]:
        """``xl destroy``: forced removal of every device, then the domain.

        Returns the backend paths that did not reach Closed in time (libxl logs
        "unable to remove device" for those and removes the nodes anyway).
        """
        plans = self.devices.pop(domid, [])
        stuck: list[str] = []
        async with trio.open_nursery() as nursery:
            for paths in plans:
                nursery.start_soon(self._remove_device, paths, stuck)
        if on_domain_destroyed is not None:
            await on_domain_destroyed(domid)

        async def body(tx: XenstoreOps) -> None:
            await _rm_quietly(tx, f"/local/domain/{domid}")
            await _rm_quietly(tx, f"/libxl/{domid}")

        await self.xs.transact(body)
        with contextlib.suppress(OSError):  # already released (the hypervisor told xenstored)
            await self.xs.release_domain(domid)
        log.info("toolstack.destroyed", domid=domid, stuck=stuck)
        return stuck

    async def _remove_device(self, paths: DiskPaths, stuck: list[str]) -> None:
        """libxl's order (``libxl_device.c``): ``online=0`` and Closing; wait to read
        Closed; for a driver domain's backend, wait up to 10 s for the driver domain
        to remove its own dir; then remove the frontend and libxl dirs (and Dom0's
        backend dir)."""
        async def initiate(tx: XenstoreOps) -> bool:
            state = await tx.read_or_none(f"{paths.backend}/state")
            if state is None:
                await _rm_quietly(tx, paths.frontend)
                return False
            await tx.write(f"{paths.backend}/online", "0")
            if state.strip() != str(XENBUS_CLOSED):
                await tx.write(f"{paths.backend}/state", str(XENBUS_CLOSING))
            return True

        initiated = await self.xs.transact(initiate)
        if initiated and not await self._wait_state(paths.backend, XENBUS_CLOSED,
                                                    self.destroy_timeout):
            log.error("toolstack.unable_to_remove_device", backend=paths.backend)
            stuck.append(paths.backend)

        if initiated and paths.backend_domid != 0 and paths.backend not in stuck:
            # libxl's device_hotplug for a driver domain's backend: wait (10 s) for
            # the driver domain to remove its dir, before libxl__device_destroy
            removed = False
            with trio.move_on_after(self.destroy_timeout):
                async with self.xs.watch(paths.backend) as events:
                    async for _event in events:
                        if not await self.xs.exists(paths.backend):
                            removed = True
                            break
            if not removed:
                log.error("toolstack.backend_dir_not_removed", backend=paths.backend)
                stuck.append(paths.backend)

        async def cleanup(tx: XenstoreOps) -> None:
            await _path_cleanup(tx, paths.frontend)
            await _path_cleanup(tx, paths.libxl)
            if paths.backend_domid == 0:  # a driver domain removes its own
                await _path_cleanup(tx, paths.backend)

        await self.xs.transact(cleanup)
