"""The ctypes bindings on a machine without Xen: every library loads with its
signatures, and every open fails with the documented clear error."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import pytest

from virtio_diskd.ioreq.xen import libxen
from virtio_diskd.ioreq.xen.interface import XenError


def _stem(name: str) -> str:
    """``libxengnttab.so.1`` -> ``xengnttab``; an unversioned entry is its stem already."""
    return name.split(".so", maxsplit=1)[0][3:] if ".so" in name else name


MISSING = [kind for kind, name in libxen.LIBRARIES.items()
           if ctypes.util.find_library(_stem(name)) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"Xen's libraries for {MISSING} are not installed (Debian: "
                          "libxendevicemodel1 libxenforeignmemory1 libxenevtchn1 "
                          "libxengnttab1 libxentoolcore1 libxenmisc4.17)")


@pytest.mark.parametrize("kind", sorted(libxen.LIBRARIES))
def test_library_loads_with_declared_signatures(kind: str) -> None:
    lib = libxen.load(kind)
    for symbol, (restype, argtypes) in libxen._SIGNATURES[kind].items():
        function = getattr(lib, symbol)
        assert function.restype is restype and function.argtypes == argtypes
        if symbol.endswith("_open") or ("map" in symbol and restype is ctypes.c_void_p):
            assert restype is ctypes.c_void_p  # pointers are never truncated to int


@pytest.mark.skipif(os.path.exists("/dev/xen"), reason="running on Xen: opens would succeed")
@pytest.mark.parametrize("opener", ["devicemodel", "foreignmemory", "evtchn", "gnttab"])
def test_open_without_xen_says_so(opener: str) -> None:
    platform = libxen.LibxenPlatform()
    with pytest.raises(XenError) as info:
        getattr(platform, opener)()
    assert "/dev/xen is absent" in str(info.value)
    assert info.value.errno


def test_enosys_is_explained_as_missing_ioreq_support() -> None:
    ctypes.set_errno(38)
    error = libxen._fail("xendevicemodel_create_ioreq_server", ioreq=True)
    assert error.errno == 38 and "CONFIG_IOREQ_SERVER" in str(error)
