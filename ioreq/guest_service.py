"""Serving one guest: its IOREQ server, its virtio disks, their XenBus handshake.

This is the Xen side of a per-guest worker process (``daemon/worker.py``, also
what ``virtio-diskd --domid N`` runs): the xenstore device paths, the node
reads and writes, the watches, the choice of foreign or grant mapping, the
IOREQ server — everything the daemon's process layer must not know.

For each ``backend/virtio_disk/<guest>/<devid>`` it reads and checks the
nodes, opens the target, claims the device's MMIO window on the guest's
IOREQ server and only then writes state 2 (InitWait) — libxl is waiting for
exactly that, for 10 s.  It follows the guest driver (4 on DRIVER_OK, back to
2 after a reset) and the toolstack (``online=0``/``state=5``, the frontend dir
vanishing, the guest dying): then it drains in-flight I/O, releases the device
and writes 6 (Closed) well inside libxl's 10 s.  A device that cannot be
served gets an ``error`` node and state 6, with a log line naming the guest
and device; the other devices and guests carry on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import math
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar, assert_never

import structlog
import trio

from virtio_diskd.backend.blk import BlkOptions, BlockRequest
from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.disk.storage import StorageRequest, open_storage
from virtio_diskd.backend.disk.target import TargetError
from virtio_diskd.backend.mmio import StateRecordError
from virtio_diskd.ioreq.blockdev import BlockDevice, DeviceHooks
from virtio_diskd.ioreq.devconfig import BadDeviceNode, DeviceConfig, parse_device
from virtio_diskd.ioreq.devstate import DeviceStateFile, GuestRecord, GuestState
from virtio_diskd.ioreq.discovery import guest_dir
from virtio_diskd.ioreq.driver_domain import TargetWait, await_target
from virtio_diskd.ioreq.guest_mapping import NOT_A_GRANT, ForeignGuestMemory, GrantGuestMemory
from virtio_diskd.ioreq.serve_options import ServeOptions
from virtio_diskd.ioreq.server import IoreqServer
from virtio_diskd.ioreq.xen.interface import PROT_READ, XenError, XenPlatform
from virtio_diskd.ioreq.xenbus import (
    BeginTeardown,
    ClearError,
    DeviceNeedsReset,
    DriverStarted,
    FrontendGone,
    GuestDied,
    GuestReset,
    RemovalRequested,
    RemoveBackendDir,
    Resumed,
    ServerReady,
    SetupFailed,
    TeardownDone,
    WriteError,
    WriteState,
    XenbusDevice,
    XenbusEffect,
    XenbusEvent,
    XenbusState,
)
from virtio_diskd.ioreq.xenstore.client import (
    XenstoreClient,
    XenstoreConnectionLost,
    XenstoreOps,
    drain,
)
from virtio_diskd.ioreq.xenstore.holder import XenstoreHolder
from virtio_diskd.ioreq.xenstore.wire import XenstoreError

log = structlog.get_logger("virtio_diskd.guest")

_T = TypeVar("_T")

#: On removal, in-flight I/O may finish normally this long; then it is cancelled, and
#: the cancelled requests get CANCELLED_DRAIN to stop (libxl waits 10 s for state 6).
#: a driver domain's backend dir: how long to wait for libxl's ``online=0`` once the
#: device is Closed, and the grace after it for libxl to read Closed (it then waits
#: 10 s for the dir to go: the grace must stay well inside that)
RELEASE_WAIT_S = 10.0
RELEASE_GRACE_S = 1.5
GRACEFUL_DRAIN = 1.0
CANCELLED_DRAIN = 4.0
#: On a daemon stop, in-flight I/O may finish this long; the rest stays in the in-flight
#: log and the successor executes it again.
GRACEFUL_DETACH = 5.0
#: Xen's "the calling domain": what the confinement probe maps when the backend's own
#: domain id is unknown or equals the guest's (it must name a domain other than the guest).
DOMID_SELF = 0x7FF0
#: I/O threads per disk by default.  Page-cache reads are done inline; the threads
#: take writes, flushes and misses in batches.  With O_DIRECT every request waits on
#: the device, so the thread count is the queue depth the device can see.
CACHED_IO_WORKERS = 4
DIRECT_IO_WORKERS = 32
#: The memory of its own (RssAnon: guest pages it maps are the guest's) that one
#: worker may reach with one guest and one disk at default settings, whatever the
#: guest does; README "Budgets" derives it, tests/daemon/test_hostile_load.py measures it.
WORKER_BUDGET_MIB = 64


def _default_storage_dir() -> str:
    """Without a daemon run directory (tests, tools): a private one in /tmp."""
    return os.path.join(tempfile.gettempdir(), f"virtio-diskd-storage-{os.getuid()}")


def _offer(channel: trio.MemorySendChannel[_T], item: _T) -> None:
    """Send without waiting; a full or closed channel means its reader is gone or
    will look anyway (a device's events, the service's change notices)."""
    with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError,
                             trio.BrokenResourceError):
        channel.send_nowait(item)


def default_serial(config: DeviceConfig, nodes: dict[str, str]) -> str:
    """GET_ID: the operator's ``serial`` node if valid, else stable per target and vdev."""
    chosen = nodes.get("serial", "")
    if chosen and len(chosen) <= 20 and chosen.isascii() and chosen.isprintable():
        return chosen
    digest = hashlib.sha1(config.params.encode(), usedforsecurity=False).hexdigest()
    return f"{config.vdev[:7]}-{digest}"[:20]


