"""An in-memory disk that executes :class:`~.blk.DiskRequest` synchronously.

The reference executor for the device model's tests and its cost benchmark:
no file, no threads, the same request contract as the real disk engine.
"""

from __future__ import annotations

from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.target import DiskInfo


class MemoryDisk:
    """A disk image held in a bytearray."""

    def __init__(self, size: int, *, read_only: bool = False, discard: bool = True) -> None:
        self.data = bytearray(size)
        self.read_only = read_only
        self.discard = discard
        self.flushes = 0
        self.executed: list[IoKind] = []

    def info(self) -> DiskInfo:
        return DiskInfo(capacity_bytes=len(self.data), read_only=self.read_only,
                        can_discard=self.discard, can_write_zeroes=self.discard,
                        write_zeroes_may_unmap=self.discard)

    def execute(self, request: DiskRequest) -> None:
        """Perform ``request`` and set its status."""
        self.executed.append(request.kind)
        kind = request.kind
        if kind == IoKind.READ:
            pos = request.offset
            for view in request.buffers:
                view[:] = self.data[pos : pos + len(view)]
                pos += len(view)
        elif kind == IoKind.WRITE:
            if self.read_only:
                request.status = IoStatus.IO_ERROR
                return
            pos = request.offset
            for view in request.buffers:
                self.data[pos : pos + len(view)] = view
                pos += len(view)
        elif kind == IoKind.FLUSH:
            self.flushes += 1
        else:
            for offset, length, _unmap in request.ranges:
                self.data[offset : offset + length] = bytes(length)
        request.status = IoStatus.OK
