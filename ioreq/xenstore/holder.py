"""A xenstore connection that comes back: reconnects with back-off after a loss.

Long-lived users (the daemon's watch loops) ask :meth:`XenstoreHolder.client`
for the current connection; when xenstored restarts they see their request
fail or their watch end, wait here for the next connection, and re-arm.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import trio

from virtio_diskd.backend.errors import VirtioDiskdError
from virtio_diskd.ioreq.xenstore.client import XenstoreClient, XenstoreConnectionLost

log = structlog.get_logger("virtio_diskd.xenstore")

#: How often "still unreachable" is said while waiting for the first connection.
UNREACHABLE_REPEAT = 10.0
HINT = ("is this a Xen Dom0 or driver domain, with xenstored running? "
        "(--xenstore PATH|xenbus chooses where to connect)")


class XenstoreUnreachable(VirtioDiskdError):
    """No first connection to xenstored within the time allowed."""


class XenstoreHolder:
    def __init__(self, where: str | None) -> None:
        self.where = where
        self._client: XenstoreClient | None = None
        self._ready = trio.Event()
        self.reconnects = 0
        #: told of every loss of an established connection (a worker that changed user
        #: cannot reconnect: it hands its guest to a successor)
        self.on_lost: Callable[[], None] | None = None

    async def client(self) -> XenstoreClient:
        """The live connection, waiting for one if xenstored is away."""
        while self._client is None or not self._client.connected:
            await self._ready.wait()
        return self._client

    async def replacement(self, old: XenstoreClient) -> XenstoreClient:
        """The first connection made after ``old`` (waits for ``old`` to be lost)."""
        await old.closed.wait()
        while True:
            client = await self.client()
            if client is not old:
                return client
            await self._ready.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  give_up_after: float | None = None) -> None:
        """Keep a connection up until cancelled; ``started`` once the first one is.

        While the first connection cannot be made, say so (with where and why, and a
        hint) at once and every ``UNREACHABLE_REPEAT`` seconds, and keep trying; after
        ``give_up_after`` seconds (None: never) raise :class:`XenstoreUnreachable`.
        """
        delay = 0.05
        started = False
        first_try = trio.current_time()
        next_report = first_try
        while True:
            try:
                async with XenstoreClient.open(self.where) as xs:
                    self._client = xs
                    self._ready.set()
                    if not started:
                        started = True
                        log.info("xenstore.connected", where=xs.where,
                                 attempts=self.reconnects + 1)
                        task_status.started()
                    elif self.reconnects:
                        log.info("xenstore.reconnected", where=xs.where,
                                 attempts=self.reconnects)
                    delay = 0.05
                    await xs.closed.wait()
            except XenstoreConnectionLost as exc:
                waited = trio.current_time() - first_try
                if not started:
                    if give_up_after is not None and waited >= give_up_after:
                        raise XenstoreUnreachable(
                            f"xenstored unreachable for {waited:.0f} s, giving up: {exc}; "
                            f"{HINT}") from exc
                    if trio.current_time() >= next_report:
                        log.warning("xenstore.unreachable", error=str(exc), hint=HINT,
                                    waited=round(waited, 1),
                                    give_up_in=None if give_up_after is None
                                    else round(give_up_after - waited, 1))
                        next_report += UNREACHABLE_REPEAT
            self._client = None
            self._ready = trio.Event()
            self.reconnects += 1
            if started:
                log.warning("xenstore.connection_lost", retry_in=delay)
                if self.on_lost is not None:
                    self.on_lost()
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)
