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
from dataclasses import dataclass, field

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


class _Iocb(ctypes.Structure):
    """``struct iocb`` (linux/aio_abi.h), little-endian layout: 64 bytes."""

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        ("aio_key", ctypes.c_uint32),
        ("aio_rw_flags", ctypes.c_int32),
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class _IoEvent(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64), ("obj", ctypes.c_uint64),
                ("res", ctypes.c_int64), ("res2", ctypes.c_int64)]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _PyBuffer(ctypes.Structure):
    """``Py_buffer`` (stable ABI layout); only ``buf`` and ``len`` are read."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


assert ctypes.sizeof(_Iocb) == 64 and ctypes.sizeof(_IoEvent) == 32

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
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


@dataclass
class _Slot:
    token: int
    iocb: _Iocb
    iovecs: ctypes.Array[_Iovec]
    pinned: list[_PyBuffer] = field(default_factory=list)

    def unpin(self) -> None:
        for pinned in self.pinned:
            _release_buffer(ctypes.byref(pinned))
        self.pinned.clear()


class KernelAio:
    """One AIO context on ``fd``; completions bump ``eventfd``."""

    def __init__(self, fd: int, eventfd: int, depth: int, alignment: int) -> None:
        self.fd = fd
        self.eventfd = eventfd
        self.depth = depth
        self.alignment = alignment
        self._ctx = ctypes.c_ulong(0)
        _call("io_setup", depth, ctypes.byref(self._ctx))
        self._slots: dict[int, _Slot] = {}
        self._events = (_IoEvent * depth)()
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
        """Pin the buffers and build the iocb; :class:`NotEligible` if unaligned."""
        align = self.alignment
        if offset % align or length % align or not buffers:
            raise NotEligible
        slot = _Slot(token, _Iocb(), (_Iovec * len(buffers))())
        try:
            for i, buf in enumerate(buffers):
                pinned = _PyBuffer()
                flags = _PYBUF_SIMPLE if write else _PYBUF_WRITABLE
                try:
                    if _get_buffer(buf, ctypes.byref(pinned), flags) != 0:
                        raise NotEligible
                except (BufferError, TypeError) as exc:  # e.g. a read into read-only memory
                    raise NotEligible from exc
                slot.pinned.append(pinned)
                address = pinned.buf or 0
                if address % align or pinned.len % align:
                    raise NotEligible
                slot.iovecs[i].iov_base = address
                slot.iovecs[i].iov_len = pinned.len
        except BaseException:
            slot.unpin()
            raise
        iocb = slot.iocb
        iocb.aio_data = token
        iocb.aio_rw_flags = rw_flags
        iocb.aio_lio_opcode = IOCB_CMD_PWRITEV if write else IOCB_CMD_PREADV
        iocb.aio_fildes = self.fd
        iocb.aio_buf = ctypes.addressof(slot.iovecs)
        iocb.aio_nbytes = len(buffers)
        iocb.aio_offset = offset
        iocb.aio_flags = IOCB_FLAG_RESFD
        iocb.aio_resfd = self.eventfd
        return slot

    def submit(self, slots: list[_Slot]) -> int:
        """Hand ``slots`` to the kernel; returns how many it took (the rest: EAGAIN,
        the context is full).  Slots not taken are unpinned."""
        room = max(0, self.depth - len(self._slots))
        batch = slots[:room]
        taken = 0
        if batch:
            pointers = (ctypes.POINTER(_Iocb) * len(batch))(
                *[ctypes.pointer(slot.iocb) for slot in batch])
            for slot in batch:
                self._slots[slot.token] = slot
            try:
                taken = _call("io_submit", self._ctx, len(batch), pointers)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    for slot in batch:
                        del self._slots[slot.token]
                        slot.unpin()
                    raise
            for slot in batch[taken:]:
                del self._slots[slot.token]
        for slot in slots[taken:]:
            slot.unpin()
        return taken

    def reap(self, wait: float = 0.0) -> list[tuple[int, int]]:
        """Finished transfers as ``(token, result)``: bytes moved, or ``-errno``."""
        if not self._slots:
            return []
        if wait:
            timeout = (ctypes.c_long * 2)(int(wait), int((wait % 1) * 1e9))
            count = _call("io_getevents", self._ctx, 1, self.depth, self._events, timeout)
        else:
            count = _call("io_getevents", self._ctx, 0, self.depth, self._events,
                          self._zero_timeout)
        out = []
        for event in self._events[:count]:
            slot = self._slots.pop(int(event.data), None)
            if slot is not None:
                slot.unpin()
                out.append((slot.token, int(event.res)))
        return out

    def close(self) -> None:
        """Destroy the context (the kernel waits for transfers still running)."""
        if self._ctx.value:
            self._ring = None
            _call("io_destroy", self._ctx)
            self._ctx = ctypes.c_ulong(0)
        for slot in self._slots.values():
            slot.unpin()
        self._slots.clear()
