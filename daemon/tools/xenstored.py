"""``virtio-diskd xenstored``: the simulated xenstored as a process of its own
(Xen's ``xenstore-*`` tools work against it through ``XENSTORED_PATH``)."""

from __future__ import annotations

from virtio_diskd.ioreq.sim import xenstored


def main(socket_path: str, domains: list[str]) -> int:
    extra = [f"--as={item}" for item in domains]
    return xenstored.main(["--socket", socket_path, *extra])
