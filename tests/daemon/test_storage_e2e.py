"""Image formats and NBD storage through the whole daemon, with a simulated guest's
verifying workload: a qcow2 overlay on a backing chain across a daemon restart (the
image's qemu-storage-daemon is kept and reused), and an NBD export whose server dies
mid-I/O — restarted at once (the guest does not notice) or gone for good (requests
fail with IOERR, acknowledged writes are on the server, the device carries on)."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest
import trio

from vdtest.daemonrun import Running, running_daemon
from vdtest.disruption import (
    assert_guest_did_not_notice,
    destroy_within_deadline,
    through_disruption,
)
from vdtest.nbdserver import QemuNbd, missing_tools
from virtio_diskd.daemon import control
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec

MiB = 1 << 20


def _config(run_dir: Path, lines: list[str]) -> list[str]:
    path = run_dir / "virtio-diskd.conf"
    path.write_text("\n".join(lines) + "\n")
    return ["--config", str(path)]


def _raw_reader(image: Path, fmt: str):  # type: ignore[no-untyped-def]
    out = image.with_name(image.name + ".raw")
    done = subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr

    def read_at(offset: int, length: int) -> bytes:
        with open(out, "rb") as f:
            f.seek(offset)
            return f.read(length)

    return read_at


def _ctl_list(run: Running) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        control.main(str(run.work / "run"), "list", None, None)
    return out.getvalue()


@pytest.mark.skipif(missing_tools("qemu-img", "qemu-storage-daemon") is not None,
                    reason=str(missing_tools("qemu-img", "qemu-storage-daemon")))
async def test_qcow2_chain_through_a_daemon_restart(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    base, over = images / "base.qcow2", images / "guest1.qcow2"
    raw = tmp_path / "base.raw"
    raw.write_bytes(b"".join(struct.pack("<QQ", at, 1) for at in range(0, 8 * MiB, 16)))
    for argv in (["convert", "-f", "raw", "-O", "qcow2", str(raw), str(base)],
                 ["create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(over)]):
        await trio.run_process(["qemu-img", *argv])
    extra = _config(tmp_path, [f"allow_dir = {images}", f"image_format = {images}/*.qcow2 qcow2"])
    async with running_daemon(tmp_path, extra) as run:
        plan = (await run.create(1, [DiskSpec(str(over))]))[0]
        driver = await run.driver(1, plan)
        assert "format=qcow2" in _ctl_list(run)

        async def restart() -> None:
            await run.stop_daemon(kill=False)
            await run.start_daemon()

        workload, _ = await through_disruption(run, driver, restart)
        result = workload.result
        assert result.ok and result.requests == 2500, (result.errors, result.mismatches[:3])
        assert not driver.bad_ring
        assert run.host.guests[1].vcpus[0].call(driver.device_intact, 10) is None
        log = run.log_text()
        assert "storage.started" in log and "storage.adopted" in log
        assert "format=qcow2" in log
        sock = run.work / "run" / "storage" / f"dom1-{plan.devid}.sock"
        assert sock.exists()
        await destroy_within_deadline(run)
        with trio.fail_after(10):  # the device's teardown stops the image's daemon
            while sock.exists():
                await trio.sleep(0.05)
    check = await trio.run_process(["qemu-img", "check", "-f", "qcow2", str(over)],
                                   capture_stdout=True, check=False)
    assert check.returncode == 0, check.stdout
    # every acknowledged write is in the image; blocks the guest never wrote still
    # come from the backing file
    reader = _raw_reader(over, "qcow2")
    assert workload.verify_disk(reader) > 0 and not workload.result.mismatches
    untouched = [b for b in range(2048) if b not in workload.generation]
    assert untouched
    for block in untouched[:32]:
        assert reader(block * 4096, 16) == struct.pack("<QQ", block * 4096, 1)


needs_qemu_nbd = pytest.mark.skipif(missing_tools("qemu-nbd") is not None,
                                    reason=str(missing_tools("qemu-nbd")))


async def _nbd_guest(tmp_path: Path) -> tuple[Path, QemuNbd, list[str]]:
    image = tmp_path / "export.img"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    server = QemuNbd(image, tmp_path / "nbd.sock").start()
    placeholder = tmp_path / "vol1"  # what the xl disk line names (libxl wants it to exist)
    placeholder.write_bytes(b"")
    return placeholder, server, _config(tmp_path, [f"nbd_export = {placeholder} {server.uri}"])


@needs_qemu_nbd
async def test_nbd_server_restarted_mid_io_the_guest_does_not_notice(tmp_path: Path) -> None:
    placeholder, server, extra = await _nbd_guest(tmp_path)
    try:
        async with running_daemon(tmp_path, extra) as run:
            plan = (await run.create(1, [DiskSpec(str(placeholder))]))[0]
            driver = await run.driver(1, plan)

            async def bounce() -> None:
                await trio.to_thread.run_sync(server.kill)
                await trio.sleep(0.5)
                await trio.to_thread.run_sync(server.start)

            workload, longest = await through_disruption(run, driver, bounce)
            assert_guest_did_not_notice(run, workload, driver, str(server.image))
            log = run.log_text()
            assert "nbd.disconnected" in log and "nbd.reconnected" in log
            print(f"\nNBD server killed and restarted: longest wait {longest * 1000:.0f} ms")
            await destroy_within_deadline(run)
    finally:
        server.stop()


@needs_qemu_nbd
async def test_nbd_server_gone_requests_fail_with_ioerr_and_acked_writes_stay(
        tmp_path: Path) -> None:
    placeholder, server, extra = await _nbd_guest(tmp_path)
    try:
        async with running_daemon(tmp_path, extra) as run:
            plan = (await run.create(1, [DiskSpec(str(placeholder))]))[0]
            driver = await run.driver(1, plan)
            guest = run.host.guests[1]
            workload = Workload(driver, guest.vcpus[0], WorkloadSpec(
                mix="write", requests=3000, queue_depth=16, sectors=4096, seed=5,
                write_first=False))
            async with trio.open_nursery() as nursery:
                async def guest_io() -> None:
                    workload.result = await trio.to_thread.run_sync(
                        lambda: guest.vcpus[0].call(workload.run, 120))

                nursery.start_soon(guest_io)
                with trio.fail_after(30):
                    while len(workload.acked) < 100:
                        await trio.sleep(0.005)
                await trio.to_thread.run_sync(server.kill)  # and it stays away
            result = workload.result
            assert result.errors > 0, "requests after the loss must fail, not hang"
            assert result.requests == 3000  # every request completed, one way or the other
            fd = os.open(server.image, os.O_RDONLY)
            try:  # every acknowledged write is on the server's image
                assert workload.verify_disk(lambda off, n: os.pread(fd, n, off)) >= 100
            finally:
                os.close(fd)
            assert not result.mismatches
            assert "nbd.requests_failed" in run.log_text()
            # the server comes back: the same device serves a new workload
            await trio.to_thread.run_sync(server.start)
            with trio.fail_after(5):  # the engine keeps trying, with or without requests
                while "nbd.reconnected" not in run.log_text():
                    await trio.sleep(0.05)
            again = await run.workload(1, driver, WorkloadSpec(requests=300, sectors=4096,
                                                               seed=6))
            assert again.ok, again.mismatches
            await destroy_within_deadline(run)
    finally:
        server.stop()
