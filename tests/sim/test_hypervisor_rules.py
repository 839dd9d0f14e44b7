"""The simulated hypervisor enforces Xen's rules, checked with a minimal scripted backend."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from virtio_diskd.ioreq.sim.hypervisor import DataAbort, GuestGone, Hypervisor
from virtio_diskd.ioreq.xen import abi
from virtio_diskd.ioreq.xen.interface import PROT_READ, PROT_WRITE, XenError
from virtio_diskd.ioreq.xen.simulated import SimPlatform

BASE = 0x02000000


@pytest.fixture
def host(tmp_path: Path):  # type: ignore[no-untyped-def]
    hv = Hypervisor()
    sock = str(tmp_path / "hv.sock")
    hv.serve(sock)
    yield hv, SimPlatform(sock, 0), sock
    hv.close()


class ScriptedBackend:
    """Just enough of a device model: one server, one window, answers by a rule."""

    def __init__(self, platform: SimPlatform, domid: int, answer) -> None:  # type: ignore[no-untyped-def]
        self.dm = platform.devicemodel()
        self.fmem = platform.foreignmemory()
        self.evtchn = platform.evtchn()
        self.id = self.dm.create_ioreq_server(domid, 0)
        self.page_map = self.fmem.map_resource(domid, 0, self.id, 1, 1, PROT_READ | PROT_WRITE)
        self.page = self.page_map.view
        self.dm.set_ioreq_server_state(domid, self.id, True)
        self.port = self.evtchn.bind_interdomain(domid, abi.vp_eport(self.page, 0))
        self.dm.map_io_range_to_ioreq_server(domid, self.id, True, BASE, BASE + 0x1FF)
        self.answer = answer
        self.seen: list[abi.Ioreq] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        import select

        while not self.stop.is_set():
            if not select.select([self.evtchn.fd()], [], [], 0.05)[0]:
                continue
            for port in self.evtchn.pending_ports():
                self.evtchn.unmask(port)
                if abi.state_of(self.page, 0) != abi.STATE_IOREQ_READY:
                    continue  # the spurious event after binding
                req = abi.decode(self.page, 0)
                abi.set_state(self.page, 0, abi.STATE_IOREQ_INPROCESS)
                self.seen.append(req)
                self.answer(self, req)

    def respond(self, data: int = 0, state: int = abi.STATE_IORESP_READY) -> None:
        abi.set_data(self.page, 0, data)
        abi.set_state(self.page, 0, state)
        self.evtchn.notify(self.port)


def test_ioreq_round_trip_carries_exact_fields(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _ = host
    guest = hv.create_guest(3)
    backend = ScriptedBackend(platform, 3, lambda b, req: b.respond(0x1122334455667788))
    assert guest.vcpus[0].call(lambda: guest.mmio(BASE + 0x70, 4, False), 10) == 0x55667788
    guest.vcpus[0].call(lambda: guest.mmio(BASE + 0x50, 2, True, 0x1ABCD), 10)
    read, write = backend.seen
    assert (read.addr, read.size, read.dir, read.type, read.count, read.data_is_ptr) == (
        BASE + 0x70, 4, abi.IOREQ_READ, abi.IOREQ_TYPE_COPY, 1, False)
    assert (write.addr, write.size, write.dir, write.data) == (BASE + 0x50, 2,
                                                               abi.IOREQ_WRITE, 0xABCD)
    assert abi.state_of(backend.page, 0) == abi.STATE_IOREQ_NONE  # Xen resets it
    backend.stop.set()


def test_unclaimed_access_is_a_data_abort(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _ = host
    guest = hv.create_guest(3)
    ScriptedBackend(platform, 3, lambda b, req: b.respond())
    with pytest.raises(DataAbort):
        guest.vcpus[0].call(lambda: guest.mmio(BASE + 0x200, 4, False), 10)
    with pytest.raises(DataAbort):  # straddling the end of the window
        guest.vcpus[0].call(lambda: guest.mmio(BASE + 0x1FC, 8, False), 10)


def test_state_going_backwards_crashes_the_guest(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _ = host
    died: list[int] = []
    hv.on_domain_died = died.append
    guest = hv.create_guest(3)
    ScriptedBackend(platform, 3, lambda b, req: b.respond(state=abi.STATE_IOREQ_NONE))
    with pytest.raises(GuestGone):
        guest.vcpus[0].call(lambda: guest.mmio(BASE, 4, False), 10)
    assert died == [3] and "went from READY to 0" in (guest.crash_reason or "")


def test_invalidate_is_broadcast_and_must_be_answered(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _ = host
    guest = hv.create_guest(3)
    answered = threading.Event()

    def answer(b: ScriptedBackend, req: abi.Ioreq) -> None:
        if req.type == abi.IOREQ_TYPE_INVALIDATE and not answered.is_set():
            return  # first INVALIDATE: leave it unanswered for a while
        b.respond()

    backend = ScriptedBackend(platform, 3, answer)
    guest.request_invalidate()
    done = threading.Event()
    threading.Thread(target=lambda: (guest.vcpus[0].call(
        lambda: guest.mmio(BASE, 4, False), 30), done.set()), daemon=True).start()
    assert not done.wait(0.5)  # the vCPU is stuck until the INVALIDATE is answered
    invalidate = backend.seen[0]
    assert (invalidate.type, invalidate.size, invalidate.dir, invalidate.data) == (
        abi.IOREQ_TYPE_INVALIDATE, 4, abi.IOREQ_WRITE, 0xFFFFFFFFFFFFFFFF)
    answered.set()
    backend.respond()
    assert done.wait(10)
    assert [r.type for r in backend.seen] == [abi.IOREQ_TYPE_INVALIDATE, abi.IOREQ_TYPE_COPY]


def test_at_most_eight_servers_and_only_the_creator_maps_the_page(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, sock = host
    hv.create_guest(3)
    dm = platform.devicemodel()
    ids = [dm.create_ioreq_server(3, 0) for _ in range(8)]
    assert ids == list(range(8))
    with pytest.raises(XenError) as info:
        dm.create_ioreq_server(3, 0)
    assert info.value.errno == errno.ENOSPC
    other = SimPlatform(sock, 7)  # an unprivileged driver domain
    with pytest.raises(XenError) as info:
        other.foreignmemory().map_resource(3, 0, 0, 1, 1, PROT_READ | PROT_WRITE)
    assert info.value.errno == errno.EPERM
    with pytest.raises(XenError) as info:
        other.foreignmemory().map(3, PROT_READ, [0x40000])
    assert info.value.errno == errno.EPERM
    with pytest.raises(XenError) as info:
        dm.create_ioreq_server(3, 1)  # buffered ioreqs: not on Arm
    assert info.value.errno == errno.EINVAL


def test_grant_rules(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _ = host
    guest = hv.create_guest(3)
    gnttab = platform.gnttab()
    guest.ram_view[0:4] = b"gran"
    ro = guest.grant([0x40000], grantee=0, readonly=True)
    rw = guest.grant([0x40001, 0x40002], grantee=0, readonly=False)
    other = guest.grant([0x40003], grantee=9, readonly=False)
    mapping = gnttab.map_domain_grant_refs(3, [ro], PROT_READ)
    assert bytes(mapping.view[:4]) == b"gran" and mapping.view.readonly
    with pytest.raises(XenError):  # read-write map of a read-only grant
        gnttab.map_domain_grant_refs(3, [ro], PROT_READ | PROT_WRITE)
    with pytest.raises(XenError):  # granted to another domain
        gnttab.map_domain_grant_refs(3, [other], PROT_READ)
    both = gnttab.map_domain_grant_refs(3, [rw, rw + 1], PROT_READ | PROT_WRITE)
    both.view[4096:4100] = b"back"
    assert bytes(guest.ram_view[0x2000:0x2004]) == b"back"
    assert guest.end_access(rw) is False  # still mapped: "still in use"
    both.unmap()
    assert guest.end_access(rw + 1) is True
    with pytest.raises(XenError):  # revoked
        gnttab.map_domain_grant_refs(3, [rw], PROT_READ)
    mapping.unmap()
    assert guest.end_access(ro) is True


def test_ioreq_server_setup_failing_half_way_is_rolled_back(host) -> None:  # type: ignore[no-untyped-def]
    """bind_interdomain fails after create/map/enable: everything done so far is undone,
    in reverse, and the guest keeps no server (Xen's 8-per-guest budget is not leaked)."""
    from virtio_diskd.ioreq.server import IoreqServer

    hv, platform, _ = host
    guest = hv.create_guest(3, vcpus=2)
    calls: list[str] = []

    class FailingEvtchn:
        def __init__(self, inner: object) -> None:
            self.inner = inner
            self.bound = 0

        def __getattr__(self, name: str) -> object:
            return getattr(self.inner, name)

        def bind_interdomain(self, domid: int, remote_port: int) -> int:
            if self.bound == 1:  # the second vCPU's port fails
                raise XenError(errno.EINVAL, "injected")
            self.bound += 1
            return self.inner.bind_interdomain(domid, remote_port)  # type: ignore[attr-defined, no-any-return]

        def unbind(self, port: int) -> None:
            calls.append("unbind")
            self.inner.unbind(port)  # type: ignore[attr-defined]

    class Platform:
        def devicemodel(self):  # type: ignore[no-untyped-def]
            dm = platform.devicemodel()
            real_destroy, real_state = dm.destroy_ioreq_server, dm.set_ioreq_server_state

            def destroy(domid: int, server: int) -> None:
                calls.append("destroy")
                real_destroy(domid, server)

            def state(domid: int, server: int, enabled: bool) -> None:
                calls.append(f"state:{enabled}")
                real_state(domid, server, enabled)

            dm.destroy_ioreq_server, dm.set_ioreq_server_state = destroy, state
            return dm

        def foreignmemory(self):  # type: ignore[no-untyped-def]
            return platform.foreignmemory()

        def evtchn(self):  # type: ignore[no-untyped-def]
            return FailingEvtchn(platform.evtchn())

        def gnttab(self):  # type: ignore[no-untyped-def]
            return platform.gnttab()

        def barrier(self) -> None:
            platform.barrier()

    server = IoreqServer(Platform(), 3)  # type: ignore[arg-type]
    with pytest.raises(XenError, match="injected"):
        server.start()
    assert calls == ["state:True", "unbind", "state:False", "destroy"]
    assert guest.servers == {}


def test_event_channel_masks_until_unmask_and_loses_nothing(host) -> None:  # type: ignore[no-untyped-def]
    """libxenevtchn semantics over the shared counters: a delivered port stays masked;
    events meanwhile are kept and delivered once after unmask; other ports are unaffected."""
    import select

    hv, platform, _sock = host
    guest = hv.create_guest(1, vcpus=2)
    dm, fmem, evtchn = platform.devicemodel(), platform.foreignmemory(), platform.evtchn()
    sid = dm.create_ioreq_server(1, 0)
    page = fmem.map_resource(1, 0, sid, 1, 1, PROT_READ | PROT_WRITE).view
    dm.set_ioreq_server_state(1, sid, True)
    ports = [evtchn.bind_interdomain(1, abi.vp_eport(page, v)) for v in range(2)]
    handle = guest.servers[sid].ports[0].handle

    def readable() -> bool:
        return bool(select.select([evtchn.fd()], [], [], 0.2)[0])

    assert readable()  # both ports are left pending once by the bind
    assert sorted(evtchn.pending_ports()) == sorted(ports)
    assert evtchn.pending_ports() == []
    handle.fire(ports[0])
    handle.fire(ports[0])  # masked: kept, not delivered
    assert evtchn.pending_ports() == []
    evtchn.unmask(ports[1])
    handle.fire(ports[1])
    assert readable() and evtchn.pending_ports() == [ports[1]]
    assert evtchn.pending_ports() == []
    evtchn.unmask(ports[0])  # the events that came while masked: delivered once now
    assert readable() and evtchn.pending_ports() == [ports[0]]
    assert evtchn.pending_ports() == []
    evtchn.unmask(ports[0])
    assert evtchn.pending_ports() == []
    evtchn.notify(ports[0])  # a notify goes straight to the vCPU's wake-up
    with pytest.raises(XenError):
        evtchn.notify(999)
    evtchn.unbind(ports[0])
    with pytest.raises(XenError) as err:
        evtchn.unbind(ports[0])
    assert err.value.errno == errno.ENOENT
    evtchn.close()


def test_interrupts_reach_the_guest_and_follow_a_reused_domid(host) -> None:  # type: ignore[no-untyped-def]
    hv, platform, _sock = host
    dm = platform.devicemodel()
    for round_ in range(2):  # the second guest reuses domid 1, as after a reboot
        guest = hv.create_guest(1)
        taken: list[int] = []
        guest.irq_handlers[40] = lambda taken=taken: taken.append(40)
        dm.set_irq_level(1, 40, 1)
        dm.set_irq_level(1, 40, 0)  # the falling edge of an edge SPI: nothing
        vcpu = guest.vcpus[0]
        assert vcpu.call(lambda vcpu=vcpu, taken=taken: vcpu.wait_until(lambda: bool(taken), 5),
                         5), round_
        assert taken == [40] and guest.irqs_delivered == 1
        with pytest.raises(XenError):
            dm.set_irq_level(1, 20, 1)  # not an SPI
        with pytest.raises(XenError):
            dm.set_irq_level(1, 2000, 1)
        hv.destroy_guest(1)
    with pytest.raises(XenError) as err:
        dm.set_irq_level(1, 40, 1)  # the domain is gone
    assert err.value.errno == errno.ESRCH
    dm.close()


def test_restricted_handles_act_on_their_guest_only(host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """xentoolcore_restrict_all as the simulated kernel drivers enforce it: after it, a
    mapping, dm_op or event-channel bind for another domain fails with EPERM."""
    from virtio_diskd.ioreq.xen import simulated

    hv, platform, _ = host
    monkeypatch.setattr(simulated, "_RESTRICTABLE", {})  # this test's handles only
    three, four = hv.create_guest(3), hv.create_guest(4)
    dm, fmem, evtchn = platform.devicemodel(), platform.foreignmemory(), platform.evtchn()
    first = {3: three.ram_base >> abi.XEN_PAGE_SHIFT, 4: four.ram_base >> abi.XEN_PAGE_SHIFT}
    fmem.map(4, PROT_READ, [first[4]]).unmap()  # unrestricted: any guest
    platform.restrict(3)
    fmem.map(3, PROT_READ, [first[3]]).unmap()
    assert dm.create_ioreq_server(3, 0) == 0
    for attempt in (lambda: fmem.map(4, PROT_READ, [first[4]]),
                    lambda: dm.create_ioreq_server(4, 0),
                    lambda: evtchn.bind_interdomain(4, 1)):
        with pytest.raises(XenError) as info:
            attempt()
        assert info.value.errno == errno.EPERM
    with pytest.raises(XenError) as info:  # an event channel is restricted once only
        platform.restrict(3)
    assert info.value.errno == errno.EACCES
    fresh = platform.foreignmemory()  # opened after: unrestricted until restricted
    fresh.map(4, PROT_READ, [first[4]]).unmap()


def test_a_restricted_grant_handle_is_useless(host, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """libxengnttab cannot restrict gntdev to a domain: xentoolcore_restrict_all dup2s
    /dev/null over its fd, and every later grant call fails with ENOTTY (as on real
    Xen: 'ioctl MAP_GRANT_REF failed: Inappropriate ioctl for device').  A handle
    opened afterwards works."""
    from virtio_diskd.ioreq.xen import simulated

    hv, platform, _ = host
    monkeypatch.setattr(simulated, "_RESTRICTABLE", {})
    hv.create_guest(3)
    gnttab = platform.gnttab()
    platform.restrict(3)
    with pytest.raises(XenError) as info:
        gnttab.map_domain_grant_refs(3, [8], PROT_READ)
    assert info.value.errno == errno.ENOTTY
    fresh = platform.gnttab()
    with pytest.raises(XenError) as info:  # usable again: refused only as a bad ref
        fresh.map_domain_grant_refs(3, [8], PROT_READ)
    assert info.value.errno == errno.EINVAL
