"""The IOREQ ABI (``xen/include/public/hvm/ioreq.h``) and related constants.

``ioreq_t`` is 32 bytes, one per vCPU at ``vcpu_id * 32`` in the shared page:

====== ==== ============================================================
offset size field
====== ==== ============================================================
0      8    addr (guest physical)
8      8    data (value, or guest paddr if data_is_ptr)
16     4    count
20     4    size (1/2/4/8)
24     4    vp_eport — Xen's port for this vCPU; never written by the DM
28     2    _pad0
30     1    state:4, data_is_ptr:1, dir:1 (1 = read), df:1
31     1    type
====== ==== ============================================================
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

IOREQ_SIZE = 32
PAGE_SIZE = 4096
MAX_VCPUS_PER_PAGE = PAGE_SIZE // IOREQ_SIZE

IOREQ_READ = 1
IOREQ_WRITE = 0

STATE_IOREQ_NONE = 0
STATE_IOREQ_READY = 1
STATE_IOREQ_INPROCESS = 2
STATE_IORESP_READY = 3

IOREQ_TYPE_PIO = 0
IOREQ_TYPE_COPY = 1
IOREQ_TYPE_PCI_CONFIG = 2
IOREQ_TYPE_TIMEOFFSET = 7
IOREQ_TYPE_INVALIDATE = 8

HVM_IOREQSRV_BUFIOREQ_OFF = 0
XENMEM_RESOURCE_IOREQ_SERVER = 0
XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ0 = 1  # frame_ioreq(n) = 1 + n

#: Grant-DMA addresses (Linux grant-dma-ops): bit 63 set, ref << 12 | offset.
XEN_GRANT_DMA_ADDR_OFF = 1 << 63
XEN_PAGE_SHIFT = 12

MAX_IOREQ_SERVERS_PER_DOMAIN = 8

_HEAD = struct.Struct("<QQIII")  # addr, data, count, size, vp_eport
OFF_DATA = 8
OFF_VP_EPORT = 24
OFF_BITS = 30
OFF_TYPE = 31
#: the byte at OFF_BITS: state in the low nibble, then data_is_ptr, dir, df
BIT_DATA_IS_PTR_SHIFT = 4
BIT_DIR_SHIFT = 5
BIT_DF_SHIFT = 6
BIT_DATA_IS_PTR = 1 << BIT_DATA_IS_PTR_SHIFT


@dataclass(frozen=True, slots=True)
class Ioreq:
    """A decoded ``ioreq_t`` slot."""

    addr: int
    data: int
    count: int
    size: int
    vp_eport: int
    state: int
    data_is_ptr: bool
    dir: int
    df: bool
    type: int

    @property
    def is_read(self) -> bool:
        return self.dir == IOREQ_READ


def decode(page: memoryview, vcpu: int) -> Ioreq:
    """Read slot ``vcpu`` (one copy of the 32 bytes)."""
    base = vcpu * IOREQ_SIZE
    addr, data, count, size, eport = _HEAD.unpack_from(page, base)
    bits = page[base + OFF_BITS]
    return Ioreq(addr, data, count, size, eport, bits & 0xF,
                 bool(bits >> BIT_DATA_IS_PTR_SHIFT & 1), bits >> BIT_DIR_SHIFT & 1,
                 bool(bits >> BIT_DF_SHIFT & 1), page[base + OFF_TYPE])


def fields(page: memoryview, vcpu: int) -> tuple[int, int, int, int, int, int]:
    """Slot ``vcpu`` as ``(addr, data, count, size, bits, type)``, ``bits`` being the byte
    of state, data_is_ptr, dir and df: what :func:`decode` gives, without building an
    :class:`Ioreq` (the IOREQ server's per-trap path; µs count under TCG)."""
    base = vcpu * IOREQ_SIZE
    addr, data, count, size, _ = _HEAD.unpack_from(page, base)
    return addr, data, count, size, page[base + OFF_BITS], page[base + OFF_TYPE]


def state_of(page: memoryview, vcpu: int) -> int:
    return int(page[vcpu * IOREQ_SIZE + OFF_BITS]) & 0xF


def set_state(page: memoryview, vcpu: int, state: int) -> None:
    """Write the state nibble only (one byte store; the other bits are kept)."""
    index = vcpu * IOREQ_SIZE + OFF_BITS
    page[index] = (page[index] & 0xF0) | state


def set_data(page: memoryview, vcpu: int, value: int) -> None:
    struct.pack_into("<Q", page, vcpu * IOREQ_SIZE + OFF_DATA, value & 0xFFFFFFFFFFFFFFFF)


def encode(page: memoryview, vcpu: int, req: Ioreq) -> None:
    """Fill a slot the way Xen does (state last)."""
    base = vcpu * IOREQ_SIZE
    struct.pack_into("<QQII", page, base, req.addr, req.data, req.count, req.size)
    page[base + OFF_TYPE] = req.type
    page[base + OFF_BITS] = ((int(req.data_is_ptr) << BIT_DATA_IS_PTR_SHIFT)
                             | (req.dir << BIT_DIR_SHIFT) | (int(req.df) << BIT_DF_SHIFT)
                             | (page[base + OFF_BITS] & 0xF))


def vp_eport(page: memoryview, vcpu: int) -> int:
    return int(struct.unpack_from("<I", page, vcpu * IOREQ_SIZE + OFF_VP_EPORT)[0])


def is_grant_address(addr: int) -> bool:
    return bool(addr & XEN_GRANT_DMA_ADDR_OFF)
