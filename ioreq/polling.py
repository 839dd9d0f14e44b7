"""Polling between trio tasks, for the data path's adaptive polling.

A wake-up across CPUs costs tens of µs (``bench`` measures it), more than most
of what it would wake us for.  So where an event is due soon, the IOREQ server
and the block devices check for it in a loop that yields to every other trio
task between checks, for a bounded time, before they go to sleep on an fd.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio


async def poll_for(check: Callable[[], bool], seconds: float) -> bool:
    """Call ``check`` after each trio checkpoint until it returns True (then True) or
    ``seconds`` have passed (then False)."""
    until = time.perf_counter() + seconds
    while True:
        await trio.lowlevel.checkpoint()  # the other tasks run meanwhile
        if check():
            return True
        if time.perf_counter() >= until:
            return False


class PollWindows:
    """How long to poll for the next trap, learned separately after each kind of access.

    What follows an access depends on which access it was: after a driver reads
    InterruptStatus its InterruptACK write comes within µs, while after the ACK of a
    32-request batch the next QueueNotify waits until the guest has consumed the
    batch — hundreds of µs.  One window shared by every access kept being doubled by
    the first and spent (``poll_us`` of CPU for nothing) after the second: about a
    quarter of the daemon's CPU at queue depth 32.  So each access (a register
    address and direction, the caller's key) keeps its own window: doubled when
    polling after it found the next trap, halved when it did not (closed below
    ``minimum``), and reopened when the sleep that followed it was short after all.  Sans-IO: the
    caller polls and sleeps; this only says for how long.
    """

    #: keys remembered at most: a guest picks the addresses it touches
    MAX_KEYS = 64

    def __init__(self, maximum: float, minimum: float, slack: float) -> None:
        self.maximum = maximum  # seconds; 0 turns polling off
        self.minimum = minimum
        self.slack = slack  # a sleep this much longer than ``maximum`` still counts short
        self._windows: dict[object, float] = {}

    def window(self, key: object) -> float:
        """Seconds to poll after access ``key`` (0: sleep at once)."""
        return self._windows.get(key, 0.0)

    def found(self, key: object) -> None:
        """Polling after ``key`` found the next trap."""
        self._set(key, min(self.maximum, self.window(key) * 2))

    def missed(self, key: object) -> None:
        """Polling after ``key`` found nothing within its window."""
        window = self.window(key) / 2
        self._set(key, window if window >= self.minimum else 0.0)

    def slept(self, key: object, seconds: float) -> None:
        """After ``key`` the server slept ``seconds`` for the next trap."""
        if self.maximum and seconds <= self.maximum + self.slack:
            self._set(key, min(self.maximum, max(self.minimum, self.window(key) * 2)))

    def _set(self, key: object, window: float) -> None:
        if key not in self._windows and len(self._windows) >= self.MAX_KEYS:
            self._windows.clear()  # a guest touching many addresses: start over
        self._windows[key] = window
