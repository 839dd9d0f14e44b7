"""The whole stack in one test process: simulated hypervisor (threads) and guest,
IOREQ server + block devices on trio, a disk engine on a real file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import trio

from virtio_diskd.backend.blk import BlkOptions, BlockRequest
from virtio_diskd.backend.disk.engine import DiskEngine, DiskIo
from virtio_diskd.backend.disk.target import DiskTarget
from virtio_diskd.daemon.tools.simrun import make_image
from virtio_diskd.ioreq.blockdev import BlockDevice
from virtio_diskd.ioreq.guest_mapping import ForeignGuestMemory, GrantGuestMemory
from virtio_diskd.ioreq.server import IoreqServer
from virtio_diskd.ioreq.sim.hypervisor import Guest, Hypervisor
from virtio_diskd.ioreq.xen.simulated import SimPlatform

BASE = 0x02000000


@dataclass
class Stack:
    hv: Hypervisor
    guest: Guest
    platform: SimPlatform
    server: IoreqServer
    devices: list[BlockDevice] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    memories: list[object] = field(default_factory=list)


async def start_stack(nursery: trio.Nursery, tmp: Path, *, disks: int = 1, vcpus: int = 1,
                      grants: bool = False, disk_mib: int = 16, memory_mib: int = 64,
                      options: BlkOptions | None = None, domid: int = 5,
                      poll_us: float = 0.0, disk_io: DiskIo | None = None,
                      direct: bool = False) -> Stack:
    hv = Hypervisor()
    sock = str(tmp / "hv.sock")
    hv.serve(sock)
    guest = hv.create_guest(domid, memory_mib << 20, vcpus)
    platform = SimPlatform(sock, 0)
    memories: list[object] = []

    def invalidate() -> None:
        for memory in memories:
            memory.invalidate()  # type: ignore[attr-defined]

    server = IoreqServer(platform, domid, on_invalidate=invalidate, poll_us=poll_us)
    server.start()
    stack = Stack(hv, guest, platform, server, memories=memories)
    for i in range(disks):
        image = tmp / f"disk{i}.img"
        make_image(str(image), disk_mib << 20)
        stack.images.append(image)
        target = DiskTarget(str(image), direct=direct)
        engine = DiskEngine[BlockRequest](target, name=f"xvd{chr(97 + i)}", io=disk_io)
        if grants:
            memory: object = GrantGuestMemory(platform.gnttab(), domid, platform.barrier)
        else:
            memory = ForeignGuestMemory(platform.foreignmemory(), domid, platform.barrier)
        memories.append(memory)
        device = BlockDevice(domid=domid, devid=51712 + 16 * i, name=f"xvd{chr(97 + i)}",
                             irq=33 + i, memory=memory, engine=engine,  # type: ignore[arg-type]
                             dm=server.dm,
                             options=options or BlkOptions(serial=f"sim-{i}",
                                                           access_platform=grants))
        server.add_window(BASE + 0x200 * i, 0x200, device, device.name)
        stack.devices.append(device)
        nursery.start_soon(device.run)
    nursery.start_soon(server.serve)
    return stack


async def stop_stack_in(nursery: trio.Nursery, stack: Stack, timeout: float = 10.0) -> None:
    """Cancel the stack's tasks in ``nursery``, wait until they have ended, then close
    its handles.  Closing right after the cancel raced a task that an fd had already
    woken: it ran on and read a closed event channel (EBADF) instead of seeing the
    cancellation."""
    nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True), trio.move_on_after(timeout):
        while any(task is not trio.lowlevel.current_task() for task in nursery.child_tasks):
            await trio.sleep(0.001)
    stop_stack(stack)


def stop_stack(stack: Stack) -> None:
    stack.server.close()
    for device in stack.devices:
        device.close()
    stack.hv.close()
    for image in stack.images:
        if image.exists():
            os.unlink(image)
