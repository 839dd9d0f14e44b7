"""The disk layer: targets and the I/O engine (threads and syscalls; no trio, no Xen)."""
