"""How long the IOREQ server polls after each kind of access (sans-IO policy)."""

from __future__ import annotations

from virtio_diskd.ioreq.polling import PollWindows

MAX, MIN, SLACK = 50e-6, 4e-6, 150e-6
ISR_READ, ACK_WRITE = 0x60 * 2, 0x64 * 2 + 1  # address * 2 + direction, as the server keys


def test_a_window_opens_after_a_short_sleep_and_grows_while_polling_finds_traps() -> None:
    windows = PollWindows(MAX, MIN, SLACK)
    assert windows.window(ISR_READ) == 0.0  # nothing learned: sleep
    windows.slept(ISR_READ, 30e-6)
    assert windows.window(ISR_READ) == MIN
    for _ in range(10):
        windows.found(ISR_READ)
    assert windows.window(ISR_READ) == MAX  # never beyond --poll-us


def test_misses_after_one_access_do_not_close_the_window_of_another() -> None:
    """The queue-depth-32 pattern: the ACK after an InterruptStatus read comes at once,
    the next notify after the ACK comes long after any window.  Polling must stop after
    the ACK and go on after the read."""
    windows = PollWindows(MAX, MIN, SLACK)
    windows.slept(ISR_READ, 10e-6)
    windows.slept(ACK_WRITE, 10e-6)
    for _ in range(20):
        if windows.window(ISR_READ):
            windows.found(ISR_READ)
        if windows.window(ACK_WRITE):
            windows.missed(ACK_WRITE)
        else:
            windows.slept(ACK_WRITE, 400e-6)  # long: the guest was busy with the batch
    assert windows.window(ISR_READ) == MAX
    assert windows.window(ACK_WRITE) == 0.0


def test_a_long_sleep_does_not_open_a_window_and_a_short_one_reopens_it() -> None:
    windows = PollWindows(MAX, MIN, SLACK)
    windows.slept(ACK_WRITE, MAX + SLACK + 1e-6)
    assert windows.window(ACK_WRITE) == 0.0
    windows.slept(ACK_WRITE, MAX + SLACK)
    assert windows.window(ACK_WRITE) == MIN
    windows.missed(ACK_WRITE)
    assert windows.window(ACK_WRITE) == 0.0  # halved below the minimum: closed


def test_polling_off_stays_off() -> None:
    windows = PollWindows(0.0, MIN, SLACK)
    windows.slept(ISR_READ, 1e-6)
    windows.found(ISR_READ)
    assert windows.window(ISR_READ) == 0.0


def test_a_guest_touching_many_addresses_cannot_grow_the_table() -> None:
    windows = PollWindows(MAX, MIN, SLACK)
    for address in range(10_000):
        windows.slept(address * 2, 1e-6)
    assert len(windows._windows) <= PollWindows.MAX_KEYS
