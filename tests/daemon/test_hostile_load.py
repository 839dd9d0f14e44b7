"""A hostile guest next to a well-behaved one, on one daemon (its own process).

The attacker, through its own trapped MMIO like any guest: thousands of reads of
addresses outside its RAM, GET_IDs with huge buffers, and a queue filled with
maximum-size requests (seg_max buffers of size_max, all over one buffer); then it
is destroyed while they are in flight.  Meanwhile the other guest runs a verifying
workload.  Must hold: the attacker's worker stays under its memory budget (its own
memory: RssAnon, sampled; guest pages it maps are the guest's), the other guest's
data verifies, the attacker's teardown meets libxl's deadline, the daemon stays up.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import trio

from vdtest.daemonrun import running_daemon
from virtio_diskd.daemon.status import collect
from virtio_diskd.ioreq.guest_service import WORKER_BUDGET_MIB
from virtio_diskd.ioreq.sim.linux_driver import Request
from virtio_diskd.ioreq.sim.toolstack import DiskSpec
from virtio_diskd.ioreq.sim.virtio_spec import BLK_T_GET_ID, BLK_T_IN
from virtio_diskd.ioreq.sim.workload import WorkloadSpec

LIBXL_DEADLINE = 10.0
ATTACKER, VICTIM = 3, 4


def _rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class PeakSampler:
    """The highest RssAnon of one process, sampled every few ms from a thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_kib, self.samples = pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kib = max(self.peak_kib, _rss_anon_kib(self.pid))
            except OSError:
                return
            self.samples += 1
            time.sleep(0.005)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def test_a_hostile_guest_stays_in_its_budget_and_the_other_guest_is_served(
        tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as run:
        bad_plan = (await run.create(ATTACKER, [DiskSpec(run.image("bad.img", 256))],
                                     memory_mib=320))[0]
        good_plan = (await run.create(VICTIM, [DiskSpec(run.image("good.img", 16))]))[0]
        bad = await run.driver(ATTACKER, bad_plan)
        good = await run.driver(VICTIM, good_plan)
        worker = next(s for s in collect(str(tmp_path / "run"))
                      if s.get("domid") == ATTACKER)
        baseline_kib = _rss_anon_kib(worker["pid"])
        guest = run.host.guests[ATTACKER]
        vcpu = guest.vcpus[0]
        seg_max, size_max = bad.seg_max, bad.size_max
        biggest = (seg_max - 1) * size_max
        buffer = bad.ram.alloc(biggest)
        in_flight: list[Request] = []

        def attack() -> int:
            # wild addresses: each 2 MiB apart, so each is a new chunk to (fail to) map
            for batch in range(40):
                wild = [Request(BLK_T_IN, sector=0, data_len=512,
                                data_addr=(1 << 40) + (batch * 64 + i) * (2 << 20))
                        for i in range(64)]
                bad.submit(0, wild)
                vcpu.wait_until(lambda w=wild: all(r.status is not None for r in w), 30)
            get_ids = [Request(BLK_T_GET_ID, sector=0, data_addr=buffer, data_len=biggest)
                       for _ in range(32)]
            bad.submit(0, get_ids)
            vcpu.wait_until(lambda: all(r.status is not None for r in get_ids), 30)
            # every slot of the queue: a maximum-size read, all over one buffer
            in_flight.extend(Request(BLK_T_IN, sector=0, data_addr=buffer, data_len=biggest)
                             for _ in range(256))
            return bad.submit(0, in_flight)

        victim_results = []

        async def victim() -> None:
            victim_results.append(await run.workload(VICTIM, good, WorkloadSpec(
                requests=1500, queue_depth=8, sectors=16384, seed=7)))

        with PeakSampler(worker["pid"]) as sampler:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(victim)
                added = await trio.to_thread.run_sync(lambda: vcpu.call(attack, 120))
                await trio.sleep(2.0)  # the worker holds the queue's worth of requests
                snapshot = next(s for s in collect(str(tmp_path / "run"))
                                if s.get("domid") == ATTACKER)
                device = next(iter(snapshot["devices"].values()))
                started = time.monotonic()
                stuck = await run.host.destroy(ATTACKER)
                teardown = time.monotonic() - started
        peak_mib = sampler.peak_kib / 1024
        print(f"\nhostile guest: {added} maximum-size requests ({biggest >> 20} MiB each) "
              f"in flight, 2560 wild reads, 32 huge GET_IDs; its worker's own memory "
              f"(RssAnon) peaked at {peak_mib:.1f} MiB (baseline {baseline_kib / 1024:.1f} "
              f"MiB; budget {WORKER_BUDGET_MIB} MiB; {sampler.samples} samples); "
              f"destroy with them in flight took {teardown:.2f} s")
        print(f"attacker's device before destroy: {device}")
        assert added == 256
        assert stuck == [] and teardown < LIBXL_DEADLINE
        assert peak_mib < WORKER_BUDGET_MIB
        result = victim_results[0]
        assert result.ok, (result.errors, result.mismatches)
        print(f"well-behaved guest: {result.reads} reads, {result.writes} writes, "
              f"{result.verified_sectors} sectors verified")
        assert run.daemon.poll() is None, "the daemon died"
        assert "Traceback" not in run.log_text()
