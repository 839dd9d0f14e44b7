"""Putting the Linux-like driver on a simulated guest: MMIO through vCPU traps, grant DMA.

* :class:`GuestBus`: the driver's register accesses become MMIO on the current
  vCPU — trapped by the simulated hypervisor and sent to whichever IOREQ
  server claims the window (or a data abort).
* :class:`GrantDma`: Linux's grant-DMA layer for ``grant_usage=1`` devices:
  consecutive grant refs per buffer, read-only for device-readable buffers,
  ``1<<63 | ref<<12 | offset`` addresses, revocation on unmap; a grant the
  backend still holds makes the device broken ("Grant still in use by backend
  domain, disabled for further use").
* :func:`attach_driver`: probe the device on vCPU 0 and route its SPI to the
  driver's interrupt handler.
"""

from __future__ import annotations

import weakref

from virtio_diskd.ioreq.sim.hypervisor import Guest
from virtio_diskd.ioreq.sim.linux_driver import DeviceBroken, GuestRam, VirtioBlkDriver
from virtio_diskd.ioreq.xen import abi

PAGE = 4096


class GuestBus:
    """A device's MMIO window as seen from guest code running on a vCPU."""

    def __init__(self, guest: Guest, base: int) -> None:
        self.guest = guest
        self.base = base

    def read(self, offset: int, size: int) -> int:
        return self.guest.mmio(self.base + offset, size, False)

    def write(self, offset: int, size: int, value: int) -> None:
        self.guest.mmio(self.base + offset, size, True, value)


class GrantDma:
    """The guest's grant-DMA ops towards backend domain ``backend``."""

    def __init__(self, guest: Guest, backend: int) -> None:
        self.guest = guest
        self.backend = backend
        self.granted = 0

    def map(self, phys: int, length: int, device_writable: bool) -> int:
        first = phys // PAGE
        pages = max((phys + length + PAGE - 1) // PAGE - first, 1)
        ref = self.guest.grant(list(range(first, first + pages)), self.backend,
                               readonly=not device_writable)
        self.granted += pages
        return abi.XEN_GRANT_DMA_ADDR_OFF | (ref << abi.XEN_PAGE_SHIFT) | (phys % PAGE)

    def unmap(self, dma: int, length: int) -> None:
        raw = dma & ~abi.XEN_GRANT_DMA_ADDR_OFF
        ref, offset = raw >> abi.XEN_PAGE_SHIFT, raw % PAGE
        pages = max((offset + length + PAGE - 1) // PAGE, 1)
        for i in range(pages):
            if not self.guest.end_access(ref + i):
                raise DeviceBroken(f"Grant still in use by backend domain {self.backend}, "
                                   "disabled for further use")


def attach_driver(guest: Guest, base: int, irq: int, *, grants: bool = False,
                  backend: int = 0, ram: GuestRam | None = None, timeout: float = 30.0,
                  **options: bool) -> VirtioBlkDriver:
    """Probe the virtio-mmio device at ``base`` from vCPU 0, as Linux does at boot."""
    ram = ram or guest_ram(guest)
    dma = GrantDma(guest, backend) if grants else None
    driver = VirtioBlkDriver(GuestBus(guest, base), ram, dma, grants=grants,
                             **options)
    guest.vcpus[0].call(driver.probe, timeout)

    def on_irq() -> None:
        driver.interrupt()

    guest.irq_handlers[irq] = on_irq
    return driver


_rams: weakref.WeakKeyDictionary[Guest, GuestRam] = weakref.WeakKeyDictionary()


def guest_ram(guest: Guest) -> GuestRam:
    """The guest kernel's page allocator: one per guest, shared by all its drivers so
    their allocations never overlap; it goes with the guest."""
    ram = _rams.get(guest)
    if ram is None:
        ram = _rams[guest] = GuestRam(guest.ram_view, guest.ram_base)
    return ram
