"""Xen: the interface the daemon uses, its ctypes bindings, and the ioreq ABI."""
