"""Driver domains: the device-model right Dom0 must give, and how the backend waits for it.

A virtio disk whose ``backend=`` is a driver domain makes that domain the guest's
device model.  Under XSM's dummy policy (what a Xen booted with ``xsm=dummy`` runs)
creating an IOREQ server, mapping the guest's ioreq page, binding its event channels
and mapping its memory all need ``XSM_DM_PRIV``: the caller is the control domain, or
its *target* is the guest.  No xl option sets a target for a disk backend (libxl does
it only for x86 stub device models), so Dom0 runs ``virtio-diskd grant-targets``
(:mod:`virtio_diskd.ioreq.target_grants`), which for every guest whose virtio disks
name a driver domain:

1. calls ``xc_domain_set_target(backend, guest)`` (Xen) and ``xs_set_target(backend,
   guest)`` (xenstored: the backend may then read and write the guest's nodes);
2. writes ``/local/domain/<backend>/target = <guest>``, readable by the backend — the
   node libxl writes for a stub domain's target, and the signal this protocol waits on.

The driver domain's worker waits for that node before it creates the guest's IOREQ
server (:func:`await_target`): created earlier, the server would be refused, and on
real Xen a guest was seen to fault at its first MMIO access when the two raced.

Limits (Xen's, not ours): a domain's target is set once and Xen holds a reference
on the guest until the driver domain itself is destroyed.  So under the dummy policy
one driver domain is the device model of **one** guest, and a destroyed guest stays
a dying domain until its driver domain goes.  FLASK (``xsm=flask`` with a policy
that labels the driver domain as the guest's device model) is the way around both;
then no target is needed, and :func:`await_target` times out and goes on.

:class:`TargetPlanner` is the sans-IO part: events in, effects out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

import trio

from virtio_diskd.ioreq.xenstore.client import XenstoreClient
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

#: The guest's frontend node naming a virtio disk's backend domain.
BACKEND_ID = re.compile(r"^/local/domain/(\d+)/device/virtio_disk/(\d+)/backend-id$")
#: How long a driver domain's worker waits for Dom0 to make it the guest's device
#: model: libxl gives the backend 10 s to reach InitWait, and the rest of the set-up
#: (IOREQ server, window, state node) takes well under a second.
TARGET_WAIT_S = 6.0
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1


def target_path(backend: int) -> str:
    """The node naming the guest a driver domain is the device model of."""
    return f"/local/domain/{backend}/target"


def frontend_dir(guest: int) -> str:
    return f"/local/domain/{guest}/device/virtio_disk"


async def read_domid(xs: XenstoreClient, path: str) -> int | None:
    """A node holding a domain id (``backend-id``, ``target``), or None when it is
    absent, unreadable or not a domain id."""
    try:
        value = (await xs.read_or_none(path) or "").strip()
    except XenstoreError:
        return None
    return int(value) if value.isdigit() and len(value) <= 5 else None


@dataclass(frozen=True)
class SetTarget:
    """Make ``backend`` the device model of ``guest`` (Xen, xenstored, the node)."""

    backend: int
    guest: int


@dataclass(frozen=True)
class RefuseTarget:
    """``guest`` names ``backend``, which cannot serve it: say why, change nothing."""

    backend: int
    guest: int
    reason: str


TargetEffect = SetTarget | RefuseTarget


class TargetPlanner:
    """Which driver domain must become which guest's device model.

    Fed the ``backend-id`` of every virtio disk frontend (and what the target nodes
    already say, at start), it asks for each driver domain's target once, and refuses
    a second guest for a driver domain that already has one: Xen would refuse it
    (EINVAL), and the second guest's disks would wait in vain.
    """

    def __init__(self) -> None:
        #: driver domain -> the guest it is (or is being made) the device model of
        self.targets: dict[int, int] = {}
        self._refused: set[tuple[int, int]] = set()

    def known(self, backend: int, guest: int) -> None:
        """A target set before (its node exists): nothing to do for it again."""
        self.targets[backend] = guest

    def backend_named(self, guest: int, backend: int) -> list[TargetEffect]:
        """A virtio disk of ``guest`` is served by ``backend``."""
        if backend == 0 or not 0 < guest <= MAX_DOMID or not 0 < backend <= MAX_DOMID:
            return []  # Dom0 serves it (no target needed), or not a domain id at all
        if backend == guest:
            return self._refuse(backend, guest, "a guest cannot be its own disk's backend")
        current = self.targets.get(backend)
        if current == guest:
            return []
        if current is not None:
            return self._refuse(
                backend, guest,
                f"dom{backend} is already the device model of dom{current}: under XSM's "
                "dummy policy a driver domain serves one guest for its lifetime (give this "
                "guest another driver domain, or use FLASK)")
        self.targets[backend] = guest
        return [SetTarget(backend, guest)]

    def failed(self, backend: int, guest: int) -> None:
        """Setting the target failed: a later event may try again."""
        if self.targets.get(backend) == guest:
            del self.targets[backend]

    def domain_gone(self, domid: int) -> None:
        """A driver domain was destroyed: its domid may come back as a new domain."""
        self.targets.pop(domid, None)
        self._refused = {pair for pair in self._refused if domid not in pair}

    def _refuse(self, backend: int, guest: int, reason: str) -> list[TargetEffect]:
        if (backend, guest) in self._refused:
            return []  # said once per pair
        self._refused.add((backend, guest))
        return [RefuseTarget(backend, guest, reason)]


class TargetWait(Enum):
    GRANTED = "granted"  # Dom0 made this domain the guest's device model
    OTHER_GUEST = "other"  # this domain serves another guest: this one cannot be served
    ABSENT = "absent"  # no node in time: no helper running, or FLASK (no target needed)


async def await_target(xs: XenstoreClient, self_domid: int, guest: int,
                       timeout: float = TARGET_WAIT_S) -> tuple[TargetWait, int | None]:
    """Wait (at most ``timeout``) until Dom0 says this driver domain is ``guest``'s
    device model; returns what the node says in the end."""
    path = target_path(self_domid)

    async def look() -> int | None:
        return await read_domid(xs, path)

    with trio.move_on_after(timeout if timeout >= 0 else math.inf):
        async with xs.watch(path) as events:
            async for _event in events:  # the first event fires at once
                current = await look()
                if current == guest:
                    return TargetWait.GRANTED, current
                if current is not None:
                    return TargetWait.OTHER_GUEST, current
    current = await look()
    if current == guest:
        return TargetWait.GRANTED, current
    return (TargetWait.ABSENT, None) if current is None else (TargetWait.OTHER_GUEST, current)
