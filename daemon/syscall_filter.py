"""The worker's system-call filter: seccomp, through libseccomp.

A worker is the process a hostile guest talks to.  Should the guest ever get code
running in it, the kernel interface it finds is cut down to what serving a disk takes:
reading and writing files and Xen's devices, mapping memory, polling, threads, Unix
sockets (xenstored, the journal, the supervisor, an image's ``qemu-storage-daemon``)
and starting that image server.  Everything else — other socket families, ptrace and
``process_vm_*``, mount and namespaces, modules, kexec, BPF, perf, keyrings,
``userfaultfd``, io_uring, changing identity — fails with ENOSYS, as if the kernel did
not have it: programs fall back from a call that is missing more gracefully than from
one that is refused (glibc's ``clone3``, QEMU's io_uring).  The filter is installed
before the worker's first thread exists (threads and children inherit it) and cannot
be lifted; it is checked by reading ``Seccomp:`` in ``/proc/self/status``.

libseccomp, not a hand-written BPF program: it resolves every name to this
architecture's number (aarch64 has no ``open`` or ``poll``; names a kernel does not
have are skipped) and builds the architecture check in.  The binding is ctypes over
its stable C API, as for Xen's libraries; the C library is Debian's ``libseccomp2``.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from virtio_diskd.daemon.privileges import forbid_new_privileges
from virtio_diskd.ioreq import sharedlib

#: what a worker, and the qemu-storage-daemon it may start, calls (by name; each
#: architecture has a subset of them)
ALLOWED = (
    # files, block devices and Xen's devices
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev",
    "preadv2", "pwritev2", "open", "openat", "openat2", "close", "close_range", "lseek",
    "_llseek", "fstat", "newfstatat", "stat", "lstat", "statx", "fstatfs", "statfs",
    "ioctl", "fcntl", "flock", "fsync", "fdatasync", "fallocate", "ftruncate",
    "sync_file_range", "readlink", "readlinkat", "getdents64", "access", "faccessat",
    "faccessat2", "rename", "renameat", "renameat2", "unlink", "unlinkat", "mkdir",
    "mkdirat", "rmdir", "chmod", "fchmod", "fchmodat", "utimensat", "umask", "getcwd",
    "chdir", "fchdir",
    # memory (guest mappings, hypercall buffers, thread stacks, ctypes trampolines)
    "brk", "mmap", "munmap", "mremap", "mprotect", "madvise", "msync", "mincore",
    "membarrier", "get_mempolicy",
    # waiting and waking
    "poll", "ppoll", "select", "pselect6", "epoll_create", "epoll_create1", "epoll_ctl",
    "epoll_wait", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "pipe", "pipe2",
    "dup", "dup2", "dup3", "timerfd_create", "timerfd_settime", "timerfd_gettime",
    "signalfd", "signalfd4", "futex", "futex_waitv", "sched_yield", "nanosleep",
    "clock_nanosleep", "clock_gettime", "clock_getres", "gettimeofday", "time",
    # Unix sockets (socket and socketpair: AF_UNIX only, below)
    "connect", "bind", "listen", "accept", "accept4", "getsockname", "getpeername",
    "getsockopt", "setsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg",
    "recvmmsg", "shutdown",
    # threads, signals, and the image server's start and end
    "clone", "clone3", "vfork", "fork", "execve", "execveat", "wait4", "waitid",
    "pidfd_open", "pidfd_send_signal", "set_robust_list", "get_robust_list",
    "set_tid_address", "rseq", "exit", "exit_group", "kill", "tgkill", "tkill",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "rt_sigsuspend",
    "sigaltstack", "restart_syscall", "setsid", "setpgid", "getpgid", "getpgrp",
    # who and where am I
    "getpid", "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "getgroups", "getrlimit", "prlimit64", "getrusage", "sysinfo", "uname",
    "sched_getaffinity", "sched_setaffinity", "getpriority", "getrandom", "capget",
    "prctl", "arch_prctl", "times", "getcpu", "sched_getparam", "sched_getscheduler",
    # native AIO: the O_DIRECT engine's batches (without it, 32 threads and a dozen
    # futex calls per request)
    "io_setup", "io_destroy", "io_submit", "io_getevents", "io_cancel",
    # what qemu-storage-daemon's block layer may add
    "fadvise64", "copy_file_range",
)
#: added where workers change user once their guest runs (``--worker-user``); without
#: CAP_SETUID, CAP_SETGID and CAP_CHOWN, which the change clears, they can do nothing
IDENTITY_CALLS = ("setgroups", "setresgid", "setresuid", "lchown", "fchownat")
#: the calls allowed only for Unix sockets (their first argument is the family)
UNIX_ONLY = ("socket", "socketpair")

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ = 4
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SOCK_FILTER_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def scmp_act_errno(code: int) -> int:
    """libseccomp's ``SCMP_ACT_ERRNO``: fail the call with ``code``."""
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def _library() -> ctypes.CDLL:
    """libseccomp (:mod:`~virtio_diskd.ioreq.sharedlib`: no linker cache needed)."""
    lib = ctypes.CDLL(sharedlib.find("seccomp", "2"), use_errno=True)
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.restype = None
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    return lib


