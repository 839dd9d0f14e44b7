"""Linux native AIO (``io_submit``) for O_DIRECT targets, through ctypes.

Why: with O_DIRECT every request waits on the device, so the queue depth the
device sees is the number of requests in flight.  Threads give that depth at
the price of a thread wake-up per request and a completion post per request;
in a VM a wake-up costs tens of µs of CPU (``bench`` measures it).  One
``io_submit`` hands a whole batch to the kernel; each completion bumps the
engine's eventfd (``IOCB_FLAG_RESFD``) and ``io_getevents`` reaps them all at
once — what QEMU calls ``aio=native``.  (io_uring would be the modern choice,
but the PyPI bindings are unusable here: see python-ecosystem.md §2.)

Only the syscalls are here; the engine decides what goes through AIO and
what falls back to its threads (unaligned buffers, flushes, fault injection).

Buffers are pinned with ``PyObject_GetBuffer`` from submission to completion,
so a guest mapping cannot be released under a transfer the kernel still does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

from virtio_diskd.backend.errors import VirtioDiskdError

# Syscall numbers (asm-generic for aarch64; x86_64's own table).
_SYSCALLS = {
    "x86_64": {"io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209},
    "aarch64": {"io_setup": 0, "io_destroy": 1, "io_submit": 2, "io_getevents": 4},
}
IOCB_CMD_PREADV = 7
IOCB_CMD_PWRITEV = 8
IOCB_FLAG_RESFD = 1
_AIO_RING_MAGIC = 0xA10A10A1
_PYBUF_SIMPLE = 0
_PYBUF_WRITABLE = 1


#: ``struct iocb`` (linux/aio_abi.h), little-endian: data, key, rw_flags, opcode,
#: reqprio, fildes, buf, nbytes, offset, reserved2, flags, resfd — 64 bytes
_IOCB = struct.Struct("<QIiHhIQQqQII")
#: ``struct io_event``: data, obj, res, res2
_IO_EVENT = struct.Struct("<QQqq")
#: ``struct iovec``: base, len
_IOVEC = struct.Struct("<QQ")
#: the head of a ``Py_buffer`` (stable ABI layout): buf, obj, len
_PY_BUFFER_HEAD = struct.Struct("<QQq")
_PY_BUFFER_SIZE = 80  # sizeof(Py_buffer) on 64-bit: buf obj len itemsize readonly ndim
#                       format shape strides suboffsets internal
#: buffers per request with room reserved in the pools; a request with more gets
#: memory of its own
_INLINE_BUFFERS = 4

assert _IOCB.size == 64 and _IO_EVENT.size == 32 and _IOVEC.size == 16
assert ctypes.sizeof(ctypes.c_void_p) == 8  # the layouts above are the 64-bit ones


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# Py_buffers are passed by address: they live in preallocated pools
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.c_void_p]
_release_buffer.restype = None


_NUMBERS = _SYSCALLS.get(platform.machine())


def _call(name: str, *args: object) -> int:
    assert _NUMBERS is not None  # KernelAio.open checks the architecture first
    result = int(_syscall(_NUMBERS[name], *args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{name}: {os.strerror(code)}")
    return result


class NotEligible(VirtioDiskdError):
    """This transfer cannot go through AIO as it is (unaligned): use the threads."""


class _Slot:
    """One transfer prepared or in the kernel: its iocb, iovecs and pinned buffers live
    in the context's pools at ``index`` (or, for more than ``_INLINE_BUFFERS``
    buffers, in ``own``).  A context makes one per pool entry and reuses it."""

    __slots__ = ("index", "iocb_address", "own", "pins", "token")

    def __init__(self, index: int, iocb_address: int) -> None:
        self.token = 0
        self.index = index
        self.iocb_address = iocb_address
        self.pins: list[int] = []  # addresses of the Py_buffers holding the buffers
        self.own: ctypes.Array[ctypes.c_char] | None = None

    def unpin(self) -> None:
        for pinned in self.pins:
            _release_buffer(pinned)
        self.pins.clear()


class KernelAio:
    """One AIO context on ``fd``; completions bump ``eventfd``.

    Per transfer, everything the kernel reads is written with ``struct`` into memory
    allocated once (iocbs, iovecs, Py_buffers, the pointer array ``io_submit`` takes):
    a ctypes object per field and per transfer cost more CPU than the transfer's
    syscall share."""

    def __init__(self, fd: int, eventfd: int, depth: int, alignment: int) -> None:
        self.fd = fd
        self.eventfd = eventfd
        self.depth = depth
        self.alignment = alignment
        self._ctx = ctypes.c_ulong(0)
        _call("io_setup", depth, ctypes.byref(self._ctx))
        self._slots: dict[int, _Slot] = {}
        self._iocbs = (ctypes.c_char * (_IOCB.size * depth))()
        self._iovecs = (ctypes.c_char * (_IOVEC.size * _INLINE_BUFFERS * depth))()
        self._pins = (ctypes.c_char * (_PY_BUFFER_SIZE * _INLINE_BUFFERS * depth))()
        # the pools' addresses, looked up once: prepare() adds offsets to them
        self._iocbs_address = ctypes.addressof(self._iocbs)
        self._iovecs_address = ctypes.addressof(self._iovecs)
        self._pins_address = ctypes.addressof(self._pins)
        self._pointers = (ctypes.c_uint64 * depth)()
        self._events = (ctypes.c_char * (_IO_EVENT.size * depth))()
        self._free = list(range(depth - 1, -1, -1))  # pool indices not in use
        self._slot_at = [_Slot(index, self._iocbs_address + _IOCB.size * index)
                         for index in range(depth)]
        self._zero_timeout = (ctypes.c_long * 2)(0, 0)
        # struct aio_ring's header: id, nr, head, tail, magic (the context id is its address)
        ring = (ctypes.c_uint32 * 5).from_address(self._ctx.value)
        self._ring: ctypes.Array[ctypes.c_uint32] | None = (
            ring if ring[4] == _AIO_RING_MAGIC else None)

    @classmethod
    def open(cls, fd: int, eventfd: int, depth: int, alignment: int) -> KernelAio | None:
        """A context, or None where the kernel or architecture has no AIO for us."""
        if _NUMBERS is None:
            return None
        try:
            return cls(fd, eventfd, depth, alignment)
        except OSError as exc:
            if exc.errno in (errno.ENOSYS, errno.EAGAIN, errno.EINVAL, errno.EPERM):
                return None
            raise

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    @property
    def has_events(self) -> bool:
        """Completions are waiting in the kernel's ring (a memory read, no syscall)."""
        ring = self._ring
        if ring is None:
            return bool(self._slots)  # unknown: let the caller reap
        return bool(ring[2] != ring[3])  # head != tail

    def prepare(self, token: int, write: bool, buffers: list[memoryview], offset: int,
                length: int, rw_flags: int) -> _Slot:
        """Pin the buffers and build the iocb; :class:`NotEligible` if unaligned (or
        every pool entry is taken: the threads do it)."""
        align = self.alignment
        count = len(buffers)
        if offset % align or length % align or not count or not self._free:
            raise NotEligible
        index = self._free.pop()
        slot = self._slot_at[index]
        slot.token = token
        if count <= _INLINE_BUFFERS:
            pins, pins_at = self._pins, _PY_BUFFER_SIZE * _INLINE_BUFFERS * index
            iovecs, iovecs_at = self._iovecs, _IOVEC.size * _INLINE_BUFFERS * index
            pins_base, iovecs_base = self._pins_address, self._iovecs_address
        else:
            own = slot.own = (ctypes.c_char * ((_PY_BUFFER_SIZE + _IOVEC.size) * count))()
            pins, pins_at = own, 0
            iovecs, iovecs_at = own, _PY_BUFFER_SIZE * count
            pins_base = iovecs_base = ctypes.addressof(own)
        pinned = pins_base + pins_at
        flags = _PYBUF_SIMPLE if write else _PYBUF_WRITABLE
        pinned_now = slot.pins
        try:
            for buf in buffers:
                try:
                    if _get_buffer(buf, pinned, flags) != 0:
                        raise NotEligible
                except (BufferError, TypeError) as exc:  # e.g. a read into read-only memory
                    raise NotEligible from exc
                pinned_now.append(pinned)
                address, _obj, size = _PY_BUFFER_HEAD.unpack_from(pins, pins_at)
                if address % align or size % align:
                    raise NotEligible
                _IOVEC.pack_into(iovecs, iovecs_at, address, size)
                pinned += _PY_BUFFER_SIZE
                pins_at += _PY_BUFFER_SIZE
                iovecs_at += _IOVEC.size
        except BaseException:
            self._let_go(slot)
            raise
        _IOCB.pack_into(self._iocbs, _IOCB.size * index, token, 0, rw_flags,
                        IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV, 0, self.fd,
                        iovecs_base + iovecs_at - _IOVEC.size * count, count, offset, 0,
                        IOCB_FLAG_RESFD, self.eventfd)
        return slot

    def _let_go(self, slot: _Slot) -> None:
        """Unpin ``slot``'s buffers and give its pool entry back."""
        slot.unpin()
        slot.own = None
        self._free.append(slot.index)

    def submit(self, slots: list[_Slot]) -> int:
        """Hand ``slots`` to the kernel; returns how many it took (the rest: EAGAIN,
        the context is full).  Slots not taken are unpinned."""
        room = max(0, self.depth - len(self._slots))
        batch = slots[:room]
        taken = 0
        if batch:
            struct.pack_into(f"<{len(batch)}Q", self._pointers, 0,
                             *[slot.iocb_address for slot in batch])
            for slot in batch:
                self._slots[slot.token] = slot
            try:
                taken = _call("io_submit", self._ctx, len(batch), self._pointers)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # none was taken: every pool entry back
                    for slot in batch:
                        del self._slots[slot.token]
                    for slot in slots:
                        self._let_go(slot)
                    raise
            for slot in batch[taken:]:
                del self._slots[slot.token]
        for slot in slots[taken:]:
            self._let_go(slot)
        return taken

    def reap(self, wait: float = 0.0, limit: int = 0) -> list[tuple[int, int]]:
        """Finished transfers as ``(token, result)``: bytes moved, or ``-errno``; at
        most ``limit`` (0: all there are)."""
        if not self._slots:
            return []
        most = min(limit, self.depth) if limit > 0 else self.depth
        if wait:
            timeout = (ctypes.c_long * 2)(int(wait), int((wait % 1) * 1e9))
            count = _call("io_getevents", self._ctx, 1, most, self._events, timeout)
        else:
            count = _call("io_getevents", self._ctx, 0, most, self._events,
                          self._zero_timeout)
        out = []
        in_kernel, let_go = self._slots, self._let_go
        for token, _obj, result, _res2 in _IO_EVENT.iter_unpack(
                memoryview(self._events)[: _IO_EVENT.size * count]):
            slot = in_kernel.pop(token, None)
            if slot is not None:
                let_go(slot)
                out.append((token, result))
        return out

    def close(self) -> None:
        """Destroy the context (the kernel waits for transfers still running)."""
        if self._ctx.value:
            self._ring = None
            _call("io_destroy", self._ctx)
            self._ctx = ctypes.c_ulong(0)
        for slot in self._slots.values():
            self._let_go(slot)
        self._slots.clear()