async def _write_if_present(tx: XenstoreOps, path: str, node: str, value: str) -> bool:
    """Write a state or error node only while the device's dir exists: a write after
    the toolstack removed it would re-create the dir (xenstore creates parents)."""
    if not await tx.exists(f"{path}/frontend-id") and not await tx.exists(f"{path}/state"):
        return False
    await tx.write(f"{path}/{node}", value)
    return True


async def _remove_if_present(tx: XenstoreOps, path: str) -> bool:
    if not await tx.exists(path):
        return False
    await tx.rm(path)
    return True


@dataclass
class _Device:
    config: DeviceConfig
    device: BlockDevice
    machine: XenbusDevice
    events: trio.MemorySendChannel[XenbusEvent]


class _Detach:
    """Stop serving a device but leave everything the guest sees as it is (daemon stop
    or upgrade): a successor resumes it."""


@dataclass
class PrivilegeHooks:
    """How a guest's service hands its process's privileges back (the worker's
    ``--worker-user``).  ``give_up(paths)`` is called once the guest runs and every
    device is set up, with the paths the service keeps writing; it returns True once
    the process can no longer open Xen's devices, disks or xenstored's socket.
    ``need(reason)`` is called when work comes that needs them again (a hot-plugged
    disk): the process must be replaced by a privileged one, which resumes."""

    give_up: Callable[[tuple[str, ...]], bool]
    need: Callable[[str], None]


@dataclass
class GuestStatus:
    domid: int
    devices: dict[int, dict[str, object]] = field(default_factory=dict)
    ioreq: dict[str, int] = field(default_factory=dict)


