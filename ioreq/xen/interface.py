"""The one Python interface to Xen that the daemon uses.

Implemented by :mod:`.libxen` (ctypes bindings to Debian's stable
libxendevicemodel.so.1, libxenforeignmemory.so.1, libxenevtchn.so.1 and
libxengnttab.so.1 — never libxenctrl) and by the simulated hypervisor's
backend side (:mod:`virtio_diskd.ioreq.xen.simulated`), chosen by
configuration only.  The shapes follow the C libraries call for call, so the
IOREQ server code is the same on both.
"""

from __future__ import annotations

import mmap
from typing import Protocol

from virtio_diskd.backend.errors import VirtioDiskdError

PROT_READ = mmap.PROT_READ
PROT_WRITE = mmap.PROT_WRITE


class XenError(VirtioDiskdError, OSError):
    """A libxen* call failed; ``errno`` says why (ENOSYS: hypervisor without IOREQ)."""


class Mapping(Protocol):
    """Mapped memory (a foreign range, a resource or grants) until :meth:`unmap`."""

    @property
    def view(self) -> memoryview: ...

    def unmap(self) -> None: ...


class DeviceModel(Protocol):
    """libxendevicemodel."""

    def nr_vcpus(self, domid: int) -> int: ...

    def create_ioreq_server(self, domid: int, handle_bufioreq: int = 0) -> int: ...

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None: ...

    def map_io_range_to_ioreq_server(self, domid: int, server: int, is_mmio: bool,
                                     start: int, end: int) -> None:
        """``end`` is inclusive, as in Xen."""
        ...

    def unmap_io_range_from_ioreq_server(self, domid: int, server: int, is_mmio: bool,
                                         start: int, end: int) -> None: ...

    def destroy_ioreq_server(self, domid: int, server: int) -> None: ...

    def set_irq_level(self, domid: int, irq: int, level: int) -> None: ...

    def close(self) -> None: ...


class ForeignMemory(Protocol):
    """libxenforeignmemory."""

    def map(self, domid: int, prot: int, gfns: list[int]) -> Mapping: ...

    def map_resource(self, domid: int, resource_type: int, resource_id: int, frame: int,
                     nr_frames: int, prot: int) -> Mapping: ...

    def close(self) -> None: ...


class EventChannels(Protocol):
    """libxenevtchn: one handle, one pollable fd, many ports."""

    def fd(self) -> int: ...

    def bind_interdomain(self, domid: int, remote_port: int) -> int: ...

    def unbind(self, port: int) -> None: ...

    def notify(self, port: int) -> None: ...

    def pending_ports(self) -> list[int]:
        """The ports pending now, from one read (call after the fd polls readable; an
        empty list when none is).  Events that come later make the fd readable again,
        so a caller goes back to polling instead of reading until EAGAIN: on the trap
        path that is a system call and an exception saved per access."""
        ...

    def unmask(self, port: int) -> None: ...

    def close(self) -> None: ...


class GrantTables(Protocol):
    """libxengnttab."""

    def set_max_grants(self, count: int) -> None: ...

    def map_domain_grant_refs(self, domid: int, refs: list[int], prot: int) -> Mapping: ...

    def close(self) -> None: ...


class DomainControl(Protocol):
    """The one domain-control call a Dom0 makes for driver domains (libxenctrl)."""

    def set_target(self, domid: int, target: int) -> None:
        """``XEN_DOMCTL_set_target``: make ``domid`` privileged over ``target`` (device
        model rights under XSM's dummy policy).  Once per domain: Xen refuses a second
        target with EINVAL, and holds ``target`` until ``domid`` is destroyed."""

    def close(self) -> None: ...


class XenPlatform(Protocol):
    """Opens the four handles, and orders stores to shared memory."""

    def devicemodel(self) -> DeviceModel: ...

    def foreignmemory(self) -> ForeignMemory: ...

    def evtchn(self) -> EventChannels: ...

    def gnttab(self) -> GrantTables: ...

    def restrict(self, domid: int) -> None:
        """Confine every open handle to ``domid`` (``xentoolcore_restrict_all``): after
        it, a hypercall or mapping for any other domain fails with EPERM, and handles
        that cannot be restricted (libxencall's) are made useless.  Once per set of
        handles: an event-channel handle refuses a second restriction."""

    def barrier(self) -> None:
        """A full memory barrier (``dmb ish`` on Arm) between shared-memory stores."""
        ...
