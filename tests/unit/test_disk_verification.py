"""What ``Workload.verify_disk`` accepts as "the acknowledged write is on the disk".

A block must hold its last acknowledged generation, or, sector by sector, a later one
(a write after it that failed — the device does not say how much of a failed write was
done — or was still in flight).  Anything older, or anything else, is a lost write."""

from __future__ import annotations

import pytest

from virtio_diskd.ioreq.sim.workload import SECTOR, Workload, WorkloadSpec, sector_stamp

SEED = 9
BLOCK = 4096


def workload(acked: int, last: int) -> Workload:
    """Block 3 written ``last`` times, the ``acked``-th write the last one acknowledged."""
    run = Workload(None, None, WorkloadSpec(mix="write", sectors=64, seed=SEED,  # type: ignore[arg-type]
                                            block_size=BLOCK))
    run.generation[3] = last
    run.acked[3] = acked
    return run


def content(*generations: int) -> bytes:
    """Block 3 with each sector's stamp of the generation given for it (the last
    repeated)."""
    first = 3 * BLOCK // SECTOR
    sectors = BLOCK // SECTOR
    picked = [generations[min(i, len(generations) - 1)] for i in range(sectors)]
    return b"".join(sector_stamp(first + i, g, SEED) for i, g in enumerate(picked))


def check(run: Workload, disk: bytes) -> list[str]:
    assert run.verify_disk(lambda offset, size: disk[:size] if offset == 3 * BLOCK
                           else b"") == 1
    return run.result.mismatches


@pytest.mark.parametrize("held", [(2,), (3,), (4,), (2, 4), (3, 2, 4, 3)],
                         ids=["acked", "failed-later", "last-in-flight", "torn-later",
                              "sectors-mixed"])
def test_the_acked_write_or_a_later_one_is_accepted(held: tuple[int, ...]) -> None:
    run = workload(acked=2, last=4)
    assert check(run, content(*held)) == []
    assert run.result.disk_blocks_checked == 1


@pytest.mark.parametrize("disk", [content(1), content(2, 1), bytes(BLOCK), content(5),
                                  content(2)[:-1] + b"\x00"],
                         ids=["older", "one-sector-older", "zeros", "never-written",
                              "one-byte-off"])
def test_a_lost_or_damaged_acked_write_is_a_mismatch(disk: bytes) -> None:
    run = workload(acked=2, last=4)
    (mismatch,) = check(run, disk)
    assert "does not hold the acknowledged write" in mismatch
    assert run.result.disk_blocks_checked == 0


def test_with_no_later_write_only_the_acked_generation_is_accepted() -> None:
    assert check(workload(acked=3, last=3), content(3)) == []
    assert check(workload(acked=3, last=3), content(4))  # a generation never written
    assert check(workload(acked=3, last=3), content(2))
