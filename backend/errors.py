"""The one root of every error virtio-diskd raises on purpose.

Each layer keeps its own, precise error (a ring violation, a guest address
outside RAM, a refused target, a failed hypercall, a xenstore error …), and
each derives from :class:`VirtioDiskdError`, so a caller that must survive
anything the package reports — a device task failing one device, never the
worker — can say so in one ``except``.  Errors that are also OS errors keep
``OSError`` (or ``ValueError``, ``ConnectionError``) as a second base so that
``errno`` matching keeps working.

It lives in ``backend/``, the bottom layer, because every layer may import
downwards only.
"""

from __future__ import annotations


class VirtioDiskdError(Exception):
    """Root of the package's errors (see the module docstring)."""
