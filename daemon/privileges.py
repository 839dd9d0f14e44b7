"""What a worker gives up for good once it runs: the right to gain privileges.

``PR_SET_NO_NEW_PRIVS``: nothing the worker executes from now on — an image's
``qemu-storage-daemon``, anything a compromised worker might be made to run — can
gain privileges through set-user-ID bits or file capabilities, and it is inherited
by every child.  (The units set ``NoNewPrivileges=yes`` for the whole service; a
worker started by hand or under another supervisor gets it here.)  Restricting the
worker's Xen handles to its guest is :meth:`GuestService._confine`'s job.
"""

from __future__ import annotations

import ctypes
import os

PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39


def forbid_new_privileges() -> bool:
    """Set no-new-privileges for this process and its children; True once it is set."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    if prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(code)}")
    return bool(prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1)
