"""What the disk engine executes: a disk operation and its outcome, in the disk's terms.

The engine knows files, offsets and buffers, not virtio: a request says what
to do (:class:`IoKind`) and where, and the engine fills in an :class:`IoStatus`.
Translating a virtio-blk request into a :class:`DiskRequest`, and its status
back into the byte the guest reads, is :mod:`virtio_diskd.backend.blk`'s job.
"""

from __future__ import annotations

import enum


class IoKind(enum.IntEnum):
    """What the disk engine must do for a request."""

    READ = 0
    WRITE = 1
    FLUSH = 2
    DISCARD = 3
    WRITE_ZEROES = 4
    SECURE_ERASE = 5


class IoStatus(enum.IntEnum):
    """How a request ended."""

    OK = 0
    IO_ERROR = 1  # the target failed it (EIO, ENOSPC, EROFS, a short read at EOF …)
    UNSUPPORTED = 2  # the target cannot do this kind of operation


class DiskRequest:
    """One disk operation; ``status`` and ``written`` are filled in by the engine.

    A plain slotted class rather than a dataclass: one is built per guest
    request on the hot path (the virtio-blk request extends it).
    """

    __slots__ = ("buffers", "cancelled", "durable", "kind", "length", "offset", "ranges",
                 "status", "written")

    def __init__(self, kind: IoKind, offset: int = 0, length: int = 0) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.buffers: list[memoryview] = []
        self.ranges: list[tuple[int, int, bool]] = []  # offset, length, unmap
        self.durable = False  # writethrough: on stable storage before completion
        self.status = IoStatus.OK
        self.written = 0
        #: Set by the owner when the result no longer matters (the guest reset the device
        #: or its queue, or the device is torn down): the engine starts no more transfers
        #: for it — a transfer is at most ``TRANSFER_CHUNK`` bytes — and completes it
        #: with IO_ERROR, so the owner's wait for it is short and bounded.
        self.cancelled = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.kind.name}, offset={self.offset}, "
                f"length={self.length}, status={self.status.name})")
