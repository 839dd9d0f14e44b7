"""``virtio-diskd demo``: the simulated host end to end.

Stage 1 (this version): the simulated xenstored and libxl-contract toolstack
create a guest with two virtio disks, a XenBus responder plays the backend's
part of the handshake, and the guest is destroyed again.  Each step is
checked; the exit status is 0 only when all of them held.
"""

from __future__ import annotations

import os
import tempfile

import trio

from virtio_diskd.ioreq.sim.toolstack import DiskSpec, GuestSpec, Toolstack
from virtio_diskd.ioreq.sim.xenstored import Xenstored
from virtio_diskd.ioreq.xenstore.client import XenstoreClient

BACKEND_ROOT = "/local/domain/0/backend/virtio_disk"


async def _responder(xs: XenstoreClient) -> None:
    async with xs.watch(BACKEND_ROOT) as events:
        async for _ in events:
            for fe in await _children(xs, BACKEND_ROOT):
                for devid in await _children(xs, f"{BACKEND_ROOT}/{fe}"):
                    path = f"{BACKEND_ROOT}/{fe}/{devid}/state"
                    state = await xs.read_or_none(path)
                    if state == "1":
                        await xs.write(path, "2")
                    elif state == "5":
                        await xs.write(path, "6")


async def _children(xs: XenstoreClient, path: str) -> list[str]:
    try:
        return await xs.directory(path)
    except OSError:
        return []


async def _demo(tmp: str) -> bool:
    server = Xenstored()
    socket_path = os.path.join(tmp, "xenstored.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, socket_path)
        async with XenstoreClient.open(socket_path) as xs:
            nursery.start_soon(_responder, xs)
            toolstack = Toolstack(xs)
            guest = GuestSpec(1, "demo-guest", [DiskSpec(os.path.join(tmp, "a.img"), "xvda"),
                                                DiskSpec(os.path.join(tmp, "b.img"), "xvdb")])
            started = trio.current_time()
            plans = await toolstack.create(guest)
            print(f"created {guest.name}: {len(plans)} disks in InitWait after "
                  f"{trio.current_time() - started:.3f} s")
            for plan in plans:
                print(f"  {plan.backend}  base={plan.base:#x} irq={plan.irq}")
            stuck = await toolstack.destroy(guest.domid)
            gone = not await xs.exists(f"{BACKEND_ROOT}/{guest.domid}")
            print(f"destroyed {guest.name}: stuck devices={stuck}, backend dirs removed={gone}")
        nursery.cancel_scope.cancel()
    return not stuck and gone


def main(seconds: float = 2.0) -> int:
    del seconds
    with tempfile.TemporaryDirectory(prefix="virtio-diskd-demo-") as tmp:
        ok = trio.run(_demo, tmp)
    print("demo: PASS" if ok else "demo: FAIL")
    return 0 if ok else 1
