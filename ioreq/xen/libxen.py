"""ctypes bindings to Xen's stable device-model libraries (Debian: libxen*1).

libxendevicemodel.so.1, libxenforeignmemory.so.1, libxenevtchn.so.1 and
libxengnttab.so.1.  libxenctrl, whose ABI changes with every release, only for
the Dom0 driver-domain helper's one call (:class:`LibxenDomainControl`), found by
its unversioned name.
Signatures are declared in full (handles and pointers as ``c_void_p``: the
default ``c_int`` would truncate 64-bit pointers); ``domid_t`` and
``ioservid_t`` are u16, ``evtchn_port_t`` u32, ``xen_pfn_t`` u64.

Errors: every failing call raises :class:`XenError` with the errno the library
left; ``ENOSYS`` from the device-model calls is reported as what it means on
Arm — a hypervisor built without ``CONFIG_IOREQ_SERVER``.  Opening a handle
without ``/dev/xen`` says so plainly.  Each handle is closed exactly once, and
a half-built :class:`LibxenPlatform` object never leaks one.
"""

from __future__ import annotations

import ctypes
import errno
import os
from ctypes import POINTER, byref, c_int, c_uint, c_uint16, c_uint32, c_uint64, c_void_p
from typing import Any

from virtio_diskd.ioreq import sharedlib
from virtio_diskd.ioreq.xen.barrier import full_barrier
from virtio_diskd.ioreq.xen.interface import PROT_WRITE, XenError
from virtio_diskd.ioreq.xen.memmap import view_at

PAGE = 4096
LIBRARIES = {
    "devicemodel": "libxendevicemodel.so.1",
    "foreignmemory": "libxenforeignmemory.so.1",
    "evtchn": "libxenevtchn.so.1",
    "gnttab": "libxengnttab.so.1",
    "toolcore": "libxentoolcore.so.1",
    # soname carries the Xen release (libxenctrl.so.4.17): found by sharedlib
    "ctrl": "xenctrl",
}

_SIGNATURES: dict[str, dict[str, tuple[Any, list[Any]]]] = {
    "devicemodel": {
        "xendevicemodel_open": (c_void_p, [c_void_p, c_uint]),
        "xendevicemodel_close": (c_int, [c_void_p]),
        "xendevicemodel_nr_vcpus": (c_int, [c_void_p, c_uint16, POINTER(c_uint)]),
        "xendevicemodel_create_ioreq_server": (c_int, [c_void_p, c_uint16, c_int,
                                                       POINTER(c_uint16)]),
        "xendevicemodel_set_ioreq_server_state": (c_int, [c_void_p, c_uint16, c_uint16, c_int]),
        "xendevicemodel_map_io_range_to_ioreq_server": (
            c_int, [c_void_p, c_uint16, c_uint16, c_int, c_uint64, c_uint64]),
        "xendevicemodel_unmap_io_range_from_ioreq_server": (
            c_int, [c_void_p, c_uint16, c_uint16, c_int, c_uint64, c_uint64]),
        "xendevicemodel_destroy_ioreq_server": (c_int, [c_void_p, c_uint16, c_uint16]),
        "xendevicemodel_set_irq_level": (c_int, [c_void_p, c_uint16, c_uint, c_uint]),
    },
    "foreignmemory": {
        "xenforeignmemory_open": (c_void_p, [c_void_p, c_uint]),
        "xenforeignmemory_close": (c_int, [c_void_p]),
        "xenforeignmemory_map": (c_void_p, [c_void_p, c_uint32, c_int, ctypes.c_size_t,
                                            POINTER(c_uint64), POINTER(c_int)]),
        "xenforeignmemory_unmap": (c_int, [c_void_p, c_void_p, ctypes.c_size_t]),
        "xenforeignmemory_map_resource": (
            c_void_p, [c_void_p, c_uint16, c_uint, c_uint, ctypes.c_ulong, ctypes.c_ulong,
                       POINTER(c_void_p), c_int, c_int]),
        "xenforeignmemory_unmap_resource": (c_int, [c_void_p, c_void_p]),
    },
    "evtchn": {
        "xenevtchn_open": (c_void_p, [c_void_p, c_uint]),
        "xenevtchn_close": (c_int, [c_void_p]),
        "xenevtchn_fd": (c_int, [c_void_p]),
        "xenevtchn_bind_interdomain": (c_int, [c_void_p, c_uint32, c_uint32]),
        "xenevtchn_unbind": (c_int, [c_void_p, c_uint32]),
        "xenevtchn_notify": (c_int, [c_void_p, c_uint32]),
        "xenevtchn_unmask": (c_int, [c_void_p, c_uint32]),
    },
    "gnttab": {
        "xengnttab_open": (c_void_p, [c_void_p, c_uint]),
        "xengnttab_close": (c_int, [c_void_p]),
        "xengnttab_set_max_grants": (c_int, [c_void_p, c_uint32]),
        "xengnttab_map_domain_grant_refs": (c_void_p, [c_void_p, c_uint32, c_uint32,
                                                       POINTER(c_uint32), c_int]),
        "xengnttab_unmap": (c_int, [c_void_p, c_void_p, c_uint32]),
    },
    "toolcore": {
        "xentoolcore_restrict_all": (c_int, [c_uint16]),
    },
    "ctrl": {
        "xc_interface_open": (c_void_p, [c_void_p, c_void_p, c_uint]),
        "xc_interface_close": (c_int, [c_void_p]),
        "xc_domain_set_target": (c_int, [c_void_p, c_uint32, c_uint32]),
    },
}