class GuestService:
    """Everything virtio-diskd does for guest ``domid``."""

    def __init__(self, holder: XenstoreHolder, platform: XenPlatform, *, domid: int,
                 self_domid: int, options: ServeOptions | None = None) -> None:
        self.holder = holder
        self.platform = platform
        self.domid = domid
        self.self_domid = self_domid
        self.options = options or ServeOptions()
        self.root = guest_dir(self_domid, domid)
        self.log = log.bind(domid=domid)
        self.server: IoreqServer | None = None
        self.foreign: ForeignGuestMemory | None = None
        self.grants: GrantGuestMemory | None = None
        self.devices: dict[int, _Device] = {}
        self.phases: dict[int, str] = {}
        self._tasks: set[int] = set()  # devids with a running device task
        self._server_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self.seen_devices = False
        #: set once the guest's device directory was first listed (READY=1 waits for it)
        self.scanned = trio.Event()
        self._changed: trio.MemorySendChannel[None]
        self.state = (GuestState(self.options.state_dir, domid)
                      if self.options.state_dir is not None else None)
        #: the server a predecessor left, and the devices still to take over before
        #: its vCPUs' waiting accesses are answered
        self._saved: GuestRecord | None = None
        self._to_resume: set[int] = set()
        self._record = GuestRecord(-1)
        self.detaching = False
        self.confined = False  # the worker's Xen handles are restricted to this guest
        self._device_model_checked = False  # driver domain: Dom0 gave the right, or no wait
        self.privileges: PrivilegeHooks | None = None
        self.privileged = True  # False once privileges.give_up succeeded
        self._guest_running = False  # a driver of the guest set DRIVER_OK
        self._privileges_kept_because: str | None = None
        self._privilege_asked = False

    # -- top level -------------------------------------------------------------------------

    async def _xs(self) -> XenstoreClient:
        return await self.holder.client()

    async def run(self) -> None:
        """Serve until the guest has no device left (or the caller cancels)."""
        changed_send, changed = trio.open_memory_channel[None](256)
        self._changed = changed_send
        if self.state is not None:
            try:
                if self.state.reclaim():
                    self.log.info("guest.state_reclaimed", directory=self.state.dir)
            except OSError as exc:
                self.log.error("guest.state_not_reclaimed", directory=self.state.dir,  # noqa: TRY400
                               error=str(exc), hint="a predecessor ran as another user; "
                               "this worker lacks CAP_CHOWN (is --worker-user set?)")
            self._saved = self.state.load_guest()
            if self._saved is not None and not await self._guest_alive():
                self.log.info("guest.state_of_a_dead_guest_dropped")
                self.state.remove()
                self._saved = None
            if self._saved is not None:
                self._to_resume = set(self._saved.windows)
                self.log.info("guest.resuming", server=self._saved.server,
                              devices=sorted(self._to_resume))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._rearming_watch, self.root, self._root_changed)
            nursery.start_soon(self._rearming_watch, "@releaseDomain", self._released)
            async for _event in changed:
                if self.detaching:  # leaving the guest to a successor: nothing new starts
                    if not self._tasks:
                        break
                    continue
                try:
                    devids = await self._list(self.root)
                except XenstoreConnectionLost:
                    continue
                for name in devids:
                    if not name.isdigit() or int(name) > 0xFFFFFFFF:
                        continue
                    devid = int(name)
                    if devid not in self._tasks and not self.privileged:
                        nursery.start_soon(self._added_while_unprivileged, devid)
                        continue
                    if devid not in self._tasks:
                        self.seen_devices = True
                        self._tasks.add(devid)
                        nursery.start_soon(self._device_task, devid)
                self.scanned.set()
                if self.seen_devices and not devids and not self._tasks:
                    break
            nursery.cancel_scope.cancel()

    async def _rearming_watch(self, path: str, on_event: Callable[[], Awaitable[None]]) -> None:
        """Watch ``path`` for as long as we run, re-arming after xenstore comes back."""
        while True:
            xs = await self._xs()
            try:
                async with xs.watch(path) as events:
                    async for _event in events:
                        drain(events)  # one look covers a burst of changes
                        await on_event()
            except XenstoreConnectionLost:
                pass
            await trio.sleep(0.01)

    async def _root_changed(self) -> None:
        await self._changed.send(None)

    async def _released(self) -> None:
        if await self._guest_alive():
            return
        self.log.info("guest.died")
        for record in list(self.devices.values()):
            _offer(record.events, GuestDied())

    async def _list(self, path: str) -> list[str]:
        try:
            return await (await self._xs()).directory(path)
        except XenstoreError:
            return []

    async def _guest_alive(self) -> bool:
        xs = await self._xs()
        try:
            return await xs.is_domain_introduced(self.domid)
        except XenstoreError:
            return await xs.exists(f"/local/domain/{self.domid}")

    def detach_all(self) -> None:
        """SIGTERM (daemon stop, restart, upgrade): stop serving, keep every device as
        the guest sees it — XenBus state, IOREQ server, MMIO claims — for a successor.
        Requests in flight finish first; any that do not stay in the in-flight log."""
        self.detaching = True
        if self._server_scope is not None:
            # no access is answered from here on: the successor answers what comes
            self._server_scope.cancel()
        if not self.devices and self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for record in list(self.devices.values()):
            _offer(record.events, _Detach())  # type: ignore[misc]  # not a XenbusEvent, seen first

    # -- one device --------------------------------------------------------------------------

    async def _read_nodes(self, path: str) -> dict[str, str]:
        """All of a device's nodes as one consistent snapshot (libxl adds and removes them
        in single transactions; reading them one by one could see half a device)."""
        async def snapshot(tx: XenstoreOps) -> dict[str, str]:
            nodes: dict[str, str] = {}
            try:
                names = await tx.directory(path)
            except XenstoreError as exc:
                if exc.errno == errno.ENOENT:
                    return nodes
                raise
            values = await tx.read_many([f"{path}/{name}" for name in names])
            for name, value in zip(names, values, strict=True):
                if value is not None:
                    nodes[name] = value
            return nodes

        return await (await self._xs()).transact(snapshot)

    async def _perform(self, path: str, effects: list[XenbusEffect], dlog: structlog.BoundLogger,
                       ) -> bool:
        """Write what the state machine decided; True if teardown must start.

        A write interrupted by a lost xenstore connection is retried on the next one:
        libxl must see the state eventually.
        """
        teardown = False
        for effect in effects:
            match effect:
                case BeginTeardown():
                    teardown = True
                case WriteState(state):
                    if await self._write_node(path, "state", str(int(state)), dlog):
                        dlog.info("xenbus.state", state=int(state), name=state.name)
                case WriteError(reason):
                    await self._write_node(path, "error", reason[:1000], dlog)
                case ClearError():
                    await self._retrying(lambda xs: xs.transact(functools.partial(
                        _remove_if_present, path=f"{path}/error")), "error", dlog)
                case RemoveBackendDir():
                    await self._release_backend_dir(path, dlog)
                case _:
                    assert_never(effect)
        return teardown

    async def _release_backend_dir(self, path: str, dlog: structlog.BoundLogger,
                                   timeout: float | None = RELEASE_WAIT_S) -> None:
        """A driver domain removes its own backend dir (libxl cannot), as libxl's
        removal expects it (``libxl_device.c``): libxl writes ``online=0`` (and
        Closing), waits to read Closed — and fails the removal if the dir is already
        gone when it looks ("wanted state 6 but it was removed") — then waits 10 s for
        the dir to go, and only then removes the frontend.  No node says libxl has read
        Closed, so, as ``xl devd`` does after its own processing, the dir goes a short
        grace after ``online=0`` and Closed are both there.  ``online=0`` is awaited at
        most ``timeout`` (None: for as long as the worker runs — a device that failed
        its set-up waits for libxl to give it up)."""
        xs = await self._xs()
        started = trio.current_time()
        with trio.move_on_after(timeout if timeout is not None else math.inf):
            try:
                async with xs.watch(f"{path}/online") as events:
                    async for _event in events:
                        if (await xs.read_or_none(f"{path}/online") or "0").strip() == "0":
                            break
            except (XenstoreError, XenstoreConnectionLost) as exc:
                dlog.warning("xenbus.online_unwatchable", error=str(exc))
        await trio.sleep(RELEASE_GRACE_S)
        dlog.info("xenbus.removal_released", waited_s=round(trio.current_time() - started, 3))
        await self._retrying(lambda xs: xs.rm(path), "remove_dir", dlog)
        dlog.info("xenbus.backend_dir_removed")

    async def _write_node(self, path: str, node: str, value: str,
                          dlog: structlog.BoundLogger) -> bool:
        """Write ``path/node`` while the device's dir exists; False if it is gone."""
        written = await self._retrying(
            lambda xs: xs.transact(functools.partial(_write_if_present, path=path, node=node,
                                                     value=value)), node, dlog)
        if written is False:
            dlog.info("xenbus.device_gone", node=node)
        return bool(written)

    async def _retrying(self, op: Callable[[XenstoreClient], Awaitable[_T]], what: str,
                        dlog: structlog.BoundLogger) -> _T | None:
        """Run ``op`` on the xenstore connection; a lost connection is retried on the
        next one (libxl must see the state eventually), a refusal is logged."""
        for _attempt in range(20):
            xs = await self._xs()
            try:
                return await op(xs)
            except XenstoreConnectionLost:
                continue
            except XenstoreError as exc:
                dlog.warning("xenbus.write_failed", node=what, error=str(exc))
                return None
        return None

    async def _device_task(self, devid: int) -> None:
        path = f"{self.root}/{devid}"
        dlog = self.log.bind(devid=devid)
        seen_at = trio.current_time()  # libxl waits 10 s for what follows (InitWait)
        machine = XenbusDevice(driver_domain=self.self_domid != 0)
        send, receive = trio.open_memory_channel[XenbusEvent](64)
        record: _Device | None = None
        detached = False
        try:
            try:
                nodes = await self._read_nodes(path)
            except XenstoreError as exc:
                dlog.warning("device.nodes_unreadable", error=str(exc))
                return  # a device that cannot be read cannot be served or closed
            if not nodes:
                return
            state = nodes.get("state", "")
            if state in ("5", "6") or nodes.get("online") == "0":
                if state == "5":  # asked to close before we ever served it: say Closed
                    await self._perform(path, [WriteState(XenbusState.CLOSED)], dlog)
                if self.self_domid != 0 and nodes.get("online") == "0":
                    # a predecessor closed it and died before removing the dir (a
                    # driver domain's job): not served again, just released
                    await self._release_backend_dir(path, dlog)
                return
            try:
                config = parse_device(nodes, domid=self.domid, devid=devid,
                                      backend_domid=self.self_domid, backend_path=path)
                device, resumed = await self._create(config, nodes, send, dlog)
            except (BadDeviceNode, TargetError, XenError, OSError, ValueError,
                    StateRecordError) as exc:
                reason = str(exc)
                dlog.error("device.setup_failed", reason=reason)
                self.phases[devid] = "failed"
                self._resumed_or_failed(devid)
                await self._perform(path, machine.handle(SetupFailed(reason)), dlog)
                if self.self_domid != 0:  # libxl removes the device, then we its dir
                    await self._release_backend_dir(path, dlog, timeout=None)
                return
            record = _Device(config, device, machine, send)
            self.devices[devid] = record
            dlog = dlog.bind(vdev=config.vdev)
            event: XenbusEvent = (Resumed(connected=device.blk.transport.live)
                                  if resumed else ServerReady())
            await self._perform(path, machine.handle(event), dlog)
            self.phases[devid] = machine.phase.value
            dlog.info("device.serving", target=config.params, base=hex(config.base),
                      irq=config.irq, grants=config.grant_usage, read_only=config.read_only,
                      resumed=resumed, setup_s=round(trio.current_time() - seen_at, 3))
            self._resumed_or_failed(devid)
            if resumed and device.blk.transport.live:
                self._guest_running = True  # a successor's: the guest runs already
            self._maybe_give_up_privileges()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.run)
                nursery.start_soon(self._watch_device, path, config, send)
                async for item in receive:
                    if isinstance(item, _Detach):
                        detached = True
                        break
                    if isinstance(item, DriverStarted):
                        self._guest_running = True
                    teardown = await self._perform(path, machine.handle(item), dlog)
                    self._maybe_give_up_privileges()
                    self.phases[devid] = machine.phase.value
                    if teardown:
                        break
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if record is not None:
                    if detached:
                        await self._detach_device(record, dlog)
                    else:
                        await self._teardown(path, record, dlog)
                self._resumed_or_failed(devid)
                self.devices.pop(devid, None)
                self._tasks.discard(devid)
                if not self.devices:
                    self._close_server()
                else:
                    self._maybe_give_up_privileges()  # the last one set up failed
                _offer(self._changed, None)  # let run() notice what is left

    # -- privileges ----------------------------------------------------------------------------

    def _maybe_give_up_privileges(self) -> None:
        """Once the guest runs (a driver set DRIVER_OK: libxl has added every disk it
        creates the guest with) and no device is half set up, the worker gives up what
        only set-up needs.  Devices served through an NBD connection keep it: their
        reconnection and their image server's stop need root."""
        hooks = self.privileges
        if (hooks is None or not self.privileged or not self._guest_running
                or self._privileges_kept_because is not None or self._to_resume
                or set(self.devices) != self._tasks or self.server is None):
            return
        for record in self.devices.values():
            if not isinstance(record.device.engine, DiskEngine):
                self._privileges_kept_because = (
                    f"device {record.config.vdev} ({record.config.params}) is served over "
                    "NBD: reconnecting and stopping its image server need root")
                self.log.warning("worker.user_kept", reason=self._privileges_kept_because)
                return
        hand_over = self.state.hand_over_order() if self.state is not None else []
        if hooks.give_up(tuple(hand_over)):
            self.privileged = False
        else:
            self._privileges_kept_because = "the change of user failed"

    async def _added_while_unprivileged(self, devid: int) -> None:
        """A device directory this worker serves no task for: a disk being added (a
        successor with root sets it up), or one it served that libxl has not removed
        yet (nothing to do)."""
        try:
            nodes = await self._read_nodes(f"{self.root}/{devid}")
        except XenstoreError:
            return
        if not nodes or nodes.get("state", "") in ("5", "6") or nodes.get("online") == "0":
            return
        self._need_privileges(f"device {devid} was added")

    def _need_privileges(self, reason: str) -> None:
        """Work that needs what this worker gave up: a privileged successor does it."""
        if self._privilege_asked or self.privileges is None:
            return
        self._privilege_asked = True
        self.log.info("worker.needs_privileges", reason=reason,
                      then="a fresh worker takes over the guest's devices and does it")
        self.privileges.need(reason)

    def _resumed_or_failed(self, devid: int) -> None:
        """Once every device the predecessor served is back (or failed), the server
        answers the accesses the guest's vCPUs are waiting on."""
        if devid in self._to_resume:
            self._to_resume.discard(devid)
            if not self._to_resume:
                self._start_serving()

    async def _watch_device(self, path: str, config: DeviceConfig,
                            events: trio.MemorySendChannel[XenbusEvent]) -> None:
        async def backend_changed() -> None:
            xs = await self._xs()
            try:
                state = await xs.read_or_none(f"{path}/state")
                online = await xs.read_or_none(f"{path}/online")
            except XenstoreError as exc:
                # our own nodes unreadable (EINVAL, EACCES: a driver domain's view while
                # its guest is torn down, seen on real Xen): the device is going away —
                # close it like a removal instead of letting the error end the worker
                self.log.warning("xenbus.backend_unreadable", devid=config.devid,
                                 error=str(exc))
                state, online = None, None
            if state is None or state.strip() in ("0", "5") or online == "0":
                await events.send(RemovalRequested())

        async def frontend_changed() -> None:
            try:
                present = await (await self._xs()).exists(config.frontend)
            except XenstoreError as exc:
                self.log.warning("xenbus.frontend_unreadable", devid=config.devid,
                                 error=str(exc))
                present = False
            if not present:
                await events.send(FrontendGone())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rearming_watch, path, backend_changed)
            nursery.start_soon(self._rearming_watch, config.frontend, frontend_changed)

    async def _create(self, config: DeviceConfig, nodes: dict[str, str],
                      events: trio.MemorySendChannel[XenbusEvent],
                      dlog: structlog.BoundLogger) -> tuple[BlockDevice, bool]:
        """The device, and whether it resumed a predecessor's (True) or starts anew."""
        if self.server is None and self.self_domid != 0 and not self._device_model_checked:
            await self._await_device_model_right()
        try:
            server = self._ensure_server()
        except XenError as exc:
            if exc.errno != errno.EPERM or self.self_domid == 0:
                raise
            raise XenError(errno.EPERM, f"{exc}: this driver domain (dom{self.self_domid}) "
                           f"is not dom{self.domid}'s device model - run `virtio-diskd "
                           "grant-targets` in Dom0 (XSM dummy policy), or grant it with "
                           "FLASK") from exc
        # confined before the grant handle is opened and before a resumed device maps
        # its in-flight requests: xentoolcore cannot restrict a grant handle, it makes
        # it useless (dup2 of /dev/null, MAP_GRANT_REF then fails with ENOTTY on real
        # Xen), and a mapping made through it could then not be unmapped.  A handle
        # opened afterwards is left as it is: grants are their own confinement, only
        # pages the guest granted this domain can be mapped.
        await self._confine()
        saved_window = (self._saved.windows.get(config.devid)
                        if self._saved is not None else None)
        resuming = saved_window == config.window and server.adopted
        storage = StorageRequest(
            params=config.params, name=f"dom{self.domid}/{config.vdev}",
            read_only=config.read_only, direct=self.options.direct_io,
            workers=self.options.io_workers or (DIRECT_IO_WORKERS if self.options.direct_io
                                                else CACHED_IO_WORKERS),
            policy=self.options.target_policy, rules=self.options.storage,
            socket_path=os.path.join(self.options.storage_dir or _default_storage_dir(),
                                     f"dom{self.domid}-{config.devid}.sock"),
            resuming=resuming)
        engine: BlockEngine[BlockRequest] = await trio.to_thread.run_sync(
            open_storage, storage)
        state_file: DeviceStateFile | None = None
        try:
            if config.grant_usage:
                if self.grants is None:
                    self.grants = GrantGuestMemory(self.platform.gnttab(), self.domid,
                                                   self.platform.barrier)
                memory: ForeignGuestMemory | GrantGuestMemory = self.grants
            else:
                memory = self._foreign_memory()
        except BaseException:
            engine.close()
            raise

        options = BlkOptions(serial=default_serial(config, nodes),
                             num_queues=self.options.num_queues,
                             queue_size=self.options.queue_size,
                             discard_enable=config.discard_enable,
                             access_platform=config.grant_usage,
                             packed_ring=self.options.packed_ring,
                             seg_max=self.options.seg_max, size_max=self.options.size_max)
        try:
            if self.state is not None:
                state_file = self.state.open_device(
                    config.devid, num_queues=options.num_queues, queue_size=options.queue_size,
                    max_segments=(options.seg_max or max(options.queue_size - 2, 1)) + 2)
            device = BlockDevice(domid=self.domid, devid=config.devid, name=config.vdev,
                                 irq=config.irq, memory=memory, engine=engine, dm=server.dm,
                                 options=options, legacy=self.options.legacy_mmio,
                                 discard_enable=config.discard_enable,
                                 hooks=DeviceHooks(driver_ok=functools.partial(
                                                       _offer, events, DriverStarted()),
                                                   reset=functools.partial(
                                                       _offer, events, GuestReset()),
                                                   needs_reset=functools.partial(
                                                       self._device_broken, config, events)),
                                 poll_us=self.options.poll_us, state=state_file)
        except BaseException:
            if state_file is not None:
                state_file.close()
            engine.close()
            raise
        try:
            saved = state_file.load() if state_file is not None and resuming else None
            if resuming and saved is None:
                raise StateRecordError("the device's saved state is missing or damaged")
            if saved is not None:
                server.adopt_window(*config.window, device, config.vdev)
                device.resume(saved)
            else:
                server.add_window(*config.window, device, config.vdev)
                device.save_state()
            self._remember_window(config)
        except BaseException:
            device.close()
            raise
        return device, saved is not None

    async def _await_device_model_right(self) -> None:
        """In a driver domain: wait for Dom0 to make this domain the guest's device
        model (:mod:`~virtio_diskd.ioreq.driver_domain`) before creating the server."""
        started = trio.current_time()
        outcome, current = await await_target(await self._xs(), self.self_domid, self.domid,
                                              self.options.target_wait)
        waited = round(trio.current_time() - started, 3)
        if outcome is TargetWait.OTHER_GUEST:
            raise XenError(errno.EPERM, f"this driver domain (dom{self.self_domid}) is the "
                           f"device model of dom{current}, not of dom{self.domid}: under "
                           "XSM's dummy policy a driver domain serves one guest")
        self._device_model_checked = True
        if outcome is TargetWait.GRANTED:
            self.log.info("guest.device_model_right", target=self.domid, waited_s=waited)
        else:
            self.log.warning("guest.no_device_model_right", waited_s=waited,
                             hint="no target set by Dom0 (is `virtio-diskd grant-targets` "
                                  "running there?); going on, as under FLASK")

    def _device_broken(self, config: DeviceConfig,
                       events: trio.MemorySendChannel[XenbusEvent], reason: str) -> None:
        """DEVICE_NEEDS_RESET: the reason, with its likely cause where one is known, to
        the device's ``error`` node and the log."""
        if config.grant_usage and NOT_A_GRANT in reason:
            reason += (" - the guest gives guest-physical addresses to a disk that expects "
                       "grant references: its kernel likely lacks CONFIG_XEN_VIRTIO "
                       "(Xen grant DMA ops)")
            self.log.error("device.guest_without_grant_support", devid=config.devid,
                           vdev=config.vdev, reason=reason)
        _offer(events, DeviceNeedsReset(reason))

    def _remember_window(self, config: DeviceConfig) -> None:
        if self.state is None or self.server is None:
            return
        self._record.server = self.server.server_id
        self._record.windows[config.devid] = config.window
        try:
            self.state.save_guest(self._record)
        except OSError as exc:
            self.log.error("guest.state_not_saved", error=str(exc))  # noqa: TRY400

    def _forget_window(self, devid: int) -> None:
        if self.state is None:
            return
        self._record.windows.pop(devid, None)
        self.state.remove_device(devid)
        with contextlib.suppress(OSError):
            self.state.save_guest(self._record)

    def _ensure_server(self) -> IoreqServer:
        if self.server is None:
            def invalidate() -> None:
                if self.foreign is not None:  # grant mappings are per request: no cache
                    self.foreign.invalidate()

            server = IoreqServer(self.platform, self.domid, on_invalidate=invalidate,
                                 poll_us=self.options.poll_us)
            server.start(adopt=self._saved.server if self._saved is not None else None)
            self.server = server
            self._record = GuestRecord(server.server_id)
            if not self._to_resume:
                self._start_serving()
        return self.server

    def _start_serving(self) -> None:
        if self.server is None or self._server_scope is not None:
            return
        assert self._nursery is not None
        self._server_scope = trio.CancelScope()
        self._nursery.start_soon(self._serve, self.server, self._server_scope)

    async def _serve(self, server: IoreqServer, scope: trio.CancelScope) -> None:
        with scope:
            await server.serve()

    def _foreign_memory(self) -> ForeignGuestMemory:
        """The guest's foreign-mapping handle, opened on first use."""
        if self.foreign is None:
            self.foreign = ForeignGuestMemory(self.platform.foreignmemory(), self.domid,
                                              self.platform.barrier)
        return self.foreign

    async def _confine(self) -> None:
        """Once the guest's IOREQ server and foreign-memory handles are open, and
        before any grant handle is (see :meth:`_create`), restrict them all to the
        guest, as QEMU's ``-xen-domid-restrict`` does: from then on a hypercall
        or mapping for another domain fails with EPERM, whatever this process is made
        to do.  Checked at once by trying to map a page of another domain.  Once per
        set of handles (an event channel refuses a second restriction); a failure is
        logged and the guest is served unconfined."""
        if self.confined or not self.options.confine or self.server is None:
            return
        foreign = self._foreign_memory()  # a later device may need it: open it now
        self.confined = True  # before the await: the guest's other devices come here too
        try:
            await trio.to_thread.run_sync(self.platform.restrict, self.domid)
        except (XenError, OSError) as exc:
            self.log.error("worker.confinement_failed", error=str(exc))  # noqa: TRY400
            return
        other = self.self_domid if self.self_domid != self.domid else DOMID_SELF
        try:
            mapping = foreign.fmem.map(other, PROT_READ, [0])
        except (XenError, OSError) as exc:
            if exc.errno == errno.EPERM:
                self.log.info("worker.confined", probe_domid=other, probe="EPERM")
                return
            self.log.warning("worker.confinement_unverified", probe_domid=other,
                             error=str(exc))
            return
        mapping.unmap()
        self.log.error("worker.confinement_ineffective", probe_domid=other,
                       reason="a page of another domain could still be mapped")

    def _close_server(self) -> None:
        self.confined = False  # its handles go: new ones are restricted anew
        if self._server_scope is not None:
            self._server_scope.cancel()
            self._server_scope = None
        if self.server is not None:
            if self.detaching:
                self.server.detach()
                self.log.info("guest.detached", server=self.server.server_id)
            else:
                self.server.close()
                if self.state is not None:
                    self.state.remove()
            self.server = None
        if self.foreign is not None:
            self.foreign.close()
            self.foreign.fmem.close()
            self.foreign = None
        if self.grants is not None:
            self.grants.gnttab.close()
            self.grants = None

    async def _teardown(self, path: str, record: _Device, dlog: structlog.BoundLogger) -> None:
        device = record.device
        drained = await device.quiesce(GRACEFUL_DRAIN, CANCELLED_DRAIN)
        if not drained:
            dlog.error("device.drain_timeout", in_flight=device.blk.pending())
        if self.server is not None:
            try:
                self.server.remove_window(record.config.base)
            except (XenError, OSError) as exc:
                dlog.warning("device.unmap_window_failed", error=str(exc))
        await trio.to_thread.run_sync(device.close)
        self._forget_window(record.config.devid)
        effects = record.machine.handle(TeardownDone())
        release: list[XenbusEffect] = [e for e in effects if isinstance(e, RemoveBackendDir)]
        with trio.move_on_after(5):  # Closed must be written whatever xenstore does
            await self._perform(path, [e for e in effects if e not in release], dlog)
        await self._perform(path, release, dlog)  # bounded by libxl's own wait
        self.phases[record.config.devid] = record.machine.phase.value
        dlog.info("device.closed", requests=device.blk.stats.requests,
                  errors=device.blk.stats.errors)

    async def _detach_device(self, record: _Device, dlog: structlog.BoundLogger) -> None:
        """Leave the device to a successor: requests in flight finish (their completions
        reach the guest) for up to GRACEFUL_DETACH; what is left stays in the log."""
        device = record.device
        drained = await device.drain(GRACEFUL_DETACH)
        if device.engine.sync_before_detach:  # an image server may not outlive us
            try:
                await trio.to_thread.run_sync(device.engine.sync)
            except OSError as exc:
                dlog.error("device.detach_flush_failed", error=str(exc))
        device.save_state()
        device.blk.cancel()
        await trio.to_thread.run_sync(functools.partial(device.close, detach=True))
        dlog.info("device.detached", drained=drained, left_in_log=device.blk.pending())

    def device_named(self, vdev: str) -> BlockDevice | None:
        """The running device the toolstack calls ``vdev`` (xvda …), if any."""
        for record in self.devices.values():
            if record.config.vdev == vdev:
                return record.device
        return None

    def device_names(self) -> list[str]:
        return sorted(record.config.vdev for record in self.devices.values())

    def status(self) -> GuestStatus:
        status = GuestStatus(self.domid)
        for devid, record in self.devices.items():
            snapshot = record.device.snapshot()
            snapshot["phase"] = record.machine.phase.value
            snapshot["target"] = record.config.params
            snapshot["format"] = record.device.format_name
            status.devices[devid] = snapshot
        for devid, phase in self.phases.items():
            status.devices.setdefault(devid, {"phase": phase})
        if self.server is not None:
            status.ioreq = dataclasses.asdict(self.server.stats)
        return status
