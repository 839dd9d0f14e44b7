"""Where the daemon finds its guests: its own ``backend/virtio_disk`` directory in xenstore.

libxl writes every ``specification=virtio`` disk of a guest under
``/local/domain/<backend>/backend/virtio_disk/<guest>/<devid>/``, where
``<backend>`` is the domain running the daemon (0 in Dom0, a driver domain's
id otherwise).  The supervisor watches that directory and keeps one worker per
guest listed in it; a worker serves ``…/<guest>/`` (:mod:`.guest_service`).
These paths are the only place the layout is spelled out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio
import trio.lowlevel

from virtio_diskd.ioreq.xenstore.client import XenstoreConnectionLost, drain
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

#: Largest guest domid (DOMID_FIRST_RESERVED - 1).
MAX_GUEST_DOMID = 0x7FEF


def backend_root(self_domid: int) -> str:
    """The directory libxl fills with our guests' virtio disks."""
    return f"/local/domain/{self_domid}/backend/virtio_disk"


def guest_dir(self_domid: int, domid: int) -> str:
    """One guest's virtio disks (one ``<devid>`` directory each)."""
    return f"{backend_root(self_domid)}/{domid}"


async def own_domid(holder: XenstoreHolder) -> int:
    """Our domain id: the ``domid`` node of our xenstore home, 0 when absent (Dom0)."""
    xs = await holder.client()
    value = await xs.read_or_none("domid")
    if value is None or not value.strip().isdigit():
        return 0
    return int(value.strip())


async def guests_with_devices(holder: XenstoreHolder, self_domid: int) -> list[int]:
    """The guests that have a directory under our backend root (hostile names skipped)."""
    xs = await holder.client()
    try:
        names = await xs.directory(backend_root(self_domid))
    except XenstoreError:
        return []
    return sorted(int(name) for name in names
                  if name.isdigit() and 0 < int(name) <= MAX_GUEST_DOMID)


async def has_devices(holder: XenstoreHolder, self_domid: int, domid: int) -> bool:
    """Whether guest ``domid`` still has a directory under our backend root."""
    return await (await holder.client()).exists(guest_dir(self_domid, domid))


async def watch_guests(holder: XenstoreHolder, self_domid: int,
                       on_change: Callable[[list[int]], Awaitable[None]]) -> None:
    """Call ``on_change`` with the guests that have devices, at once and after every
    burst of changes under the backend root; re-arms after xenstored comes back.
    Runs until cancelled."""
    root = backend_root(self_domid)
    while True:
        xs = await holder.client()
        try:
            async with xs.watch(root) as events:
                async for _event in events:  # the first event fires when the watch is set
                    drain(events)  # one rescan covers a burst of node writes
                    await on_change(await guests_with_devices(holder, self_domid))
        except XenstoreConnectionLost:
            await trio.lowlevel.checkpoint()
            continue


async def fail_guest_devices(holder: XenstoreHolder, self_domid: int, domid: int,
                             reason: str) -> list[int]:
    """Give up on every device of guest ``domid`` that is still open: ``error`` node,
    then state 6 (what a worker does for one device it cannot serve; used by the
    supervisor when the guest's worker keeps crashing).  Returns the devids failed."""
    xs = await holder.client()
    root = guest_dir(self_domid, domid)
    failed = []
    try:
        names = await xs.directory(root)
    except XenstoreError:
        return []
    for name in names:
        if not name.isdigit():
            continue
        path = f"{root}/{name}"
        state = await xs.read_or_none(f"{path}/state")
        if state is None or state.strip() in ("5", "6"):
            continue
        await xs.write(f"{path}/error", reason[:1000])
        await xs.write(f"{path}/state", "6")
        failed.append(int(name))
    return failed
