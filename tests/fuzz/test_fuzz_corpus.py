"""Every input of the fuzz corpus (and every crash the fuzzer found, kept there as a
regression case) runs through the fuzz target on every test run, without atheris."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.ring_target import one_input

CORPUS = Path(__file__).resolve().parent / "corpus"
CASES = sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []


def test_the_corpus_is_there() -> None:
    assert len(CASES) >= 20, "the fuzz corpus is missing (tests/fuzz/corpus)"


@pytest.mark.parametrize("case", CASES, ids=lambda path: path.name[:12])
def test_corpus_case(case: Path) -> None:
    one_input(case.read_bytes())


def test_the_target_notices_a_broken_invariant(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted fault: a device that keeps more in flight than the queue holds."""
    from virtio_diskd.backend.virtqueue import Virtqueue

    monkeypatch.setattr(Virtqueue, "in_flight", property(lambda self: self.size + 1))
    data = bytes([0, 2, 1]) + bytes(6)  # split ring of 8, one notify
    with pytest.raises(AssertionError, match="more in flight"):
        one_input(data)
