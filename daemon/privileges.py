"""What a worker gives up for good once it runs: capabilities, and the right to gain
privileges.

A worker serves one guest.  Everything it needs from then on it reaches as the owner
of root's files (Xen's devices, xenstored's socket, the run directory, the disks),
which takes no capability: so it drops every one, from its bounding set too, before
its first thread exists (capabilities are per thread).  A worker compromised by its
guest then cannot load modules, trace or signal other users' processes, override
file permissions, mount, or reach the network stack's privileged corners, and
nothing it executes can get a capability back.

Where the operator names a worker user (``--worker-user``), the worker keeps the
three capabilities that change identity (CAP_SETUID, CAP_SETGID, CAP_CHOWN) until
its guest runs, then becomes that user (:func:`become`): from then on it cannot
open ``/dev/xen/privcmd`` again — the one thing that would undo the restriction of
its Xen handles — nor any disk, nor xenstored's socket.  Whatever needs root after
that point (a hot-plugged disk, a lost xenstored connection) is done by a fresh
worker that the supervisor forks in its place (README "Confinement").

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
import pwd
from collections.abc import Iterable
from dataclasses import dataclass

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")
CAP_CHOWN = 0
CAP_SETGID = 6
CAP_SETUID = 7
#: what a worker keeps until it becomes its unprivileged user (:func:`become`)
IDENTITY_CAPABILITIES = (CAP_CHOWN, CAP_SETGID, CAP_SETUID)
#: A worker's exit status when work it was asked to do needs the privileges it gave
#: up (a hot-plugged disk, after ``--worker-user``): its supervisor forks a successor
#: at once, which resumes the guest's devices and does the work (EX_TEMPFAIL)
REPLACE_ME = 75
#: a user id at or above this is no user (``(uid_t)-1`` and the overflow id's range)
MAX_ID = 0xFFFFFFFE


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

    def holds_only(self, keep: Iterable[int] = ()) -> bool:
        """Exactly ``keep`` in the permitted, effective and bounding sets, nothing
        inheritable or ambient: what :func:`drop_capabilities` leaves when all went
        well (``keep`` empty: :attr:`none`)."""
        mask = sum(1 << cap for cap in frozenset(keep))
        wanted = {"CapInh": 0, "CapPrm": mask, "CapEff": mask, "CapBnd": mask, "CapAmb": 0}
        return all(self.sets.get(name) == value for name, value in wanted.items())

    @property
    def none_usable(self) -> bool:
        """Nothing to use, now or through an exec: the bounding set may still list
        what a process kept up to a change of user, which no-new-privileges makes
        unreachable."""
        return all(self.sets.get(name, 1) == 0
                   for name in ("CapInh", "CapPrm", "CapEff", "CapAmb"))

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


def drop_capabilities(keep: Iterable[int] = ()) -> CapabilityState:
    """Empty every capability set of this process but for ``keep``, the bounding set
    first (dropping from it takes CAP_SETPCAP, which goes last).  Call it while the
    process has one thread: threads started earlier would keep theirs.  Returns what
    is left."""
    kept = frozenset(keep)
    libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as last_cap:
        last = int(last_cap.read())
    for cap in range(last + 1):
        if cap in kept:
            continue
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
    for cap in kept:
        word, bit = divmod(cap, 32)
        data[word].effective |= 1 << bit
        data[word].permitted |= 1 << bit
    if libc.capset(ctypes.byref(header), data) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"capset: {os.strerror(code)}")
    return read_capabilities()


@dataclass(frozen=True)
class WorkerUser:
    """Whom a worker becomes once its guest runs: ``uid``/``gid``, plus the guest's
    domid when ``per_guest`` (libxl's ``xen-qemuuser-range-base`` convention for
    QEMU: one uid per guest, so that no two guests' workers can signal each other)."""

    uid: int
    gid: int
    per_guest: bool = False
    spec: str = ""

    def __str__(self) -> str:  # as given: handed on to exec'd workers
        return self.spec

    def ids_for(self, domid: int) -> tuple[int, int]:
        if not self.per_guest:
            return self.uid, self.gid
        return self.uid + domid, self.gid

    @classmethod
    def parse(cls, spec: str, max_domid: int) -> WorkerUser:
        """``NAME`` or ``UID:GID``, either followed by ``+`` for one uid per guest
        (the base plus the domid).  ValueError, with the reason, for anything else:
        an unknown user, root, or a range that would run past the largest id."""
        text = spec.strip()
        per_guest = text.endswith("+")
        body = text[:-1] if per_guest else text
        if not body:
            raise ValueError(f"{spec!r}: a user name or UID:GID is needed")
        if ":" in body:
            uid_text, _, gid_text = body.partition(":")
            if not (uid_text.isdigit() and gid_text.isdigit()):
                raise ValueError(f"{spec!r}: UID:GID must be two decimal numbers")
            uid, gid = int(uid_text), int(gid_text)
        else:
            try:
                entry = pwd.getpwnam(body)
            except KeyError:
                raise ValueError(f"{spec!r}: no such user (create it: adduser --system "
                                 f"--group --no-create-home {body})") from None
            uid, gid = entry.pw_uid, entry.pw_gid
        if uid == 0 or gid == 0:
            raise ValueError(f"{spec!r}: a worker user must not be root or in group root")
        top = uid + (max_domid if per_guest else 0)
        if top > MAX_ID or gid > MAX_ID:
            raise ValueError(f"{spec!r}: ids up to {top} run past the largest id {MAX_ID}")
        return cls(uid, gid, per_guest, text)


def become(uid: int, gid: int, hand_over: Iterable[str] = ()) -> None:
    """Give ``hand_over`` (paths this process keeps writing: its state directory and
    files) to ``uid``/``gid``, then become them for good: no supplementary groups,
    real, effective and saved ids all changed, so that the kernel clears every
    capability of every thread (glibc changes the ids of all threads).  OSError if
    any step fails (the caller stays as it was, or partly changed: it must not serve
    on as if confined)."""
    for path in hand_over:
        os.chown(path, uid, gid, follow_symlinks=False)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    real, effective, saved = os.getresuid()
    if {real, effective, saved} != {uid}:
        raise OSError(errno.EPERM, f"uids are {real}/{effective}/{saved}, not {uid}")
    if not read_capabilities().none_usable:
        raise OSError(errno.EPERM, "capabilities survived the change of user")
