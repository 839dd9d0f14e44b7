"""The XenBus state machine: libxl's contract as transitions."""

from __future__ import annotations

import pytest

from virtio_diskd.ioreq.xenbus import (
    BeginTeardown,
    ClearError,
    DeviceNeedsReset,
    DriverStarted,
    FrontendGone,
    GuestDied,
    GuestReset,
    Phase,
    RemovalRequested,
    RemoveBackendDir,
    ServerReady,
    SetupFailed,
    TeardownDone,
    WriteError,
    WriteState,
    XenbusDevice,
    XenbusState,
)


def test_create_connect_reset_and_close() -> None:
    dev = XenbusDevice()
    assert dev.handle(DriverStarted()) == []  # not served yet: nothing
    # a stale error node from an earlier failed attempt goes before InitWait is written
    assert dev.handle(ServerReady()) == [ClearError(), WriteState(XenbusState.INIT_WAIT)]
    assert dev.handle(DriverStarted()) == [WriteState(XenbusState.CONNECTED)]
    assert dev.handle(GuestReset()) == [WriteState(XenbusState.INIT_WAIT)]
    assert dev.handle(DriverStarted()) == [WriteState(XenbusState.CONNECTED)]
    assert dev.handle(RemovalRequested()) == [BeginTeardown()]
    assert dev.handle(RemovalRequested()) == []  # already closing
    assert dev.handle(TeardownDone()) == [WriteState(XenbusState.CLOSED)]
    assert dev.finished and dev.phase is Phase.CLOSED
    assert dev.handle(ServerReady()) == []


@pytest.mark.parametrize("event", [RemovalRequested(), FrontendGone(), GuestDied()])
@pytest.mark.parametrize("ready", [False, True])
def test_every_close_reason_tears_down_then_writes_closed(event: object, ready: bool) -> None:
    dev = XenbusDevice()
    if ready:
        dev.handle(ServerReady())
    assert dev.handle(event) == [BeginTeardown()]  # type: ignore[arg-type]
    assert dev.handle(DriverStarted()) == []
    assert dev.handle(TeardownDone()) == [WriteState(XenbusState.CLOSED)]


def test_failure_writes_error_and_closed_once() -> None:
    dev = XenbusDevice()
    assert dev.handle(SetupFailed("params: no such file")) == [
        WriteError("params: no such file"), WriteState(XenbusState.CLOSED)]
    assert dev.phase is Phase.FAILED and dev.error == "params: no such file"
    assert dev.handle(SetupFailed("again")) == []
    assert dev.handle(ServerReady()) == []


def test_a_broken_device_says_why_and_recovers_after_a_reset() -> None:
    dev = XenbusDevice()
    assert dev.handle(DeviceNeedsReset("too early")) == []  # not served: nothing to say
    dev.handle(ServerReady())
    dev.handle(DriverStarted())
    assert dev.handle(DeviceNeedsReset("queue 0: bad ring")) == [WriteError("queue 0: bad ring")]
    assert dev.phase is Phase.CONNECTED  # the state stays: libxl's protocol is unchanged
    # the guest resets the device: the reason is stale and goes
    assert dev.handle(GuestReset()) == [ClearError(), WriteState(XenbusState.INIT_WAIT)]
    assert dev.handle(DriverStarted()) == [WriteState(XenbusState.CONNECTED)]
    # broken before DRIVER_OK (a ring the device cannot map): the driver going on to
    # DRIVER_OK does not clear it, only a reset does
    broken = XenbusDevice()
    broken.handle(ServerReady())
    assert broken.handle(DeviceNeedsReset("ring")) == [WriteError("ring")]
    assert broken.handle(DriverStarted()) == [WriteState(XenbusState.CONNECTED)]
    assert broken.error == "ring"
    assert dev.handle(RemovalRequested()) == [BeginTeardown()]
    assert dev.handle(DeviceNeedsReset("late")) == []  # closing: nothing to say


def test_driver_domain_removes_its_own_dir() -> None:
    dev = XenbusDevice(driver_domain=True)
    dev.handle(ServerReady())
    dev.handle(FrontendGone())
    assert dev.handle(TeardownDone()) == [WriteState(XenbusState.CLOSED), RemoveBackendDir()]


def test_state_two_is_never_skipped() -> None:
    """libxl matches state == 2 exactly: 4 is only reachable through 2."""
    dev = XenbusDevice()
    written = []
    for event in (DriverStarted(), ServerReady(), DriverStarted()):
        written += [e.state for e in dev.handle(event) if isinstance(e, WriteState)]
    assert written == [XenbusState.INIT_WAIT, XenbusState.CONNECTED]
