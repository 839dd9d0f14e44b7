"""What outlives a worker process: per guest, the IOREQ server it holds in Xen, and
per device, the register file and the queues' in-flight logs.

A worker killed by anything (SIGKILL, a crash, an upgrade) leaves Xen holding
the guest's IOREQ server, its MMIO claims and the guest side of its event
channels; the guest's vCPUs wait on their next trapped access.  A successor that
finds these files takes over where the predecessor stopped (issue #15):

``<state_dir>/dom<D>/guest.json``
    the IOREQ server id and the windows it claims, per devid; written with an
    atomic rename when that changes (set-up and teardown only).
``<state_dir>/dom<D>/<devid>.state``
    mapped shared: a header, two slots for the register file record (JSON, with a
    sequence number and a CRC: a process killed while writing one leaves the other
    intact), and each queue's :class:`~virtio_diskd.backend.inflight.InflightLog`.
    The record changes on register writes that change state (driver set-up, a
    reset), never per request; the logs change per request, as memory stores.

The state directory is on tmpfs (under the run directory): it is for process
death, not for a host reboot, after which no guest is left to resume.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from virtio_diskd.backend.inflight import InflightLog, region_size

_MAGIC = 0x54534456  # "VDST"
_VERSION = 1
_HEADER = struct.Struct("<IHHII")  # magic, version, spare, queues, queue size; + max segs
_SLOT_OFFSETS = (4096, 4096 + 16384)
_SLOT_SIZE = 16384
_SLOT_HEAD = 16  # u64 seq, u32 length, u32 crc
_QUEUES_OFFSET = 4096 + 2 * 16384
_PAGE = 4096


def _round_up(value: int) -> int:
    return (value + _PAGE - 1) // _PAGE * _PAGE


@dataclass
class GuestRecord:
    """The guest's IOREQ server as Xen still holds it after our process is gone."""

    server: int
    windows: dict[int, tuple[int, int]] = field(default_factory=dict)  # devid -> (base, size)

    def to_json(self) -> str:
        return json.dumps({"server": self.server,
                           "windows": {str(d): list(w) for d, w in self.windows.items()}})

    @classmethod
    def from_json(cls, text: str) -> GuestRecord:
        data = json.loads(text)
        server = int(data["server"])
        if not 0 <= server < 256:
            raise ValueError(f"server id {server}")
        windows = {int(d): (int(w[0]), int(w[1])) for d, w in dict(data["windows"]).items()}
        return cls(server, windows)


class DeviceStateFile:
    """One device's register file record and in-flight logs (see the module docstring)."""

    def __init__(self, path: str, *, num_queues: int, queue_size: int, max_segments: int) -> None:
        self.path = path
        self.num_queues = num_queues
        self.queue_size = queue_size
        self.max_segments = max_segments
        self.queue_stride = _round_up(region_size(queue_size, max_segments))
        size = _QUEUES_OFFSET + num_queues * self.queue_stride
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            existing = os.fstat(fd).st_size
            if existing != size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.view = memoryview(self._map)
        #: False when the file was laid out for another device shape (nothing to resume)
        self.matches = existing == size and self._header_matches()
        if not self.matches:  # nothing of another layout may be read as ours
            self.view[:_QUEUES_OFFSET] = bytes(_QUEUES_OFFSET)
            _HEADER.pack_into(self.view, 0, _MAGIC, _VERSION, 0, num_queues, queue_size)
            struct.pack_into("<I", self.view, _HEADER.size, max_segments)
        self._seqs = [self.view[off : off + 8].cast("Q") for off in _SLOT_OFFSETS]
        self._last_saved = ""
        self._logs: dict[int, InflightLog] = {}

    def _header_matches(self) -> bool:
        magic, version, _spare, queues, size = _HEADER.unpack_from(self.view, 0)
        max_segments = struct.unpack_from("<I", self.view, _HEADER.size)[0]
        return (magic, version, queues, size, max_segments) == (
            _MAGIC, _VERSION, self.num_queues, self.queue_size, self.max_segments)

    # -- the register file record ------------------------------------------------------

    def load(self) -> dict[str, Any] | None:
        """The newest intact record, or None."""
        best: tuple[int, dict[str, Any]] | None = None
        for index, offset in enumerate(_SLOT_OFFSETS):
            seq = int(self._seqs[index][0])
            length, crc = struct.unpack_from("<II", self.view, offset + 8)
            if not seq or length > _SLOT_SIZE - _SLOT_HEAD:
                continue
            data = bytes(self.view[offset + _SLOT_HEAD : offset + _SLOT_HEAD + length])
            if zlib.crc32(data) != crc:
                continue
            with contextlib.suppress(ValueError):
                record = json.loads(data)
                if isinstance(record, dict) and (best is None or seq > best[0]):
                    best = (seq, record)
        return best[1] if best is not None else None

    def save(self, record: dict[str, Any]) -> None:
        """Write ``record`` into the older slot; its sequence number goes last."""
        text = json.dumps(record, sort_keys=True)
        if text == self._last_saved:
            return
        data = text.encode()
        if len(data) > _SLOT_SIZE - _SLOT_HEAD:
            raise ValueError(f"device record of {len(data)} bytes does not fit")
        seqs = [int(s[0]) for s in self._seqs]
        target = 0 if seqs[0] <= seqs[1] else 1
        offset = _SLOT_OFFSETS[target]
        self._seqs[target][0] = 0  # invalid while being written
        self.view[offset + _SLOT_HEAD : offset + _SLOT_HEAD + len(data)] = data
        struct.pack_into("<II", self.view, offset + 8, len(data), zlib.crc32(data))
        self._seqs[target][0] = max(seqs) + 1
        self._last_saved = text

    # -- in-flight logs ------------------------------------------------------------------

    def log(self, queue: int) -> InflightLog | None:
        if not 0 <= queue < self.num_queues:
            return None
        log = self._logs.get(queue)
        if log is None:
            start = _QUEUES_OFFSET + queue * self.queue_stride
            log = InflightLog(self.view[start : start + self.queue_stride], self.queue_size,
                              self.max_segments)
            self._logs[queue] = log
        return log

    def close(self) -> None:
        self._logs.clear()
        with contextlib.suppress(BufferError):
            for seq in self._seqs:
                seq.release()
            self.view.release()
        with contextlib.suppress(BufferError):  # a log view still held: the GC closes it
            self._map.close()


