"""Dom0's side of driver domains: make each one the device model of its guest.

The service behind ``virtio-diskd grant-targets`` (protocol and limits:
:mod:`virtio_diskd.ioreq.driver_domain`).  It watches ``/local/domain`` for virtio
disk frontends (libxl writes ``device/virtio_disk/<devid>/backend-id`` when it adds
a disk, before it waits for the backend's InitWait) and, for a frontend served by a
driver domain, sets the target in Xen and in xenstored and then writes the node the
driver domain waits on.  It must act inside libxl's 10 s window, so every step is
bounded and a failure is logged with both domains and never ends the service.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable

import structlog
import trio

from virtio_diskd.ioreq.driver_domain import (
    BACKEND_ID,
    RefuseTarget,
    SetTarget,
    TargetEffect,
    TargetPlanner,
    frontend_dir,
    read_domid,
    target_path,
)
from virtio_diskd.ioreq.xen.interface import DomainControl, XenError
from virtio_diskd.ioreq.xenstore.client import XenstoreClient
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

log = structlog.get_logger("virtio_diskd.targets")

DOMAINS = "/local/domain"
#: xs_set_target fails until xenstored knows the guest (libxl introduces it early,
#: but the frontend can be seen first): retried this long
INTRODUCE_WAIT_S = 3.0
_DOMAIN = re.compile(r"^/local/domain/(\d+)$")


async def _domains(xs: XenstoreClient) -> list[int]:
    try:
        return [int(n) for n in await xs.directory(DOMAINS) if n.isdigit() and len(n) <= 5]
    except XenstoreError:
        return []


class TargetGrants:
    """The service: events from xenstore through :class:`TargetPlanner` to Xen calls."""

    def __init__(self, holder: XenstoreHolder, control: DomainControl) -> None:
        self.holder = holder
        self.control = control
        self.planner = TargetPlanner()
        self.granted = 0

    async def run(self, ready: Callable[[], None] | None = None) -> None:
        xs = await self.holder.client()
        for backend in await _domains(xs):  # targets set by an earlier run
            guest = await read_domid(xs, target_path(backend))
            if guest is not None:
                self.planner.known(backend, guest)
        async with trio.open_nursery() as nursery, xs.watch(DOMAINS) as events:
            nursery.start_soon(self._watch_releases, xs)
            for guest in await _domains(xs):  # guests created before we started
                await self._scan_guest(xs, guest)
            log.info("targets.ready", known=dict(sorted(self.planner.targets.items())))
            if ready is not None:
                ready()
            async for event in events:
                match = BACKEND_ID.match(event.path)
                if match is None:
                    continue
                named = await read_domid(xs, event.path)
                if named is not None:
                    await self._perform(xs, self.planner.backend_named(int(match.group(1)),
                                                                       named))

    async def _scan_guest(self, xs: XenstoreClient, guest: int) -> None:
        try:
            devids = await xs.directory(frontend_dir(guest))
        except XenstoreError:
            return
        for devid in devids:
            backend = await read_domid(xs, f"{frontend_dir(guest)}/{devid}/backend-id")
            if backend is not None:
                await self._perform(xs, self.planner.backend_named(guest, backend))

    async def _watch_releases(self, xs: XenstoreClient) -> None:
        """A destroyed driver domain's domid may return as a new domain: forget it."""
        async with xs.watch("@releaseDomain") as released:
            async for _event in released:
                for backend in list(self.planner.targets):
                    try:
                        alive = await xs.is_domain_introduced(backend)
                    except XenstoreError:
                        alive = await xs.exists(f"{DOMAINS}/{backend}")
                    if not alive:
                        log.info("targets.driver_domain_gone", backend=backend)
                        self.planner.domain_gone(backend)

    async def _perform(self, xs: XenstoreClient, effects: list[TargetEffect]) -> None:
        for effect in effects:
            if isinstance(effect, RefuseTarget):
                log.error("targets.refused", backend=effect.backend, guest=effect.guest,
                          reason=effect.reason)
            elif isinstance(effect, SetTarget):
                await self._set_target(xs, effect)

    async def _set_target(self, xs: XenstoreClient, effect: SetTarget) -> None:
        backend, guest = effect.backend, effect.guest
        started = trio.current_time()
        try:
            self.control.set_target(backend, guest)
        except XenError as exc:
            hint = ("the driver domain already has a target (Xen sets one once per domain)"
                    if exc.errno == errno.EINVAL else
                    "is this Dom0, and is Xen's XSM policy dummy (xsm=dummy)?"
                    if exc.errno == errno.EPERM else "")
            log.error(  # noqa: TRY400 (the reason is in the fields)
                "targets.xen_refused", backend=backend, guest=guest, error=str(exc),
                hint=hint)
            self.planner.failed(backend, guest)
            return
        deadline = trio.current_time() + INTRODUCE_WAIT_S
        while True:
            try:
                await xs.set_target(backend, guest)
                break
            except XenstoreError as exc:
                if trio.current_time() > deadline:
                    log.error(  # noqa: TRY400 (the reason is in the fields)
                        "targets.xenstore_refused", backend=backend, guest=guest,
                        error=str(exc))
                    return  # Xen's relation stays (it cannot be undone); the node says no
                await trio.sleep(0.05)
        try:
            await xs.write(target_path(backend), str(guest))
            await xs.set_perms(target_path(backend), ["n0", f"r{backend}"])
        except XenstoreError as exc:
            log.error(  # noqa: TRY400 (the reason is in the fields)
                "targets.node_not_written", backend=backend, guest=guest, error=str(exc))
            return
        self.granted += 1
        log.info("targets.granted", backend=backend, guest=guest,
                 took_ms=round((trio.current_time() - started) * 1e3, 1))