_loaded: dict[str, ctypes.CDLL] = {}


def load(kind: str) -> ctypes.CDLL:
    """Load one library and declare its signatures (cached)."""
    lib = _loaded.get(kind)
    if lib is not None:
        return lib
    name = LIBRARIES[kind]
    if ".so" not in name:
        name = sharedlib.find(name)
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise XenError(errno.ENOENT, f"{name} is not installed (Debian package "
                       f"{name.split('.so')[0]}1): {exc}") from exc
    for symbol, (restype, argtypes) in _SIGNATURES[kind].items():
        function = getattr(lib, symbol)
        function.restype = restype
        function.argtypes = argtypes
    _loaded[kind] = lib
    return lib


def _fail(call: str, *, ioreq: bool = False) -> XenError:
    code = ctypes.get_errno() or errno.EIO
    if code == errno.ENOSYS and ioreq:
        return XenError(code, f"{call}: the hypervisor has no IOREQ server support "
                        "(on Arm, rebuild Xen with CONFIG_EXPERT=y CONFIG_IOREQ_SERVER=y)")
    return XenError(code, f"{call}: {os.strerror(code)}")


def _open(kind: str) -> tuple[ctypes.CDLL, int]:
    lib = load(kind)
    prefix = {"devicemodel": "xendevicemodel", "foreignmemory": "xenforeignmemory",
              "evtchn": "xenevtchn", "gnttab": "xengnttab"}[kind]
    ctypes.set_errno(0)
    handle = getattr(lib, f"{prefix}_open")(None, 0)
    if not handle:
        code = ctypes.get_errno() or errno.ENOENT
        if not os.path.exists("/dev/xen") and not os.path.exists("/proc/xen/privcmd"):
            raise XenError(code, f"{prefix}_open: /dev/xen is absent — not running on Xen "
                           "(or the xen kernel modules are not loaded)")
        raise XenError(code, f"{prefix}_open: {os.strerror(code)}")
    return lib, int(handle)


class _Handle:
    def __init__(self, kind: str, close_symbol: str) -> None:
        self.lib, self.handle = _open(kind)
        self._close = getattr(self.lib, close_symbol)

    def close(self) -> None:
        if self.handle:
            self._close(self.handle)
            self.handle = 0


