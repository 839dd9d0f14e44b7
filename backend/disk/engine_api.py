"""What a device needs of its disk engine, whichever engine it is.

:class:`~virtio_diskd.backend.disk.engine.DiskEngine` serves raw files and block
devices with system calls; :class:`~virtio_diskd.backend.disk.nbd.NbdEngine`
serves NBD exports (image formats through qemu-storage-daemon, network storage).
The device model drives both through this one interface: requests in, an eventfd
that says completions are waiting, completions out in batches.
"""

from __future__ import annotations

import collections
import contextlib
import os
from typing import Protocol, TypeVar

from virtio_diskd.backend.disk.request import DiskRequest
from virtio_diskd.backend.disk.target import DiskInfo

RequestT = TypeVar("RequestT", bound=DiskRequest)


class EngineTarget(Protocol):
    """The disk behind an engine, as the device model and operators see it."""

    @property
    def path(self) -> str: ...

    @property
    def read_only(self) -> bool: ...

    @property
    def direct(self) -> bool: ...

    def info(self, *, discard_enable: bool = True) -> DiskInfo: ...

    def close(self) -> None: ...


class BlockEngine(Protocol[RequestT]):
    """Executes requests for one device (see the module docstring)."""

    @property
    def target(self) -> EngineTarget: ...

    @property
    def completion_fd(self) -> int: ...

    @property
    def in_flight(self) -> int: ...

    @property
    def has_completions(self) -> bool: ...

    def submit(self, requests: list[RequestT]) -> list[RequestT]:
        """Start ``requests``; returns those already finished."""

    def take_completions(self, limit: int = 0) -> list[RequestT]:
        """Requests finished since the last call, at most ``limit`` of them (0: all).
        A take of all clears the eventfd first.  A caller that takes fewer must look at
        :attr:`has_completions` before it waits on the fd again: what is left may
        already be signalled, and the fd may wake it once with nothing to take."""

    def wait_idle(self, timeout: float | None = None) -> bool: ...

    def check_resize(self) -> int | None:
        """The disk's size if it changed since the last look, else None."""

    @property
    def sync_before_detach(self) -> bool:
        """Whether completed writes can be lost with a process (an image server's
        cache), so a hand-over to a successor must :meth:`sync` first."""

    def sync(self) -> None:
        """Make every completed write stable (blocking: an operator's pause)."""

    def close(self, *, detach: bool = False) -> None:
        """Stop; ``detach``: a successor process carries on with this disk, so what
        serves it (an image's qemu-storage-daemon) is left running."""


def take_from(done: collections.deque[RequestT], limit: int) -> list[RequestT]:
    """Pop at most ``limit`` (0: all) of an engine's finished requests, oldest first:
    what both engines' :meth:`BlockEngine.take_completions` hand out."""
    count = len(done) if limit <= 0 else min(limit, len(done))
    pop = done.popleft
    return [pop() for _ in range(count)]


def clear_signal(completion_fd: int) -> None:
    """Reset an engine's completion eventfd (non-blocking: unset is fine)."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_read(completion_fd)
