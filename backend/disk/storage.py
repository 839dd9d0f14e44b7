"""From a device's ``params`` to the engine that serves it: a raw file or block device
(the disk engine), an image format through ``qemu-storage-daemon``, or an NBD export,
as the operator's :class:`~virtio_diskd.backend.disk.storage_rules.StorageRules` say.
Each device's choice is logged (``storage.opened``) with its format and engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from virtio_diskd.backend.disk.engine import DiskEngine
from virtio_diskd.backend.disk.engine_api import BlockEngine
from virtio_diskd.backend.disk.nbd import NbdEngine, NbdTarget, NbdUnavailable, connect
from virtio_diskd.backend.disk.nbd_uri import BadNbdUri, looks_like_nbd_uri, parse_nbd_uri
from virtio_diskd.backend.disk.policy import TargetPolicy, TargetRefused
from virtio_diskd.backend.disk.request import DiskRequest
from virtio_diskd.backend.disk.storage_daemon import EXPORT_NAME, StorageDaemon, StorageDaemonError
from virtio_diskd.backend.disk.storage_rules import DISCARD_FREES, FORMATS, StorageRules
from virtio_diskd.backend.disk.target import DiskTarget, TargetError

log = structlog.get_logger("virtio_diskd.storage")

RequestT = TypeVar("RequestT", bound=DiskRequest)
#: sun_path holds 108 bytes with its terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class StorageRequest:
    """Everything a device's storage is opened with."""

    params: str
    name: str  # dom<D>/<vdev>, for logs and thread names
    read_only: bool = False
    direct: bool = False
    workers: int = 4
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    rules: StorageRules = field(default_factory=StorageRules)
    socket_path: str = ""  # where an image's qemu-storage-daemon listens
    #: the device resumes a predecessor's: if its image server is gone and must be
    #: started anew, writes it acknowledged may be lost, and the next flush says so
    resuming: bool = False


def open_storage(request: StorageRequest) -> BlockEngine[RequestT]:
    """The engine for ``request.params`` (blocking: run it off the event loop).
    Raises :class:`TargetError` with the reason a device cannot be served."""
    params = request.params
    if looks_like_nbd_uri(params):
        if not request.rules.nbd_uris:
            raise TargetError(f"{params}: NBD URIs as targets are not allowed here "
                              "(allow_nbd_uris = yes in the daemon's configuration)")
        return _open_nbd(request, params, "raw", discard_honoured=True)
    uri = request.rules.export_for(params)
    if uri is not None:
        return _open_nbd(request, uri, "raw", discard_honoured=True)
    fmt = (request.rules.format_for(params, os.path.realpath(params))
           if request.rules.formats else "raw")
    if fmt == "raw":
        target = DiskTarget(params, read_only=request.read_only, direct=request.direct,
                            policy=request.policy)
        try:
            engine: DiskEngine[RequestT] = DiskEngine(target, name=request.name,
                                                      workers=request.workers)
        except BaseException:
            target.close()
            raise
        log.info("storage.opened", target=params, format="raw", engine="file",
                 direct=target.direct, block_device=target.is_block,
                 memory_backed=target.memory_backed)
        return engine
    return _open_image(request, fmt)


def _checked_image(request: StorageRequest) -> str:
    """The image's real path, once the target policy allows what it really is."""
    try:
        fd = os.open(request.params, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"{request.params}: {exc.strerror}") from exc
    try:
        if not os.path.isfile(f"/proc/self/fd/{fd}"):
            raise TargetError(f"{request.params}: an image must be a regular file")
        return request.policy.check_open(fd, request.params)
    except TargetRefused as exc:
        raise TargetError(str(exc)) from exc
    finally:
        os.close(fd)


def _open_image(request: StorageRequest, fmt: str) -> BlockEngine[RequestT]:
    image = _checked_image(request)
    socket_path = request.socket_path
    if not socket_path or len(socket_path.encode()) > MAX_SOCKET_PATH:
        raise TargetError(f"{request.params}: no usable socket path for its "
                          f"qemu-storage-daemon ({socket_path!r})")
    daemon = StorageDaemon(image=image, driver=FORMATS[fmt], socket_path=socket_path,
                           read_only=request.read_only, direct=request.direct)
    uri = f"nbd+unix:///{EXPORT_NAME}?socket={socket_path}"
    if daemon.adopt():
        try:
            return _open_nbd(request, uri, fmt, discard_honoured=DISCARD_FREES[FORMATS[fmt]],
                             on_close=daemon.stop, revive=daemon.revive, image=image)
        except TargetError as exc:
            # alive and started with our options, yet not answering: dying, or its
            # socket gone.  A new daemon serves the device rather than none.
            log.warning("storage.adopted_daemon_unreachable", image=image, pid=daemon.pid,
                        error=str(exc), action="starting a new qemu-storage-daemon")
            daemon.pid = 0  # start() stops it as a stale daemon of this socket
    try:
        daemon.start()
    except StorageDaemonError as exc:
        raise TargetError(f"{request.params} ({fmt}): {exc}") from exc
    if request.resuming:
        log.warning("storage.server_lost_across_restart", image=image,
                    consequence="the guest's next flush fails: writes the old server "
                                "acknowledged after its last flush may be lost")
    try:
        return _open_nbd(request, uri, fmt, discard_honoured=DISCARD_FREES[FORMATS[fmt]],
                         on_close=daemon.stop, revive=daemon.revive, image=image,
                         writes_at_risk=request.resuming)
    except BaseException:
        daemon.stop()
        raise


def _open_nbd(request: StorageRequest, uri: str, fmt: str, *, discard_honoured: bool,
              on_close: Callable[[], None] | None = None,
              revive: Callable[[], None] | None = None,
              image: str | None = None,
              writes_at_risk: bool = False) -> BlockEngine[RequestT]:
    try:
        address = parse_nbd_uri(uri)
        sock, export = connect(address)
    except (BadNbdUri, NbdUnavailable) as exc:
        raise TargetError(f"{request.params}: {exc}") from exc
    if export.read_only and not request.read_only:
        sock.close()
        raise TargetError(f"{request.params}: the export is read-only and the disk is "
                          "writable (mode=w); give the disk mode=r")
    target = NbdTarget(address, export, read_only=request.read_only,
                       display=image or request.params, format_name=fmt,
                       discard_honoured=discard_honoured)
    engine: NbdEngine[RequestT] = NbdEngine(target, sock, name=request.name,
                                            on_close=on_close, revive=revive,
                                            writes_at_risk=writes_at_risk)
    log.info("storage.opened", target=request.params, format=fmt, engine="nbd",
             export=address.describe(), size=export.size, flush=export.can_flush,
             fua=export.can_fua, trim=export.can_trim and discard_honoured,
             write_zeroes=export.can_write_zeroes)
    return engine
