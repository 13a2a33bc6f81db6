"""HTTP/1.1 (RFC 9112), sans-IO, just what a bulk-transfer measurement needs.

Requests out (`build_request`), response heads in (`head_end`, `parse_response_head`),
body framing (`framing`) and an incremental chunked-body decoder that only *counts*
payload bytes (`ChunkedDecoder`): the transfer probe needs byte-exact progress, never
the body itself, so nothing here keeps more than a bounded line in memory.

Every parser raises only `WireError` on bytes from the peer (a censor's injected page,
a wrong service on the port, a giant header); `build_request` raises `ValueError` on
bad *local* input (a path or host that would let a config value inject header lines).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from . import WireError

__all__ = [
    "MAX_HEAD_BYTES",
    "ChunkedDecoder",
    "Framing",
    "ResponseHead",
    "build_request",
    "framing",
    "head_end",
    "parse_response_head",
]

MAX_HEAD_BYTES = 16 * 1024  # a status line plus headers larger than this is not a server we know
_MAX_CHUNK_LINE = 1024  # chunk-size line including extensions
_MAX_TRAILERS = 8 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: ([^\r\n]*))?")
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_SAFE_PATH = re.compile(r"/[!-~]*")  # origin-form: visible ASCII, no space, CR or LF
_SAFE_HOST = re.compile(r"[!-~]+")


def build_request(
    method: str,
    path: str,
    host: str,
    *,
    content_length: int | None = None,
    user_agent: str = "messenger-reachability-probe",
) -> bytes:
    """A ``Connection: close`` request head; the caller sends any body after it."""
    if not _TOKEN.fullmatch(method.encode("ascii", "replace")):
        raise ValueError(f"invalid HTTP method {method!r}")
    if not _SAFE_PATH.fullmatch(path):
        raise ValueError(f"invalid request path {path!r}: must start with '/', visible ASCII")
    if not _SAFE_HOST.fullmatch(host):
        raise ValueError(f"invalid Host {host!r}")
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {host}",
        f"User-Agent: {user_agent}",
        "Accept: */*",
        # identity: we count bytes as they travel; compression would change the size
        "Accept-Encoding: identity",
        "Connection: close",
    ]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
        lines.append("Content-Type: application/octet-stream")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def head_end(buffer: bytes) -> int | None:
    """Offset just past the blank line ending the head, None if more bytes are needed."""
    index = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
    if index >= 0:
        return index + 4
    if len(buffer) >= MAX_HEAD_BYTES:
        raise WireError(f"response head longer than {MAX_HEAD_BYTES} bytes")
    return None


@dataclass(frozen=True)
class ResponseHead:
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n == name]

    def get(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None


def parse_response_head(data: bytes) -> ResponseHead:
    """Parse a status line and header fields (the head, blank line optional at the end)."""
    if len(data) > MAX_HEAD_BYTES + 4:
        raise WireError("response head too long")
    lines = data.split(b"\r\n")
    while lines and lines[-1] == b"":
        lines.pop()
    if not lines:
        raise WireError("empty response head")
    match = _STATUS_LINE.fullmatch(lines[0])
    if match is None:
        raise WireError("not an HTTP/1.x status line")
    minor, code, reason = match.groups()
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise WireError("malformed header field")  # also rejects obs-fold (leading space)
        if b"\r" in value or b"\n" in value or b"\0" in value:
            raise WireError("control character in header value")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return ResponseHead(
        version=f"HTTP/1.{minor.decode()}",
        status=int(code),
        reason=(reason or b"").decode("latin-1"),
        headers=tuple(headers),
    )


@dataclass(frozen=True)
class Framing:
    """How the body ends: after ``length`` bytes, at the chunked terminator, or at EOF."""

    kind: Literal["length", "chunked", "close"]
    length: int | None = None


def framing(head: ResponseHead, *, request_method: str = "GET") -> Framing:
    """Body framing per RFC 9112 §6.3 (the subset a Connection: close client meets)."""
    if request_method == "HEAD" or head.status in (204, 304) or 100 <= head.status < 200:
        return Framing("length", 0)
    encodings = [
        e.strip().lower() for value in head.values("transfer-encoding") for e in value.split(",")
    ]
    encodings = [e for e in encodings if e]
    if encodings:
        # chunked must be last; anything else means "read until close" (§6.3 item 4)
        return Framing("chunked") if encodings[-1] == "chunked" else Framing("close")
    lengths = {v.strip() for value in head.values("content-length") for v in value.split(",")}
    if not lengths:
        return Framing("close")
    if len(lengths) > 1:
        raise WireError("conflicting Content-Length values")
    (length,) = lengths
    if not _DIGITS.fullmatch(length.encode("latin-1")):
        raise WireError("invalid Content-Length")
    return Framing("length", int(length))


class ChunkedDecoder:
    """Counts the payload bytes of a chunked body fed in arbitrary pieces.

    ``feed()`` returns how many payload bytes the piece carried; ``done`` turns true
    after the last chunk and its trailers.  Bytes after the end are ignored (counted
    in ``excess``).  Lines are bounded, so a peer cannot grow our memory.
    """

    def __init__(self) -> None:
        self._state: Literal["size", "data", "data_crlf", "trailer", "done"] = "size"
        self._line = bytearray()
        self._remaining = 0
        self._trailer_bytes = 0
        self.excess = 0

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, data: bytes) -> int:
        payload = 0
        view = memoryview(data)
        while view:
            if self._state == "done":
                self.excess += len(view)
                break
            if self._state == "data":
                take = min(self._remaining, len(view))
                payload += take
                self._remaining -= take
                view = view[take:]
                if self._remaining == 0:
                    self._state = "data_crlf"
                continue
            line, view = self._take_line(view)
            if line is not None:
                self._on_line(line)
        return payload

    def _take_line(self, view: memoryview) -> tuple[bytes | None, memoryview]:
        """Accumulate up to a LF; return the complete line (without CRLF) or None."""
        limit = _MAX_CHUNK_LINE if self._state != "trailer" else _MAX_TRAILERS
        window = bytes(view[: limit + 2])  # never scan (or copy) more than a legal line
        newline = window.find(b"\n")
        if newline < 0:
            if len(self._line) + len(window) > limit + 1:  # +1: the CR before the LF
                raise WireError("chunked framing line too long")
            self._line += window  # the whole view: it is shorter than limit + 2
            return None, view[len(view) :]
        self._line += window[:newline]
        if len(self._line) > limit + 1:
            raise WireError("chunked framing line too long")
        if not self._line.endswith(b"\r"):
            raise WireError("chunked framing line not terminated by CRLF")
        line = bytes(self._line[:-1])
        self._line.clear()
        return line, view[newline + 1 :]

    def _on_line(self, line: bytes) -> None:
        if self._state == "data_crlf":
            if line:
                raise WireError("chunk data longer than its size")
            self._state = "size"
        elif self._state == "size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size):
                raise WireError("invalid chunk size")
            self._remaining = int(size, 16)
            self._state = "data" if self._remaining else "trailer"
        else:  # trailer section: lines until an empty one
            self._trailer_bytes += len(line) + 2
            if self._trailer_bytes > _MAX_TRAILERS:
                raise WireError("chunked trailers too long")
            if not line:
                self._state = "done"