@dataclass(frozen=True)
class FilterInstalled:
    allowed: int  # how many of the names this architecture has, and so allows

    def describe(self) -> str:
        return f"seccomp ({self.allowed} calls allowed, the rest ENOSYS)"


@dataclass(frozen=True)
class PreparedFilter:
    """The filter compiled to its BPF program, ready to load into a process.

    The zygote prepares it once (resolving ~160 names and compiling costs a worker
    milliseconds natively, a tenth of a second and more under TCG); each worker it
    forks only loads the program — two ``prctl`` calls."""

    program: bytes  # struct sock_filter[], as the kernel takes it
    allowed: int  # how many of the names this architecture has, and so allows

    def load(self) -> FilterInstalled:
        """Install on this process (its threads-to-be and children inherit it); sets
        no-new-privileges first, which a process without CAP_SYS_ADMIN needs."""
        forbid_new_privileges()
        instructions = len(self.program) // _SOCK_FILTER_SIZE
        buffer = ctypes.create_string_buffer(self.program, len(self.program))
        fprog = _SockFprog(instructions, ctypes.addressof(buffer))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(ctypes.c_ulong(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                      ctypes.c_ulong(ctypes.addressof(fprog)), ctypes.c_ulong(0),
                      ctypes.c_ulong(0)) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"prctl(PR_SET_SECCOMP): {os.strerror(code)}")
        return FilterInstalled(self.allowed)


def prepare(allowed: tuple[str, ...] = ALLOWED, *, refuse_with: int = errno.ENOSYS,
            unix_only: tuple[str, ...] = UNIX_ONLY) -> PreparedFilter:
    """Compile the filter with libseccomp (names resolved for this architecture, the
    architecture check built in): ``allowed`` pass, ``unix_only`` pass for AF_UNIX only,
    every other call fails with ``refuse_with``.  OSError if libseccomp is missing or
    refuses."""
    try:
        lib = _library()
    except OSError as exc:
        raise OSError(errno.ENOENT, f"libseccomp is not installed ({exc})") from exc
    ctx = lib.seccomp_init(scmp_act_errno(refuse_with))
    if not ctx:
        raise OSError(errno.ENOMEM, "seccomp_init failed")
    try:
        count = 0
        for name in allowed:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:  # not a call of this architecture (or a pseudo-call)
                continue
            _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 0, None), name)
            count += 1
        unix = (_ArgCmp * 1)(_ArgCmp(0, SCMP_CMP_EQ, socket.AF_UNIX, 0))
        for name in unix_only:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number >= 0:
                _check(lib.seccomp_rule_add_array(ctx, SCMP_ACT_ALLOW, number, 1, unix),
                       name)
                count += 1
        memfd = os.memfd_create("vd-seccomp", os.MFD_CLOEXEC)
        try:
            _check(lib.seccomp_export_bpf(ctx, memfd), "seccomp_export_bpf")
            program = os.pread(memfd, os.fstat(memfd).st_size, 0)
        finally:
            os.close(memfd)
    finally:
        lib.seccomp_release(ctx)
    if not program or len(program) % _SOCK_FILTER_SIZE:
        raise OSError(errno.EINVAL, f"libseccomp exported {len(program)} bytes of BPF")
    return PreparedFilter(program, count)


#: set by :func:`preload` in the zygote, for every worker it forks
_prepared: PreparedFilter | None = None


_prepared_for: tuple[str, ...] = ()


def worker_calls(changes_user: bool) -> tuple[str, ...]:
    """What a worker's filter allows: :data:`ALLOWED`, and :data:`IDENTITY_CALLS` for a
    worker that will change user."""
    return ALLOWED + IDENTITY_CALLS if changes_user else ALLOWED


def preload(allowed: tuple[str, ...] = ALLOWED) -> None:
    """Compile the filter now, in the zygote, so that its workers only load it."""
    global _prepared, _prepared_for
    _prepared, _prepared_for = prepare(allowed), allowed


def install(allowed: tuple[str, ...] = ALLOWED) -> FilterInstalled:
    """Install the filter on this process (and all it starts): the zygote's compiled
    program when there is one for ``allowed``, else compiled now.  OSError if
    libseccomp is missing or refuses; nothing is installed then."""
    prepared = (_prepared if _prepared is not None and allowed == _prepared_for
                else prepare(allowed))
    return prepared.load()


def _check(result: int, what: str) -> None:
    if result < 0:  # libseccomp returns -errno
        raise OSError(-result, f"libseccomp {what}: {errno.errorcode.get(-result, result)}")


def mode(pid: int | str = "self") -> int:
    """``Seccomp:`` of ``/proc/<pid>/status``: 0 none, 1 strict, 2 filter."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("Seccomp:"):
                return int(line.split()[1])
    return 0
