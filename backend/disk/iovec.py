"""Scatter-gather lists of guest memory: the iovecs both disk engines move data with.

A request's buffers are views of mapped guest memory, a page or an element each;
these cut them, skip into them and copy to or from them without joining them
into one buffer (which would be a copy of the request).  Slices made here hold
exports of the guest mappings: callers drop them before the request completes.
"""

from __future__ import annotations


def advance(buffers: list[memoryview], count: int) -> list[memoryview]:
    """``buffers`` without their first ``count`` bytes (after a short transfer, or
    what an earlier piece took)."""
    out = []
    for buf in buffers:
        if count >= len(buf):
            count -= len(buf)
            continue
        out.append(buf[count:] if count else buf)
        count = 0
    return out


def first(buffers: list[memoryview], count: int) -> list[memoryview]:
    """The first ``count`` bytes of ``buffers`` (one piece of a large transfer)."""
    out = []
    for buf in buffers:
        if count <= 0:
            break
        out.append(buf if len(buf) <= count else buf[:count])
        count -= len(buf)
    return out


def copy(buffers: list[memoryview], stream: int, data: memoryview, *,
          to_buffers: bool) -> None:
    """Copy between ``data`` and the bytes of ``buffers`` from ``stream`` on."""
    done = 0
    for buf in buffers:
        if stream >= len(buf):
            stream -= len(buf)
            continue
        take = min(len(buf) - stream, len(data) - done)
        if to_buffers:
            buf[stream : stream + take] = data[done : done + take]
        else:
            data[done : done + take] = buf[stream : stream + take]
        done += take
        stream = 0
        if done == len(data):
            return
