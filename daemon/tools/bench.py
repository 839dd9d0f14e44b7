"""``virtio-diskd bench``: every suite, printed as tables, optionally written as JSON."""

from __future__ import annotations

import dataclasses
import json
from typing import Any


def main(*, suites: list[str] | None, quick: bool, json_path: str | None,
         seconds: float, poll_us: int = 50, vcpu_spin_us: int = 200,
         workloads: list[str] | None = None) -> int:
    from virtio_diskd.daemon.tools import bench_engine, bench_model, bench_xenstore

    chosen = suites or ["start", "full", "model", "engine", "xenstore"]
    if workloads:
        from virtio_diskd.daemon.tools.bench_full import WORKLOADS

        known = [workload[0] for workload in WORKLOADS]
        unknown = sorted(set(workloads) - set(known))
        if unknown:
            print(f"virtio-diskd bench: no workload {', '.join(unknown)} "
                  f"(the full suite has {', '.join(known)})")
            return 2
    report: dict[str, Any] = {}
    if "start" in chosen:
        from virtio_diskd.daemon.tools import bench_start

        report["startup"] = dataclasses.asdict(bench_start.main(quick=quick))
    if "full" in chosen:
        from virtio_diskd.daemon.tools import bench_full

        full = bench_full.main(bench_full.BenchSettings(quick=quick, poll_us=poll_us,
                                                        vcpu_spin_us=vcpu_spin_us,
                                                        workloads=workloads))
        report["workloads"] = [dataclasses.asdict(f) for f in full.workloads]
        report["syscalls_per_request"] = [dataclasses.asdict(s) for s in full.syscalls]
        report["traps"] = [dataclasses.asdict(t) for t in full.traps]
        report["worker_rss_mib"] = max(full.rss_mib, default=None)
    if "model" in chosen:
        bench_model.main(2_000 if quick else 20_000)
    if "engine" in chosen:  # raw file, O_DIRECT, and the qcow2 and NBD rows
        report["engine"] = [dataclasses.asdict(f) for f in bench_engine.main(quick=quick)]
    if "xenstore" in chosen:
        bench_xenstore.main(0.3 if quick else seconds)
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {json_path}")
    return 0
