"""The operator's storage choices: which targets are image files of which format, which
are served from an NBD export.  Never the image's content or the guest's say.

Configuration lines (``/etc/virtio-diskd.conf``):

* ``image_format = GLOB FORMAT`` — targets whose path matches ``GLOB`` (fnmatch, on
  the path ``params`` gives and on its real path) are ``qcow2`` or ``vhd`` images
  (``raw`` to say so explicitly); the first matching rule wins; a target no rule
  names is raw.  libxl insists on ``format=raw`` for virtio disks, so the format
  cannot come from the ``xl`` disk line — and guessing it from the image would let
  a guest that writes a qcow2 header into its raw disk reach host files through a
  backing-file name (QEMU's CVE-2008-2004).
* ``nbd_export = PATH URI`` — the device whose ``params`` is ``PATH`` is served by
  the NBD export at ``URI`` (in Dom0, libxl wants ``PATH`` to exist: a placeholder
  file or the device node).
* ``allow_nbd_uris = yes`` — ``params`` may itself be an NBD URI (a driver
  domain's devices, where libxl does not check the target).

Light on imports: the supervisor reads these without loading any engine.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass

from virtio_diskd.backend.disk.nbd_uri import BadNbdUri, parse_nbd_uri

#: Formats served through QEMU, by the name operators write; the value is QEMU's driver.
FORMATS = {"qcow2": "qcow2", "vhd": "vpc", "vpc": "vpc", "raw": "raw"}
#: Formats whose discard really frees space (QEMU's vpc driver has no discard).
DISCARD_FREES = {"qcow2": True, "vpc": False, "raw": True}


class StorageRuleError(ValueError):
    """A configuration line for storage cannot be used (the daemon refuses to start:
    serving a qcow2 image as raw would hand the guest its metadata)."""


@dataclass(frozen=True)
class StorageRules:
    """The operator's storage choices (see the module docstring)."""

    formats: tuple[tuple[str, str], ...] = ()  # (glob, format)
    nbd_exports: tuple[tuple[str, str], ...] = ()  # (params path, URI)
    nbd_uris: bool = False

    @staticmethod
    def format_rule(value: str) -> tuple[str, str]:
        """``GLOB FORMAT`` from a configuration line, checked."""
        glob, _, fmt = value.strip().rpartition(" ")
        glob, fmt = glob.strip(), fmt.strip().lower()
        if not glob.startswith("/") or fmt not in FORMATS:
            raise StorageRuleError(f"image_format = {value!r}: want 'GLOB FORMAT' with an "
                                   f"absolute GLOB and FORMAT one of {', '.join(FORMATS)}")
        return glob, fmt

    @staticmethod
    def export_rule(value: str) -> tuple[str, str]:
        """``PATH URI`` from a configuration line, checked."""
        path, _, uri = value.strip().partition(" ")
        uri = uri.strip()
        if not path.startswith("/"):
            raise StorageRuleError(f"nbd_export = {value!r}: want 'PATH URI'")
        try:
            parse_nbd_uri(uri)
        except BadNbdUri as exc:
            raise StorageRuleError(f"nbd_export = {value!r}: {exc}") from exc
        return os.path.normpath(path), uri

    def format_for(self, *paths: str) -> str:
        for glob, fmt in self.formats:
            if any(fnmatch.fnmatchcase(path, glob) for path in paths):
                return fmt
        return "raw"

    def export_for(self, path: str) -> str | None:
        normal = os.path.normpath(path)
        for rule_path, uri in self.nbd_exports:
            if rule_path == normal:
                return uri
        return None

    def describe(self) -> str:
        parts = [f"{glob} as {fmt}" for glob, fmt in self.formats]
        parts += [f"{path} from {uri}" for path, uri in self.nbd_exports]
        if self.nbd_uris:
            parts.append("NBD URIs in params")
        return "; ".join(parts) or "raw files and block devices only"
