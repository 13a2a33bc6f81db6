"""HTTP/1.1 codec (sans-IO): request building, response heads, framing, chunked counting.

Bytes from the peer may be anything: every parser raises only `WireError` (hypothesis).
"""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from probe.wire import WireError
from probe.wire.http1 import (
    MAX_HEAD_BYTES,
    ChunkedDecoder,
    Framing,
    build_request,
    framing,
    head_end,
    parse_response_head,
)


def test_build_request_is_a_connection_close_get() -> None:
    assert build_request("GET", "/big.bin?x=1", "example.org:8443", user_agent="t") == (
        b"GET /big.bin?x=1 HTTP/1.1\r\nHost: example.org:8443\r\nUser-Agent: t\r\n"
        b"Accept: */*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
    )


def test_build_request_with_body_length() -> None:
    request = build_request("POST", "/up", "h", content_length=10)
    assert b"\r\nContent-Length: 10\r\n" in request
    assert request.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("method", "path", "host"),
    [
        ("GET", "/a\r\nX-Injected: 1", "h"),
        ("GET", "/a b", "h"),
        ("GET", "relative", "h"),
        ("GET", "/", "h\r\nX: 1"),
        ("GET", "/", ""),
        ("G ET", "/", "h"),
    ],
)
def test_build_request_refuses_header_injection(method: str, path: str, host: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        build_request(method, path, host)


def test_parse_response_head() -> None:
    head = parse_response_head(
        b"HTTP/1.1 206 Partial Content\r\nContent-Length: 12\r\nX-A:  b \r\nx-a: c\r\n\r\n"
    )
    assert (head.version, head.status, head.reason) == ("HTTP/1.1", 206, "Partial Content")
    assert head.get("content-length") == "12"
    assert head.values("x-a") == ["b", "c"]
    assert head.get("missing") is None


def test_status_line_without_reason() -> None:
    assert parse_response_head(b"HTTP/1.0 200\r\n\r\n").status == 200


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\r\n folded\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA: b\nc\r\n\r\n",
    ],
)
def test_malformed_heads_are_wire_errors(data: bytes) -> None:
    with pytest.raises(WireError):
        parse_response_head(data)


def test_head_end() -> None:
    assert head_end(b"HTTP/1.1 200 OK\r\n") is None
    assert head_end(b"HTTP/1.1 200 OK\r\n\r\nbody") == 19
    with pytest.raises(WireError, match="longer than"):
        head_end(b"a" * MAX_HEAD_BYTES)


def _head(fields: bytes, status: int = 200) -> bytes:
    return b"HTTP/1.1 %d X\r\n%b\r\n" % (status, fields)


@pytest.mark.parametrize(
    ("fields", "status", "method", "expected"),
    [
        (b"Content-Length: 42\r\n", 200, "GET", Framing("length", 42)),
        (b"Content-Length: 42\r\nContent-Length: 42\r\n", 200, "GET", Framing("length", 42)),
        (b"Content-Length: 42, 42\r\n", 200, "GET", Framing("length", 42)),
        (b"", 200, "GET", Framing("close")),
        (b"Transfer-Encoding: chunked\r\nContent-Length: 9\r\n", 200, "GET", Framing("chunked")),
        (b"Transfer-Encoding: gzip, chunked\r\n", 200, "GET", Framing("chunked")),
        (b"Transfer-Encoding: gzip\r\n", 200, "GET", Framing("close")),
        (b"Content-Length: 42\r\n", 204, "GET", Framing("length", 0)),
        (b"Content-Length: 42\r\n", 304, "GET", Framing("length", 0)),
        (b"Content-Length: 42\r\n", 200, "HEAD", Framing("length", 0)),
    ],
)
def test_framing(fields: bytes, status: int, method: str, expected: Framing) -> None:
    assert framing(parse_response_head(_head(fields, status)), request_method=method) == expected


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 1\r\nContent-Length: 2\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: x\r\n",
    ],
)
def test_bad_content_length_is_a_wire_error(fields: bytes) -> None:
    with pytest.raises(WireError):
        framing(parse_response_head(_head(fields)))


def _chunked(payload: bytes, sizes: list[int], trailers: bytes = b"") -> bytes:
    out = bytearray()
    pos = 0
    for size in sizes:
        piece = payload[pos : pos + size]
        if not piece:
            break
        out += b"%x;ext=1\r\n%b\r\n" % (len(piece), piece)
        pos += len(piece)
    if pos < len(payload):
        out += b"%X\r\n%b\r\n" % (len(payload) - pos, payload[pos:])
    return bytes(out + b"0\r\n" + trailers + b"\r\n")


def _feed_split(decoder: ChunkedDecoder, data: bytes, cuts: list[int]) -> int:
    total = 0
    last = 0
    for cut in [*sorted({c % (len(data) + 1) for c in cuts}), len(data)]:
        total += decoder.feed(data[last:cut])
        last = cut
    return total


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), max_size=10),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    trailers=st.sampled_from([b"", b"X-Checksum: abc\r\n"]),
)
def test_chunked_decoder_counts_payload_whatever_the_split(
    payload: bytes, sizes: list[int], cuts: list[int], trailers: bytes
) -> None:
    data = _chunked(payload, sizes, trailers)
    decoder = ChunkedDecoder()
    assert _feed_split(decoder, data + b"extra", cuts) == len(payload)
    assert decoder.done
    assert decoder.excess == len(b"extra")


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n",
        b"5\r\nabcdefg\r\n",  # data longer than its size
        b"5\nabcde\r\n",  # bare LF
        b"1" * 2000,  # endless size line
        b"0\r\n" + b"X: " + b"a" * 9000 + b"\r\n",  # endless trailer
    ],
)
def test_chunked_decoder_rejects_bad_framing(data: bytes) -> None:
    with pytest.raises(WireError):
        ChunkedDecoder().feed(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_head_bytes_raise_only_wire_error(data: bytes) -> None:
    try:
        end = head_end(data)
        head = parse_response_head(data[:end] if end else data)
        framing(head)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=600), max_size=8))
def test_arbitrary_chunked_bytes_raise_only_wire_error(pieces: list[bytes]) -> None:
    decoder = ChunkedDecoder()
    try:
        for piece in pieces:
            decoder.feed(piece)
    except WireError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="0123456789abcdefABCDEF\r\n;= xX:", max_size=400))
def test_chunked_framing_like_text_raises_only_wire_error(text: str) -> None:
    with contextlib.suppress(WireError):
        ChunkedDecoder().feed(text.encode())
