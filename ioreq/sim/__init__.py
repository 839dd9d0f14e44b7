"""The simulated Xen host: xenstored, toolstack, hypervisor and a Linux-like guest.

It ships in the package so that integrators can test a set-up without Xen
hardware, but it is a guest in the house, not a room of it: only tests and the
tools (``daemon/tools/``) import it, never the daemon, the rest of ``ioreq/`` or
``backend/``.  The daemon reaches it only through
:mod:`virtio_diskd.ioreq.xen.simulated`, a second implementation of the same
libxen* interface, over a socket.  The simulated guest driver carries its own
copy of the virtio rules (:mod:`.virtio_spec`) and imports nothing of the
device it checks (``tests/test_layout.py`` enforces all of this).
"""
