"""NBD export addresses: the URIs operators write (the NBD URI standard, as libnbd and
QEMU read them), checked strictly because they come from configuration or ``params``.

* ``nbd://HOST[:PORT][/EXPORT]`` — TCP, port 10809 by default;
* ``nbd+unix:///[EXPORT]?socket=PATH`` — a Unix socket (an absolute path).

TLS (``nbds``, ``nbds+unix``) is refused with a clear error: it is not implemented,
and silently speaking plain text to a server the operator meant to reach over TLS
would be worse.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from virtio_diskd.backend.errors import VirtioDiskdError

DEFAULT_PORT = 10809


class BadNbdUri(VirtioDiskdError, ValueError):
    """The URI is not one virtio-diskd can serve; the reason is for operators."""


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a Unix socket path or a host and port, and its name."""

    export: str
    socket_path: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def describe(self) -> str:
        where = (f"unix:{self.socket_path}" if self.socket_path
                 else f"{self.host}:{self.port}")
        return f"nbd {where} export {self.export!r}"


def looks_like_nbd_uri(text: str) -> bool:
    return text.split(":", 1)[0].lower() in ("nbd", "nbd+unix", "nbds", "nbds+unix")


def parse_nbd_uri(text: str) -> NbdAddress:
    """The address ``text`` names, or :class:`BadNbdUri` saying what is wrong."""
    if len(text) > 4096 or any(ord(c) < 0x20 for c in text):
        raise BadNbdUri("NBD URI too long or with control characters")
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise BadNbdUri(f"{text}: NBD over TLS is not supported")
    if parts.fragment:
        raise BadNbdUri(f"{text}: a fragment has no meaning here")
    export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if len(export.encode()) > 4096 or "\0" in export:
        raise BadNbdUri(f"{text}: export name not valid")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    if scheme == "nbd+unix":
        if parts.netloc:
            raise BadNbdUri(f"{text}: nbd+unix takes no host (nbd+unix:///EXPORT?socket=PATH)")
        sockets = query.pop("socket", [])
        if len(sockets) != 1 or not sockets[0].startswith("/"):
            raise BadNbdUri(f"{text}: needs one socket=ABSOLUTE_PATH")
        if query:
            raise BadNbdUri(f"{text}: unknown parameters {sorted(query)}")
        return NbdAddress(export=export, socket_path=sockets[0])
    if scheme == "nbd":
        if query:
            raise BadNbdUri(f"{text}: unknown parameters {sorted(query)}")
        if parts.username or parts.password:
            raise BadNbdUri(f"{text}: user names are not supported")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError as exc:
            raise BadNbdUri(f"{text}: bad port") from exc
        if not parts.hostname:
            raise BadNbdUri(f"{text}: no host")
        return NbdAddress(export=export, host=parts.hostname, port=port)
    raise BadNbdUri(f"{text}: not an NBD URI (nbd:// or nbd+unix://)")
