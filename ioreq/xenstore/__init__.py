"""xenstore: the wire protocol and the daemon's trio client."""
