"""The virtio-mmio register file (virtio 1.2 §4.2), as a pure state machine.

``read(offset, size) -> int`` and ``write(offset, size, value) -> [MmioEffect]``:
the IOREQ server hands every trapped access here and performs the effects
(notify a queue, raise the SPI, tell XenBus the driver is up …).  The device
itself (virtio-blk) plugs in through :class:`VirtioDevice`: its features and
its configuration space at 0x100.

Version 2 (modern) by default; version 1 (legacy: GuestPageSize, QueuePFN,
QueueAlign, 32 feature bits, guest-endian config) as an option for old guests.

Hostile drivers: control registers answer only 32-bit aligned accesses (others
read 0 and are ignored); QueueNum and the ring addresses cannot change while a
queue is ready; features cannot change after FEATURES_OK; a feature set the
device cannot accept leaves FEATURES_OK clear (the driver sees it and fails);
a queue that cannot be set up puts the device in DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from virtio_diskd.backend.guestmem import GuestMemory
from virtio_diskd.backend.inflight import InflightLog
from virtio_diskd.backend.virtqueue import Chain, PackedQueue, RingError, SplitQueue, Virtqueue

MAGIC_VALUE = 0x74726976  # "virt"
VENDOR_ID = 0x4B534456  # "VDSK"

# Registers (offsets into the device's window of WINDOW_SIZE bytes).
REG_MAGIC = 0x000
REG_VERSION = 0x004
REG_DEVICE_ID = 0x008
REG_VENDOR_ID = 0x00C
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
REG_QUEUE_DESC_HIGH = 0x084
REG_QUEUE_DRIVER_LOW = 0x090
REG_QUEUE_DRIVER_HIGH = 0x094
REG_QUEUE_DEVICE_LOW = 0x0A0
REG_QUEUE_DEVICE_HIGH = 0x0A4
REG_SHM_SEL = 0x0AC
REG_SHM_LEN_LOW = 0x0B0
REG_SHM_LEN_HIGH = 0x0B4
REG_SHM_BASE_LOW = 0x0B8
REG_SHM_BASE_HIGH = 0x0BC
REG_QUEUE_RESET = 0x0C0
REG_CONFIG_GENERATION = 0x0FC
CONFIG_OFFSET = 0x100
#: The one definition of a device's MMIO window size (libxl's VIRTIO_MMIO_DEV_SIZE).
WINDOW_SIZE = 0x200

# Device status bits (§2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

INTERRUPT_VRING = 1
INTERRUPT_CONFIG = 2

# Transport feature bits (§6).
F_INDIRECT_DESC = 28
F_EVENT_IDX = 29
F_VERSION_1 = 32
F_ACCESS_PLATFORM = 33
F_RING_PACKED = 34


# -- effects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueNotified:
    """The driver kicked ``queue``: process its available buffers (after answering)."""

    queue: int


@dataclass(frozen=True, slots=True)
class DriverOk:
    """The driver set DRIVER_OK: the device is live (XenBus → Connected)."""


@dataclass(frozen=True, slots=True)
class DeviceReset:
    """The driver reset the device: every queue is gone; drop in-flight completions."""


@dataclass(frozen=True, slots=True)
class QueueDisabled:
    """A queue was switched off (QueueReady ← 0); its in-flight completions are void."""

    queue: int


@dataclass(frozen=True, slots=True)
class NeedsReset:
    """The device entered DEVICE_NEEDS_RESET because of a driver error."""

    reason: str


@dataclass(frozen=True, slots=True)
class RaiseInterrupt:
    """Signal the guest (one edge on the device's SPI)."""


@dataclass(frozen=True, slots=True)
class ConfigWritten:
    """The driver wrote a writable configuration field."""

    offset: int


MmioEffect = QueueNotified | DriverOk | DeviceReset | QueueDisabled | NeedsReset | RaiseInterrupt \
    | ConfigWritten


class VirtioDevice(Protocol):
    """What a virtio device contributes to the transport."""

    device_id: int
    num_queues: int
    queue_size_max: int

    def device_features(self) -> int: ...

    def accept_features(self, features: int) -> bool: ...

    def config_space(self) -> bytes: ...

    def config_write(self, offset: int, data: bytes) -> bool:
        """Apply a driver write to config space; True if it changed anything."""
        ...

    def reset(self) -> None: ...

    def device_state(self) -> dict[str, Any]:
        """What of the device a successor must restore (driver-written config)."""
        ...

    def restore_device_state(self, state: dict[str, Any]) -> None: ...


class StateRecordError(ValueError):
    """A saved register file that cannot be this device's (another device, or damaged)."""


#: The register-file fields a successor restores (:meth:`MmioTransport.snapshot`).
#: InterruptStatus is left out on purpose: it changes per request, and a successor
#: raises a (harmless, possibly spurious) interrupt instead.
_SAVED_FIELDS = ("status", "config_generation", "device_features_sel", "driver_features_sel",
                 "driver_features", "negotiated", "queue_sel", "guest_page_size", "queue_align")


@dataclass(slots=True)
class QueueRegisters:
    """Per-queue register values as the driver wrote them."""

    num: int = 0
    ready: bool = False
    desc: int = 0
    driver: int = 0
    device: int = 0
    pfn: int = 0  # legacy


def _set_half(value: int, half: int, high: bool) -> int:
    if high:
        return (value & 0xFFFFFFFF) | (half << 32)
    return (value & ~0xFFFFFFFF) | half


@dataclass
class MmioTransport:
    """The register file of one virtio-mmio device."""

    model: VirtioDevice
    memory: GuestMemory
    legacy: bool = False
    status: int = 0
    interrupt_status: int = 0
    config_generation: int = 0
    device_features_sel: int = 0
    driver_features_sel: int = 0
    driver_features: int = 0
    negotiated: int = 0
    queue_sel: int = 0
    guest_page_size: int = 4096
    queue_align: int = 4096
    queue_regs: list[QueueRegisters] = field(default_factory=list)
    queues: list[Virtqueue | None] = field(default_factory=list)
    needs_reset_reason: str | None = None
    #: The in-flight log of queue N, for a successor after a crash (None: no log).
    inflight_log: Callable[[int], InflightLog | None] | None = None

    def __post_init__(self) -> None:
        self.queue_regs = [QueueRegisters() for _ in range(self.model.num_queues)]
        self.queues = [None] * self.model.num_queues

    # -- state --------------------------------------------------------------------

    @property
    def live(self) -> bool:
        """Buffers may be consumed: DRIVER_OK set, neither FAILED nor NEEDS_RESET."""
        return (self.status & (STATUS_DRIVER_OK | STATUS_NEEDS_RESET | STATUS_FAILED)
                == STATUS_DRIVER_OK)

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated >> bit & 1)

    def offered_features(self) -> int:
        features = self.model.device_features()
        if self.legacy:
            # Legacy devices have 32 feature bits and no modern-only rings.
            return features & 0xFFFFFFFF
        return features

    # -- reads --------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """The value the driver reads; 0 for accesses the spec does not allow."""
        if offset >= CONFIG_OFFSET:
            return self._config_read(offset - CONFIG_OFFSET, size)
        if size != 4 or offset % 4:
            return 0
        regs = self._selected()
        if offset == REG_INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == REG_STATUS:
            return self.status
        if offset == REG_MAGIC:
            return MAGIC_VALUE
        if offset == REG_VERSION:
            return 1 if self.legacy else 2
        if offset == REG_DEVICE_ID:
            return self.model.device_id
        if offset == REG_VENDOR_ID:
            return VENDOR_ID
        if offset == REG_DEVICE_FEATURES:
            if self.device_features_sel > 1 or (self.legacy and self.device_features_sel):
                return 0
            return (self.offered_features() >> (32 * self.device_features_sel)) & 0xFFFFFFFF
        if offset == REG_QUEUE_NUM_MAX:
            return self.model.queue_size_max if regs is not None else 0
        if offset == REG_QUEUE_READY and not self.legacy:
            return 1 if regs is not None and regs.ready else 0
        if offset == REG_QUEUE_PFN and self.legacy:
            return regs.pfn if regs is not None else 0
        if offset in (REG_SHM_LEN_LOW, REG_SHM_LEN_HIGH, REG_SHM_BASE_LOW, REG_SHM_BASE_HIGH):
            return 0xFFFFFFFF if not self.legacy else 0  # no shared memory regions
        if offset == REG_CONFIG_GENERATION and not self.legacy:
            return self.config_generation & 0xFFFFFFFF
        return 0  # write-only or reserved

    def _config_read(self, offset: int, size: int) -> int:
        config = self.model.config_space()
        if size not in (1, 2, 4, 8) or offset + size > len(config):
            return 0
        if not self.legacy and offset % min(size, 4):
            return 0
        return int.from_bytes(config[offset : offset + size], "little")

    # -- writes -------------------------------------------------------------------

    def write(self, offset: int, size: int, value: int) -> list[MmioEffect]:
        """Apply a driver write; returns what the caller must do about it."""
        if offset == REG_QUEUE_NOTIFY and size == 4:
            queue = value & 0xFFFF
            if queue < len(self.queues) and self.queues[queue] is not None and self.live:
                return [QueueNotified(queue)]
            return []
        if offset >= CONFIG_OFFSET:
            return self._config_write(offset - CONFIG_OFFSET, size, value)
        if size != 4 or offset % 4:
            return []
        value &= 0xFFFFFFFF
        if offset == REG_STATUS:
            return self._write_status(value)
        if offset == REG_INTERRUPT_ACK:
            self.interrupt_status &= ~value
            return []
        if offset == REG_QUEUE_SEL:
            self.queue_sel = value
            return []
        if offset == REG_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
            return []
        if offset == REG_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
            return []
        if offset == REG_DRIVER_FEATURES:
            if self.status & STATUS_FEATURES_OK or self.status & STATUS_DRIVER_OK:
                return []  # features are frozen once accepted
            if self.driver_features_sel == 0:
                self.driver_features = _set_half(self.driver_features, value, False)
            elif self.driver_features_sel == 1 and not self.legacy:
                self.driver_features = _set_half(self.driver_features, value, True)
            return []
        if self.legacy and offset in (REG_GUEST_PAGE_SIZE, REG_QUEUE_ALIGN):
            if value and not value & (value - 1):
                if offset == REG_GUEST_PAGE_SIZE:
                    self.guest_page_size = value
                else:
                    self.queue_align = value
            return []
        regs = self._selected()
        if regs is None:
            return []
        if offset == REG_QUEUE_NUM:
            if not regs.ready:
                regs.num = value
            return []
        if self.legacy:
            if offset == REG_QUEUE_PFN:
                return self._write_legacy_pfn(regs, value)
            return []
        if offset == REG_QUEUE_READY:
            return self._write_queue_ready(regs, value & 1)
        if regs.ready:
            return []  # ring addresses cannot move under a ready queue
        if offset in (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH):
            regs.desc = _set_half(regs.desc, value, offset == REG_QUEUE_DESC_HIGH)
        elif offset in (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH):
            regs.driver = _set_half(regs.driver, value, offset == REG_QUEUE_DRIVER_HIGH)
        elif offset in (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH):
            regs.device = _set_half(regs.device, value, offset == REG_QUEUE_DEVICE_HIGH)
        return []

    def _selected(self) -> QueueRegisters | None:
        if self.queue_sel < len(self.queue_regs):
            return self.queue_regs[self.queue_sel]
        return None

    def _config_write(self, offset: int, size: int, value: int) -> list[MmioEffect]:
        if size not in (1, 2, 4, 8) or (not self.legacy and offset % min(size, 4)):
            return []
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self.model.config_write(offset, data):
            return [ConfigWritten(offset)]
        return []

    def _write_status(self, value: int) -> list[MmioEffect]:
        if value == 0:
            return self.reset()
        old = self.status
        new = old | (value & ~STATUS_NEEDS_RESET)  # status bits are never cleared but by reset
        effects: list[MmioEffect] = []
        if not self.legacy and new & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            if self._features_acceptable():
                self.negotiated = self.driver_features
            else:
                new &= ~STATUS_FEATURES_OK
        if new & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            if self.legacy:
                if not self._features_acceptable():
                    self.status = new & ~STATUS_DRIVER_OK
                    return self.needs_reset("legacy driver accepted features never offered")
                self.negotiated = self.driver_features
            elif not new & STATUS_FEATURES_OK:
                self.status = new & ~STATUS_DRIVER_OK
                return self.needs_reset("DRIVER_OK set without FEATURES_OK")
            effects.append(DriverOk())
        self.status = new
        return effects

    def _features_acceptable(self) -> bool:
        features = self.driver_features
        if features & ~self.offered_features():
            return False
        if not self.legacy and not features >> F_VERSION_1 & 1:
            return False
        return self.model.accept_features(features)

    def _make_queue(self, index: int, regs: QueueRegisters, desc: int, driver: int,
                    device: int, *, fresh: bool = True) -> Virtqueue:
        event_idx = self.has_feature(F_EVENT_IDX)
        indirect = self.has_feature(F_INDIRECT_DESC)
        packed = self.has_feature(F_RING_PACKED)
        if regs.num > self.model.queue_size_max or regs.num == 0:
            raise RingError(f"queue size {regs.num} outside 1..{self.model.queue_size_max}")
        log = self.inflight_log(index) if self.inflight_log is not None else None
        if log is not None and fresh:
            log.format(packed)
        if packed:
            return PackedQueue(self.memory, regs.num, desc, driver, device,
                               event_idx=event_idx, indirect=indirect, log=log)
        return SplitQueue(self.memory, regs.num, desc, driver, device,
                          event_idx=event_idx, indirect=indirect, log=log)

    def _ring_addresses(self, regs: QueueRegisters) -> tuple[int, int, int]:
        if not self.legacy:
            return regs.desc, regs.driver, regs.device
        desc = regs.pfn * self.guest_page_size
        avail = desc + 16 * regs.num
        align = self.queue_align
        return desc, avail, (avail + 6 + 2 * regs.num + align - 1) // align * align

    # -- a successor's view ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything a successor needs to serve the driver on from here (JSON-able);
        taken when a register write changed it, never per request."""
        record: dict[str, Any] = {name: getattr(self, name) for name in _SAVED_FIELDS}
        record["legacy"] = self.legacy
        record["offered"] = self.offered_features()
        record["needs_reset_reason"] = self.needs_reset_reason
        record["queues"] = [asdict(regs) for regs in self.queue_regs]
        record["device"] = self.model.device_state()
        return record

    def restore(self, record: dict[str, Any]) -> dict[int, list[Chain]]:
        """Take over from a predecessor's :meth:`snapshot` and in-flight logs.

        Returns, per ready queue, the chains it had taken and not completed (to be
        executed again).  Raises :class:`StateRecordError` when the record is not
        this device's; a ring that cannot be taken over puts the device in
        DEVICE_NEEDS_RESET (the driver sees it, as after any ring error).
        """
        try:
            values = {name: int(record[name]) for name in _SAVED_FIELDS}
            queues = [QueueRegisters(num=int(q["num"]), ready=bool(q["ready"]),
                                     desc=int(q["desc"]), driver=int(q["driver"]),
                                     device=int(q["device"]), pfn=int(q["pfn"]))
                      for q in record["queues"]]
            reason = record.get("needs_reset_reason")
            legacy, offered = bool(record["legacy"]), int(record["offered"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateRecordError(f"saved register file is damaged: {exc!r}") from exc
        if legacy != self.legacy or len(queues) != len(self.queue_regs):
            raise StateRecordError("saved register file is for another transport layout")
        if values["negotiated"] & ~self.offered_features() or offered != self.offered_features():
            raise StateRecordError(
                f"features offered now ({self.offered_features():#x}) differ from those the "
                f"driver negotiated against ({offered:#x})")
        for name, value in values.items():
            setattr(self, name, value)
        self.needs_reset_reason = reason if isinstance(reason, str) else None
        self.model.restore_device_state(dict(record.get("device") or {}))
        self.queue_regs = queues
        self.queues = [None] * self.model.num_queues
        recovered: dict[int, list[Chain]] = {}
        for index, regs in enumerate(queues):
            if not regs.ready:
                continue
            regs.ready = False
            try:
                queue = self._make_queue(index, regs, *self._ring_addresses(regs), fresh=False)
                recovered[index] = queue.recover()
            except RingError as exc:
                self.needs_reset(f"queue {index} could not be taken over: {exc}")
                continue
            self.queues[index] = queue
            regs.ready = True
        return recovered

    def _write_queue_ready(self, regs: QueueRegisters, ready: int) -> list[MmioEffect]:
        index = self.queue_sel
        if not ready:
            return self._stop_queue(index)
        if regs.ready:
            return []
        if not self.status & STATUS_FEATURES_OK:
            return self.needs_reset(f"queue {index} enabled before FEATURES_OK")
        try:
            self.queues[index] = self._make_queue(index, regs, regs.desc, regs.driver,
                                                  regs.device)
        except RingError as exc:
            return self.needs_reset(f"queue {index}: {exc}")
        regs.ready = True
        return []

    def _write_legacy_pfn(self, regs: QueueRegisters, pfn: int) -> list[MmioEffect]:
        index = self.queue_sel
        if pfn == 0:
            regs.pfn = 0
            return self._stop_queue(index)
        if regs.ready:
            return []
        regs.pfn = pfn
        try:
            # legacy: the features in use from here on (validated again at DRIVER_OK)
            self.negotiated = self.driver_features & self.offered_features()
            self.queues[index] = self._make_queue(index, regs, *self._ring_addresses(regs))
        except RingError as exc:
            regs.pfn = 0
            return self.needs_reset(f"queue {index}: {exc}")
        regs.ready = True
        return []

    def _stop_queue(self, index: int) -> list[MmioEffect]:
        queue = self.queues[index]
        self.queue_regs[index].ready = False
        if queue is None:
            return []
        queue.release()
        self.queues[index] = None
        return [QueueDisabled(index)]

    # -- device-initiated ------------------------------------------------------------

    def reset(self) -> list[MmioEffect]:
        """Device reset (Status ← 0): back to the power-on state."""
        for queue in self.queues:
            if queue is not None:
                queue.release()
        self.queues = [None] * self.model.num_queues
        self.queue_regs = [QueueRegisters() for _ in range(self.model.num_queues)]
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = self.negotiated = 0
        self.queue_sel = 0
        self.needs_reset_reason = None
        self.model.reset()
        return [DeviceReset()]

    def signal_used(self) -> list[MmioEffect]:
        """Used buffers were published: interrupt status bit 0 and one edge."""
        self.interrupt_status |= INTERRUPT_VRING
        return [RaiseInterrupt()]

    def config_changed(self) -> list[MmioEffect]:
        """Configuration changed (e.g. capacity): new generation, config interrupt."""
        self.config_generation += 1
        if not self.status & STATUS_DRIVER_OK:
            return []
        self.interrupt_status |= INTERRUPT_CONFIG
        return [RaiseInterrupt()]

    def needs_reset(self, reason: str) -> list[MmioEffect]:
        """Stop the device until the driver resets it (§2.1.2)."""
        if self.status & STATUS_NEEDS_RESET:
            return []
        self.needs_reset_reason = reason
        self.status |= STATUS_NEEDS_RESET
        effects: list[MmioEffect] = [NeedsReset(reason)]
        if self.status & STATUS_DRIVER_OK:
            effects += self.config_changed()
        return effects

