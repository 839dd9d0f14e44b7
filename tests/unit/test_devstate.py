"""The saved device state a successor resumes from (issue #15)."""

from __future__ import annotations

from pathlib import Path

from virtio_diskd.ioreq.devstate import DeviceStateFile, GuestRecord, GuestState, saved_guests
from virtio_diskd.ioreq.xenbus import Phase, Resumed, WriteState, XenbusDevice, XenbusState


def _open(path: Path, queue_size: int = 64) -> DeviceStateFile:
    return DeviceStateFile(str(path), num_queues=2, queue_size=queue_size, max_segments=8)


def test_the_newest_intact_record_is_loaded(tmp_path: Path) -> None:
    state = _open(tmp_path / "d.state")
    assert state.load() is None
    state.save({"status": 1})
    state.save({"status": 15})
    state.close()
    again = _open(tmp_path / "d.state")
    assert again.load() == {"status": 15}


def test_a_record_torn_by_a_kill_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    state = _open(tmp_path / "d.state")
    state.save({"status": 1})
    state.save({"status": 15})
    newest = max(range(2), key=lambda i: int(state._seqs[i][0]))
    offset = (4096, 4096 + 16384)[newest]
    state.view[offset + 20] ^= 0xFF  # a byte of the newest record never made it
    assert state.load() == {"status": 1}


def test_a_file_laid_out_for_another_device_shape_resumes_nothing(tmp_path: Path) -> None:
    state = _open(tmp_path / "d.state")
    state.save({"status": 15})
    state.close()
    other = _open(tmp_path / "d.state", queue_size=128)
    assert not other.matches and other.load() is None


def test_guest_record_round_trip_and_removal(tmp_path: Path) -> None:
    guest = GuestState(str(tmp_path), 7)
    assert guest.load_guest() is None
    guest.save_guest(GuestRecord(3, {51712: (0x2000000, 0x200)}))
    assert guest.load_guest() == GuestRecord(3, {51712: (0x2000000, 0x200)})
    assert saved_guests(str(tmp_path)) == [7]
    (tmp_path / "dom7" / "guest.json").write_text("{not json")
    assert guest.load_guest() is None  # damaged: nothing to adopt, never a crash
    guest.remove()
    assert saved_guests(str(tmp_path)) == []


def test_a_resumed_device_keeps_its_phase_and_restates_it() -> None:
    live = XenbusDevice()
    effects = live.handle(Resumed(connected=True))
    assert live.phase == Phase.CONNECTED
    assert WriteState(XenbusState.CONNECTED) in effects
    waiting = XenbusDevice()
    assert WriteState(XenbusState.INIT_WAIT) in waiting.handle(Resumed(connected=False))
    assert waiting.phase == Phase.INIT_WAIT
    assert waiting.handle(Resumed(connected=True)) == []  # only once, from DISCOVERED
