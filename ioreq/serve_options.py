"""The daemon-wide choices every device a worker creates is made with.

Its own module, light on imports, because the supervisor carries these options to
its workers without ever serving a device itself: it must not pay for importing
the device model to start (``virtio-diskd bench --suite start``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from virtio_diskd.backend.disk.policy import TargetPolicy
from virtio_diskd.backend.disk.storage_rules import StorageRules


@dataclass(frozen=True)
class ServeOptions:
    """Daemon-wide choices for the devices it creates."""

    direct_io: bool = False
    io_workers: int | None = None  # None: 4 on the page cache, 32 with O_DIRECT
    num_queues: int = 1
    queue_size: int = 256
    packed_ring: bool = True
    legacy_mmio: bool = False
    poll_us: float = 0.0
    seg_max: int | None = None  # None: queue_size - 2
    size_max: int = 1 << 20
    target_policy: TargetPolicy = field(default_factory=TargetPolicy)
    #: image formats and NBD exports by target (issue #17)
    storage: StorageRules = field(default_factory=StorageRules)
    #: where an image's qemu-storage-daemon listens (it outlives a restarted worker)
    storage_dir: str | None = None
    #: restrict the worker's Xen handles to its guest once its devices are set up
    confine: bool = True
    #: in a driver domain, how long to wait for Dom0 to grant the device-model right
    #: (:mod:`virtio_diskd.ioreq.driver_domain`); libxl's InitWait deadline is 10 s
    target_wait: float = 6.0
    #: where device state outlives the worker (issue #15); None: nowhere (no resume)
    state_dir: str | None = None
