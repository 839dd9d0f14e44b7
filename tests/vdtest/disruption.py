"""A guest's verifying workload through a disruption of the daemon (a killed worker, a
restart, a dying storage server), and the checks that the guest did not notice."""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable

import trio

from vdtest.daemonrun import Running
from virtio_diskd.ioreq.sim.linux_driver import VirtioBlkDriver
from virtio_diskd.ioreq.sim.workload import Workload, WorkloadSpec

LIBXL_DEADLINE = 10.0


async def through_disruption(run: Running, driver: VirtioBlkDriver, disrupt:
                              Callable[[], Awaitable[None]], *, domid: int = 1,
                              ) -> tuple[Workload, float]:
    """Run a verifying workload, disrupt the daemon once requests are flowing; returns
    the workload and the guest's longest wait for a completion across the disruption."""
    guest = run.host.guests[domid]
    completions: list[float] = []
    workload = Workload(driver, guest.vcpus[0], WorkloadSpec(
        mix="mixed", requests=2500, queue_depth=16, sectors=4096, seed=11, write_first=False),
        progress=lambda done, total: completions.append(time.monotonic()))
    disrupted_at = 0.0
    async with trio.open_nursery() as nursery:
        async def guest_io() -> None:
            result = await trio.to_thread.run_sync(lambda: guest.vcpus[0].call(workload.run, 120))
            workload.result = result

        nursery.start_soon(guest_io)
        with trio.fail_after(30):
            while len(completions) < 40:  # requests are in flight and completing
                await trio.sleep(0.005)
        disrupted_at = time.monotonic()
        await disrupt()
    before = [t for t in completions if t <= disrupted_at]
    after = [t for t in completions if t > disrupted_at]
    assert after, "no request completed after the disruption"
    # what the guest lives through: the longest time without a completion, from the
    # last one before the disruption on
    times = before[-1:] + after
    return workload, max(b - a for a, b in itertools.pairwise(times))


def assert_guest_did_not_notice(run: Running, workload: Workload, driver: VirtioBlkDriver,
                                image: str, read_at: Callable[[int, int], bytes] | None = None,
                                ) -> None:
    """The workload finished with every read verified, no completion twice, no reset,
    and every acknowledged write on the target (read with ``read_at``: raw by default)."""
    result = workload.result
    assert result.ok, (result.errors, result.mismatches[:3])
    assert result.requests == 2500
    assert not driver.bad_ring, driver.bad_ring  # no completion twice
    problem = run.host.guests[1].vcpus[0].call(driver.device_intact, 10)
    assert problem is None, problem  # no reset, nothing broken

    def read_raw(offset: int, length: int) -> bytes:
        with open(image, "rb") as file:
            file.seek(offset)
            return file.read(length)

    assert workload.verify_disk(read_at or read_raw) > 0  # acknowledged writes are there
    assert not result.mismatches


async def destroy_within_deadline(run: Running, domid: int = 1) -> None:
    started = time.monotonic()
    assert await run.host.destroy(domid) == []
    assert time.monotonic() - started < LIBXL_DEADLINE