class LibxenDeviceModel(_Handle):
    def __init__(self) -> None:
        super().__init__("devicemodel", "xendevicemodel_close")

    def _call(self, symbol: str, *args: Any) -> None:
        if getattr(self.lib, symbol)(self.handle, *args) != 0:
            raise _fail(symbol, ioreq=True)

    def nr_vcpus(self, domid: int) -> int:
        count = c_uint(0)
        self._call("xendevicemodel_nr_vcpus", domid, byref(count))
        return count.value

    def create_ioreq_server(self, domid: int, handle_bufioreq: int = 0) -> int:
        server = c_uint16(0)
        self._call("xendevicemodel_create_ioreq_server", domid, handle_bufioreq, byref(server))
        return server.value

    def set_ioreq_server_state(self, domid: int, server: int, enabled: bool) -> None:
        self._call("xendevicemodel_set_ioreq_server_state", domid, server, int(enabled))

    def map_io_range_to_ioreq_server(self, domid: int, server: int, is_mmio: bool, start: int,
                                     end: int) -> None:
        self._call("xendevicemodel_map_io_range_to_ioreq_server", domid, server, int(is_mmio),
                   start, end)

    def unmap_io_range_from_ioreq_server(self, domid: int, server: int, is_mmio: bool,
                                         start: int, end: int) -> None:
        self._call("xendevicemodel_unmap_io_range_from_ioreq_server", domid, server,
                   int(is_mmio), start, end)

    def destroy_ioreq_server(self, domid: int, server: int) -> None:
        self._call("xendevicemodel_destroy_ioreq_server", domid, server)

    def set_irq_level(self, domid: int, irq: int, level: int) -> None:
        self._call("xendevicemodel_set_irq_level", domid, irq, level)


class _ForeignMapping:
    def __init__(self, lib: ctypes.CDLL, handle: int, address: int, pages: int,
                 writable: bool) -> None:
        self._lib, self._handle, self._address, self._pages = lib, handle, address, pages
        self.view = view_at(address, pages * PAGE, writable)

    def unmap(self) -> None:
        if self._pages:
            self.view.release()
            self._lib.xenforeignmemory_unmap(self._handle, self._address, self._pages)
            self._pages = 0


class _ResourceMapping:
    def __init__(self, lib: ctypes.CDLL, handle: int, resource: int, address: int,
                 frames: int) -> None:
        self._lib, self._handle, self._resource = lib, handle, resource
        self.view = view_at(address, frames * PAGE, True)

    def unmap(self) -> None:
        if self._resource:
            self.view.release()
            self._lib.xenforeignmemory_unmap_resource(self._handle, self._resource)
            self._resource = 0


class LibxenForeignMemory(_Handle):
    def __init__(self) -> None:
        super().__init__("foreignmemory", "xenforeignmemory_close")

    def map(self, domid: int, prot: int, gfns: list[int]) -> _ForeignMapping:
        array = (c_uint64 * len(gfns))(*gfns)
        address = self.lib.xenforeignmemory_map(self.handle, domid, prot, len(gfns), array, None)
        if not address:
            raise _fail("xenforeignmemory_map")
        return _ForeignMapping(self.lib, self.handle, address, len(gfns), bool(prot & PROT_WRITE))

    def map_resource(self, domid: int, resource_type: int, resource_id: int, frame: int,
                     nr_frames: int, prot: int) -> _ResourceMapping:
        address = c_void_p(None)
        resource = self.lib.xenforeignmemory_map_resource(
            self.handle, domid, resource_type, resource_id, frame, nr_frames, byref(address),
            prot, 0)
        if not resource or not address.value:
            raise _fail("xenforeignmemory_map_resource", ioreq=True)
        return _ResourceMapping(self.lib, self.handle, resource, address.value, nr_frames)


