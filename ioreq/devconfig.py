"""A virtio disk's configuration, read from libxl's xenstore nodes and checked.

Every value comes from xenstore and is treated as hostile until checked here:
wrong type, range or shape gives :class:`BadDeviceNode` with a reason an
operator can act on (it ends up in the backend's ``error`` node and the log),
never an exception elsewhere.  The contract: ``shared/reference/
xen-interface.md`` §1 (nodes libxl 4.17–4.22 writes for ``specification=virtio``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError
from virtio_diskd.backend.mmio import WINDOW_SIZE

VIRTIO_MMIO_REGION = (0x02000000, 0x02000000 + 0x00100000)  # GUEST_VIRTIO_MMIO_BASE/SIZE
SPI_RANGE = (32, 1019)  # GIC SPIs (INTIDs)
MAX_VALUE = 4096


class BadDeviceNode(VirtioDiskdError, ValueError):
    """A node is missing or holds a value the daemon cannot serve."""


@dataclass(frozen=True)
class DeviceConfig:
    domid: int  # the guest (frontend)
    devid: int
    vdev: str
    params: str  # the target path, raw (no "aio:" prefix for standalone)
    read_only: bool
    base: int
    irq: int
    grant_usage: bool
    discard_enable: bool
    frontend: str
    backend_path: str

    @property
    def window(self) -> tuple[int, int]:
        return self.base, WINDOW_SIZE


def _int(nodes: dict[str, str], key: str, *, required: bool = True) -> int | None:
    raw = nodes.get(key)
    if raw is None:
        if required:
            raise BadDeviceNode(f"missing node {key}")
        return None
    text = raw.strip()
    if not re.fullmatch(r"(0[xX][0-9a-fA-F]{1,16}|[0-9]{1,20})", text):
        raise BadDeviceNode(f"{key}={raw!r} is not an integer")
    return int(text, 0)


def _flag(nodes: dict[str, str], key: str, default: bool) -> bool:
    raw = nodes.get(key)
    if raw is None:
        return default
    if raw.strip() not in ("0", "1"):
        raise BadDeviceNode(f"{key}={raw!r} is neither 0 nor 1")
    return raw.strip() == "1"


def parse_device(nodes: dict[str, str], *, domid: int, devid: int, backend_domid: int,
                 backend_path: str) -> DeviceConfig:
    """Check the backend nodes of one device; raises :class:`BadDeviceNode`."""
    for key, value in nodes.items():
        if len(value) > MAX_VALUE or "\0" in value:
            raise BadDeviceNode(f"{key} holds an oversized or binary value")
    transport = nodes.get("transport", "mmio")
    if transport != "mmio":
        raise BadDeviceNode(f"transport={transport!r}: only mmio is supported")
    spec = nodes.get("specification", "virtio")
    if spec != "virtio":
        raise BadDeviceNode(f"specification={spec!r}: not a virtio disk")
    device_type = nodes.get("device-type", "disk")
    if device_type != "disk":
        raise BadDeviceNode(f"device-type={device_type!r}: a virtio-blk device is a disk, "
                            "not a CD-ROM (use device-type=disk)" if device_type == "cdrom"
                            else f"device-type={device_type!r}: expected disk")
    params = nodes.get("params", "")
    if not params:
        raise BadDeviceNode("missing node params (the disk target)")
    if not params.startswith("/") or not params.isprintable() or "/../" in params + "/":
        raise BadDeviceNode(f"params={params!r} is not an absolute path")
    params = os.path.normpath(params)
    mode = nodes.get("mode", "")
    if mode not in ("r", "w", "rw"):
        raise BadDeviceNode(f"mode={mode!r}: expected r or w")
    base = _int(nodes, "base")
    irq = _int(nodes, "irq")
    assert base is not None and irq is not None
    lo, hi = VIRTIO_MMIO_REGION
    if base % WINDOW_SIZE or not lo <= base <= hi - WINDOW_SIZE:
        raise BadDeviceNode(f"base={base:#x} is not a {WINDOW_SIZE:#x}-aligned window in the "
                            f"virtio-mmio "
                            f"region {lo:#x}-{hi - 1:#x}")
    if not SPI_RANGE[0] < irq <= SPI_RANGE[1]:
        raise BadDeviceNode(f"irq={irq} is not a GIC SPI")
    grant_raw = _int(nodes, "grant_usage", required=False)
    if grant_raw is None:
        grants = backend_domid != 0  # libxl before 4.19: grants iff the backend is not dom0
    elif grant_raw in (0, 1):
        grants = bool(grant_raw)
    else:
        raise BadDeviceNode(f"grant_usage={grant_raw} is neither 0 nor 1")
    expected_frontend = f"/local/domain/{domid}/device/virtio_disk/{devid}"
    frontend = nodes.get("frontend", expected_frontend)
    if frontend != expected_frontend:
        raise BadDeviceNode(f"frontend={frontend!r} does not belong to dom{domid} device {devid}")
    frontend_id = _int(nodes, "frontend-id", required=False)
    if frontend_id is not None and frontend_id != domid:
        raise BadDeviceNode(f"frontend-id={frontend_id} but the device is under dom{domid}")
    vdev = nodes.get("dev", str(devid))
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", vdev):
        vdev = str(devid)
    return DeviceConfig(domid=domid, devid=devid, vdev=vdev, params=params,
                        read_only="w" not in mode, base=base, irq=irq, grant_usage=grants,
                        discard_enable=_flag(nodes, "discard-enable", "w" in mode),
                        frontend=frontend, backend_path=backend_path)
