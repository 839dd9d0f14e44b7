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
