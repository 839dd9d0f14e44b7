"""The disk target: what ``params`` names — a raw image file or a block device.

Opened once with the access libxl asked for (``mode=r`` opens O_RDONLY, so
the kernel refuses writes too), optionally O_DIRECT.  Its size and block sizes
come from the target itself (BLKGETSIZE64, BLKSSZGET, BLKPBSZGET for block
devices), and so does what it can really do: punch-hole / zero-range for
files (probed beyond EOF, where they change nothing), BLKDISCARD /
BLKZEROOUT for block devices.  The device model offers only what is found
here.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from virtio_diskd.backend.disk.policy import TargetPolicy, TargetRefused
from virtio_diskd.backend.errors import VirtioDiskdError

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
BLKPBSZGET = 0x127B
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKFLSBUF = 0x1261

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
#: The unit of sizes and offsets on every Linux block device (and of virtio-blk sectors).
SECTOR = 512

#: ``statfs.f_type`` of the file systems that keep files in memory only (linux/magic.h)
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_fstatfs = _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int


def file_system_type(fd: int) -> int | None:
    """``fstatfs(fd).f_type`` (the first field of ``struct statfs``, a C long on every
    Linux), or None if it cannot be had; os.fstatvfs does not give it."""
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    if _fstatfs(fd, buffer) != 0:
        return None
    return int(ctypes.c_ulong.from_buffer(buffer).value) & 0xFFFFFFFF


@dataclass(frozen=True)
class DiskInfo:
    """What the disk layer can really do; features follow from it."""

    capacity_bytes: int
    logical_block_size: int = SECTOR
    physical_block_size: int = SECTOR
    read_only: bool = False
    can_discard: bool = False
    can_write_zeroes: bool = False
    write_zeroes_may_unmap: bool = False
    can_secure_erase: bool = False
    opt_io_bytes: int = 0


class TargetError(VirtioDiskdError):
    """The target cannot be served (missing, wrong type, refused); the reason is for operators."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with modes (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class TargetCapabilities:
    punch_hole: bool = False  # files: FALLOC_FL_PUNCH_HOLE; block devices: BLKDISCARD
    zero_range: bool = False  # files: FALLOC_FL_ZERO_RANGE; block devices: BLKZEROOUT


class DiskTarget:
    """An open disk target.  Close it with :meth:`close`."""

    def __init__(self, path: str, *, read_only: bool = False, direct: bool = False,
                 policy: TargetPolicy | None = None) -> None:
        self.path = path
        self.real_path = path  # what was opened, symlinks resolved (with a policy)
        self.read_only = read_only
        self.direct = direct
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TargetError(f"{path}: {exc.strerror}") from exc
        if stat.S_ISBLK(st.st_mode):
            self.is_block = True
        elif stat.S_ISREG(st.st_mode):
            self.is_block = False
        else:
            raise TargetError(f"{path}: neither a regular file nor a block device")
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.EINVAL and direct:
                raise TargetError(f"{path}: O_DIRECT is not supported here") from exc
            raise TargetError(f"{path}: cannot open {'read-only' if read_only else 'read-write'}:"
                              f" {exc.strerror}") from exc
        try:
            if policy is not None:
                try:
                    self.real_path = policy.check_open(self.fd, path)
                except TargetRefused as exc:
                    raise TargetError(str(exc)) from exc
            self._lock()
            self.logical_block_size, self.physical_block_size = self._block_sizes()
            self.size = self.current_size()
            self.capabilities = self._probe()
            #: a file on tmpfs or ramfs: reading it waits for no device (see the engine)
            self.memory_backed = not self.is_block and file_system_type(self.fd) in (
                TMPFS_MAGIC, RAMFS_MAGIC)
        except BaseException:
            os.close(self.fd)
            raise

    def _lock(self) -> None:
        """As QEMU's image locking: a writer holds the target exclusively, readers share
        it, so two devices — of one guest or of two, in any process — never both hold
        one disk writable (an advisory flock, released when the fd closes)."""
        try:
            fcntl.flock(self.fd, (fcntl.LOCK_SH if self.read_only else fcntl.LOCK_EX)
                        | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = "a device writes it" if self.read_only else "another device holds it"
            raise TargetError(f"{self.path}: locked, {holder}; a disk is writable by one "
                              f"device at a time") from exc

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> DiskTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _block_sizes(self) -> tuple[int, int]:
        if not self.is_block:
            return SECTOR, max(os.fstatvfs(self.fd).f_bsize, SECTOR)
        logical = struct.unpack("i", fcntl.ioctl(self.fd, BLKSSZGET, b"\0" * 4))[0]
        physical = struct.unpack("I", fcntl.ioctl(self.fd, BLKPBSZGET, b"\0" * 4))[0]
        return logical, physical

    def current_size(self) -> int:
        """Bytes usable by the guest now (rounded down to whole sectors)."""
        if self.is_block:
            size = int(struct.unpack("Q", fcntl.ioctl(self.fd, BLKGETSIZE64, b"\0" * 8))[0])
        else:
            size = os.fstat(self.fd).st_size
        return size // SECTOR * SECTOR

    def _probe(self) -> TargetCapabilities:
        if self.read_only:
            return TargetCapabilities()
        if self.is_block:
            queue = self._sysfs_queue()
            discard = _read_int(queue / "discard_max_bytes") > 0 if queue else False
            # BLKZEROOUT always works: the kernel writes zeroes when there is no offload.
            return TargetCapabilities(punch_hole=discard, zero_range=True)
        # Probe beyond EOF with KEEP_SIZE: the file's contents and size do not change.
        end = os.fstat(self.fd).st_size
        probe_at = (end + 65536) // 4096 * 4096
        punch = _try_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, probe_at)
        zero = _try_fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, probe_at)
        if zero and punch:  # give back the block zero-range allocated past EOF
            _try_fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, probe_at)
        return TargetCapabilities(punch_hole=punch, zero_range=zero)

    def _sysfs_queue(self) -> Path | None:
        rdev = os.fstat(self.fd).st_rdev
        base = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
        for candidate in (base / "queue", base / ".." / "queue"):
            if candidate.is_dir():
                return candidate
        return None

    def info(self, *, discard_enable: bool = True) -> DiskInfo:
        """What the device model may offer for this target."""
        caps = self.capabilities
        return DiskInfo(
            capacity_bytes=self.size,
            logical_block_size=self.logical_block_size,
            physical_block_size=max(self.physical_block_size, self.logical_block_size),
            read_only=self.read_only,
            can_discard=caps.punch_hole and discard_enable,
            can_write_zeroes=caps.zero_range or caps.punch_hole,
            write_zeroes_may_unmap=caps.punch_hole,
        )


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _try_fallocate(fd: int, mode: int, offset: int) -> bool:
    try:
        fallocate(fd, mode, offset, 4096)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
            return False
        raise
    return True
