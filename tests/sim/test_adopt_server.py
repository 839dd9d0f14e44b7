"""A successor takes over the guest's IOREQ server (issue #15 item 2), on the simulated
hypervisor, which keeps a server and its claims when the emulator's process goes and
returns the guest side of its event channels to unbound, as Xen does."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import trio

from virtio_diskd.ioreq.server import HoldAnswer, IoreqServer
from virtio_diskd.ioreq.sim.hypervisor import Hypervisor
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.interface import XenError
from virtio_diskd.ioreq.xen.simulated import SimPlatform

BASE = 0x02000000


class Registers:
    def __init__(self, value: int) -> None:
        self.value = value
        self.writes: list[tuple[int, int]] = []

    def mmio_read(self, offset: int, size: int) -> int:
        return self.value

    def mmio_write(self, offset: int, size: int, value: int) -> HoldAnswer | None:
        self.writes.append((offset, value))
        return None

    def after_answer(self) -> None:
        pass


class KilledMidAccess:
    """A guest on the simulated hypervisor whose vCPU 0 made one register read that a
    first server took (the slot READY → INPROCESS) and never answered; ``vcpu_answers``
    gets the value the vCPU finally reads."""

    def __init__(self, tmp_path: Path) -> None:
        self.hv = Hypervisor()
        self.hv.serve(str(tmp_path / "hv.sock"))
        self.guest = self.hv.create_guest(5, 16 << 20, 1)
        self.platform = SimPlatform(str(tmp_path / "hv.sock"), 0)
        self.first = IoreqServer(self.platform, 5)
        self.vcpu_answers: list[int] = []
        vcpu, guest = self.guest.vcpus[0], self.guest
        self.reader = threading.Thread(target=lambda: self.vcpu_answers.append(
            vcpu.call(lambda: guest.mmio(BASE + 0x70, 4, False), 30)))

    async def take_the_access(self) -> memoryview:
        """The first server claims the window and takes the vCPU's read; its page."""
        self.first.start()
        self.first.add_window(BASE, 0x200, Registers(0xDEAD), "xvda")
        self.reader.start()
        with trio.fail_after(10):  # the access waits in the page: nobody serves it yet
            while abi.state_of(self.first.page, 0) != abi.STATE_IOREQ_READY:
                await trio.sleep(0.01)
        abi.set_state(self.first.page, 0, abi.STATE_IOREQ_INPROCESS)
        return self.first.page

    async def successor_serves(self, value: int) -> IoreqServer:
        """The first server dies (what it leaves: the server, its claim, its ports); a
        second adopts it and serves until the vCPU has its answer (``value`` is what
        the register reads now)."""
        server_id = self.first.server_id
        self.first.detach()
        second = IoreqServer(self.platform, 5)
        second.start(adopt=server_id)
        assert second.adopted and second.server_id == server_id
        second.adopt_window(BASE, 0x200, Registers(value), "xvda")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second.serve)
            with trio.fail_after(10):
                while not self.vcpu_answers:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(self.reader.join)
        return second


async def test_the_successor_answers_the_access_its_predecessor_took(tmp_path: Path) -> None:
    host = KilledMidAccess(tmp_path)
    try:
        await host.take_the_access()  # taken, then killed before its answer
        second = await host.successor_serves(0xBEEF)
        assert host.vcpu_answers == [0xBEEF]  # answered by the successor, the vCPU resumed

        # the claim is still the adopted server's: a new server could not take it
        third = IoreqServer(host.platform, 5)
        third.start()
        with pytest.raises(XenError):
            third.add_window(BASE, 0x200, Registers(0), "xvda")
        third.close()
        second.close()  # a real teardown this time: the claim goes with the server
        fourth = IoreqServer(host.platform, 5)
        fourth.start()
        fourth.add_window(BASE, 0x200, Registers(0), "xvda")
        fourth.close()
    finally:
        host.hv.close()


async def test_an_answer_its_predecessor_stored_but_never_signalled_reaches_the_vcpu(
        tmp_path: Path) -> None:
    """Killed between storing IORESP_READY and notifying the port: on Xen the vCPU
    sleeps in ``wait_for_io`` until that port is notified, whatever the slot says, so
    the successor must send the signal its predecessor did not."""
    host = KilledMidAccess(tmp_path)
    try:
        page = await host.take_the_access()
        abi.set_data(page, 0, 0xCAFE)
        abi.set_state(page, 0, abi.STATE_IORESP_READY)  # answered, killed before notify
        await trio.sleep(0.2)
        assert not host.vcpu_answers  # the vCPU is still asleep in Xen: nobody signalled it
        second = await host.successor_serves(0xBEEF)
        assert host.vcpu_answers == [0xCAFE]  # the predecessor's answer, not served again
        second.close()
    finally:
        host.hv.close()


async def test_a_server_xen_no_longer_has_is_created_again(tmp_path: Path) -> None:
    hv = Hypervisor()
    hv.serve(str(tmp_path / "hv.sock"))
    hv.create_guest(5, 16 << 20, 1)
    platform = SimPlatform(str(tmp_path / "hv.sock"), 0)
    try:
        server = IoreqServer(platform, 5)
        server.start(adopt=6)  # a stale record: no server 6
        assert not server.adopted
        server.adopt_window(BASE, 0x200, Registers(1), "xvda")  # claimed anew
        assert [w.base for w in server.windows] == [BASE]
        server.close()
    finally:
        hv.close()
