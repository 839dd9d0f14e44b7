"""What a worker gives up for good once it runs: capabilities, and the right to gain
privileges.

A worker serves one guest.  Everything it needs from then on it reaches as the owner
of root's files (Xen's devices, xenstored's socket, the run directory, the disks),
which takes no capability: so it drops every one, from its bounding set too, before
its first thread exists (capabilities are per thread).  A worker compromised by its
guest then cannot load modules, trace or signal other users' processes, override
file permissions, mount, or reach the network stack's privileged corners, and
nothing it executes can get a capability back.  It stays uid 0 because xenstored's
socket and ``/dev/xen/*`` are root's, mode 0600, and a worker must reconnect to
xenstored and open a hot-plugged disk's handles after set-up.

``PR_SET_NO_NEW_PRIVS``: nothing the worker executes from now on — an image's
``qemu-storage-daemon``, anything a compromised worker might be made to run — can
gain privileges through set-user-ID bits or file capabilities, and it is inherited
by every child.  (The units set ``NoNewPrivileges=yes`` for the whole service; a
worker started by hand or under another supervisor gets it here.)  Restricting the
worker's Xen handles to its guest is :meth:`GuestService._confine`'s job.
"""

from __future__ import annotations

import ctypes
import errno
import os
from dataclasses import dataclass

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                           ctypes.c_ulong]
    libc.prctl.restype = ctypes.c_int
    return libc


def forbid_new_privileges() -> bool:
    """Set no-new-privileges for this process and its children; True once it is set."""
    prctl = _libc().prctl
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(code)}")
    return bool(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1)


@dataclass(frozen=True)
class CapabilityState:
    """This thread's capability sets, as ``/proc/<pid>/status`` shows them (hex masks)."""

    sets: dict[str, int]

    @property
    def none(self) -> bool:
        return all(self.sets.get(name, 1) == 0 for name in _CAP_SETS)

    def describe(self) -> str:
        if self.none:
            return "none"
        return " ".join(f"{name}={self.sets.get(name, 0):x}" for name in _CAP_SETS)


def read_capabilities(pid: int | str = "self") -> CapabilityState:
    """The capability sets of ``pid`` (``"<pid>/task/<tid>"`` for one thread)."""
    sets: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in _CAP_SETS:
                sets[name] = int(value.strip(), 16)
    return CapabilityState(sets)


def drop_capabilities() -> CapabilityState:
    """Empty every capability set of this process, the bounding set first (dropping
    from it takes CAP_SETPCAP, which goes last).  Call it while the process has one
    thread: threads started earlier would keep theirs.  Returns what is left."""
    libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as last_cap:
        last = int(last_cap.read())
    for cap in range(last + 1):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            code = ctypes.get_errno()
            if code == errno.EPERM:  # no CAP_SETPCAP (not root): nothing to drop there
                break
            if code != errno.EINVAL:  # EINVAL: a capability this kernel does not know
                raise OSError(code, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(code)}")
    if libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        if code != errno.EINVAL:  # a kernel older than 4.3 has no ambient set
            raise OSError(code, f"prctl(PR_CAP_AMBIENT_CLEAR_ALL): {os.strerror(code)}")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: no effective, permitted or inheritable capability
    if libc.capset(ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"capset: {os.strerror(code)}")
    return read_capabilities()
