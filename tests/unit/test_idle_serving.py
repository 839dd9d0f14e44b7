"""Event-channel fds served at trio's idle point (``ioreq/idle_serving.py``).

The fds here are eventfds written by a thread (the way Xen's events arrive: from
outside the run, while trio sleeps).  What must hold: every event is served; the
rest of the run — tasks on other fds, sleeping tasks, tasks a drain wakes — goes on
as under trio alone; several servers in one run are all served; a drain's failure
reaches the serving task; cancelling stops the serving."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing

from virtio_diskd.ioreq import idle_serving
from virtio_diskd.ioreq.idle_serving import IdleServing


class EventSource:
    """An eventfd and its drain: counts the events it read."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.drained = 0
        self.after_drain: Callable[[], None] = lambda: None

    def drain(self) -> None:
        try:
            self.drained += os.eventfd_read(self.fd)
        except BlockingIOError:
            return
        self.after_drain()

    def fire_from_thread(self, times: int, pause: float = 0.0) -> threading.Thread:
        def fire() -> None:
            for _ in range(times):
                os.eventfd_write(self.fd, 1)
                if pause:
                    threading.Event().wait(pause)
        thread = threading.Thread(target=fire)
        thread.start()
        return thread

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def sources() -> Iterator[list[EventSource]]:
    made = [EventSource() for _ in range(2)]
    yield made
    for source in made:
        source.close()


async def wait_until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.001)


async def test_this_trio_supports_it() -> None:
    """If a trio upgrade removes what the instrument reads, this fails (the servers would
    silently fall back to waiting through trio)."""
    assert idle_serving.available()


async def test_events_are_served_at_the_idle_point(sources: list[EventSource]) -> None:
    source = sources[0]
    serving = IdleServing.of_this_run()
    served_before = serving.stats.served
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.serve, source.fd, source.drain)
        await trio.sleep(0.01)
        thread = source.fire_from_thread(200, pause=0.0005)
        with trio.fail_after(20):
            await wait_until(lambda: source.drained == 200)
        thread.join()
        nursery.cancel_scope.cancel()
    assert serving.stats.served > served_before
    assert serving.stats.sleeps > 0


async def test_two_servers_in_one_run_are_both_served(sources: list[EventSource]) -> None:
    """One instrument per run: a server sleeping on its own fd alone would leave the
    other's events unserved while trio sleeps."""
    serving = IdleServing.of_this_run()
    async with trio.open_nursery() as nursery:
        for source in sources:
            nursery.start_soon(serving.serve, source.fd, source.drain)
        await trio.sleep(0.01)
        threads = [source.fire_from_thread(100, pause=0.0005) for source in sources]
        with trio.fail_after(20):
            await wait_until(lambda: all(s.drained == 100 for s in sources))
        for thread in threads:
            thread.join()
        nursery.cancel_scope.cancel()
    assert IdleServing.of_this_run() is serving


async def test_other_tasks_fds_and_sleeps_go_on_while_it_serves(
        sources: list[EventSource]) -> None:
    source = sources[0]
    serving = IdleServing.of_this_run()
    ours, theirs = socket.socketpair()
    received: list[bytes] = []
    ticks = 0

    async def reader() -> None:
        while len(b"".join(received)) < 50:
            await trio.lowlevel.wait_readable(ours)
            received.append(ours.recv(100))

    async def sleeper() -> None:
        nonlocal ticks
        for _ in range(20):
            await trio.sleep(0.01)
            ticks += 1

    with ours, theirs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serving.serve, source.fd, source.drain)
            nursery.start_soon(reader)
            nursery.start_soon(sleeper)
            await trio.sleep(0.01)
            firing = source.fire_from_thread(400, pause=0.0005)

            def write_slowly() -> None:
                for _ in range(50):
                    theirs.send(b"x")
                    threading.Event().wait(0.002)
            writer = threading.Thread(target=write_slowly)
            writer.start()
            with trio.fail_after(20):
                await wait_until(lambda: ticks == 20 and len(b"".join(received)) == 50
                                 and source.drained == 400)
            firing.join()
            writer.join()
            nursery.cancel_scope.cancel()
    assert serving.stats.to_trio > 0  # the socket's data was handed to trio