class LibxenEventChannels(_Handle):
    """Ports are read from the fd directly (non-blocking), as the kernel device allows:
    ``xenevtchn_pending`` would block in ``read``."""

    def __init__(self) -> None:
        super().__init__("evtchn", "xenevtchn_close")
        self._fd = int(self.lib.xenevtchn_fd(self.handle))
        os.set_blocking(self._fd, False)

    def fd(self) -> int:
        return self._fd

    def bind_interdomain(self, domid: int, remote_port: int) -> int:
        port = int(self.lib.xenevtchn_bind_interdomain(self.handle, domid, remote_port))
        if port < 0:
            raise _fail("xenevtchn_bind_interdomain")
        return port

    def unbind(self, port: int) -> None:
        if self.lib.xenevtchn_unbind(self.handle, port) != 0:
            raise _fail("xenevtchn_unbind")

    def notify(self, port: int) -> None:
        if self.lib.xenevtchn_notify(self.handle, port) != 0:
            raise _fail("xenevtchn_notify")

    def unmask(self, port: int) -> None:
        if self.lib.xenevtchn_unmask(self.handle, port) != 0:
            raise _fail("xenevtchn_unmask")

    def pending_ports(self) -> list[int]:
        try:
            data = os.read(self._fd, 4 * 64)  # the evtchn device returns whole ports
        except BlockingIOError:
            return []
        return list(memoryview(data[: len(data) & ~3]).cast("I"))


class _GrantMapping:
    def __init__(self, lib: ctypes.CDLL, handle: int, address: int, count: int,
                 writable: bool) -> None:
        self._lib, self._handle, self._address, self._count = lib, handle, address, count
        self.view = view_at(address, count * PAGE, writable)

    def unmap(self) -> None:
        if self._count:
            self.view.release()
            if self._lib.xengnttab_unmap(self._handle, self._address, self._count) != 0:
                raise _fail("xengnttab_unmap")
            self._count = 0


class LibxenGrantTables(_Handle):
    def __init__(self) -> None:
        super().__init__("gnttab", "xengnttab_close")

    def set_max_grants(self, count: int) -> None:
        if self.lib.xengnttab_set_max_grants(self.handle, count) != 0:
            raise _fail("xengnttab_set_max_grants")

    def map_domain_grant_refs(self, domid: int, refs: list[int], prot: int) -> _GrantMapping:
        array = (c_uint32 * len(refs))(*refs)
        address = self.lib.xengnttab_map_domain_grant_refs(self.handle, len(refs), domid, array,
                                                           prot)
        if not address:
            raise _fail("xengnttab_map_domain_grant_refs")
        return _GrantMapping(self.lib, self.handle, address, len(refs), bool(prot & PROT_WRITE))


class LibxenDomainControl:
    """:class:`~virtio_diskd.ioreq.xen.interface.DomainControl` through libxenctrl (Dom0)."""

    def __init__(self) -> None:
        self._lib = load("ctrl")
        ctypes.set_errno(0)
        handle = self._lib.xc_interface_open(None, None, 0)
        if not handle:
            raise _fail("xc_interface_open")
        self._handle: int | None = int(handle)

    def set_target(self, domid: int, target: int) -> None:
        ctypes.set_errno(0)
        if self._lib.xc_domain_set_target(self._handle, domid, target) != 0:
            raise _fail(f"xc_domain_set_target({domid}, {target})")

    def close(self) -> None:
        if self._handle is not None:
            self._lib.xc_interface_close(self._handle)
            self._handle = None


class LibxenPlatform:
    """:class:`~virtio_diskd.ioreq.xen.interface.XenPlatform` on a real Dom0 or driver domain."""

    def devicemodel(self) -> LibxenDeviceModel:
        return LibxenDeviceModel()

    def foreignmemory(self) -> LibxenForeignMemory:
        return LibxenForeignMemory()

    def evtchn(self) -> LibxenEventChannels:
        return LibxenEventChannels()

    def gnttab(self) -> LibxenGrantTables:
        handle = LibxenGrantTables()
        try:
            handle.set_max_grants(4096)
        except BaseException:
            handle.close()
            raise
        return handle

    def restrict(self, domid: int) -> None:
        ctypes.set_errno(0)
        if load("toolcore").xentoolcore_restrict_all(domid) != 0:
            raise _fail("xentoolcore_restrict_all")

    def barrier(self) -> None:
        full_barrier()
