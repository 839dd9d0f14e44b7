"""A xenstore connection that comes back: reconnects with back-off after a loss.

Long-lived users (the daemon's watch loops) ask :meth:`XenstoreHolder.client`
for the current connection; when xenstored restarts they see their request
fail or their watch end, wait here for the next connection, and re-arm.
"""

from __future__ import annotations

import structlog
import trio

from virtio_diskd.ioreq.xenstore.client import XenstoreClient, XenstoreConnectionLost

log = structlog.get_logger("virtio_diskd.xenstore")


class XenstoreHolder:
    def __init__(self, where: str | None) -> None:
        self.where = where
        self._client: XenstoreClient | None = None
        self._ready = trio.Event()
        self.reconnects = 0

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
                  ) -> None:
        """Keep a connection up until cancelled; ``started`` once the first one is."""
        delay = 0.05
        started = False
        while True:
            try:
                async with XenstoreClient.open(self.where) as xs:
                    self._client = xs
                    self._ready.set()
                    if not started:
                        started = True
                        task_status.started()
                    elif self.reconnects:
                        log.info("xenstore.reconnected", attempts=self.reconnects)
                    delay = 0.05
                    await xs.closed.wait()
            except XenstoreConnectionLost as exc:
                if not started and self.reconnects == 0:
                    log.warning("xenstore.unreachable", error=str(exc))
            self._client = None
            self._ready = trio.Event()
            self.reconnects += 1
            if started:
                log.warning("xenstore.connection_lost", retry_in=delay)
            await trio.sleep(delay)
            delay = min(delay * 2, 0.5)