async def test_a_task_the_drain_wakes_runs_without_waiting_for_another_event(
        sources: list[EventSource]) -> None:
    """A drain that makes a task runnable (a held answer, a waiter on completions) must
    end trio's sleep: otherwise that task waits for an unrelated event or deadline."""
    source = sources[0]
    woken = trio.Event()
    source.after_drain = woken.set
    serving = IdleServing.of_this_run()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.serve, source.fd, source.drain)
        nursery.start_soon(trio.sleep, 3600)  # trio's own sleep would last an hour
        await trio.sleep(0.01)
        os.eventfd_write(source.fd, 1)  # from the run itself: served at the next idle
        started = trio.current_time()
        with trio.fail_after(60):  # trio's stale sleep would end here, at the earliest
            await woken.wait()
        # long before that deadline: the drain ended trio's sleep (a liveness check: the
        # margin is thousands of times what it takes)
        assert trio.current_time() - started < 30
        nursery.cancel_scope.cancel()


async def test_a_failing_drain_raises_in_the_serving_task(sources: list[EventSource]) -> None:
    source, other = sources

    def broken() -> None:
        raise RuntimeError("drain broke")

    source.drain = broken  # type: ignore[method-assign]
    serving = IdleServing.of_this_run()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.serve, other.fd, other.drain)
        os.eventfd_write(source.fd, 1)  # pending before serving starts: served at once
        with pytest.raises(RuntimeError, match="drain broke"), trio.fail_after(10):
            await serving.serve(source.fd, source.drain)
        # the other server is still served
        os.eventfd_write(other.fd, 1)
        with trio.fail_after(10):
            await wait_until(lambda: other.drained == 1)
        nursery.cancel_scope.cancel()


async def test_cancelled_serving_drains_nothing_more(sources: list[EventSource]) -> None:
    source = sources[0]
    serving = IdleServing.of_this_run()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.serve, source.fd, source.drain)
        await trio.sleep(0.01)
        os.eventfd_write(source.fd, 1)
        with trio.fail_after(10):
            await wait_until(lambda: source.drained == 1)
        nursery.cancel_scope.cancel()
    os.eventfd_write(source.fd, 1)
    await trio.sleep(0.05)
    assert source.drained == 1
    # and the fd can be served again
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serving.serve, source.fd, source.drain)
        with trio.fail_after(10):
            await wait_until(lambda: source.drained == 2)
        nursery.cancel_scope.cancel()


def run_in_thread_with_watchdog(main: Callable[[], object], clock: trio.abc.Clock | None,
                                seconds: float) -> bool:
    """``trio.run(main)`` in a thread; False if it has not finished after ``seconds``
    (a hang that trio's own timeouts cannot catch: they depend on its clock)."""
    thread = threading.Thread(target=trio.run, args=(main,), kwargs={"clock": clock},
                              daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


@pytest.mark.parametrize("waits", ["clock_jump", "all_tasks_blocked"])
def test_trio_sees_its_own_idle_time_out(waits: str) -> None:
    """A jumping test clock, and ``wait_all_tasks_blocked``, need trio's own sleep to run
    out with nothing happening: the instrument must only look then, never sleep (after
    its own sleep it would have to wake trio, and trio would never see the idle)."""
    source = EventSource()
    clock = trio.testing.MockClock(autojump_threshold=0.05) if waits == "clock_jump" else None

    async def main() -> None:
        serving = IdleServing.of_this_run()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serving.serve, source.fd, source.drain)
            if waits == "clock_jump":
                await trio.sleep(3600)  # jumps after 0.05 s of real idle
            else:
                await trio.testing.wait_all_tasks_blocked(0.05)
            os.eventfd_write(source.fd, 1)
            while source.drained != 1:
                await trio.sleep(0.001)
            nursery.cancel_scope.cancel()

    try:
        assert run_in_thread_with_watchdog(main, clock, 20)
    finally:
        source.close()
