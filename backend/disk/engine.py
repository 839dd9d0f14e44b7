"""The disk engine: block requests executed straight into guest memory.

Zero-copy: ``preadv``/``pwritev`` take the request's buffers, which are views
of mapped guest memory.  Reads are first tried inline with ``RWF_NOWAIT``
(≈1 µs when the data is in the page cache; fails at once when it is not);
whatever must wait goes to the device's I/O worker threads, which release the
GIL in the syscall, take every queued request at once and post their
completions back in one batch through an eventfd.  Writes, flushes, discards
and write-zeroes never run on the caller's thread, so the event loop never
blocks on the disk.

Durability:

* a FLUSH runs ``fdatasync`` only once every write submitted before it has
  completed (writes run in parallel workers, so this is tracked, not assumed);
* a write marked ``durable`` (writethrough mode, CONFIG_WCE) is written with
  ``RWF_DSYNC`` and completes only once on stable storage;
* short reads and writes are continued until done; a read that hits EOF
  (the target shrank) and any OSError (EIO, ENOSPC, EROFS …) fail that
  request alone with IOERR, logged with the device and sector.

O_DIRECT: aligned reads and writes go to the kernel in one ``io_submit`` per
batch (:mod:`.aio`, Linux native AIO; completions bump the same eventfd), so
the device sees the guest's queue depth without a thread wake-up per request.
Unaligned guest buffers go to the threads, which use an aligned bounce buffer
(and read-modify-write for unaligned offsets); so does anything AIO refuses.

This module uses threads and file descriptors but knows nothing of trio or
Xen: the runtime waits on :attr:`DiskEngine.completion_fd` and calls
:meth:`DiskEngine.take_completions`.
"""

from __future__ import annotations

import collections
import errno
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar, cast

import structlog

from virtio_diskd.backend.disk.aio import KernelAio, NotEligible
from virtio_diskd.backend.disk.engine_api import clear_signal, take_from
from virtio_diskd.backend.disk.flush_order import FlushOrder
from virtio_diskd.backend.disk.iovec import advance, copy, first
from virtio_diskd.backend.disk.request import DiskRequest, IoKind, IoStatus
from virtio_diskd.backend.disk.target import (
    BLKDISCARD,
    BLKZEROOUT,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    DiskTarget,
    fallocate,
)

log = structlog.get_logger("virtio_diskd.disk")

_STOP = object()
#: Requests one worker takes from the queue at once (page-cache targets: one wake-up
#: and one completion post per batch).  O_DIRECT targets take one at a time: each
#: request waits on the device, so parallel workers — the queue depth the device
#: sees — matter more than fewer posts.
WORKER_BATCH = 64
ZERO_CHUNK = 1 << 20
#: Transfers one device may have in the kernel's AIO context at once.
AIO_DEPTH = 256
#: The most one system call moves for a request.  Larger requests are done in pieces
#: with a look at ``request.cancelled`` between them, so a cancelled request stops
#: within one piece; only requests up to this size go to native AIO (which cannot
#: be stopped once submitted).
TRANSFER_CHUNK = 1 << 20
_RWF_DSYNC = os.RWF_DSYNC
#: O_DIRECT bounce buffers (for guest buffers the kernel refuses unaligned): a fixed
#: budget per device, never sized by the request; larger transfers go through in pieces.
BOUNCE_BUFFERS = 2
BOUNCE_SIZE = 1 << 20


class Cancelled(Exception):
    """The request was cancelled between two pieces of its transfer."""


class DiskIo:
    """The system calls the engine makes; tests subclass it to inject faults."""

    def preadv(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        return os.preadv(fd, buffers, offset, flags)

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int, flags: int = 0) -> int:
        return os.pwritev(fd, buffers, offset, flags)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fallocate(self, fd: int, mode: int, offset: int, length: int) -> None:
        fallocate(fd, mode, offset, length)

    def block_range_ioctl(self, fd: int, request: int, offset: int, length: int) -> None:
        import fcntl

        fcntl.ioctl(fd, request, struct.pack("QQ", offset, length))


RequestT = TypeVar("RequestT", bound=DiskRequest)


