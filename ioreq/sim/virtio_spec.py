"""The virtio rules the simulated guest driver checks the device against, in its own copy.

Written from the virtio 1.2 specification (§2.7 split and packed rings, §4.2.2
the virtio-mmio registers, §5.2 the block device), not imported from
``virtio_diskd.backend``: a driver that shared the device's constants and its
``vring_need_event`` would agree with the device's mistakes instead of catching
them.  ``tests/test_layout.py`` keeps the simulator from importing the backend.
"""

from __future__ import annotations

# §4.2.2 MMIO device register layout (version 2, plus the legacy registers of §4.2.4).
MAGIC_VALUE = 0x74726976  # "virt", little-endian
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_DEVICE_FEATURES = 0x010
REG_DEVICE_FEATURES_SEL = 0x014
REG_DRIVER_FEATURES = 0x020
REG_DRIVER_FEATURES_SEL = 0x024
REG_GUEST_PAGE_SIZE = 0x028  # legacy
REG_QUEUE_SEL = 0x030
REG_QUEUE_NUM_MAX = 0x034
REG_QUEUE_NUM = 0x038
REG_QUEUE_ALIGN = 0x03C  # legacy
REG_QUEUE_PFN = 0x040  # legacy
REG_QUEUE_READY = 0x044
REG_QUEUE_NOTIFY = 0x050
REG_INTERRUPT_STATUS = 0x060
REG_INTERRUPT_ACK = 0x064
REG_STATUS = 0x070
REG_QUEUE_DESC_LOW = 0x080
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_CONFIG_GENERATION = 0x0FC
CONFIG_OFFSET = 0x100

# §2.1 device status field.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

# §4.2.2 InterruptStatus bits.
INTERRUPT_VRING = 1
INTERRUPT_CONFIG = 2

# §6 reserved (transport) feature bits.
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34

# §2.7.5 / §2.8 descriptor and ring flags.
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
PACKED_DESC_F_AVAIL = 1 << 7
PACKED_DESC_F_USED = 1 << 15
USED_F_NO_NOTIFY = 1
RING_EVENT_FLAGS_ENABLE = 0
RING_EVENT_FLAGS_DISABLE = 1
RING_EVENT_FLAGS_DESC = 2

# §5.2 block device: id, feature bits, request types, status values, config layout.
DEVICE_ID_BLOCK = 2
BLK_F_SIZE_MAX = 1
BLK_F_SEG_MAX = 2
BLK_F_RO = 5
BLK_F_BLK_SIZE = 6
BLK_F_FLUSH = 9
BLK_F_TOPOLOGY = 10
BLK_F_CONFIG_WCE = 11
BLK_F_MQ = 12
BLK_F_DISCARD = 13
BLK_F_WRITE_ZEROES = 14
BLK_F_SECURE_ERASE = 16
BLK_T_IN = 0
BLK_T_OUT = 1
BLK_T_FLUSH = 4
BLK_T_GET_ID = 8
BLK_T_DISCARD = 11
BLK_T_WRITE_ZEROES = 13
BLK_T_SECURE_ERASE = 14
BLK_S_OK = 0
BLK_S_IOERR = 1
BLK_S_UNSUPP = 2
#: capacity (8) + size_max (4) + seg_max (4) + geometry (4) + blk_size (4) + topology (8)
BLK_CONFIG_WRITEBACK_OFFSET = 32


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10: notify iff ``event_idx`` lies in the window ``[old_idx, new_idx)``,
    computed modulo 2**16 as the specification's C expression is."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF
