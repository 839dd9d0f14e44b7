"""The IOREQ server's answer to every kind of slot Xen can hand it.

The simulated hypervisor only makes the accesses a virtio-mmio guest makes (1–8 byte
copies, INVALIDATE); Xen can put anything in a slot.  Here each slot is written as
Xen writes it (``abi.encode``, state last) and served by ``IoreqServer.handle``:
what the device saw, what the vCPU reads back, the slot's state, the notify."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from virtio_diskd.ioreq.server import IoreqServer, _Window
from virtio_diskd.ioreq.xen import abi

BASE = 0x0200_0000
PORT = 7


@dataclass(eq=False)  # hashed by identity, as the server keys devices
class RecordingDevice:
    reads: list[tuple[int, int]] = field(default_factory=list)
    writes: list[tuple[int, int, int]] = field(default_factory=list)
    answers_after: int = 0

    def mmio_read(self, offset: int, size: int) -> int:
        self.reads.append((offset, size))
        return 0x1122334455667788 & ((1 << (8 * size)) - 1)

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, size, value))

    def after_answer(self) -> None:
        self.answers_after += 1


class FakeEvents:
    def __init__(self) -> None:
        self.notified: list[int] = []

    def notify(self, port: int) -> None:
        self.notified.append(port)


class FakePlatform:
    def barrier(self) -> None:
        pass


@pytest.fixture
def served() -> tuple[IoreqServer, RecordingDevice, FakeEvents, list[int]]:
    server = IoreqServer(FakePlatform(), 3)  # type: ignore[arg-type]
    server.page = memoryview(bytearray(abi.PAGE_SIZE))
    events = FakeEvents()
    server.evtchn = events  # type: ignore[assignment]
    device = RecordingDevice()
    server.windows.append(_Window(BASE, 0x200, device, "xvda"))  # type: ignore[arg-type]
    invalidated: list[int] = []
    server.on_invalidate = lambda: invalidated.append(1)
    return server, device, events, invalidated


def put(server: IoreqServer, vcpu: int, **fields: Any) -> None:
    slot = dict(addr=BASE, data=0, count=1, size=4, vp_eport=0, state=abi.STATE_IOREQ_READY,
                data_is_ptr=False, dir=abi.IOREQ_READ, df=False, type=abi.IOREQ_TYPE_COPY)
    slot.update(fields)
    abi.encode(server.page, vcpu, abi.Ioreq(**slot))
    abi.set_state(server.page, vcpu, slot["state"])


def answered(server: IoreqServer, vcpu: int) -> abi.Ioreq:
    req = abi.decode(server.page, vcpu)
    assert req.state == abi.STATE_IORESP_READY
    return req


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_a_register_read_returns_the_devices_value_at_its_size(served, size: int) -> None:  # type: ignore[no-untyped-def]
    server, device, events, _ = served
    put(server, 1, addr=BASE + 0x70, size=size, dir=abi.IOREQ_READ, data=0xDEAD)
    server.handle(1, PORT)
    assert device.reads == [(0x70, size)]
    assert answered(server, 1).data == 0x1122334455667788 & ((1 << (8 * size)) - 1)
    assert events.notified == [PORT]
    assert (server.stats.traps, server.stats.reads) == (1, 1)


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_a_register_write_passes_only_the_accessed_bytes(served, size: int) -> None:  # type: ignore[no-untyped-def]
    server, device, events, _ = served
    put(server, 0, addr=BASE + 0x50, size=size, dir=abi.IOREQ_WRITE,
        data=0xA1B2C3D4E5F60718)
    server.handle(0, PORT)
    assert device.writes == [(0x50, size, 0xA1B2C3D4E5F60718 & ((1 << (8 * size)) - 1))]
    assert device.reads == []
    answered(server, 0)
    assert events.notified == [PORT]
    server._after_answers()  # the round's end, as the drain does
    assert device.answers_after == 1


@pytest.mark.parametrize(("kind", "changes"), [
    ("pointer data", {"data_is_ptr": True}),
    ("repeated", {"count": 2}),
    ("odd size", {"size": 3}),
    ("port I/O", {"type": abi.IOREQ_TYPE_PIO}),
    ("PCI config", {"type": abi.IOREQ_TYPE_PCI_CONFIG}),
    ("outside every window", {"addr": BASE + 0x200}),
    ("straddling the window's end", {"addr": BASE + 0x1FE, "size": 4}),
])
def test_an_access_the_device_does_not_take_reads_as_all_ones_and_touches_nothing(
        served, kind: str, changes: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    server, device, events, invalidated = served
    put(server, 2, **{"dir": abi.IOREQ_READ, **changes})
    server.handle(2, PORT)
    assert answered(server, 2).data == 0xFFFFFFFFFFFFFFFF, kind
    assert (device.reads, device.writes, invalidated) == ([], [], [])
    assert server.stats.unhandled == 1
    assert events.notified == [PORT]  # the vCPU is never left waiting


@pytest.mark.parametrize("changes", [{"data_is_ptr": True}, {"count": 4},
                                     {"type": abi.IOREQ_TYPE_PIO}])
def test_an_unusual_write_is_answered_and_not_applied(served, changes: dict[str, Any]) -> None:  # type: ignore[no-untyped-def]
    server, device, events, _ = served
    put(server, 0, dir=abi.IOREQ_WRITE, data=0x1234, **changes)
    server.handle(0, PORT)
    answered(server, 0)
    assert device.writes == []
    assert events.notified == [PORT]


def test_invalidate_drops_mappings_and_is_answered(served) -> None:  # type: ignore[no-untyped-def]
    server, device, events, invalidated = served
    assert events.notified == []
    put(server, 0, type=abi.IOREQ_TYPE_INVALIDATE, dir=abi.IOREQ_WRITE,
        data=0xFFFFFFFFFFFFFFFF)
    server.handle(0, PORT)
    assert invalidated == [1]
    assert (device.reads, device.writes) == ([], [])
    answered(server, 0)
    assert events.notified == [PORT]
    assert server.stats.invalidates == 1


@pytest.mark.parametrize("state", [abi.STATE_IOREQ_NONE, abi.STATE_IOREQ_INPROCESS,
                                   abi.STATE_IORESP_READY])
def test_a_slot_that_is_not_ready_is_left_alone(served, state: int) -> None:  # type: ignore[no-untyped-def]
    server, device, events, _ = served
    put(server, 0, state=state)
    before = bytes(server.page[:abi.IOREQ_SIZE])
    server.handle(0, PORT)
    assert bytes(server.page[:abi.IOREQ_SIZE]) == before
    assert (device.reads, events.notified, server.stats.spurious) == ([], [], 1)


def test_the_df_flag_and_other_vcpus_slots_are_kept(served) -> None:  # type: ignore[no-untyped-def]
    server, device, _, _ = served
    put(server, 0, addr=BASE + 4, data=0x55, dir=abi.IOREQ_WRITE, df=True)
    put(server, 1, addr=BASE + 8, dir=abi.IOREQ_READ)
    other = bytes(server.page[abi.IOREQ_SIZE:2 * abi.IOREQ_SIZE])
    server.handle(0, PORT)
    req = answered(server, 0)
    assert (req.df, req.dir, req.addr) == (True, abi.IOREQ_WRITE, BASE + 4)
    assert bytes(server.page[abi.IOREQ_SIZE:2 * abi.IOREQ_SIZE]) == other
    assert device.writes == [(4, 4, 0x55)]
