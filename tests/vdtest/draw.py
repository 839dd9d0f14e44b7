"""Decoding one hypothesis byte string into a hostile guest's choices.

Cheap to generate and shrinks well: each test reads bytes off the string as it
needs them; past its end every byte reads as 0.
"""

from __future__ import annotations


class Draw:
    def __init__(self, blob: bytes) -> None:
        self.blob, self.pos = blob, 0

    def byte(self) -> int:
        value = self.blob[self.pos] if self.pos < len(self.blob) else 0
        self.pos += 1
        return value

    def uint(self, size: int) -> int:
        return int.from_bytes(bytes(self.byte() for _ in range(size)), "little")
