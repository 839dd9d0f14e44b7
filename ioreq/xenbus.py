"""The XenBus state machine of one backend device, pure and table-driven.

Rule 1: everything that decides which XenBus ``state`` the backend writes, and
when, lives in :data:`TRANSITIONS`.  Rule 2: this module does no I/O; it takes
events and returns effects (h11 style) that the daemon performs.

libxl's contract (``shared/reference/xen-interface.md`` §1):

* create waits 10 s for backend ``state`` == 2 (InitWait) *exactly*, so 2 is
  written only once the IOREQ server and MMIO window are ready, and never
  skipped;
* 4 (Connected) is written when the guest driver sets DRIVER_OK — libxl has
  stopped waiting by then — and the device returns to 2 after a guest reset;
* removal (``online=0``/``state=5``), the frontend dir vanishing, or the guest
  dying: drain in-flight I/O, tear down, then write 6 (Closed) within 10 s;
* a device that cannot be served gets an ``error`` node and state 6.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class XenbusState(enum.IntEnum):
    """``enum xenbus_state`` (``xen/include/public/io/xenbus.h``)."""

    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8


class Phase(enum.Enum):
    """Where the backend is with one device."""

    DISCOVERED = "discovered"  # nodes read, server being set up
    INIT_WAIT = "init-wait"  # state 2 written, guest not yet driving the device
    CONNECTED = "connected"  # state 4 written, guest driver is up
    CLOSING = "closing"  # draining and tearing down
    CLOSED = "closed"  # state 6 written; nothing more happens
    FAILED = "failed"  # error node + state 6 written


# -- events (inputs) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ServerReady:
    """The IOREQ server and the device's MMIO window are in place."""


@dataclass(frozen=True, slots=True)
class Resumed:
    """A killed predecessor's device was taken over with its IOREQ server and register
    file (issue #15); ``connected``: the guest driver is live on it."""

    connected: bool


@dataclass(frozen=True, slots=True)
class SetupFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class DriverStarted:
    """The guest driver wrote DRIVER_OK to the device's Status register."""


@dataclass(frozen=True, slots=True)
class GuestReset:
    """The guest driver reset the device (Status ← 0)."""


@dataclass(frozen=True, slots=True)
class RemovalRequested:
    """The toolstack wrote ``online=0`` or ``state=5``."""


@dataclass(frozen=True, slots=True)
class FrontendGone:
    """The frontend directory disappeared (forced removal)."""


@dataclass(frozen=True, slots=True)
class GuestDied:
    """The guest domain no longer exists."""


@dataclass(frozen=True, slots=True)
class TeardownDone:
    """In-flight I/O drained, the device unmapped, its resources released."""


@dataclass(frozen=True, slots=True)
class DeviceNeedsReset:
    """The running device stopped until the guest resets it (DEVICE_NEEDS_RESET): the
    reason goes to the ``error`` node, where an operator looks; the state stays (the
    guest may reset and recover, and removal still follows libxl's protocol).  The
    guest's reset removes the node."""

    reason: str


XenbusEvent = (ServerReady | Resumed | SetupFailed | DriverStarted | GuestReset | RemovalRequested
               | FrontendGone | GuestDied | TeardownDone | DeviceNeedsReset)

# -- effects (outputs) ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WriteState:
    state: XenbusState


@dataclass(frozen=True, slots=True)
class WriteError:
    """Write the backend's ``error`` node so the operator sees why."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClearError:
    """Remove an ``error`` node a failed earlier attempt left (QEMU's xen-block does the
    same): a device that is served says so without a stale reason beside it."""


@dataclass(frozen=True, slots=True)
class BeginTeardown:
    """Stop taking new requests, drain in-flight I/O, release the device."""


@dataclass(frozen=True, slots=True)
class RemoveBackendDir:
    """Only a driver-domain backend removes its own dir (libxl removes dom0's)."""


XenbusEffect = WriteState | WriteError | ClearError | BeginTeardown | RemoveBackendDir

_CLOSE_EVENTS = (RemovalRequested, FrontendGone, GuestDied)

#: (phase, event type) → (next phase, effects).  Pairs not listed change nothing.
TRANSITIONS: dict[tuple[Phase, type], tuple[Phase, tuple[XenbusEffect, ...]]] = {
    (Phase.DISCOVERED, ServerReady): (Phase.INIT_WAIT, (ClearError(),
                                                        WriteState(XenbusState.INIT_WAIT))),
    (Phase.INIT_WAIT, DriverStarted): (Phase.CONNECTED, (WriteState(XenbusState.CONNECTED),)),
    (Phase.CONNECTED, GuestReset): (Phase.INIT_WAIT, (WriteState(XenbusState.INIT_WAIT),)),
    **{(phase, ev): (Phase.CLOSING, (BeginTeardown(),))
       for phase in (Phase.DISCOVERED, Phase.INIT_WAIT, Phase.CONNECTED) for ev in _CLOSE_EVENTS},
    (Phase.CLOSING, TeardownDone): (Phase.CLOSED, (WriteState(XenbusState.CLOSED),)),
}


class XenbusDevice:
    """The state of one ``backend/virtio_disk/<guest>/<devid>`` device."""

    def __init__(self, *, driver_domain: bool = False) -> None:
        self.phase = Phase.DISCOVERED
        self.driver_domain = driver_domain
        self.error: str | None = None

    def handle(self, event: XenbusEvent) -> list[XenbusEffect]:
        """Apply one event; returns the effects to perform, in order."""
        if isinstance(event, SetupFailed):
            if self.phase in (Phase.CLOSED, Phase.FAILED):
                return []
            self.phase = Phase.FAILED
            self.error = event.reason
            effects: list[XenbusEffect] = [WriteError(event.reason), WriteState(XenbusState.CLOSED)]
            return effects
        if isinstance(event, DeviceNeedsReset):
            if self.phase not in (Phase.INIT_WAIT, Phase.CONNECTED):
                return []
            self.error = event.reason
            return [WriteError(event.reason)]
        if isinstance(event, GuestReset) and self.error is not None \
                and self.phase in (Phase.INIT_WAIT, Phase.CONNECTED):
            # the guest reset the broken device: the reason no longer holds (a new
            # one is written if it breaks again)
            self.error = None
            return [ClearError(), *self.handle(event)]
        if isinstance(event, Resumed):
            if self.phase != Phase.DISCOVERED:
                return []
            # the state node says so already, unless the predecessor died between the
            # driver's DRIVER_OK and its write of 4: writing it again is harmless
            self.phase = Phase.CONNECTED if event.connected else Phase.INIT_WAIT
            state = XenbusState.CONNECTED if event.connected else XenbusState.INIT_WAIT
            return [ClearError(), WriteState(state)]
        entry = TRANSITIONS.get((self.phase, type(event)))
        if entry is None:
            return []
        self.phase, produced = entry
        effects = list(produced)
        if self.phase == Phase.CLOSED and self.driver_domain:
            effects.append(RemoveBackendDir())
        return effects

    @property
    def finished(self) -> bool:
        return self.phase in (Phase.CLOSED, Phase.FAILED)
