"""Image formats through qemu-storage-daemon, chosen by the operator's rules: qcow2 with
a backing chain, VHD, discard that frees qcow2 clusters, a raw disk that holds a qcow2
header staying raw, a daemon that dies mid-run, and a successor reusing the daemon.
Bytes are checked by reading the images back with qemu-img, not through our code."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vdtest.disks import request, run
from vdtest.nbdserver import missing_tools
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.disk.nbd import NbdEngine
from virtio_diskd.backend.disk.policy import TargetPolicy
from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.storage import StorageRequest, open_storage
from virtio_diskd.backend.disk.storage_rules import StorageRuleError, StorageRules
from virtio_diskd.backend.disk.target import TargetError

MiB = 1 << 20
_missing = missing_tools("qemu-img", "qemu-storage-daemon")
pytestmark = pytest.mark.skipif(_missing is not None, reason=str(_missing))


def _stamp(offset: int, length: int, generation: int) -> bytes:
    out = bytearray()
    for at in range(offset, offset + length, 16):
        out += struct.pack("<QQ", at, generation)
    return bytes(out[:length])


def _img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def _as_raw(image: Path, fmt: str) -> bytes:
    out = image.with_suffix(".check.raw")
    done = _img("convert", "-f", fmt, "-O", "raw", str(image), str(out))
    assert done.returncode == 0, done.stderr
    data = out.read_bytes()
    out.unlink()
    return data


def _open(tmp_path: Path, image: Path, rules: StorageRules, *,
          read_only: bool = False) -> BlockEngine[DiskRequest]:
    return open_storage(StorageRequest(params=str(image), name="dom1/xvda",
                                       read_only=read_only, rules=rules,
                                       socket_path=str(tmp_path / "s" / "dom1-51712.sock")))


def _io(engine: BlockEngine[DiskRequest], *requests: DiskRequest) -> list[IoStatus]:
    run(engine, list(requests))
    return [r.status for r in requests]


def _write(offset: int, data: bytes, durable: bool = False) -> DiskRequest:
    return request(IoKind.WRITE, offset,
                   [memoryview(bytearray(data[at : at + 4096]))
                    for at in range(0, len(data), 4096)], durable=durable)


def _read(offset: int, length: int) -> DiskRequest:
    return request(IoKind.READ, offset, [memoryview(bytearray(length))])


QCOW2 = StorageRules(formats=(("*.qcow2", "qcow2"), ("*.vhd", "vhd")))


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[tuple[Path, Path, bytes]]:
    """base.qcow2 (stamped, generation 1) ← over.qcow2 (empty overlay)."""
    raw = tmp_path / "base.raw"
    content = _stamp(0, 16 * MiB, 1)
    raw.write_bytes(content)
    base, over = tmp_path / "base.qcow2", tmp_path / "over.qcow2"
    assert _img("convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)).returncode == 0
    made = _img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(over))
    assert made.returncode == 0, made.stderr
    yield base, over, content


def test_qcow2_overlay_reads_its_backing_file_and_writes_only_itself(
        tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    base, over, content = chain
    engine = _open(tmp_path, over, QCOW2)
    assert isinstance(engine, NbdEngine)
    try:
        assert engine.target.format_name == "qcow2"
        info = engine.target.info()
        assert info.capacity_bytes == 16 * MiB and info.can_discard and info.can_write_zeroes
        reads = [_read(at, 65536) for at in (0, 3 * MiB + 4096, 16 * MiB - 65536)]
        assert _io(engine, *reads) == [IoStatus.OK] * 3
        for r in reads:  # the backing file's bytes, each block its own
            assert bytes(r.buffers[0]) == content[r.offset : r.offset + r.length]
        new = _stamp(MiB, 2 * MiB, 2)
        assert _io(engine, _write(MiB, new), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
        back = _read(MiB, 2 * MiB)
        assert _io(engine, back) == [IoStatus.OK] and bytes(back.buffers[0]) == new
    finally:
        engine.close()
    assert not (tmp_path / "s" / "dom1-51712.sock").exists()  # the daemon is gone
    check = _img("check", "-f", "qcow2", str(over))
    assert check.returncode == 0, check.stdout + check.stderr
    expected = content[:MiB] + new + content[3 * MiB :]
    assert _as_raw(over, "qcow2") == expected
    assert _as_raw(base, "qcow2") == content  # the backing file is untouched


def test_qcow2_discard_frees_clusters_and_reads_zeroes(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    assert _img("create", "-q", "-f", "qcow2", str(image), "32M").returncode == 0
    engine = _open(tmp_path, image, QCOW2)
    try:
        data = _stamp(0, 8 * MiB, 3)
        assert _io(engine, _write(0, data), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
        discard = request(IoKind.DISCARD, ranges=[(2 * MiB, 4 * MiB, True)])
        zero = request(IoKind.WRITE_ZEROES, ranges=[(MiB, 65536, False)])
        assert _io(engine, discard, zero, request(IoKind.FLUSH)) == [IoStatus.OK] * 3
    finally:
        engine.close()
    extents = json.loads(_img("map", "--output=json", "-f", "qcow2", str(image)).stdout)
    freed = [e for e in extents if e["start"] <= 2 * MiB and e["start"] + e["length"] >= 6 * MiB]
    assert freed and not freed[0]["data"], extents  # no cluster behind the discarded range
    raw = _as_raw(image, "qcow2")
    assert raw[2 * MiB : 6 * MiB] == bytes(4 * MiB)
    assert raw[MiB : MiB + 65536] == bytes(65536)
    assert raw[: MiB] == data[: MiB] and raw[6 * MiB : 8 * MiB] == data[6 * MiB :]
    assert _img("check", "-f", "qcow2", str(image)).returncode == 0


def test_vhd_images_read_back_and_are_not_offered_discard(tmp_path: Path) -> None:
    image = tmp_path / "disk.vhd"
    assert _img("create", "-q", "-f", "vpc", str(image), "16M").returncode == 0
    engine = _open(tmp_path, image, QCOW2)
    try:
        assert engine.target.format_name == "vhd"
        size = engine.target.info().capacity_bytes
        assert size >= 16 * MiB - MiB  # VHD geometry rounds the size
        assert not engine.target.info().can_discard  # vpc frees nothing
        data = _stamp(4 * MiB, MiB, 4)
        assert _io(engine, _write(4 * MiB, data, durable=True)) == [IoStatus.OK]
        back = _read(4 * MiB, MiB)
        assert _io(engine, back) == [IoStatus.OK] and bytes(back.buffers[0]) == data
    finally:
        engine.close()
    raw = _as_raw(image, "vpc")
    assert raw[4 * MiB : 5 * MiB] == data and raw[: 4 * MiB] == bytes(4 * MiB)


def test_a_raw_disk_holding_a_qcow2_header_stays_raw(tmp_path: Path) -> None:
    """CVE-2008-2004: the format is the operator's; no rule names this disk, so its
    content — a qcow2 header naming a host file as backing — is just bytes."""
    trap = tmp_path / "trap.qcow2"
    made = _img("create", "-q", "-f", "qcow2", "-b", "/etc/shadow", "-F", "raw", str(trap),
                "1M")
    assert made.returncode == 0, made.stderr
    disk = tmp_path / "guest.img"
    disk.write_bytes(trap.read_bytes().ljust(4 * MiB, b"\0"))
    engine = _open(tmp_path, disk, QCOW2)  # *.qcow2 rules do not name guest.img
    try:
        assert isinstance(engine, DiskEngine)
        first = _read(0, 4096)
        assert _io(engine, first) == [IoStatus.OK]
        assert bytes(first.buffers[0][:4]) == b"QFI\xfb"  # the guest sees its own bytes
        assert engine.target.info().capacity_bytes == 4 * MiB
    finally:
        engine.close()
        engine.target.close()


def test_the_storage_daemon_dies_and_comes_back(tmp_path: Path,
                                                chain: tuple[Path, Path, bytes]) -> None:
    _, over, content = chain
    engine = _open(tmp_path, over, QCOW2)
    assert isinstance(engine, NbdEngine)
    try:
        data = _stamp(0, MiB, 5)
        assert _io(engine, _write(0, data)) == [IoStatus.OK]  # acknowledged, unflushed
        pid = int((tmp_path / "s" / "dom1-51712.sock.pid").read_text())
        os.kill(pid, 9)
        # the engine finds the daemon dead, starts it again and reconnects; the
        # flush cannot vouch for the write the dead daemon acknowledged
        assert _io(engine, request(IoKind.FLUSH)) == [IoStatus.IO_ERROR]
        assert int((tmp_path / "s" / "dom1-51712.sock.pid").read_text()) != pid
        later = _stamp(2 * MiB, MiB, 6)
        assert _io(engine, _write(2 * MiB, later), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
    finally:
        engine.close()
    check = _img("check", "-f", "qcow2", str(over))
    assert check.returncode in (0, 3), check.stdout  # 3: leaked clusters, no corruption
    raw = _as_raw(over, "qcow2")
    assert raw[2 * MiB : 3 * MiB] == later
    assert raw[3 * MiB :] == content[3 * MiB :]


def test_a_successor_reuses_the_running_daemon(tmp_path: Path,
                                               chain: tuple[Path, Path, bytes]) -> None:
    _, over, _ = chain
    first = _open(tmp_path, over, QCOW2)
    data = _stamp(0, MiB, 7)
    assert _io(first, _write(0, data), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
    pid = (tmp_path / "s" / "dom1-51712.sock.pid").read_text()
    first.close(detach=True)  # a worker handing over: the daemon stays
    second = _open(tmp_path, over, QCOW2)
    try:
        assert (tmp_path / "s" / "dom1-51712.sock.pid").read_text() == pid
        back = _read(0, MiB)
        assert _io(second, back) == [IoStatus.OK] and bytes(back.buffers[0]) == data
    finally:
        second.close()
    # a daemon started under other rules (read-only now) is not reused: a new one
    third = _open(tmp_path, over, QCOW2, read_only=True)
    try:
        assert third.target.read_only
        assert (tmp_path / "s" / "dom1-51712.sock.pid").read_text() != pid
    finally:
        third.close()


def test_images_obey_the_target_policy(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    assert _img("create", "-q", "-f", "qcow2", str(image), "1M").returncode == 0
    with pytest.raises(TargetError, match="not under a directory"):
        open_storage(StorageRequest(params=str(image), name="dom1/xvda", rules=QCOW2,
                                    policy=TargetPolicy(allowed_dirs=("/srv/xen",)),
                                    socket_path=str(tmp_path / "x.sock")))
    assert not (tmp_path / "x.sock").exists()  # refused before any daemon started


def test_a_broken_image_fails_the_device_with_qemus_reason(tmp_path: Path) -> None:
    image = tmp_path / "broken.qcow2"
    image.write_bytes(b"QFI\xfb" + bytes(508))
    with pytest.raises(TargetError, match=r"broken\.qcow2 \(qcow2\).*exited"):
        _open(tmp_path, image, QCOW2)


@pytest.mark.parametrize(("line", "message"), [
    ("disk.qcow2 qcow2", "absolute"), ("/a/*.img qed", "FORMAT one of"),
    ("/a/*.img", "GLOB FORMAT"),
])
def test_bad_format_rules_are_refused(line: str, message: str) -> None:
    with pytest.raises(StorageRuleError, match=message):
        StorageRules.format_rule(line)


def test_rules_choose_format_and_export() -> None:
    rules = StorageRules(formats=(("/img/*.qcow2", "qcow2"), ("/img/*", "raw")),
                         nbd_exports=(("/dev/xen/vol1", "nbd://san.example/vol1"),))
    assert rules.format_for("/img/a.qcow2") == "qcow2"
    assert rules.format_for("/img/a.vhd") == "raw"  # the first matching rule wins
    assert rules.format_for("/other/a.qcow2") == "raw"
    assert rules.export_for("/dev/xen//vol1") == "nbd://san.example/vol1"
    with pytest.raises(StorageRuleError, match="TLS"):
        StorageRules.export_rule("/dev/x nbds://host/x")


def test_a_resumed_device_whose_image_server_died_fails_its_next_flush(
        tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    """A restart that took qemu-storage-daemon with it (systemd's KillMode, a crash):
    writes it acknowledged after its last flush may be gone, and the guest — which
    lives on — must hear it from its next flush, not believe them stable."""
    _, over, _ = chain
    first = _open(tmp_path, over, QCOW2)
    assert _io(first, _write(0, _stamp(0, MiB, 8))) == [IoStatus.OK]  # not flushed
    pid = int((tmp_path / "s" / "dom1-51712.sock.pid").read_text())
    first.close(detach=True)
    os.kill(pid, 9)  # gone with the worker
    os.waitpid(pid, 0)  # gone for good before the successor looks (this test started it)
    resumed = open_storage(StorageRequest(params=str(over), name="dom1/xvda", rules=QCOW2,
                                          socket_path=str(tmp_path / "s" / "dom1-51712.sock"),
                                          resuming=True))
    try:
        assert _io(resumed, request(IoKind.FLUSH)) == [IoStatus.IO_ERROR]
        assert _io(resumed, request(IoKind.FLUSH)) == [IoStatus.OK]  # said once
    finally:
        resumed.close()
    # adopted (the server lived): nothing was lost, the flush succeeds
    again = _open(tmp_path, over, QCOW2)
    again.close(detach=True)
    adopted = open_storage(StorageRequest(params=str(over), name="dom1/xvda", rules=QCOW2,
                                          socket_path=str(tmp_path / "s" / "dom1-51712.sock"),
                                          resuming=True))
    try:
        assert _io(adopted, request(IoKind.FLUSH)) == [IoStatus.OK]
    finally:
        adopted.close()


def test_an_adopted_daemon_that_does_not_answer_is_replaced(
        tmp_path: Path, chain: tuple[Path, Path, bytes]) -> None:
    """A predecessor's daemon can pass adoption (alive, same argv) and still be unusable:
    dying, or its socket gone.  The successor replaces it instead of failing the device,
    and the guest hears from its next flush that unflushed writes may be lost."""
    _, over, _ = chain
    sock = tmp_path / "s" / "dom1-51712.sock"
    first = _open(tmp_path, over, QCOW2)
    assert _io(first, _write(0, _stamp(0, MiB, 9)), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
    old_pid = int((tmp_path / "s" / "dom1-51712.sock.pid").read_text())
    first.close(detach=True)
    sock.unlink()  # alive and recorded, but nobody can reach it any more
    resumed = open_storage(StorageRequest(params=str(over), name="dom1/xvda", rules=QCOW2,
                                          socket_path=str(sock), resuming=True))
    try:
        new_pid = int((tmp_path / "s" / "dom1-51712.sock.pid").read_text())
        assert new_pid != old_pid
        assert not Path(f"/proc/{old_pid}").exists() or _zombie(old_pid)
        assert _io(resumed, request(IoKind.FLUSH)) == [IoStatus.IO_ERROR]
        back = _read(0, MiB)
        assert _io(resumed, back) == [IoStatus.OK]
        assert bytes(back.buffers[0]) == _stamp(0, MiB, 9)
    finally:
        resumed.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_a_hand_over_flushes_the_image_server_first(tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    assert _img("create", "-q", "-f", "qcow2", str(image), "16M").returncode == 0
    engine = _open(tmp_path, image, QCOW2)
    assert engine.sync_before_detach
    data = _stamp(0, 4 * MiB, 9)
    assert _io(engine, _write(0, data)) == [IoStatus.OK]
    engine.sync()  # what a worker's detach does before it goes
    pid = int((tmp_path / "s" / "dom1-51712.sock.pid").read_text())
    engine.close(detach=True)
    os.kill(pid, 9)  # the restart takes the server: the synced writes survive it
    assert _as_raw(image, "qcow2")[: 4 * MiB] == data


def _kernel_nbd() -> str | None:
    """The reason /dev/nbdX cannot be made here, or None."""
    if missing_tools("qemu-nbd"):
        return missing_tools("qemu-nbd")
    if os.geteuid() != 0:
        return "/dev/nbdX needs root"
    if missing_tools("modprobe"):  # kmod: the real-Xen tier's set-up installs it
        return missing_tools("modprobe")
    subprocess.run(["modprobe", "nbd"], capture_output=True, check=False)
    if not Path("/dev/nbd0").exists():
        return "the kernel has no nbd module (/dev/nbd0 missing)"
    return None


@pytest.mark.skipif(_kernel_nbd() is not None, reason=str(_kernel_nbd()))
def test_a_kernel_nbd_device_is_a_plain_block_target(tmp_path: Path) -> None:
    """How a Ceph (rbd-nbd) or remote NBD volume reaches a Dom0: /dev/nbdX, served by
    the disk engine like any block device (no rule needed)."""
    image = tmp_path / "vol.qcow2"
    assert _img("create", "-q", "-f", "qcow2", str(image), "16M").returncode == 0
    subprocess.run(["qemu-nbd", "--format=qcow2", "-c", "/dev/nbd0", str(image)], check=True)
    try:
        engine = _open(tmp_path, Path("/dev/nbd0"), StorageRules())
        assert isinstance(engine, DiskEngine) and engine.target.is_block
        try:
            data = _stamp(MiB, MiB, 10)
            assert _io(engine, _write(MiB, data), request(IoKind.FLUSH)) == [IoStatus.OK] * 2
        finally:
            engine.close()
            engine.target.close()
    finally:
        subprocess.run(["qemu-nbd", "-d", "/dev/nbd0"], check=False)
    assert _as_raw(image, "qcow2")[MiB : 2 * MiB] == data
