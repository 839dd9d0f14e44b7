"""The target policy: only what the operator allows is opened, checked on what was
really opened (symlinks resolved, no window between check and open)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vdtest.disks import can_make_loop_devices, loop_device
from virtio_diskd.backend.disk.policy import TargetPolicy
from virtio_diskd.backend.disk.target import DiskTarget, TargetError


@pytest.fixture
def places(tmp_path: Path) -> tuple[Path, Path]:
    allowed, other = tmp_path / "images", tmp_path / "elsewhere"
    allowed.mkdir()
    other.mkdir()
    for path in (allowed / "g1.img", other / "secret.img"):
        path.write_bytes(bytes(1 << 20))
    return allowed, other


def test_files_under_an_allowed_directory_open(places: tuple[Path, Path]) -> None:
    allowed, _ = places
    policy = TargetPolicy((str(allowed),))
    with DiskTarget(str(allowed / "g1.img"), policy=policy) as target:
        assert target.real_path == str(allowed / "g1.img")


def test_files_elsewhere_are_refused_with_the_reason(places: tuple[Path, Path]) -> None:
    allowed, other = places
    policy = TargetPolicy((str(allowed),))
    with pytest.raises(TargetError, match="not under a directory the target policy allows"):
        DiskTarget(str(other / "secret.img"), policy=policy)
    # a prefix is not a parent: /x/images-old is not under /x/images
    sibling = allowed.parent / (allowed.name + "-old")
    sibling.mkdir()
    (sibling / "a.img").write_bytes(bytes(4096))
    with pytest.raises(TargetError):
        DiskTarget(str(sibling / "a.img"), policy=policy)


def test_a_symlink_that_escapes_is_refused(places: tuple[Path, Path]) -> None:
    allowed, other = places
    link = allowed / "innocent.img"
    os.symlink(other / "secret.img", link)
    policy = TargetPolicy((str(allowed),))
    with pytest.raises(TargetError, match=r"secret\.img"):
        DiskTarget(str(link), policy=policy)
    inside = allowed / "alias.img"
    os.symlink(allowed / "g1.img", inside)  # a symlink that stays inside is fine
    with DiskTarget(str(inside), policy=policy) as target:
        assert target.real_path == str(allowed / "g1.img")


def test_no_directories_configured_allows_any_file(places: tuple[Path, Path]) -> None:
    _, other = places
    with DiskTarget(str(other / "secret.img"), policy=TargetPolicy()):
        pass


@pytest.mark.skipif(can_make_loop_devices() is not None,
                    reason=str(can_make_loop_devices()))
def test_block_devices_follow_their_own_switch(places: tuple[Path, Path]) -> None:
    allowed, _ = places
    with loop_device(allowed / "g1.img") as device:
        with DiskTarget(device, policy=TargetPolicy((str(allowed),))):
            pass
        with pytest.raises(TargetError, match="block devices are not allowed"):
            DiskTarget(device, policy=TargetPolicy((str(allowed),), block_devices=False))
