"""A reply's body inflated from gzip or deflate as it comes, chunk by chunk, to a bound."""

from __future__ import annotations

import zlib

# The encodings inflated. A gzip body may hold several members, one after another (RFC 1952:
# a server that compresses each piece of a streamed reply on its own), and is all of them.
GZIP = frozenset({"gzip", "x-gzip"})
INFLATED = GZIP | {"deflate"}


class Inflater:
    """Inflates one body in ``encoding`` (one of INFLATED). Bytes after its end (after the
    last gzip member: what is not one) are ignored, as other clients ignore them."""

    def __init__(self, encoding: str) -> None:
        self.encoding = encoding
        self._stream: zlib._Decompress | None = None   # the member being inflated
        self._members = 0   # members inflated whole
        self._after = b""   # what follows the last, while too short to tell if it is another
        self._over = False  # its end was reached: the rest is ignored

    @property
    def ended(self) -> bool:
        """Whether what was fed ends where its encoding says the body ends (or was none): a
        stream cut short (a server that never closed its compressor, a proxy that cut the
        body and fixed its length) inflates to a start that may read as a whole reply."""
        return self._stream is None

    def feed(self, data: bytes, room: int) -> bytes:
        """``data`` inflated, at most ``room`` bytes of it (> 0: a small body may inflate to
        gigabytes; what is not inflated of ``data`` is dropped). Raises zlib.error for a body
        that does not start as its encoding says."""
        out: list[bytes] = []
        while data and room > 0 and not self._over:
            if self._stream is None and self._members:
                # Another member only if it starts as one: a newline or a NUL after the last
                # is no member cut short (zlib takes a byte for the start of a header).
                data, self._after = self._after + data, b""
                if len(data) < len(_MAGIC):
                    self._after = data
                    break
                if not data.startswith(_MAGIC):
                    self._over = True
                    break
                self._stream = zlib.decompressobj(_GZIP_ONLY)
            elif self._stream is None:
                # 47: a gzip or zlib header; deflate without one is raw (some servers').
                raw = self.encoding == "deflate" and data[0] & 0x0F != 8
                self._stream = zlib.decompressobj(-15 if raw else 47)
            try:
                part = self._stream.decompress(data, room)
            except zlib.error:
                if not self._members:
                    raise
                self._stream, self._over = None, True   # after the last member: ignored
                break
            out.append(part)
            room -= len(part)
            if not self._stream.eof:
                break   # all of ``data`` taken, or ``room`` filled
            self._members += 1
            data, self._stream = self._stream.unused_data, None
            self._over = self.encoding not in GZIP   # a deflate body is one stream
        return b"".join(out)


_MAGIC = b"\x1f\x8b"   # how a gzip member starts
_GZIP_ONLY = 16 + zlib.MAX_WBITS