class GuestState:
    """The state directory of one guest."""

    def __init__(self, root: str, domid: int) -> None:
        self.dir = os.path.join(root, f"dom{domid}")
        self.guest_path = os.path.join(self.dir, "guest.json")

    def reclaim(self) -> bool:
        """Take the directory and its files back from a predecessor that changed user
        (``--worker-user``): root without capabilities cannot look into another
        user's 0700 directory.  Needs CAP_CHOWN; True if anything changed owner."""
        try:
            info = os.stat(self.dir)
        except FileNotFoundError:
            return False
        uid, gid = os.geteuid(), os.getegid()
        if info.st_uid == uid:
            return False
        os.chown(self.dir, uid, gid, follow_symlinks=False)  # first: then it can look in
        for name in os.listdir(self.dir):
            os.chown(os.path.join(self.dir, name), uid, gid, follow_symlinks=False)
        return True

    def hand_over_order(self) -> list[str]:
        """The directory's files, then the directory: the order to give them to another
        user in (:meth:`reclaim` takes them back in the reverse one), since once the
        directory is another user's, root without capabilities cannot look into it."""
        if not os.path.isdir(self.dir):
            return []
        names = sorted(os.listdir(self.dir))
        return [*(os.path.join(self.dir, name) for name in names), self.dir]

    def load_guest(self) -> GuestRecord | None:
        try:
            with open(self.guest_path, encoding="utf-8") as file:
                return GuestRecord.from_json(file.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save_guest(self, record: GuestRecord) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        temporary = self.guest_path + ".new"
        with open(temporary, "w", encoding="utf-8") as file:
            file.write(record.to_json())
        os.replace(temporary, self.guest_path)

    def device_path(self, devid: int) -> str:
        return os.path.join(self.dir, f"{devid}.state")

    def has_device(self, devid: int) -> bool:
        return os.path.exists(self.device_path(devid))

    def open_device(self, devid: int, *, num_queues: int, queue_size: int,
                    max_segments: int) -> DeviceStateFile:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        return DeviceStateFile(self.device_path(devid), num_queues=num_queues,
                               queue_size=queue_size, max_segments=max_segments)

    def remove_device(self, devid: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.device_path(devid))

    def remove(self) -> None:
        """The guest's server is gone (destroyed, or the guest died): forget it all."""
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dir, name))
            # PermissionError: a worker that changed user; its supervisor removes it
            with contextlib.suppress(PermissionError):
                os.rmdir(self.dir)


def saved_guests(root: str) -> list[int]:
    """Guests with a state directory under ``root``."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(int(n[3:]) for n in names if n.startswith("dom") and n[3:].isdigit())
