"""Finding a C library without the linker cache and without listing /usr/lib."""

from __future__ import annotations

import ctypes.util
import os
from pathlib import Path

import pytest

from virtio_diskd.ioreq import sharedlib


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_the_first_directory_with_the_library_wins_and_its_newest_version(
        tmp_path: Path) -> None:
    first, second = tmp_path / "usr-lib-triplet", tmp_path / "usr-lib"
    for name in ("libxenctrl.so.4.16.0", "libxenctrl.so.4.17", "libxenctrl.so.4.17.0"):
        _touch(first / name)
    _touch(second / "libxenctrl.so.4.19.0")
    _touch(first / "libxenctrlx.so.9")  # another library with the same prefix
    found = sharedlib.find("xenctrl", directories=[str(first), str(second)])
    assert found == str(first / "libxenctrl.so.4.17.0")
    _touch(first / "libseccomp.so.2.5.4")
    _touch(first / "libseccomp.so.3.0.0")
    assert sharedlib.find("seccomp", "2", directories=[str(first)]).endswith("so.2.5.4")


def test_without_the_library_anywhere_the_linker_cache_is_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    monkeypatch.setattr(ctypes.util, "find_library", asked.append)
    assert sharedlib.find("nosuch", directories=[str(tmp_path)]) == "libnosuch.so"
    assert asked == ["nosuch"]


def test_a_debian_library_is_found_in_the_multiarch_directory_without_a_subprocess(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_subprocess(stem: str) -> None:
        raise AssertionError(f"ctypes.util.find_library({stem!r}) runs ldconfig")

    monkeypatch.setattr(ctypes.util, "find_library", no_subprocess)
    found = sharedlib.find("seccomp", "2")  # libseccomp2: installed for the worker
    assert os.path.exists(found) and "/libseccomp.so.2" in found
    assert sharedlib.library_directories()[0].startswith(("/usr/lib/", "/lib/"))
