"""Serving event channels at trio's idle point: no task switch per trap.

Why: a trap answered through a trio task costs, besides the handling itself, a
wake-up of that task — re-arming its fd (``epoll_ctl``), trio's scheduling pass,
the task step.  Measured on the 2-vCPU VM (an eventfd ping-pong with another
process, CPU of our side): 7.3 µs per round trip through
``trio.lowlevel.wait_readable`` against 2.6 µs for a plain ``poll`` loop.  At three
traps per request and queue depth 1 that is most of what is left to trim, and
under TCG on real Xen every µs of it becomes tens (issue #16).

How: trio calls an instrument's ``before_io_wait`` once every runnable task has run,
just before it sleeps in ``epoll_wait`` for ``timeout``.  There this instrument
sleeps instead, in one ``poll`` on every registered event-channel fd *and* trio's
own epoll fd (readable when anything a trio task waits for is ready — sockets,
other threads' completions, trio's wake-up socket for signals and
``run_sync_soon``).  An event-channel event is served right there, by the
server's synchronous drain (unmask, handle, answer, the queue work), and the
instrument sleeps again.  It gives the loop back to trio when trio has work: its
fd is readable (its ``epoll_wait`` then returns at once), serving made a task
runnable, or the deadline trio slept towards has come (in the last two cases it
wakes trio's loop, which would otherwise sleep out its stale timeout).  While
trio is busy (``timeout`` 0) the instrument only looks (``poll`` with no wait).

One instrument serves every IOREQ server of the run (a trio ``RunVar``): one that
slept on its own fd alone would leave the others' vCPUs waiting.

It reads private trio attributes — the run's epoll object and run queue, and the
two that say a test clock jumps or a task waits for the run to go idle — because
trio has no public way to wait on "anything for trio" from outside a task.
:func:`available` says whether this trio has them; without them servers wait
through trio as before, and while a test clock jumps or a task waits for the run to
go idle (those need trio's own sleep to time out unobserved) the instrument only
looks, never sleeps.  A failure while serving is raised in the server's task, as
before.
"""

from __future__ import annotations

import errno
import math
import select
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import outcome
import trio

#: The run's one instrument (created by the first server that asks).
_IDLE_SERVING: trio.lowlevel.RunVar[IdleServing] = trio.lowlevel.RunVar("idle_serving")


def _runner() -> Any:  # trio's private Runner
    from trio._core import _run  # private: see the module docstring

    return _run.GLOBAL_RUN_CONTEXT.runner


def available() -> bool:
    """True when this trio run can be served at its idle point (epoll, and the private
    attributes read here and in :meth:`IdleServing.before_io_wait` present)."""
    try:
        runner = _runner()
        epoll = runner.io_manager._epoll
        return isinstance(epoll, select.epoll) and all(
            hasattr(runner, name)
            for name in ("runq", "waiting_for_idle", "clock_autojump_threshold"))
    except (AttributeError, RuntimeError):
        return False


@dataclass
class IdleServingStats:
    sleeps: int = 0  # poll() calls that waited
    served: int = 0  # event-channel wake-ups served at the idle point
    to_trio: int = 0  # hand-backs because trio's fd was readable
    woke_trio: int = 0  # hand-backs that had to wake trio's loop (deadline, runnable task)


class IdleServing(trio.abc.Instrument):
    """The run's idle-point server of event-channel fds (see the module docstring)."""

    def __init__(self) -> None:
        runner = _runner()
        self._runq = runner.runq
        self._runner = runner
        self._trio_fd = runner.io_manager._epoll.fileno()
        self._token = trio.lowlevel.current_trio_token()
        self._poller = select.poll()
        self._poller.register(self._trio_fd, select.POLLIN)
        self._drains: dict[int, Callable[[], None]] = {}
        self._failed: dict[int, Callable[[BaseException], None]] = {}
        self.stats = IdleServingStats()

    @classmethod
    def of_this_run(cls) -> IdleServing:
        try:
            return _IDLE_SERVING.get()
        except LookupError:
            serving = cls()
            _IDLE_SERVING.set(serving)
            trio.lowlevel.add_instrument(serving)
            return serving

    async def serve(self, fd: int, drain: Callable[[], None]) -> None:
        """Serve ``fd``'s events with ``drain`` at the idle point until cancelled; an
        exception from ``drain`` is raised here."""
        if fd in self._drains:
            raise ValueError(f"fd {fd} is already served")
        task = trio.lowlevel.current_task()
        self._drains[fd] = drain
        self._failed[fd] = lambda exc: trio.lowlevel.reschedule(task, outcome.Error(exc))
        self._poller.register(fd, select.POLLIN)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._failed.pop(fd, None)  # cancelled: a later failure has no one to tell
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._stop_serving(fd)

    def _stop_serving(self, fd: int) -> Callable[[BaseException], None] | None:
        if self._drains.pop(fd, None) is not None:
            self._poller.unregister(fd)
        return self._failed.pop(fd, None)

    def _fail(self, fd: int, exc: BaseException) -> None:
        """Stop serving ``fd`` and raise ``exc`` in its task (unless it was cancelled)."""
        failed = self._stop_serving(fd)
        if failed is not None:
            failed(exc)

    # -- the instrument -------------------------------------------------------------------

    def before_io_wait(self, timeout: float) -> None:
        if not self._drains:
            return
        try:
            self._serve_while_idle(timeout)
        except BaseException as exc:  # trio would drop the instrument silently
            for fd in list(self._drains):
                self._fail(fd, exc)
            self._wake_trio()

    def _serve_while_idle(self, timeout: float) -> None:
        runner = self._runner
        if timeout <= 0 or runner.waiting_for_idle or runner.clock_autojump_threshold <= timeout:
            self._serve_ready(self._poller.poll(0))
            if timeout > 0 and self._runq:
                self._wake_trio()
            return
        until = time.monotonic() + timeout
        poll = self._poller.poll
        while True:
            remaining = until - time.monotonic()
            if remaining <= 0:
                self._wake_trio()  # the deadline trio computed its sleep for has come
                return
            self.stats.sleeps += 1
            events = poll(math.ceil(remaining * 1000))
            if not events:
                continue
            if self._serve_ready(events):
                self.stats.to_trio += 1
                return
            if self._runq:  # serving made a task runnable (a held answer, a waiter)
                self._wake_trio()
                return

    def _serve_ready(self, events: list[tuple[int, int]]) -> bool:
        """Serve the ready event-channel fds; True if trio's fd is among them."""
        for_trio = False
        for fd, revents in events:
            if fd == self._trio_fd:
                for_trio = True
                continue
            drain = self._drains.get(fd)
            if drain is None:
                continue
            self.stats.served += 1
            try:
                if revents & (select.POLLNVAL | select.POLLERR):
                    raise OSError(errno.EBADF, f"event-channel fd {fd} failed (poll: {revents:#x})")
                drain()
            except Exception as exc:  # raised in the serving task instead
                self._fail(fd, exc)
        return for_trio

    def _wake_trio(self) -> None:
        self.stats.woke_trio += 1
        self._token.run_sync_soon(_nothing)


def _nothing() -> None:
    """Run by trio's loop: its only purpose was to end trio's sleep."""
