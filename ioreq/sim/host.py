"""The simulated Xen host in one object: xenstored, hypervisor and toolstack.

``async with SimHost(directory) as host`` serves ``xenstored.sock`` and
``hypervisor.sock`` in ``directory`` (a daemon started with ``--simulated
DIRECTORY --xenstore DIRECTORY/xenstored.sock`` finds them there), links the
hypervisor's domain deaths to ``@releaseDomain``, and offers ``xl``-like
operations: :meth:`SimHost.create` (domain built first, then libxl's device
nodes, then the 10 s wait for InitWait) and :meth:`SimHost.destroy`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from virtio_diskd.ioreq.sim.hypervisor import Guest, Hypervisor
from virtio_diskd.ioreq.sim.toolstack import DiskPaths, DiskSpec, GuestSpec, Toolstack
from virtio_diskd.ioreq.sim.xenstored import Xenstored
from virtio_diskd.ioreq.xenstore.client import XenstoreClient
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder


class SimHost:
    def __init__(self, directory: str, *, xen_version: tuple[int, int] = (4, 19)) -> None:
        self.directory = directory
        self.xenstore_path = os.path.join(directory, "xenstored.sock")
        self.hypervisor_path = os.path.join(directory, "hypervisor.sock")
        self.xenstored = Xenstored()
        self.hypervisor = Hypervisor()
        self.xen_version = xen_version
        self.holder: XenstoreHolder
        self.toolstack: Toolstack
        self.guests: dict[int, Guest] = {}
        self._token: trio.lowlevel.TrioToken | None = None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SimHost]:
        self._token = trio.lowlevel.current_trio_token()
        self.hypervisor.on_domain_died = self._domain_died
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self._serve_xenstored)
            self.hypervisor.serve(self.hypervisor_path)
            self.holder = XenstoreHolder(self.xenstore_path)
            await nursery.start(self.holder.run)
            self.toolstack = Toolstack(await self.holder.client(), xen_version=self.xen_version)
            try:
                yield self
            finally:
                self.hypervisor.close()
                nursery.cancel_scope.cancel()

    async def _serve_xenstored(self, *,
                               task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                               ) -> None:
        stopped = self._xenstored_stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                self._xenstored_scope = scope
                await self.xenstored.serve(self.xenstore_path, task_status=task_status)
        finally:
            stopped.set()

    async def restart_xenstored(self) -> None:
        """Drop every xenstore connection, then listen again on the same store (a
        restart that keeps the database, as a live-updated xenstored does)."""
        old = await self.holder.client()
        self._xenstored_scope.cancel()
        # The old server removes its socket on the way out; the new one must not bind
        # before that (a new socket file may get the old one's inode number back, and
        # the old server's "is it still mine" check would then remove the new one).
        await self._xenstored_stopped.wait()
        self.xenstored = Xenstored(self.xenstored.store)
        await self.nursery.start(self._serve_xenstored)
        with trio.fail_after(10):
            self.toolstack.xs = await self.holder.replacement(old)

    @property
    def xs(self) -> XenstoreClient:
        """The host's own xenstore connection (dom0, privileged)."""
        client = self.holder._client
        if client is None:
            raise ConnectionError("xenstored is restarting")
        return client

    def _domain_died(self, domid: int) -> None:
        """The hypervisor killed a domain: xenstored fires @releaseDomain (as on VIRQ_DOM_EXC)."""
        try:
            trio.lowlevel.current_trio_token()
            in_trio = True
        except RuntimeError:
            in_trio = False
        if in_trio:
            self.xenstored.domain_released(domid)
        elif self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self.xenstored.domain_released, domid,
                                          trio_token=self._token)

    async def create(self, spec: GuestSpec, *, memory_mib: int = 128,
                     before_devices: Callable[[], None] | None = None) -> list[DiskPaths]:
        """``xl create``: build the domain, add its disks, wait for InitWait (≤ 10 s).
        ``before_devices`` is called just before the device nodes are written."""

        async def built(guest_spec: GuestSpec, _plans: list[DiskPaths]) -> None:
            guest = self.hypervisor.create_guest(guest_spec.domid, memory_mib << 20,
                                                 guest_spec.vcpus)
            self.guests[guest_spec.domid] = guest
            if before_devices is not None:
                before_devices()

        try:
            # each `xl create` is its own process with its own xenstore connection
            async with XenstoreClient.open(self.xenstore_path) as xs:
                toolstack = Toolstack(xs, xen_version=self.xen_version,
                                      devices=self.toolstack.devices)
                return await toolstack.create(spec, on_domain_built=built)
        except BaseException:
            self.guests.pop(spec.domid, None)
            self.hypervisor.destroy_guest(spec.domid, "create failed")
            raise

    async def attach(self, spec: GuestSpec, disk: DiskSpec) -> DiskPaths:
        """``xl block-attach`` to a guest created with ``spec`` (which gains ``disk``)."""
        async with XenstoreClient.open(self.xenstore_path) as xs:
            toolstack = Toolstack(xs, xen_version=self.xen_version,
                                  devices=self.toolstack.devices)
            return await toolstack.attach(spec, disk)

    async def destroy(self, domid: int) -> list[str]:
        """``xl destroy``: forced device removal, then the domain dies."""

        async def kill(dead: int) -> None:
            self.guests.pop(dead, None)
            self.hypervisor.destroy_guest(dead, "xl destroy")

        self.hypervisor.pause_guest(domid)  # as libxl does before removing devices
        async with XenstoreClient.open(self.xenstore_path) as xs:
            toolstack = Toolstack(xs, xen_version=self.xen_version,
                                  devices=self.toolstack.devices)
            return await toolstack.destroy(domid, on_domain_destroyed=kill)

