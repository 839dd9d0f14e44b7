"""The parse fast path for Linux's request layout (a 16-byte header, one data buffer, a
1-byte status) must decide exactly what the general path decides for the same bytes.

The same request is given twice: in Linux's layout, which takes the fast path, and
with its header split over two 8-byte elements, which takes the general (ANY_LAYOUT)
path.  Both must end alike: finished or handed to the disk, status, kind, offset,
length, bytes to be written back, durability, and the very guest bytes the buffers
cover, with the same access.
"""

from __future__ import annotations

import struct
from typing import cast

from hypothesis import example, given, settings
from hypothesis import strategies as st

from virtio_diskd.backend import blk
from virtio_diskd.backend.blk import BlkOptions, BlockRequest, VirtioBlk
from virtio_diskd.backend.guestmem import FlatGuestMemory
from virtio_diskd.backend.memdisk import MemoryDisk
from virtio_diskd.backend.virtqueue import Chain, Segment, Virtqueue

BASE = 0x40000000
RAM = 64 * 1024
DISK = 256 * 1024
HEADER_AT = BASE + 0x100
STATUS_AT = BASE + 0x200
OUTSIDE = BASE + RAM + 0x1000  # not guest RAM
#: the queue a request comes from: only carried (a finished request has none)
QUEUE = cast(Virtqueue, object())


def _device(read_only: bool, writeback: bool) -> tuple[VirtioBlk, bytearray]:
    ram = bytearray(RAM)
    for i in range(0, RAM, 4):
        struct.pack_into("<I", ram, i, i)  # every word says where it is
    disk = MemoryDisk(DISK, read_only=read_only)
    device = VirtioBlk(disk.info(), FlatGuestMemory(ram, BASE),
                       BlkOptions(writeback=writeback, size_max=1 << 16, seg_max=8))
    return device, ram


def _outcome(request: BlockRequest) -> tuple[object, ...]:
    return (request.queue is None, request.status, request.kind, request.offset,
            request.length, request.written, request.durable,
            [(bytes(view), view.readonly) for view in request.buffers])


@settings(max_examples=1500, deadline=None)
# cases a random draw can miss: buffers outside RAM in both directions, write-through
@example(rtype=blk.T_OUT, sector=0, length=512, data_offset=0, data_writable=False,
         data_outside=True, header_outside=False, read_only=False, writeback=False)
@example(rtype=blk.T_IN, sector=0, length=4096, data_offset=0, data_writable=True,
         data_outside=True, header_outside=False, read_only=False, writeback=False)
@example(rtype=blk.T_OUT, sector=8, length=4096, data_offset=512, data_writable=False,
         data_outside=False, header_outside=False, read_only=False, writeback=False)
@given(rtype=st.sampled_from([blk.T_IN, blk.T_OUT, blk.T_FLUSH, blk.T_GET_ID,
                              blk.T_DISCARD, 99]),
       sector=st.one_of(st.sampled_from([0, 1, DISK // 512 - 8, DISK // 512 - 1, DISK // 512,
                                         (1 << 64) - 1]),
                        st.integers(0, DISK // 512)),
       length=st.one_of(st.sampled_from([0, 1, 511, 512, 4096, 8192, DISK, (1 << 16) + 512]),
                        st.integers(0, 1 << 15)),
       data_offset=st.integers(0, RAM - 1),
       data_writable=st.booleans(),
       data_outside=st.booleans(),
       header_outside=st.sampled_from([False, False, False, True]),
       read_only=st.booleans(),
       writeback=st.booleans())
def test_linux_layout_is_parsed_as_any_other_layout(
        rtype: int, sector: int, length: int, data_offset: int, data_writable: bool,
        data_outside: bool, header_outside: bool, read_only: bool, writeback: bool) -> None:
    results = []
    for split_header in (False, True):
        device, ram = _device(read_only, writeback)
        header = HEADER_AT if not header_outside else OUTSIDE
        if not header_outside:
            struct.pack_into("<IIQ", ram, header - BASE, rtype, 0, sector)
        data = (OUTSIDE if data_outside else BASE + data_offset)
        tail: list[Segment] = [(data, length, data_writable), (STATUS_AT, 1, True)]
        if split_header:
            segments = [(header, 8, False), (header + 8, 8, False), *tail]
        else:
            segments = [(header, 16, False), *tail]
        request = device._parse(0, QUEUE, Chain(7, segments, 1))
        results.append((_outcome(request), device.stats))
    (fast, fast_stats), (general, general_stats) = results
    assert fast == general
    assert fast_stats == general_stats


def test_the_fast_path_maps_the_guest_buffer_itself() -> None:
    """A read in Linux's layout hands the disk a writable view of the guest's buffer
    (no copy): bytes put there land in guest RAM."""
    device, ram = _device(read_only=False, writeback=True)
    struct.pack_into("<IIQ", ram, HEADER_AT - BASE, blk.T_IN, 0, 8)
    chain = Chain(3, [(HEADER_AT, 16, False), (BASE + 0x1000, 4096, True),
                      (STATUS_AT, 1, True)], 1)
    request = device._parse(0, QUEUE, chain)
    assert request.queue is QUEUE and request.kind == blk.IoKind.READ
    assert (request.offset, request.length, request.written) == (8 * 512, 4096, 4096)
    (view,) = request.buffers
    view[:4] = b"abcd"
    assert ram[0x1000:0x1004] == b"abcd"