class _BouncePool:
    """A fixed number of aligned bounce buffers, made on first use; ``get`` waits for a
    free one, so O_DIRECT fallbacks cost at most ``count × size`` per device."""

    def __init__(self, count: int, size: int) -> None:
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._made = 0
        self.count, self.size = count, size

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._free.empty() and self._made < self.count:
                self._made += 1
                return mmap.mmap(-1, self.size)
        return self._free.get()

    def put(self, buffer: mmap.mmap) -> None:
        self._free.put(buffer)


class DiskEngine(Generic[RequestT]):
    """Executes :class:`DiskRequest` objects (or a subclass's, ``RequestT``: the engine hands
    back the very objects it was given) for one device's target."""

    def __init__(self, target: DiskTarget, *, name: str = "", workers: int = 4,
                 io: DiskIo | None = None, inline_reads: bool = True,
                 use_aio: bool = True,
                 on_error: Callable[[RequestT, OSError], None] | None = None) -> None:
        self.target = target
        self.fd = target.fd
        self.name = name or target.path
        self.io = io or DiskIo()
        # The real syscalls, not a DiskIo subclass injecting faults: the inline read
        # calls os.preadv directly and native AIO may be used.
        self._plain_io = type(self.io) is DiskIo
        self.inline_reads = inline_reads and not target.direct
        # Inline reads ask RWF_NOWAIT to fail rather than wait for the device; a file on
        # tmpfs or ramfs has no device to wait for (its pages are memory, like our own)
        # and those file systems refuse the flag, so they are read inline without it
        self._inline_flags = 0 if target.memory_backed and self._plain_io else os.RWF_NOWAIT
        # ... and written inline: no writeback to throttle on, nothing to wait for
        self._inline_writes = (target.memory_backed and self._plain_io
                               and not target.read_only)
        self._batch_limit = 1 if target.direct else WORKER_BATCH
        self.on_error = on_error
        self.completion_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._done: collections.deque[RequestT] = collections.deque()
        self._lock = threading.Lock()
        self._flushes: FlushOrder[RequestT] = FlushOrder()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)
        self._closed = False
        self._threads = [threading.Thread(target=self._worker, name=f"vd-io-{self.name}-{i}",
                                          daemon=True) for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()
        self.inline_hits = 0
        self.offloaded = 0
        self.aio_submitted = 0
        self._aio: KernelAio | None = None
        if use_aio and target.direct and self._plain_io:
            self._aio = KernelAio.open(self.fd, self.completion_fd, AIO_DEPTH,
                                       max(target.logical_block_size, 512))
        self._aio_requests: dict[int, RequestT] = {}
        self._aio_lock = threading.Lock()  # reaping: the event loop, or wait_idle
        self._bounces = _BouncePool(BOUNCE_BUFFERS, BOUNCE_SIZE)
        self._next_token = 1

    # -- submission (caller's thread) ----------------------------------------------

    def submit(self, requests: list[RequestT]) -> list[RequestT]:
        """Start ``requests``; returns those already finished (inline reads, and writes
        to a file in memory)."""
        finished: list[RequestT] = []
        if self._aio is not None:
            requests = self._submit_aio(requests)
        fd, plain, inline_flags = self.fd, self._plain_io, self._inline_flags
        for request in requests:
            # inline only what takes the event loop a moment: a larger read goes to the
            # workers in pieces (cancellable; the loop stays free for traps and xenstore)
            if (request.kind == IoKind.READ and self.inline_reads
                    and request.length <= TRANSFER_CHUNK):
                try:
                    if plain:  # the common case, without the layers fault injection needs
                        if os.preadv(fd, request.buffers, request.offset,
                                     inline_flags) != request.length:
                            raise BlockingIOError  # partly cached or at the end: a worker
                    else:
                        self._read(request, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass  # not cached: a worker will do it
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                        self._fail(request, exc)
                        finished.append(request)
                        continue
                    # RWF_NOWAIT is not supported on this target (tmpfs, some network
                    # filesystems): stop trying it and let the workers read.
                    self.inline_reads = False
                else:
                    self.inline_hits += 1
                    request.status = IoStatus.OK
                    finished.append(request)
                    continue
            elif (request.kind == IoKind.WRITE and self._inline_writes
                    and request.length <= TRANSFER_CHUNK):
                try:
                    done = os.pwritev(fd, request.buffers, request.offset,
                                      os.RWF_DSYNC if request.durable else 0)
                except OSError as exc:  # ENOSPC: the file system is full
                    self._fail(request, exc)
                    finished.append(request)
                    continue
                if done == request.length:
                    self.inline_hits += 1
                    request.status = IoStatus.OK
                    finished.append(request)
                    continue
                # short: a worker writes it whole again (the same bytes: harmless)
            self._enqueue(request)
        return finished

    def _submit_aio(self, requests: list[RequestT]) -> list[RequestT]:
        """Send the aligned reads and writes to the AIO context; returns the rest."""
        aio = self._aio
        assert aio is not None
        rest: list[RequestT] = []
        slots = []
        chosen: list[RequestT] = []
        writes = False
        prepare, by_token, token = aio.prepare, self._aio_requests, self._next_token
        for request in requests:
            kind = request.kind
            if ((kind is not IoKind.READ and kind is not IoKind.WRITE)
                    or request.length > TRANSFER_CHUNK):
                rest.append(request)  # AIO cannot be stopped: large ones go in pieces
                continue
            write = kind is IoKind.WRITE
            try:
                slot = prepare(token, write, request.buffers, request.offset,
                               request.length, _RWF_DSYNC if request.durable else 0)
            except NotEligible:
                rest.append(request)
                continue
            writes |= write
            slots.append(slot)
            chosen.append(request)
            by_token[token] = request
            token += 1
        self._next_token = token
        if not slots:
            return rest
        with self._lock:  # counted before the kernel can finish them
            self._in_flight += len(chosen)
            if writes:
                for request in chosen:
                    if request.kind is IoKind.WRITE:
                        self._flushes.write_started(request)
        try:
            taken = aio.submit(slots)
        except OSError as exc:
            log.warning("disk.aio_refused", device=self.name, error=str(exc))
            taken = 0
        self.aio_submitted += taken
        for slot, request in zip(slots[taken:], chosen[taken:], strict=True):
            del self._aio_requests[slot.token]
            self._requeue(request)  # the context is full or refused it: the threads do it
        return rest

    def _requeue(self, request: RequestT) -> None:
        """A request already counted in flight goes to the worker threads."""
        self.offloaded += 1
        self._queue.put(request)

    def _reap_aio(self, wait: float = 0.0, limit: int = 0) -> None:
        """Collect AIO completions (at most ``limit``; 0: all) into the done list (and
        retire them)."""
        aio = self._aio
        if aio is None or not aio.in_flight:
            return
        finished: list[RequestT] = []
        by_token = self._aio_requests
        with self._aio_lock:
            for token, result in aio.reap(wait, limit):
                request = by_token.pop(token)
                if result == request.length:
                    request.status = IoStatus.OK
                    finished.append(request)
                elif result < 0 and -result not in (errno.EINVAL, errno.EAGAIN):
                    self._fail(request, OSError(-result, os.strerror(-result)))
                    finished.append(request)
                else:
                    # short, or refused at run time: the threads continue or bounce it
                    # (a read or write of the same bytes again is harmless)
                    self._requeue(request)
        if finished:
            self._retire(finished, signal=False)

    def _enqueue(self, request: RequestT) -> None:
        with self._lock:
            self._in_flight += 1
            if request.kind == IoKind.FLUSH:
                if not self._flushes.may_go(request):
                    return
            elif request.kind != IoKind.READ:
                self._flushes.write_started(request)
        self.offloaded += 1
        self._queue.put(request)

    def take_completions(self, limit: int = 0) -> list[RequestT]:
        """Requests finished since the last call, at most ``limit`` (0: all).

        Why a limit: a consumer that turns each completion into new work at once (as fio
        does) keeps the device busy while it handles the rest; taking all 32 of a batch
        first leaves the device idle for the whole batch's handling.

        The eventfd: a take of all clears it first, then collects everything, so a
        consumer may wait on it right after.  A take of ``limit`` clears it only when it
        finds fewer than ``limit`` (at its end): until then more may be waiting, and
        the consumer looks at :attr:`has_completions` before it waits anyway — a
        completion signalled and cleared meanwhile shows there.  That saves a system
        call per take; the cost is at most one wake-up that finds nothing."""
        if limit <= 0:
            clear_signal(self.completion_fd)
            self._reap_aio()
        elif len(self._done) < limit:
            self._reap_aio(limit=limit - len(self._done))
        done = take_from(self._done, limit)
        if len(done) < limit:  # a take of ``limit`` that found fewer: nothing is left
            clear_signal(self.completion_fd)
        return done

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def has_completions(self) -> bool:
        """Finished requests are waiting (no syscall: for polling)."""
        return bool(self._done) or (self._aio is not None and self._aio.has_events)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is in flight (for shutdown paths); AIO completions
        are collected here too and wait in the done list."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._reap_aio(wait=0.01)
            with self._idle:
                if self._in_flight == 0:
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                aio_busy = self._aio is not None and self._aio.in_flight
                self._idle.wait(0.01 if aio_busy else left)

    #: Completed writes are in the kernel's page cache, which outlives this process.
    sync_before_detach = False

    def sync(self) -> None:
        """Make every completed write stable (an operator's pause)."""
        os.fsync(self.fd)

    def close(self, *, detach: bool = False) -> None:
        """Stop the workers (after what is queued) and release the eventfd (``detach``
        changes nothing here: the file needs no server)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)
        for thread in self._threads:
            thread.join()
        if self._aio is not None:
            self._aio.close()  # waits for transfers the kernel still runs
            self._aio = None
        os.close(self.completion_fd)

    def check_resize(self) -> int | None:
        """The target's size if it changed since the last look, else None."""
        size = self.target.current_size()
        if size == self.target.size:
            return None
        self.target.size = size
        return size

    # -- workers ---------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._batch_limit:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)  # leave it for this or another worker
                    break
                batch.append(item)
            for item in batch:
                self._execute(cast(RequestT, item))
            self._retire(batch, signal=True)  # type: ignore[arg-type]

    def _retire(self, batch: list[RequestT], *, signal: bool) -> None:
        """Finished requests to the done list; flushes whose writes are all done are
        released to the workers; ``signal`` bumps the eventfd (AIO's own did)."""
        with self._lock:
            self._done.extend(batch)
            self._in_flight -= len(batch)
            for request in batch:
                kind = request.kind
                if kind is not IoKind.READ and kind is not IoKind.FLUSH:
                    self._flushes.write_done(request)
            released = self._flushes.released()  # every earlier write is done: sync now
            if self._in_flight == 0:
                self._idle.notify_all()
        for flush in released:
            self._queue.put(flush)
        if signal:
            os.eventfd_write(self.completion_fd, 1)

    def _execute(self, request: RequestT) -> None:
        if request.cancelled:
            request.status = IoStatus.IO_ERROR
            return
        try:
            kind = request.kind
            if kind == IoKind.READ:
                self._read(request, 0)
            elif kind == IoKind.WRITE:
                self._write(request)
            elif kind == IoKind.FLUSH:
                self.io.fdatasync(self.fd)
            elif kind == IoKind.DISCARD:
                for offset, length, _unmap in request.ranges:
                    self._discard(offset, length)
            elif kind == IoKind.WRITE_ZEROES:
                for offset, length, unmap in request.ranges:
                    self._write_zeroes(offset, length, unmap, request)
            else:
                request.status = IoStatus.UNSUPPORTED
                return
            request.status = IoStatus.OK
        except Cancelled:
            request.status = IoStatus.IO_ERROR
        except OSError as exc:
            self._fail(request, exc)
        except Exception as exc:
            # no memory for a bounce buffer, a view that went away …: this request
            # fails, and the worker thread lives on to complete the others
            request.status = IoStatus.IO_ERROR
            log.exception("disk.internal_error", device=self.name, op=request.kind.name,
                      sector=request.offset // 512, error=repr(exc))

    def _fail(self, request: RequestT, exc: OSError) -> None:
        request.status = IoStatus.IO_ERROR
        log.error("disk.io_error", device=self.name, op=request.kind.name,
                  sector=request.offset // 512, length=request.length,
                  errno=errno.errorcode.get(exc.errno or 0, str(exc.errno)), error=exc.strerror)
        if self.on_error is not None:
            self.on_error(request, exc)

    # -- operations -----------------------------------------------------------------------

    def _transfer(self, op: Callable[[int, list[memoryview], int, int], int],
                  buffers: list[memoryview], offset: int, length: int, flags: int,
                  request: DiskRequest | None = None) -> None:
        """``preadv``/``pwritev`` until every byte moved, at most ``TRANSFER_CHUNK`` per
        call (``request.cancelled`` is looked at before each); short transfers are
        continued; one that moves nothing (a read at the end of a shrunk target) is EIO."""
        while length:
            if request is not None and request.cancelled:
                raise Cancelled
            piece = buffers if length <= TRANSFER_CHUNK else first(buffers, TRANSFER_CHUNK)
            count = op(self.fd, piece, offset, flags)
            if count == 0:
                raise OSError(errno.EIO, "transfer beyond the end of the target")
            length -= count
            offset += count
            if length:
                buffers = advance(buffers, count)

    def _read(self, request: RequestT, flags: int) -> None:
        try:
            self._transfer(self.io.preadv, request.buffers, request.offset, request.length,
                           flags, request)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.target.direct and not flags:
                self._bounce(request, write=False, flags=0)
                return
            raise

    def _write(self, request: RequestT) -> None:
        flags = os.RWF_DSYNC if request.durable else 0
        try:
            self._transfer(self.io.pwritev, request.buffers, request.offset, request.length,
                           flags, request)
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.target.direct:
                self._bounce(request, write=True, flags=flags)
                return
            raise

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        block = max(self.target.logical_block_size, 512)
        start = offset // block * block
        end = (offset + length + block - 1) // block * block
        return start, end - start

    def _bounce(self, request: RequestT, *, write: bool, flags: int) -> None:
        """O_DIRECT through an aligned bounce buffer from the device's fixed budget, one
        window of at most ``BOUNCE_SIZE`` at a time (read-modify-write at unaligned
        edges of a write)."""
        block = max(self.target.logical_block_size, 512)
        offset, end = request.offset, request.offset + request.length
        bounce = self._bounces.get()
        view = memoryview(bounce)
        try:
            stream = 0  # position in the request's buffers
            window = offset // block * block
            while window < end:
                if request.cancelled:
                    raise Cancelled
                span = min(BOUNCE_SIZE, (end - window + block - 1) // block * block)
                inside = view[:span]
                lo, hi = max(offset, window), min(end, window + span)
                if write:
                    if lo != window or hi != window + span:  # edges: keep the other bytes
                        self._transfer(self.io.preadv, [inside], window, span, 0)
                    copy(request.buffers, stream, inside[lo - window : hi - window],
                          to_buffers=False)
                    self._transfer(self.io.pwritev, [inside], window, span, flags)
                else:
                    self._transfer(self.io.preadv, [inside], window, span, 0)
                    copy(request.buffers, stream, inside[lo - window : hi - window],
                          to_buffers=True)
                inside.release()
                stream += hi - lo
                window += span
        finally:
            view.release()
            self._bounces.put(bounce)

    def _discard(self, offset: int, length: int) -> None:
        if self.target.is_block:
            self.io.block_range_ioctl(self.fd, BLKDISCARD, offset, length)
        else:
            self.io.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def _write_zeroes(self, offset: int, length: int, unmap: bool,
                      request: RequestT) -> None:
        caps = self.target.capabilities
        if self.target.is_block:
            self.io.block_range_ioctl(self.fd, BLKZEROOUT, offset, length)
        elif unmap and caps.punch_hole:
            self.io.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        elif caps.zero_range:
            self.io.fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        elif caps.punch_hole:
            self.io.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        else:
            zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
            pos = offset
            while pos < offset + length:
                if request.cancelled:
                    raise Cancelled
                chunk = zeros[: min(len(zeros), offset + length - pos)]
                pos += self.io.pwritev(self.fd, [chunk], pos, 0)
