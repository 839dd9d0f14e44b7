"""The simulated Xen host: xenstored, toolstack, hypervisor and a Linux-like guest.

It ships in the package so that integrators can test a set-up without Xen
hardware; the daemon talks to it through the same interfaces it uses on Xen.
"""
