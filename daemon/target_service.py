"""``virtio-diskd grant-targets``: the Dom0 service that lets driver domains serve guests.

Runs in Dom0 beside xenstored (unit ``virtio-diskd-targets.service``), before any
guest whose disks name a driver domain is created.  What it does and why:
:mod:`virtio_diskd.ioreq.driver_domain`; the loop: :mod:`virtio_diskd.ioreq.target_grants`.
A lost xenstore connection is waited out and everything is scanned again.
"""

from __future__ import annotations

import os
import signal

import structlog
import trio

from virtio_diskd.daemon import logsetup, sdnotify
from virtio_diskd.ioreq.target_grants import TargetGrants
from virtio_diskd.ioreq.xen.interface import DomainControl, XenError
from virtio_diskd.ioreq.xenstore.client import XenstoreConnectionLost
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder, XenstoreUnreachable

log = structlog.get_logger("virtio_diskd.targets")


def open_control(simulated: str | None) -> DomainControl:
    if simulated:
        from virtio_diskd.ioreq.xen.simulated import SimDomainControl

        return SimDomainControl(os.path.join(simulated, "hypervisor.sock"))
    from virtio_diskd.ioreq.xen.libxen import LibxenDomainControl

    return LibxenDomainControl()


async def serve(holder: XenstoreHolder, control: DomainControl,
                xenstore_timeout: float | None = None) -> int:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("targets.stopping", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            try:
                await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: holder.run(
                    task_status=task_status, give_up_after=xenstore_timeout))
            except XenstoreUnreachable as exc:
                log.error("targets.giving_up", reason=str(exc))  # noqa: TRY400
                return 1
            grants = TargetGrants(holder, control)

            def ready() -> None:
                sdnotify.notify("READY=1")  # again after a reconnection: harmless

            while not nursery.cancel_scope.cancel_called:
                try:
                    await grants.run(ready=ready)
                except* XenstoreConnectionLost:
                    log.warning("targets.xenstore_lost", action="scanning again once back")
                    await trio.sleep(0.1)
    return 0


def main(*, xenstore: str | None, simulated: str | None, log_format: str | None,
         log_level: str, xenstore_timeout: float | None = None) -> int:
    logsetup.configure(log_format or logsetup.default_format(), log_level)
    try:
        control = open_control(simulated)
    except XenError as exc:
        log.error("targets.no_domain_control", error=str(exc),  # noqa: TRY400
                  hint="grant-targets runs in Dom0 (libxenctrl: Debian libxenmisc)")
        return 1
    holder = XenstoreHolder(xenstore)
    try:
        return trio.run(serve, holder, control, xenstore_timeout)
    except KeyboardInterrupt:
        return 130
    finally:
        control.close()
