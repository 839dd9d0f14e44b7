"""The worker's seccomp filter: what it refuses, what it lets through, and that workers
run under it (and without it with ``--no-syscall-filter``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vdtest.daemonrun import running_daemon
from vdtest.disruption import destroy_within_deadline
from virtio_diskd.daemon import syscall_filter
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.workload import WorkloadSpec

try:
    syscall_filter._library()
except OSError:  # pragma: no cover (CI installs libseccomp2)
    pytest.skip("libseccomp is not installed", allow_module_level=True)

#: run in a child process: the filter cannot be lifted once installed
PROBE = textwrap.dedent("""
    import ctypes, errno, json, os, socket, subprocess, sys, threading
    from virtio_diskd.daemon import syscall_filter
    out = {"installed": syscall_filter.install().describe(), "mode": syscall_filter.mode()}
    libc = ctypes.CDLL(None, use_errno=True)

    def call(name, *args):
        result = getattr(libc, name)(*args)
        return "ok" if result >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")

    def sock(family):
        try:
            socket.socket(family, socket.SOCK_STREAM).close()
            return "ok"
        except OSError as exc:
            return errno.errorcode.get(exc.errno, "?")

    out["inet"] = sock(socket.AF_INET)
    out["inet6"] = sock(socket.AF_INET6)
    out["unix"] = sock(socket.AF_UNIX)
    out["ptrace"] = call("ptrace", 0, 0, 0, 0)
    out["mount"] = call("mount", b"none", b"/mnt", b"tmpfs", 0, None)
    out["unshare"] = call("unshare", 0x00020000)
    out["setuid"] = call("setuid", 65534)
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    out["thread"] = "ok"
    out["child"] = subprocess.run(["/bin/sh", "-c", "exit 3"]).returncode
    path = sys.argv[1]
    with open(path, "wb") as handle:
        handle.write(b"data")
        os.fsync(handle.fileno())
    fd = os.open(path, os.O_RDONLY)
    out["read_back"] = os.pread(fd, 4, 0).decode()
    os.close(fd)
    # native AIO, the O_DIRECT engine's (io_setup refused: 32 threads instead, 16
    # syscalls per request where AIO takes one per batch)
    ctx = ctypes.c_ulong(0)
    number = {"x86_64": 206, "aarch64": 0}[os.uname().machine]
    out["io_setup"] = call("syscall", number, 8, ctypes.byref(ctx))
    os.unlink(path)
    print(json.dumps(out))
""")


def test_the_filter_refuses_what_serving_a_disk_never_needs(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["mode"] == 2  # SECCOMP_MODE_FILTER
    assert out["installed"].startswith("seccomp (")
    # refused as if the kernel had no such call
    assert out["inet"] == out["inet6"] == "ENOSYS"
    assert out["ptrace"] == out["mount"] == out["unshare"] == out["setuid"] == "ENOSYS"
    # the data path, threads and the image server's start still work
    assert out["unix"] == "ok" and out["thread"] == "ok"
    assert out["child"] == 3  # a child ran (and is filtered too: inherited)
    assert out["read_back"] == "data" and not (tmp_path / "f").exists()
    assert out["io_setup"] == "ok"


@pytest.mark.parametrize("filtered", [True, False], ids=["filtered", "no-syscall-filter"])
async def test_workers_serve_under_the_filter(tmp_path: Path, filtered: bool) -> None:
    async with running_daemon(tmp_path, [] if filtered else ["--no-syscall-filter"]) as run:
        plans = await run.create(1, [DiskSpec(run.image("a.img", 8), "xvda"),
                                     DiskSpec(run.image("b.img", 8), "xvdb",
                                              grant_usage=True)])
        for plan, grants, seed in ((plans[0], False, 1), (plans[1], True, 2)):
            driver = await run.driver(1, plan, grants=grants)
            result = await run.workload(1, driver, WorkloadSpec(requests=300, sectors=2048,
                                                                seed=seed))
            assert result.ok, result.mismatches
        worker = run.serving_worker(1)
        assert syscall_filter.mode(worker) == (2 if filtered else 0)
        assert syscall_filter.mode(run.daemon.pid) == 0  # the supervisor is not filtered
        log = run.log_text()
        assert ("syscall_filter='seccomp (" in log) == filtered
        assert "worker.syscall_filter_failed" not in log
        await destroy_within_deadline(run)
