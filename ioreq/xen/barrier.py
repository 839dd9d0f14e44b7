"""A full memory barrier callable from Python (``mfence`` / ``dmb ish``).

The ioreq page and the virtqueues are shared with other CPUs: Xen and the
guest read them while we write.  Two orderings matter and CPython gives
neither: *store → store* (an ioreq's ``data`` before its ``state``, a used
element before the used index) — weakly ordered on Arm; and *store → load*
(publish ``avail_event``, then re-read the avail index) — reordered even on
x86.  So the daemon calls a two-instruction function placed in an executable
page at start-up (as the pyprobe did on real Xen): about 1–2 µs per call, used
once per ioreq answer and once per batch on a queue.  If the page cannot be
made executable (a W^X policy), the fallback is the ``membarrier`` system call.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

_CODE = {
    "x86_64": bytes([0x0F, 0xAE, 0xF0, 0xC3]),  # mfence; ret
    "aarch64": (0xD5033BBF).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little"),
}
MEMBARRIER_CMD_GLOBAL = 1
SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}

_keep: list[object] = []


def _jit(code: bytes) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    page = libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if page in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap failed")
    ctypes.memmove(page, code, len(code))
    if libc.mprotect(page, 4096, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
        raise OSError(ctypes.get_errno(), "mprotect(PROT_EXEC) refused")
    fn = ctypes.CFUNCTYPE(None)(page)
    _keep.append(fn)
    return fn


def _syscall_barrier(machine: str) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    number = SYS_MEMBARRIER[machine]

    def barrier() -> None:
        libc.syscall(number, MEMBARRIER_CMD_GLOBAL, 0)

    return barrier


def make_barrier() -> tuple[Callable[[], None], str]:
    """The barrier, and which kind it is (logged: the system call costs far more)."""
    machine = platform.machine()
    code = _CODE.get(machine)
    if code is None:
        raise RuntimeError(f"no memory barrier for {machine}")
    try:
        return _jit(code), "instruction"
    except OSError:
        return _syscall_barrier(machine), "membarrier"


full_barrier, BARRIER_KIND = make_barrier()
