"""Which flushes may go: the ordering both disk engines keep for durability.

virtio-blk's FLUSH covers the writes completed before it; Linux issues one only
after those writes completed.  An engine runs writes in parallel (worker threads,
native AIO, an NBD server that may answer out of order, whose own FLUSH covers
only writes it has answered), so a flush is held back until every write submitted
before it has completed — tracked per flush, not assumed.

Not thread-safe on its own: an engine calls it under the lock that also guards
its in-flight count.
"""

from __future__ import annotations

from typing import Generic, TypeVar

FlushT = TypeVar("FlushT")


class FlushOrder(Generic[FlushT]):
    """Writes in flight, and the flushes waiting for some of them."""

    def __init__(self) -> None:
        self._writes: set[int] = set()
        self._parked: list[tuple[FlushT, set[int]]] = []

    def write_started(self, write: object) -> None:
        self._writes.add(id(write))

    def may_go(self, flush: FlushT) -> bool:
        """True if ``flush`` can be executed now; else it waits for the writes in
        flight now and is handed back by :meth:`released`."""
        if not self._writes:
            return True
        self._parked.append((flush, set(self._writes)))
        return False

    def write_done(self, write: object) -> None:
        self._writes.discard(id(write))
        for _flush, waiting in self._parked:
            waiting.discard(id(write))

    def released(self) -> list[FlushT]:
        """The parked flushes whose writes have all completed (each handed out once)."""
        if not self._parked:
            return []
        ready = [flush for flush, waiting in self._parked if not waiting]
        if ready:
            self._parked = [entry for entry in self._parked if entry[1]]
        return ready
